"""One small training loop shared by sft, nsft, dpo and reward.

An algorithm is an :class:`Objective`: named loss terms with weights, a way to count each term's
normaliser from a batch without a forward pass (tokens for SFT, pairs for DPO), and a forward that
returns each term's *sum*. The loop normalises every term by its count over the whole optimizer
step, so gradient accumulation is exact: 8 micro-batches of 1 give the same update as 1 batch of 8.

The loop knows nothing of Ray or DeepSpeed: an :class:`Engine` does backward/step (plain torch here,
DeepSpeed in ``ray_glue/deepspeed.py``) and :class:`Hooks` receive metrics and checkpoints (printing
here, ``ray.train.report`` in ``ray_glue/train.py``).
"""

from __future__ import annotations

import csv
import itertools
import json
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from nsft_ray.config import OptimConfig

__all__ = [
    "Objective",
    "samples_in",
    "Engine",
    "TorchEngine",
    "Hooks",
    "TrainState",
    "fit",
    "make_optimizer",
    "make_scheduler",
    "lr_lambda",
    "peak_memory_bytes",
    "current_memory_bytes",
    "MetricsWriter",
    "read_metrics",
]

Batch = dict[str, Any]


@dataclass
class Objective:
    """What an algorithm optimises: ``L = sum_k weights[k] * sum_k(step) / count_k(step)``."""

    weights: dict[str, float]
    count: Callable[[Batch], dict[str, float]]  # term -> normaliser in this micro-batch
    forward: Callable[[nn.Module, Batch], tuple[dict[str, Tensor], dict[str, float]]]
    # forward returns (term -> summed loss over the micro-batch, extra metrics summed likewise)


class Engine(Protocol):
    model: nn.Module

    def backward(self, loss: Tensor) -> None: ...
    def step(self) -> float | None: ...  # optimizer + scheduler step; returns the grad norm
    def lr(self) -> float: ...
    def module(self) -> nn.Module: ...  # the bare model (no DDP/DeepSpeed wrapper)
    def save(self, path: Path, client_state: dict) -> None: ...
    def load(self, path: Path) -> dict: ...


class TorchEngine:
    """Plain torch: AdamW, clipping, LR schedule. Also used under DDP (model wrapped by Ray)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                 scheduler: torch.optim.lr_scheduler.LRScheduler, max_grad_norm: float):
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.max_grad_norm = max_grad_norm

    def backward(self, loss: Tensor) -> None:
        loss.backward()

    def step(self) -> float | None:
        norm = None
        if self.max_grad_norm > 0:
            norm = float(nn.utils.clip_grad_norm_(self.model.parameters(), self.max_grad_norm))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def module(self) -> nn.Module:
        return getattr(self.model, "module", self.model)  # unwrap DDP

    def save(self, path: Path, client_state: dict) -> None:
        path.mkdir(parents=True, exist_ok=True)
        torch.save({"model": self.module().state_dict(), "optimizer": self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict(), "client_state": client_state},
                   path / "torch_state.pt")

    def load(self, path: Path) -> dict:
        state = torch.load(path / "torch_state.pt", map_location="cpu", weights_only=False)
        self.module().load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        return state["client_state"]


def make_optimizer(model: nn.Module, optim: OptimConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=optim.lr, betas=(optim.beta1, optim.beta2),
                             eps=optim.eps, weight_decay=optim.weight_decay)


def lr_lambda(optim: OptimConfig, total_steps: int) -> Callable[[int], float]:
    """Multiplier of the base LR at optimizer step s: linear warmup, then cosine or constant."""
    warmup = int(round(optim.warmup_ratio * total_steps))

    def fn(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if optim.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
        return optim.min_lr_ratio + (1.0 - optim.min_lr_ratio) * cosine

    return fn


def make_scheduler(optimizer: torch.optim.Optimizer, optim: OptimConfig,
                   total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(optim, total_steps))


@dataclass
class TrainState:
    """Everything besides model/optimizer/scheduler that a resumed run must restore."""

    step: int = 0  # optimizer steps done
    epoch: int = 0
    micro_in_epoch: int = 0  # micro-batches consumed in the current epoch (data position)
    samples: int = 0
    tokens: int = 0

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class Hooks:
    """Where the loop reports. Defaults print; Ray Train's glue reports to the cluster."""

    log: Callable[[dict[str, float]], None] = lambda m: print(m)
    checkpoint: Callable[[TrainState, dict[str, float]], None] = lambda s, m: None
    log_every: int = 10
    checkpoint_every: int = 0
    progress: Callable[[int], None] = lambda n: None  # called with optimizer steps just done
    on_step: Callable[[TrainState], None] = lambda s: None  # e.g. fault injection in tests
    extra: dict = field(default_factory=dict)


def peak_memory_bytes(device: torch.device | str = "cpu") -> int:
    """Peak memory of this process: CUDA allocator peak on GPU, max RSS on CPU."""
    if torch.device(device).type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    import resource
    import sys

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)  # Linux reports KiB


def current_memory_bytes(device: torch.device | str = "cpu") -> int:
    """Memory this process holds now: CUDA allocator bytes on GPU, resident set size on CPU."""
    if torch.device(device).type == "cuda":
        return int(torch.cuda.memory_allocated(device))
    try:
        with open("/proc/self/statm") as f:  # Linux: pages (size, resident, ...)
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # no procfs (macOS): unknown, and the summary says so with None
        return 0


class MetricsWriter:
    """A run's metric sinks: RUN/metrics.jsonl, RUN/metrics.csv and TensorBoard under RUN/tb."""

    def __init__(self, run_dir: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.jsonl = (run_dir / "metrics.jsonl").open("a")
        self.csv_path = run_dir / "metrics.csv"
        self.tb = SummaryWriter(str(run_dir / "tb"))

    def write(self, metrics: dict[str, Any]) -> None:
        self.jsonl.write(json.dumps(metrics) + "\n")
        self.jsonl.flush()
        new = not self.csv_path.exists()
        with self.csv_path.open("a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(metrics), extrasaction="ignore")
            if new:
                writer.writeheader()
            writer.writerow(metrics)
        for k, v in metrics.items():
            if isinstance(v, (int, float)) and k != "step":
                self.tb.add_scalar(k, v, metrics["step"])
        self.tb.flush()

    def close(self) -> None:
        self.jsonl.close()
        self.tb.close()


def read_metrics(run_dir: Path) -> list[dict]:
    """The lines of RUN/metrics.jsonl (empty when there is none yet)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _micro_batches(epochs: Callable[[int], Iterable[Batch]], state: TrainState
                   ) -> Iterator[Batch]:
    """Endless micro-batches across epochs, skipping what a resumed run already consumed."""
    while True:
        it = iter(epochs(state.epoch))
        # Streams cannot seek: a resumed run skips the micro-batches it already trained on.
        for _ in itertools.islice(it, state.micro_in_epoch):
            pass
        empty = True
        for batch in it:
            empty = False
            state.micro_in_epoch += 1
            yield batch
        if empty and state.micro_in_epoch == 0:
            raise ValueError("the training data yielded no batch: is the dataset empty?")
        state.epoch += 1
        state.micro_in_epoch = 0


def fit(objective: Objective, engine: Engine, epochs: Callable[[int], Iterable[Batch]], *,
        total_steps: int, grad_accum: int, hooks: Hooks, state: TrainState | None = None,
        device: torch.device | str = "cpu", prefix: str = "train") -> TrainState:
    """Train for `total_steps` optimizer steps; `epochs(e)` yields the micro-batches of epoch e."""
    state = state or TrainState()
    stream = _micro_batches(epochs, state)
    engine.model.train()
    window: dict[str, float] = {}
    window_start = time.perf_counter()
    data_wait = 0.0  # seconds this window spent fetching micro-batches (Ray Data + collation)
    while state.step < total_steps:
        micro = []
        for _ in range(grad_accum):
            fetch_start = time.perf_counter()
            batch = next(stream)
            data_wait += time.perf_counter() - fetch_start
            micro.append(_to_device(batch, device))
        # Normalise each term by its count over the whole step: exact gradient accumulation.
        counts: dict[str, float] = {k: 0.0 for k in objective.weights}
        for b in micro:
            for k, v in objective.count(b).items():
                counts[k] += float(v)
        step_metrics: dict[str, float] = {}
        for b in micro:
            sums, extra = objective.forward(engine.model, b)
            loss = sum(objective.weights[k] * sums[k] / max(counts[k], 1.0) for k in sums)
            engine.backward(loss)
            _accumulate(step_metrics, {"loss": float(loss.detach())})
            for k, v in sums.items():
                _accumulate(step_metrics, {f"{k}_loss": float(v.detach()) / max(counts[k], 1.0)})
            _accumulate(step_metrics, {k: v / grad_accum for k, v in extra.items()})
        grad_norm = engine.step()
        state.step += 1
        step_samples = sum(samples_in(b) for b in micro)
        step_tokens = sum(int(b["attention_mask"].sum()) for b in micro if "attention_mask" in b)
        state.samples += step_samples
        state.tokens += step_tokens
        step_metrics["lr"] = engine.lr()
        if grad_norm is not None:
            step_metrics["grad_norm"] = grad_norm
        for k, v in step_metrics.items():
            _accumulate(window, {k: v})
        window["_n"] = window.get("_n", 0) + 1
        window["_samples"] = window.get("_samples", 0) + step_samples
        window["_tokens"] = window.get("_tokens", 0) + step_tokens
        hooks.progress(1)
        hooks.on_step(state)
        last = state.step == total_steps
        if state.step % hooks.log_every == 0 or last:
            seconds = time.perf_counter() - window_start
            n = window.pop("_n")
            samples, tokens = window.pop("_samples"), window.pop("_tokens")
            metrics = {f"{prefix}/{k}": v / n for k, v in window.items()}
            metrics.update({
                "step": state.step, "epoch": state.epoch, "samples": state.samples,
                "tokens": state.tokens, f"{prefix}/samples_per_s": samples / max(seconds, 1e-9),
                f"{prefix}/tokens_per_s": tokens / max(seconds, 1e-9),
                # Time blocked on the data stream: near 1 means the trainer starves for batches.
                f"{prefix}/data_wait_s": data_wait,
                f"{prefix}/data_wait_fraction": min(1.0, data_wait / max(seconds, 1e-9)),
                "peak_memory_bytes": peak_memory_bytes(device),
            })
            hooks.log(metrics)
            window, window_start, data_wait = {}, time.perf_counter(), 0.0
        if (hooks.checkpoint_every and state.step % hooks.checkpoint_every == 0) or last:
            hooks.checkpoint(state, {"step": state.step})
    return state


def _accumulate(acc: dict[str, float], new: dict[str, float]) -> None:
    for k, v in new.items():
        acc[k] = acc.get(k, 0.0) + float(v)


def samples_in(batch: Batch) -> int:
    """Samples in a micro-batch: rows, or the sequences packed into them (sequence_ids); for
    dpo and reward, chosen plus rejected sequences (2B)."""
    if "sequence_ids" in batch:
        return int(batch["sequence_ids"].max()) + 1
    return int(next(v for v in batch.values() if isinstance(v, Tensor)).shape[0])


def _to_device(batch: Batch, device: torch.device | str) -> Batch:
    return {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}
