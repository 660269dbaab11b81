"""Training throughput: nsft through nsft-ray's Ray Train path (ZeRO 0 and 2) vs TRL's SFTTrainer.

    python benchmarks/bench_train.py --out runs/bench_train.json [--sizes tiny small]
        [--steps N --warmup N --batch 8 --threads 1 --repeats 1 --fast-options]
    python benchmarks/bench_train.py --quick --out runs/bench_train_quick.json

`--quick` (under 4 minutes on 2 cores): tiny only, `nsft` vs `trl_sft`, 5 interleaved repeats,
10 timed steps after 2, `--fast-options`; the JSON's top-level `ratios.nsft_vs_trl_sft` is the
median samples/s of nsft over the median of TRL (each size also has its own `ratios`).

`--fast-options`: both sides train what the demo trains, vision tower and connector frozen
(`model.freeze: [vision, connector]`; TRL: the same parameters frozen before the trainer builds
its optimizer, so both update the same weights). nsft then uses what that allows:
`train.cache_image_features` (each image's features computed once), `train.cache_encoded` (each
row's chat template + image processor once) and `train.pack_tokens = --max-length`
(padding-free rows). TRL 1.16 has no equivalent for a vision dataset: it refuses
`padding_free=True` and packing for one ("not supported for vision datasets") and has no
encode or feature cache, so it pads each batch and runs the tower every step. FLOPs (and MFU)
stay those of the plain padded forward + backward for every method, the work both do.

Builds, offline in a temporary folder per model size, a small ShapesWorld, a randomly initialised
Idefics3 VLM (`tiny` 1.6M or `small` ~36M parameters) and the nSFT conversations of the world's
preference rows (chosen + negatives, `construct_rows`). Every method then trains the SAME model
(one saved init) on the SAME rows in the SAME order (sequential, no shuffle, incomplete last batch
dropped), with the same batch size, optimizer (torch AdamW, constant LR, no warm-up schedule,
grad-norm clip 1.0), max_length, loss masking (assistant tokens only) and number of steps, in fp32
without gradient checkpointing:

- `nsft` (the no-Ray floor): the nsft objective (chosen token mean + lam * negative token mean)
  through `loop.fit` + `TorchEngine`, called in-process: no Ray Data, no Ray Train worker, no
  object store, no DeepSpeed; the collator runs inline in the training thread;
- `ray_zero0`, `ray_zero2`: the same objective through `nsft_ray.ray_glue.train.train` on an
  embedded local Ray: 1 Ray Train worker, Ray Data streaming the (materialized) Parquet rows,
  DeepSpeed stage 0 / 2 with the torch AdamW as client optimizer, checkpoint only at the end, no
  export. Ray Data collates the next batch in a background thread while the worker computes;
- `trl_sft`: TRL's `SFTTrainer` with `assistant_only_loss=True` (our chat template carries
  `{% generation %}` markers), `bf16=False, fp16=False, gradient_checkpointing=False` (TRL's CPU
  defaults are ~5x slower). Its loss is one token mean over all rows, not nsft's two means, so
  only its first loss (before any update) is comparable: the JSON's checks compare it with the
  token-weighted mean of nsft's two first-step terms.

Each method runs in a fresh subprocess (this script with `--one`), so peak memory does not mix,
with `--threads` torch threads (the Ray worker gets `cpus_per_worker = threads` and the same
OMP_NUM_THREADS), `--repeats` times, interleaved with the other methods; the fastest run is
reported and every run's throughput is kept in the JSON.

Timing. The first `--warmup` steps are excluded. In-process methods time the steps themselves
(one clock mark per optimizer step; a step includes fetching/collating its batch). The Ray worker
logs every step (`train.log_every=1`), and each metrics.jsonl line's window (`samples_per_s` over
the batch) is the worker's own clock from the end of the previous step's log to this step's log:
the step with its data fetch, but not the per-step metric write and `ray.train.report`, which only
exist because the benchmark logs every step (a real run logs every 10-20). A driver-side watcher
also stamps each new line, so `observed_seconds_per_step` (under the table) includes that logging.
Ray Train V2 hands a worker's reports to its controller through a one-slot queue that the
controller drains when it polls the workers, every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (2 s by
default): a worker reporting faster than that blocks in `ray.train.report`. Logging every step
would then cap the loop at one step per poll, so the benchmark sets the interval to `--ray-poll-s`
(0.05 s); `--ray-poll-s 2` measures Ray's default.
CPU time: the process's own for in-process methods; for Ray methods the worker process's (read
from /proc by the watcher when the warm-up step's line and the last line appear), plus, in the
JSON, the CPU time of every process of the embedded Ray (driver, GCS, raylet, workers).
Peak memory: each process's peak RSS (VmHWM); for Ray methods the worker's `peak_memory_bytes`
metric (cross-checked against the worker's VmHWM), and in the JSON the driver's peak RSS and the
memory of all Ray processes together (PSS sum, at the first timed and the last step).

Data wait: the share of timed step time spent blocked on the next batch. nsft and the Ray methods
log it from `loop.fit` (time inside `next(stream)`: in-process that is slicing the rows plus
collating them; under Ray it is Ray Data's iterator, which hands over a batch that a background
thread fetched from the object store and collated). For TRL the benchmark wraps
`Trainer.get_batch_samples`: the DataLoader's `next()` (row fetch with image decode by
`datasets`, TRL's collator: chat template + image processor + label masking; accelerate fetches
one batch ahead, synchronously) plus the trainer's count of label tokens.

FLOP/s. The parent measures this machine's fp32 `torch.matmul` rate (square matrices, best of
10 repetitions, the methods' thread count) -- the limit -- and counts the FLOPs of a
forward + backward of the nsft objective on every distinct batch shape of the run with
`torch.utils.flop_counter.FlopCounterMode` (matmuls, convolutions and attention; CPU SDPA is
added to its table; elementwise ops and the optimizer are not counted). FLOPs depend only on the
padded shapes, so every step's count is exact for our collator's batches. Achieved FLOP/s = timed
steps' FLOPs / timed seconds; MFU = achieved / limit, and likewise per CPU second against the
matmul's FLOP per CPU second (both limits are the best over the run's measurements).

Tokens/s counts trained (loss) tokens; `input_tokens_per_s` counts every non-padding token. The
Ray worker logs non-padding tokens only: the benchmark re-collates the rows in order and uses
their trained-token counts only after checking that the worker's per-step token counts equal
them (so it trained the same batches in the same order). Timings are measured, never asserted.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository's packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

__all__ = ["METHODS", "flops_by_shape", "prepare_assets", "run_one", "measure", "run_bench",
           "markdown_table", "main"]

METHODS = ("nsft", "ray_zero0", "ray_zero2", "trl_sft")
NOTES = {
    "nsft": "no-Ray floor: loop.fit + TorchEngine in-process, collator inline",
    "ray_zero0": "Ray Train (1 worker) + Ray Data + DeepSpeed ZeRO-0",
    "ray_zero2": "Ray Train (1 worker) + Ray Data + DeepSpeed ZeRO-2",
    "trl_sft": "TRL SFTTrainer, assistant_only_loss=True, fp32, no grad checkpointing",
}
DATA_WAIT = {
    "nsft": "time in next(stream): slice rows + collate inline",
    "ray_zero0": "time in next(stream): Ray Data iterator (collated in a background thread)",
    "ray_zero2": "time in next(stream): Ray Data iterator (collated in a background thread)",
    "trl_sft": "time in Trainer.get_batch_samples: DataLoader next() (row fetch + image decode "
               "+ TRL collator) + label-token count",
}
# (timed steps, warm-up steps) per size when --steps/--warmup are not given.
DEFAULT_STEPS = {"tiny": (40, 5), "small": (10, 2)}
QUICK = {"repeats": 5, "methods": ["nsft", "trl_sft"], "steps": 10, "warmup": 2}
CONVERSATIONS = "conversations.parquet"
MATMUL_SIZES = (1024, 1536, 2048)
POLL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"


# ---------------------------------------------------------------------------------------------
# Assets (parent process)
# ---------------------------------------------------------------------------------------------


def prepare_assets(root: Path, size: str, images: int, seed: int) -> dict[str, Any]:
    """World, VLM (root/model), chosen + negative conversations (root/CONVERSATIONS)."""
    import pyarrow.parquet as pq

    from nsft_ray.config import NegativesConfig, WorldConfig
    from nsft_ray.models import build_tiny_vlm, load_vlm, param_count
    from nsft_ray.negatives.pipeline import construct_rows
    from nsft_ray.schema import conversation_table
    from nsft_ray.world import corpus, write_world

    world_cfg = WorldConfig(n_train=images, n_eval=2)
    write_world(world_cfg, root / "world", seed=seed)
    build_tiny_vlm(root / "model", corpus(world_cfg, n=500, seed=seed), size=size,
                   image_size=world_cfg.image_size, seed=seed)
    prefs = pq.read_table(root / "world" / "pref_train.parquet").to_pylist()
    conversations, failures = construct_rows(prefs, NegativesConfig())
    if failures:  # the template/text-diff constructors handle every ShapesWorld row
        raise RuntimeError(f"{len(failures)} preference rows failed construction, e.g. "
                           f"{failures[0]['id']}: {failures[0]['reason']}")
    pq.write_table(conversation_table(conversations), root / CONVERSATIONS)
    model, _ = load_vlm(root / "model")
    origins = [c["origin"] for c in conversations]
    return {"images": images, "preference_rows": len(prefs), "conversations": len(conversations),
            "chosen": origins.count("chosen"), "negative": origins.count("negative"),
            "parameters": param_count(model)}


# ---------------------------------------------------------------------------------------------
# Shared by the child processes
# ---------------------------------------------------------------------------------------------


def _rss_mib(pid: int | str = "self") -> float:
    """Peak RSS of a process so far (this one by default), MiB.

    Linux's VmHWM: the high-water mark of the process's own address space. Not ru_maxrss:
    Linux carries that across fork + exec, so a child started by a big parent (this benchmark's
    parent holds torch, transformers, TRL and a model) reports the parent's peak as its own.
    """
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    if pid != "self":
        return float("nan")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # elsewhere: KiB (Linux), bytes (mac)
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024


def _now() -> tuple[float, float]:
    """(wall clock, this process's CPU time), seconds."""
    return time.perf_counter(), time.process_time()


FAST_OPTIONS = ("model.freeze=[vision,connector]", "train.cache_image_features=true",
                "train.cache_encoded=true")


def _config(assets: Path, args: argparse.Namespace, *overrides: str, plain: bool = False) -> Any:
    """The nsft run config every nsft-ray method shares (the Ray methods add their own keys);
    with --fast-options (and not `plain`) the demo's frozen tower and what it allows."""
    from nsft_ray.config import load_config

    pack = args.max_length if args.pack_tokens is None else args.pack_tokens
    fast = [*FAST_OPTIONS, f"train.pack_tokens={pack}"] if args.fast_options and not plain else []
    return load_config(None, [*fast,
        f"model.name_or_path={assets / 'model'}", f"run.seed={args.seed}",
        f"train.data=[{assets / CONVERSATIONS}]", f"train.micro_batch_size={args.batch}",
        "train.grad_accum=1", f"train.max_length={args.max_length}",
        f"train.max_steps={args.warmup + args.steps}", "train.shuffle=false",
        f"optim.lr={args.lr}", "optim.schedule=constant", "optim.warmup_ratio=0.0",
        "optim.weight_decay=0.0", "optim.max_grad_norm=1.0", *overrides,
        *([] if plain else args.set),
    ])


def _rows(assets: Path) -> list[dict]:
    import pyarrow.parquet as pq

    return pq.read_table(assets / CONVERSATIONS).to_pylist()


def _epoch_batches(rows: list[dict], collate: Callable[[dict], dict], batch: int
                   ) -> Iterator[dict]:
    """One epoch in row order, incomplete last batch dropped, columns as Ray Data hands them."""
    for start in range(0, len(rows) - batch + 1, batch):
        chunk = rows[start:start + batch]
        yield collate({k: [r[k] for r in chunk] for k in chunk[0]})


def _first_batches(rows: list[dict], collate: Callable[[dict], dict], batch: int,
                   n: int) -> Iterator[dict]:
    """The first `n` micro-batches of consecutive epochs: what every method trains on."""
    done = 0
    while done < n:
        for b in _epoch_batches(rows, collate, batch):
            yield b
            done += 1
            if done == n:
                return


def _counts(batch: dict) -> dict[str, int]:
    """Per-batch token counts: trained (shifted labels != -100), of those on chosen rows,
    non-padding inputs, and the padded length."""
    trained = batch["labels"][:, 1:] != -100  # the causal-LM shift
    out = {"trained": int(trained.sum()), "input": int(batch["attention_mask"].sum()),
           "padded_length": int(batch["input_ids"].shape[1])}
    if "is_negative" in batch:
        negative = batch["is_negative"].bool()  # (B,) per row, or (R, T) per token when packed
        negative = negative.unsqueeze(1) if negative.dim() == 1 else negative[:, 1:]
        out["chosen"] = int((trained & ~negative).sum())
    return out


def _summary(args: argparse.Namespace, step_seconds: list[float], cpu_seconds: float,
             counts: list[dict[str, int]], losses: list[float], steps_done: int,
             rss_first_step: float, peak_rss: float, data_wait_seconds: float,
             extra: dict[str, Any]) -> dict[str, Any]:
    """Throughput over the timed steps (after warm-up); per-step counts and losses for checks."""
    total = args.warmup + args.steps
    if len(step_seconds) != args.steps or len(counts) < total or len(losses) != total:
        raise RuntimeError(f"expected {args.steps} timed steps, {total} batches and {total} "
                           f"losses, got {len(step_seconds)}, {len(counts)} and {len(losses)}")
    seconds = sum(step_seconds)
    timed = counts[args.warmup:total]
    return {
        "steps_done": steps_done, "warmup_steps": args.warmup, "timed_steps": args.steps,
        "batch": args.batch, "timed_seconds": seconds,
        "seconds_per_step": seconds / args.steps,
        # Less sensitive than the mean to other jobs' bursts on a shared machine.
        "median_seconds_per_step": sorted(step_seconds)[len(step_seconds) // 2],
        # CPU time: what the work costs, whatever other jobs do to wall time.
        "cpu_seconds_per_step": cpu_seconds / args.steps,
        "samples_per_cpu_s": args.steps * args.batch / cpu_seconds,
        "samples_per_s": args.steps * args.batch / seconds,
        "tokens_per_s": sum(c["trained"] for c in timed) / seconds,
        "input_tokens_per_s": sum(c["input"] for c in timed) / seconds,
        "data_wait_seconds_per_step": data_wait_seconds / args.steps,
        "data_wait_fraction": min(1.0, data_wait_seconds / seconds),
        "trained_tokens_per_step": [c["trained"] for c in counts[:total]],
        "input_tokens_per_step": [c["input"] for c in counts[:total]],
        "padded_length_per_step": [c["padded_length"] for c in counts[:total]],
        "first_loss": losses[0], "final_loss": losses[-1], "losses": losses,
        "rss_first_step_mib": rss_first_step, "peak_rss_mib": peak_rss, **extra,
    }


# ---------------------------------------------------------------------------------------------
# One method (child process)
# ---------------------------------------------------------------------------------------------


def _run_nsft(assets: Path, args: argparse.Namespace) -> dict[str, Any]:
    from nsft_ray.algorithms import ALGORITHMS
    from nsft_ray.loop import Hooks, TorchEngine, fit, make_optimizer, make_scheduler

    total = args.warmup + args.steps
    cfg = _config(assets, args)
    spec = ALGORITHMS["nsft"]
    model, processor = spec.load(cfg)  # load_vlm + model.freeze, as a training run loads it
    objective = spec.objective(cfg, model, "cpu")
    collate = spec.collate(processor, cfg)
    rows = _rows(assets)
    counts: list[dict[str, int]] = []  # per micro-batch, in training order

    def epochs(epoch: int):
        for batch in _epoch_batches(rows, collate, args.batch):
            counts.append(_counts(batch))
            yield batch

    opt = make_optimizer(model, cfg.optim)
    engine = TorchEngine(model, opt, make_scheduler(opt, cfg.optim, total), cfg.optim.max_grad_norm)
    logs: list[dict] = []
    marks: list[tuple[float, float]] = []
    rss_first: list[float] = []

    def on_step(state) -> None:
        marks.append(_now())
        if not rss_first:
            rss_first.append(_rss_mib())

    hooks = Hooks(log=logs.append, log_every=1, on_step=on_step)
    start = _now()
    state = fit(objective, engine, epochs, total_steps=total, grad_accum=1, hooks=hooks)
    t0 = marks[args.warmup - 1] if args.warmup else start
    walls = [t0[0]] + [m[0] for m in marks[args.warmup:]]
    step_seconds = [b - a for a, b in zip(walls, walls[1:], strict=False)]
    # fit logs every step, so log i is step i+1: its data wait is that step's next(stream) time.
    wait = sum(m["train/data_wait_s"] for m in logs[args.warmup:])
    extra = {"chosen_losses": [m["train/chosen_loss"] for m in logs],
             "negative_losses": [m["train/negative_loss"] for m in logs],
             "chosen_tokens_per_step": [c["chosen"] for c in counts[:total]]}
    return _summary(args, step_seconds, marks[-1][1] - t0[1], counts,
                    [m["train/loss"] for m in logs], state.step, rss_first[0], _rss_mib(), wait,
                    extra)


def _run_trl(assets: Path, args: argparse.Namespace) -> dict[str, Any]:
    import datasets
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from nsft_ray.collate import decode_image
    from nsft_ray.models import freeze, load_vlm

    total = args.warmup + args.steps
    model, processor = load_vlm(assets / "model")
    if args.fast_options:  # the same trainable weights as nsft's model.freeze
        freeze(model, ("vision", "connector"))
    dataset = datasets.Dataset.from_list(
        [{"images": [decode_image(r["image"])], "messages": r["messages"]} for r in _rows(assets)])
    config = SFTConfig(
        output_dir=str(assets / "trl_out"), max_steps=total, per_device_train_batch_size=args.batch,
        learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0, optim="adamw_torch",
        weight_decay=0.0, max_grad_norm=1.0, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8,
        # Fair on CPU: TRL's defaults (bf16 autocast, gradient checkpointing) are ~5x slower here.
        bf16=False, fp16=False, gradient_checkpointing=False, use_cpu=True,
        # packing / padding_free: TRL 1.16 refuses both for vision datasets.
        assistant_only_loss=True, max_length=args.max_length, packing=False, padding_free=False,
        train_sampling_strategy="sequential", dataloader_drop_last=True, dataloader_num_workers=0,
        logging_steps=1, save_strategy="no", report_to=[], disable_tqdm=True, seed=args.seed,
    )
    marks: list[tuple[float, float]] = []
    rss_first: list[float] = []

    class StepTimes(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            marks.append(_now())
            if not rss_first:
                rss_first.append(_rss_mib())

    trainer = SFTTrainer(model=model, args=config, train_dataset=dataset,
                         processing_class=processor, callbacks=[StepTimes()])
    counts: list[dict[str, int]] = []
    trl_collate = trainer.data_collator

    def counting_collate(examples: list[dict]) -> dict:
        batch = trl_collate(examples)
        counts.append(_counts(batch))
        return batch

    trainer.data_collator = counting_collate  # read when train() builds its dataloader
    waits: list[float] = []
    get_batch_samples = trainer.get_batch_samples

    def timed_get_batch_samples(*a, **kw):  # the trainer's one data fetch per optimizer step
        t = time.perf_counter()
        out = get_batch_samples(*a, **kw)
        waits.append(time.perf_counter() - t)
        return out

    trainer.get_batch_samples = timed_get_batch_samples
    start = _now()
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    t0 = marks[args.warmup - 1] if args.warmup else start
    walls = [t0[0]] + [m[0] for m in marks[args.warmup:]]
    step_seconds = [b - a for a, b in zip(walls, walls[1:], strict=False)]
    # The fetch for step i happens after step i-1's mark: waits[warmup:total] are timed steps'.
    # The dataloader fetches a batch ahead: only the first `total` batches were trained on.
    return _summary(args, step_seconds, marks[-1][1] - t0[1], counts[:total], losses,
                    trainer.state.global_step, rss_first[0], _rss_mib(),
                    sum(waits[args.warmup:total]), {})


class _RayWatch(threading.Thread):
    """Driver-side watcher of a Ray Train run: stamps each new metrics.jsonl line with the wall
    clock and the worker's CPU time, and samples CPU time and RSS of every Ray process."""

    def __init__(self, metrics: Path, warmup: int, total: int):
        super().__init__(daemon=True)
        self.metrics, self.warmup, self.total = metrics, warmup, total
        self.stop = threading.Event()
        self.lines: dict[int, dict[str, float]] = {}  # line count -> measurements
        self.worker: Any = None
        self.worker_env: dict[str, str] = {}
        self.tree_pss_max = 0.0
        self.tree_at_max: dict[str, float] = {}  # process title -> PSS MiB, at the largest sum

    def _find_worker(self) -> None:
        import psutil

        for p in psutil.Process().children(recursive=True):
            try:
                if "RayTrainWorker" in " ".join(p.cmdline()):
                    self.worker = p
                    env = p.environ()
                    self.worker_env = {k: env.get(k, "") for k in (
                        "OMP_NUM_THREADS", "MKL_NUM_THREADS", POLL_ENV)}
                    return
            except psutil.Error:
                continue

    def _tree(self) -> tuple[float, float]:
        """CPU seconds and memory (PSS, MiB) summed over this process and all its descendants.
        PSS splits shared pages (libraries, the object store) between the processes mapping
        them, so the sum does not count them once per Ray process as an RSS sum would."""
        import psutil

        cpu = mem = 0.0
        by_title: dict[str, float] = {}
        for p in [psutil.Process(), *psutil.Process().children(recursive=True)]:
            try:
                t, pss = p.cpu_times(), p.memory_full_info().pss / 2**20
                title = "driver" if p.pid == os.getpid() else (
                    p.cmdline() or [p.name()])[0].split("/")[-1][:40]
            except psutil.Error:
                continue
            cpu += t.user + t.system
            mem += pss
            by_title[title] = by_title.get(title, 0.0) + pss
        if mem > self.tree_pss_max:
            self.tree_pss_max, self.tree_at_max = mem, by_title
        return cpu, mem

    def run(self) -> None:
        size, n = -1, 0
        while not self.stop.is_set():
            time.sleep(0.005)
            try:
                new_size = self.metrics.stat().st_size
            except FileNotFoundError:
                continue
            if new_size == size:
                continue
            size = new_size
            wall = time.perf_counter()
            count = self.metrics.read_bytes().count(b"\n")
            if count == n:
                continue
            n = count
            if self.worker is None:
                self._find_worker()
            entry = {"wall": wall}
            try:
                t = self.worker.cpu_times()
                entry["worker_cpu"] = t.user + t.system
                entry["worker_vmhwm"] = _rss_mib(self.worker.pid)
            except Exception:  # noqa: BLE001 -- the worker may have exited; the run then fails
                pass
            # Every Ray process at the first line stamped after warm-up and at the last (a
            # tree walk with PSS costs tens of ms of driver CPU: not at every step).
            started = any(k >= self.warmup for k in self.lines)
            if n == self.total or (n >= self.warmup and not started):
                entry["tree_cpu"], entry["tree_pss"] = self._tree()
            self.lines[n] = entry


def _run_ray(stage: int, assets: Path, args: argparse.Namespace) -> dict[str, Any]:
    import ray
    from transformers import AutoProcessor

    from nsft_ray.algorithms import ALGORITHMS
    from nsft_ray.ray_glue.train import read_metrics, train

    total = args.warmup + args.steps
    run_dir = assets / f"run_ray_zero{stage}"
    shutil.rmtree(run_dir, ignore_errors=True)
    # Same rows in the same order as the other methods: no shuffle, Ray Data's preserve_order
    # (checked below against the worker's per-step token counts).
    cfg = _config(assets, args, f"run.dir={run_dir}", "train.materialize=true",
                  "train.preserve_order=true", "train.log_every=1", "train.checkpoint_every=0",
                  "train.export=false",
                  "deepspeed.enabled=true", f"deepspeed.stage={stage}",
                  "deepspeed.precision=fp32", "resources.num_workers=1",
                  f"resources.cpus_per_worker={args.threads}")
    t_start = time.perf_counter()
    threads = str(args.threads)
    # Ray Train V2's controller drains each worker's one-slot report queue when it polls (every
    # 2 s by default): a worker reporting every step would block in ray.train.report until then.
    # Read by the controller actor, which inherits the environment of the Ray started here.
    os.environ[POLL_ENV] = str(args.ray_poll_s)
    # A fresh local Ray (never someone else's cluster), workers with the same thread count.
    ray.init(address="local", num_cpus=args.threads + 2, include_dashboard=False,
             log_to_driver=False, runtime_env={"env_vars": {
                 "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                 "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads,
                 POLL_ENV: str(args.ray_poll_s)}})
    watch = _RayWatch(run_dir / "metrics.jsonl", args.warmup, total)
    watch.start()
    try:
        summary = train(cfg, "nsft")
    finally:
        watch.stop.set()
        watch.join()
        ray.shutdown()
    metrics = sorted(read_metrics(run_dir), key=lambda m: m["step"])
    if [m["step"] for m in metrics] != list(range(1, total + 1)):
        raise RuntimeError(f"expected one metrics line per step 1..{total}, got steps "
                           f"{[m['step'] for m in metrics]}")
    lines = watch.lines
    if total not in lines or "worker_cpu" not in lines[total]:
        raise RuntimeError("the watcher missed the last step's line or the worker process")
    # The watcher stamps line `warmup` unless a busy machine starved it past a whole step: then
    # the next line it stamped starts the CPU window (cpu_window_steps says which).
    first_n = min((n for n in lines if args.warmup <= n < total and "worker_cpu" in lines[n]
                   and "tree_cpu" in lines[n]), default=None)
    # The batches the worker should have trained on, to check the order and count trained tokens.
    processor = AutoProcessor.from_pretrained(assets / "model")
    expected = [_counts(b) for b in _first_batches(
        _rows(assets), ALGORITHMS["nsft"].collate(processor, cfg), args.batch, total)]
    logged_input = [m["tokens"] - (metrics[i - 1]["tokens"] if i else 0)
                    for i, m in enumerate(metrics)]
    if logged_input != [c["input"] for c in expected]:
        raise RuntimeError("the Ray worker's per-step token counts differ from the rows in order "
                           f"(Ray Data reordered them?): {logged_input} vs "
                           f"{[c['input'] for c in expected]}")
    timed = metrics[args.warmup:]
    step_seconds = [args.batch / m["nsft/samples_per_s"] for m in timed]
    if first_n is None:
        raise RuntimeError(f"the watcher stamped no line in steps {args.warmup}..{total - 1}")
    first, last, window_steps = lines[first_n], lines[total], total - first_n
    extra = {
        "deepspeed_stage": stage, "cpu_window_steps": [first_n, total],
        "observed_seconds_per_step": (last["wall"] - first["wall"]) / window_steps,
        "ray_processes_cpu_seconds_per_step": (last["tree_cpu"] - first["tree_cpu"])
        / window_steps,
        "ray_processes_pss_mib": watch.tree_pss_max, "driver_peak_rss_mib": _rss_mib(),
        "ray_processes_pss_mib_by_title": {k: round(v, 1) for k, v in sorted(
            watch.tree_at_max.items(), key=lambda kv: -kv[1])},
        # Cross-check of the worker's peak_memory_bytes metric (ru_maxrss, which Linux carries
        # over from the process that started the worker): its VmHWM read at the last step.
        "worker_vmhwm_mib": last.get("worker_vmhwm", float("nan")),
        "seconds_to_first_step": lines[min(lines)]["wall"] - t_start,
        "worker_env": watch.worker_env,
        "chosen_losses": [m["nsft/chosen_loss"] for m in metrics],
        "negative_losses": [m["nsft/negative_loss"] for m in metrics],
        "trained_tokens_source": "re-collated rows in order; equal to the worker's per-step "
                                 "non-padding token counts",
        "train_summary": {k: summary[k] for k in ("steps", "train_seconds", "samples_per_s",
                                                  "tokens_per_s", "peak_memory_bytes")},
    }
    # CPU seconds over the timed steps, scaled from the stamped window if it is shorter.
    cpu_seconds = (last["worker_cpu"] - first["worker_cpu"]) * args.steps / window_steps
    return _summary(args, step_seconds, cpu_seconds, expected,
                    [m["nsft/loss"] for m in metrics], metrics[-1]["step"],
                    metrics[0]["peak_memory_bytes"] / 2**20,
                    max(m["peak_memory_bytes"] for m in metrics) / 2**20,
                    sum(m["nsft/data_wait_s"] for m in timed), extra)


def _cpu_sdpa_flops() -> dict:
    """FlopCounterMode entries for CPU scaled-dot-product attention (not in torch's table):
    the same counts torch uses for the CUDA kernels (full Lq x Lk, causal or not)."""
    import torch
    from torch.utils import flop_counter

    aten = torch.ops.aten

    def forward(query, key, value, *args, out_val=None, **kwargs):
        return flop_counter.sdpa_flop_count(query, key, value)

    def backward(grad_out, query, key, value, *args, out_val=None, **kwargs):
        return flop_counter.sdpa_backward_flop_count(grad_out, query, key, value)

    return {aten._scaled_dot_product_flash_attention_for_cpu: forward,
            aten._scaled_dot_product_flash_attention_for_cpu_backward: backward}


def matmul_flops_per_s(sizes: tuple[int, ...] = MATMUL_SIZES, reps: int = 10) -> dict[str, Any]:
    """fp32 torch.matmul of n x n matrices, best of `reps` per n: this machine's limit, per
    wall-clock second and per CPU second of this process (the latter barely moves when other
    jobs share the cores; with one thread it is the rate of one core)."""
    import torch

    wall: dict[str, float] = {}
    cpu: dict[str, float] = {}
    for n in sizes:
        a, b = torch.randn(n, n), torch.randn(n, n)
        torch.matmul(a, b)  # first call allocates and picks the kernel
        fastest, least_cpu = math.inf, math.inf
        for _ in range(reps):
            t, c = _now()
            torch.matmul(a, b)
            t2, c2 = _now()
            fastest, least_cpu = min(fastest, t2 - t), min(least_cpu, max(c2 - c, 1e-9))
        wall[str(n)], cpu[str(n)] = 2 * n**3 / fastest, 2 * n**3 / least_cpu
    return {"flops_per_s": max(wall.values()), "flops_per_cpu_s": max(cpu.values()),
            "by_size": wall, "by_size_cpu": cpu, "reps": reps, "dtype": "float32"}


def _run_flops(assets: Path, args: argparse.Namespace) -> dict[str, Any]:
    """`_count_flops` in the parent (nothing else runs meanwhile), with the methods' threads."""
    import torch

    threads = torch.get_num_threads()
    # The methods' thread count: the limit is theirs, and 2 OpenMP threads on a shared 2-core
    # machine made the counting passes ~10x slower.
    torch.set_num_threads(args.threads)
    try:
        return _count_flops(assets, args)
    finally:
        torch.set_num_threads(threads)


def flops_by_shape(model: Any, objective: Any, batches: Iterable[dict],
                   device: str | Any = "cpu") -> tuple[list[int], dict[tuple, dict[str, int]]]:
    """FLOPs of forward + backward of `objective` on each batch, counted once per batch shape
    with FlopCounterMode (CPU SDPA added to its table); also each shape's counts per op."""
    from torch import Tensor
    from torch.utils.flop_counter import FlopCounterMode

    from nsft_ray.loop import _to_device

    by_shape: dict[tuple, dict[str, int]] = {}
    per_step: list[int] = []
    for batch in batches:
        key = tuple(sorted((k, tuple(v.shape)) for k, v in batch.items() if isinstance(v, Tensor)))
        if key not in by_shape:
            model.zero_grad(set_to_none=True)
            with FlopCounterMode(display=False, custom_mapping=_cpu_sdpa_flops()) as counter:
                sums, _ = objective.forward(model, _to_device(batch, device))
                sum(sums.values()).backward()
            by_shape[key] = {str(op): int(n) for op, n in
                             counter.get_flop_counts()["Global"].items()}
        per_step.append(sum(by_shape[key].values()))
    model.zero_grad(set_to_none=True)
    return per_step, by_shape


def _count_flops(assets: Path, args: argparse.Namespace) -> dict[str, Any]:
    """The matmul limit, then FLOPs of forward + backward on each step's batch (once per shape)."""
    from nsft_ray.algorithms import ALGORITHMS
    from nsft_ray.models import load_vlm

    limit = matmul_flops_per_s()
    cfg = _config(assets, args, plain=True)  # every method's work: the padded, uncached step
    model, processor = load_vlm(assets / "model")
    model.train()
    objective = ALGORITHMS["nsft"].objective(cfg, model, "cpu")
    collate = ALGORITHMS["nsft"].collate(processor, cfg)
    start = time.perf_counter()
    per_step, by_shape = flops_by_shape(
        model, objective, _first_batches(_rows(assets), collate, args.batch,
                                         args.warmup + args.steps))
    first = next(iter(by_shape.values()))
    return {"matmul_limit": limit, "flops_per_step": per_step, "distinct_shapes": len(by_shape),
            "first_batch_flops_by_op": first, "count_seconds": time.perf_counter() - start,
            "counted": "forward + backward of the nsft objective (matmul, conv, attention); "
                       "not elementwise ops or the optimizer"}


def run_one(method: str, assets: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Train `method` in this process and return its measurements."""
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    load_before = os.getloadavg()[0]
    runners: dict[str, Callable[[], dict[str, Any]]] = {
        "nsft": lambda: _run_nsft(assets, args),
        "ray_zero0": lambda: _run_ray(0, assets, args),
        "ray_zero2": lambda: _run_ray(2, assets, args),
        "trl_sft": lambda: _run_trl(assets, args),
    }
    if method not in runners:
        raise ValueError(f"method {method!r}: expected one of {', '.join(runners)}")
    result = runners[method]()
    result.update(method=method, torch_threads=torch.get_num_threads(), note=NOTES[method],
                  data_wait_includes=DATA_WAIT[method],
                  load_average_1min=[load_before, os.getloadavg()[0]])  # before, after
    return result


# ---------------------------------------------------------------------------------------------
# Parent: one subprocess per method, the table, the JSON
# ---------------------------------------------------------------------------------------------


def _shared_flags(args: argparse.Namespace) -> list[str]:
    return ["--steps", str(args.steps), "--warmup", str(args.warmup), "--batch", str(args.batch),
            "--max-length", str(args.max_length), "--lr", str(args.lr), "--seed", str(args.seed),
            "--threads", str(args.threads), "--ray-poll-s", str(args.ray_poll_s),
            *(["--fast-options"] if args.fast_options else []),
            *([] if args.pack_tokens is None else ["--pack-tokens", str(args.pack_tokens)]),
            *(["--set", *args.set] if args.set else [])]


def measure(method: str, assets: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Run `method` in a fresh Python process (this script with --one) and read its result."""
    result_file = assets / f"result_{method}.json"
    result_file.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--one", method,
           "--assets", str(assets), "--result", str(result_file), *_shared_flags(args)]
    threads = str(args.threads)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    wall = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0 or not result_file.is_file():
        tail = (proc.stdout + proc.stderr)[-4000:]
        raise RuntimeError(f"method {method} failed (exit {proc.returncode}):\n{tail}")
    result = json.loads(result_file.read_text())
    result["process_seconds"] = time.perf_counter() - wall  # imports + setup + training
    return result


def _size_args(args: argparse.Namespace, size: str) -> argparse.Namespace:
    steps, warmup = DEFAULT_STEPS[size]
    return argparse.Namespace(**{**vars(args), "size": size,
                                 "steps": args.steps if args.steps is not None else steps,
                                 "warmup": args.warmup if args.warmup is not None else warmup})


def _bench_size(root: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Assets, FLOP count and every method for one model size."""
    assets = root / args.size
    assets.mkdir()
    data = prepare_assets(assets, args.size, args.images, args.seed)
    flops = _run_flops(assets, args)
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in args.methods}
    for _ in range(args.repeats):
        for m in args.methods:  # interleaved, so a burst of other jobs hits every method
            runs[m].append(measure(m, assets, args))
    results = {m: _best(rs) for m, rs in runs.items()}
    return {"settings": {"size": args.size, "steps": args.steps, "warmup": args.warmup},
            "data": data, "flops": flops, "results": results, "checks": _checks(results),
            "ratios": _ratios(results)}


def _ratios(results: dict[str, dict[str, Any]]) -> dict[str, float]:
    """nsft's samples/s over TRL's, each the median of its interleaved runs."""
    if "nsft" not in results or "trl_sft" not in results:
        return {}
    return {"nsft_vs_trl_sft": results["nsft"]["median_samples_per_s"]
            / results["trl_sft"]["median_samples_per_s"]}


def _checks(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Did every method train the same batches, and do the losses agree where they should?"""
    checks: dict[str, Any] = {}
    for key in ("trained_tokens_per_step", "input_tokens_per_step", "padded_length_per_step"):
        values = [r[key] for r in results.values()]
        checks[key.replace("_per_step", "_match")] = all(v == values[0] for v in values)
    nsft = results.get("nsft")
    for m in ("ray_zero0", "ray_zero2"):
        if nsft and m in results:  # same objective, data and optimizer: the same loss curve
            checks[f"{m}_vs_nsft_max_loss_abs_diff"] = max(
                abs(a - b) for a, b in zip(results[m]["losses"], nsft["losses"], strict=True))
    if nsft and "trl_sft" in results:
        # TRL's first loss is one token mean over the batch; nsft's two terms are token means over
        # the chosen and negative rows: weighted by their token counts they are the same number.
        n_all, n_chosen = nsft["trained_tokens_per_step"][0], nsft["chosen_tokens_per_step"][0]
        mixed = (n_chosen * nsft["chosen_losses"][0]
                 + (n_all - n_chosen) * nsft["negative_losses"][0]) / n_all
        checks["trl_first_loss_vs_nsft_token_mean_abs_diff"] = abs(
            results["trl_sft"]["first_loss"] - mixed)
    return checks


def _add_flop_rates(size_report: dict[str, Any], limit: float, limit_cpu: float) -> None:
    """Achieved FLOP/s (per wall and per CPU second) and MFU for every method of one size."""
    per_step = size_report["flops"]["flops_per_step"]
    for r in size_report["results"].values():
        timed = sum(per_step[r["warmup_steps"]:r["warmup_steps"] + r["timed_steps"]])
        r["flops_per_step_mean"] = timed / r["timed_steps"]
        r["achieved_flops_per_s"] = timed / r["timed_seconds"]
        r["achieved_flops_per_cpu_s"] = timed / (r["cpu_seconds_per_step"] * r["timed_steps"])
        r["mfu"] = r["achieved_flops_per_s"] / limit
        r["mfu_cpu"] = r["achieved_flops_per_cpu_s"] / limit_cpu


def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    """Every size: assets in a temporary folder, FLOPs, every method; return the report."""
    started = datetime.datetime.now().astimezone()
    machine = _machine()
    sizes: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        for size in args.sizes:
            sizes[size] = _bench_size(Path(tmp), _size_args(args, size))
    # One limit for the run: the best matmul rate any calibration saw (others only slow it down).
    limit = max(s["flops"]["matmul_limit"]["flops_per_s"] for s in sizes.values())
    limit_cpu = max(s["flops"]["matmul_limit"]["flops_per_cpu_s"] for s in sizes.values())
    for s in sizes.values():
        _add_flop_rates(s, limit, limit_cpu)
    machine["matmul_flops_per_s"], machine["matmul_flops_per_cpu_s"] = limit, limit_cpu
    machine["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    return {
        "benchmark": "bench_train", "date": started.isoformat(timespec="seconds"),
        "settings": {"batch": args.batch, "max_length": args.max_length, "lr": args.lr,
                     "seed": args.seed, "threads": args.threads, "repeats": args.repeats,
                     "images": args.images, "methods": list(args.methods),
                     "fast_options": args.fast_options, "quick": args.quick,
                     "ray_train_poll_s": args.ray_poll_s},
        "machine": machine, "sizes": sizes,
        # The first size's ratios (--quick: the only one); every size has its own under sizes.
        "ratios": sizes[args.sizes[0]]["ratios"],
    }


def _best(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The fastest run of a method (other jobs only ever slow a run down), with every run's
    throughput and load under `runs`; peak RSS is the largest of all runs."""
    best = dict(min(runs, key=lambda r: r["timed_seconds"]))
    keep = ("samples_per_s", "seconds_per_step", "cpu_seconds_per_step", "peak_rss_mib",
            "data_wait_fraction", "load_average_1min")
    best["runs"] = [{k: r[k] for k in keep} for r in runs]
    best["peak_rss_mib"] = max(r["peak_rss_mib"] for r in runs)
    # The ratios use the median: fairer than the best when only some runs are disturbed.
    best["median_samples_per_s"] = statistics.median(r["samples_per_s"] for r in runs)
    return best


def _machine() -> dict[str, Any]:
    import ray
    import torch
    import transformers
    import trl

    return {"cpus": os.cpu_count(), "gpu": torch.cuda.is_available(),
            "load_average": [round(x, 2) for x in os.getloadavg()],
            "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "trl": trl.__version__, "ray": ray.__version__}


def markdown_table(report: dict[str, Any], size: str) -> str:
    """One size's results as a Markdown table (one row per method), settings and checks below."""
    s = report["sizes"][size]
    lines = ["| method | samples/s | trained tok/s | s/step (median) | CPU s/step | data wait | "
             "peak RSS MiB | GFLOP/s | MFU (wall / CPU) | final loss | path |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for method, r in s["results"].items():
        lines.append(
            f"| {method} | {r['samples_per_s']:.1f} | {r['tokens_per_s']:.0f} | "
            f"{r['seconds_per_step']:.3f} ({r['median_seconds_per_step']:.3f}) | "
            f"{r['cpu_seconds_per_step']:.3f} | {100 * r['data_wait_fraction']:.0f}% | "
            f"{r['peak_rss_mib']:.0f} | {r['achieved_flops_per_s'] / 1e9:.1f} | "
            f"{100 * r['mfu']:.0f}% / {100 * r['mfu_cpu']:.0f}% | {r['final_loss']:.4f} | "
            f"{r['note']} |")
    st, d, m, f = report["settings"], s["data"], report["machine"], s["flops"]
    runs = (f"best of {st['repeats']} interleaved runs per method" if st["repeats"] > 1
            else "one run per method")
    mean_flops = sum(f["flops_per_step"]) / len(f["flops_per_step"])
    lines += ["", (
        f"{size} Idefics3 ({d['parameters'] / 1e6:.1f}M params), batch {st['batch']}, "
        f"{s['settings']['steps']} timed steps after {s['settings']['warmup']} warm-up, "
        f"lr {st['lr']}, {st['threads']} torch thread(s) per process, {runs}; "
        f"{d['conversations']} conversations ({d['chosen']} chosen + {d['negative']} negative) "
        f"from {d['preference_rows']} preference rows; {m['cpus']} CPUs, 1-min load average "
        f"{m['load_average'][0]} at the start."), (
        f"FLOPs per step (fwd + bwd, FlopCounterMode, each step's batch shape): "
        f"{mean_flops / 1e9:.2f} G on average; limit: fp32 matmul "
        f"{m['matmul_flops_per_s'] / 1e9:.1f} GFLOP/s, {m['matmul_flops_per_cpu_s'] / 1e9:.1f} "
        f"GFLOP per CPU-s ({st['threads']} thread(s), best of {f['matmul_limit']['reps']})."),
    ]
    ray_rows = [(m, r) for m, r in s["results"].items() if "observed_seconds_per_step" in r]
    if ray_rows:
        lines.append("Ray, per step: wall incl. the metric write and ray.train.report ("
                     + ", ".join(f"{m} {r['observed_seconds_per_step']:.3f} s" for m, r in ray_rows)
                     + "); CPU of all Ray processes ("
                     + ", ".join(f"{m} {r['ray_processes_cpu_seconds_per_step']:.3f} s"
                                 for m, r in ray_rows)
                     + "). Memory (PSS) of all Ray processes: "
                     + ", ".join(f"{m} {r['ray_processes_pss_mib']:.0f} MiB"
                                 for m, r in ray_rows)
                     + ". Ray start to first step: "
                     + ", ".join(f"{m} {r['seconds_to_first_step']:.0f} s" for m, r in ray_rows)
                     + f" (Ray Train poll {st['ray_train_poll_s']} s).")
    c = s["checks"]
    checks = [f"{k.removesuffix('_match').replace('_', ' ')}: {v}" for k, v in c.items()
              if k.endswith("_match")]
    checks += [f"{k.removesuffix('_abs_diff').replace('_', ' ')}: {v:.1e}" for k, v in c.items()
               if k.endswith("_abs_diff")]
    lines.append("Checks: per-step " + "; ".join(checks) + ".")
    if s.get("ratios"):
        lines.append("Ratios (median samples/s over the interleaved runs): " + ", ".join(
            f"{k} {v:.2f}" for k, v in s["ratios"].items()) + (
            "; --fast-options (frozen tower; nsft: cached features and encodings, packed rows)"
            if st.get("fast_options") else "") + ".")
    return "\n".join(lines)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, help="write the JSON report here")
    p.add_argument("--sizes", "--size", nargs="+", choices=tuple(DEFAULT_STEPS),
                   default=["tiny"], help="model sizes, each a full comparison")
    defaults = ", ".join(f"{k}: {v[0]} after {v[1]}" for k, v in DEFAULT_STEPS.items())
    p.add_argument("--steps", type=int,
                   help=f"timed optimizer steps per method (default per size, {defaults})")
    p.add_argument("--warmup", type=int, help="untimed steps before timing (default per size)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--images", type=int, default=32, help="ShapesWorld train images")
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--seed", type=int, default=0)
    # 1 by default: on a shared 2-core machine, 2 OpenMP threads contend with other jobs and
    # steps became 10-30x slower and erratic; one thread per process gives stable numbers.
    p.add_argument("--threads", type=int, default=1, help="torch threads per method process")
    p.add_argument("--repeats", type=int,
                   help="fresh processes per method, interleaved; the fastest is reported, "
                        "the ratios use the median (default 1; --quick: 3)")
    p.add_argument("--methods", nargs="+", choices=METHODS)
    p.add_argument("--fast-options", action="store_true",
                   help="freeze vision + connector for every method; nsft also caches image "
                        "features and encodings and packs rows (see the module docstring)")
    p.add_argument("--pack-tokens", type=int,
                   help="with --fast-options: nsft's train.pack_tokens (default --max-length; "
                        "0: padded rows, packing off)")
    p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                   help="extra config overrides for the nsft-ray methods, applied last (e.g. "
                        "train.cache_image_features=false: one option's contribution at a time)")
    p.add_argument("--quick", action="store_true",
                   help="tiny, nsft vs trl_sft, 5 repeats, 10 steps after 2, --fast-options; "
                        "explicit flags still win")
    p.add_argument("--ray-poll-s", type=float, default=0.05,
                   help=f"{POLL_ENV} for the Ray methods (Ray's default: 2.0; see _run_ray)")
    # Internal: one method in this process (the parent starts a fresh process per method).
    p.add_argument("--one", choices=METHODS, help=argparse.SUPPRESS)
    p.add_argument("--assets", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    quick = QUICK if args.quick else {}
    for name, default in (("repeats", 1), ("methods", list(METHODS))):
        if getattr(args, name) is None:
            setattr(args, name, quick.get(name, default))
    if args.quick:
        args.fast_options = True
        args.steps = QUICK["steps"] if args.steps is None else args.steps
        args.warmup = QUICK["warmup"] if args.warmup is None else args.warmup
    for name, low in (("steps", 1), ("warmup", 0), ("batch", 1), ("threads", 1), ("repeats", 1)):
        value = getattr(args, name)
        if value is not None and value < low:
            p.error(f"--{name} {value}: expected >= {low}")
    if args.ray_poll_s <= 0:
        p.error(f"--ray-poll-s {args.ray_poll_s}: expected > 0")
    if args.one is None and args.out is None:
        p.error("--out is required")
    if args.one is not None and (args.steps is None or args.warmup is None):
        p.error("--one needs --steps and --warmup")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = _parse(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may reach a model hub
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.one:
        result = run_one(args.one, args.assets, args)
        args.result.write_text(json.dumps(result))
        return result
    report = run_bench(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    for size in report["sizes"]:
        print(f"\n### {size}\n")
        print(markdown_table(report, size))
    print(f"\nJSON: {args.out}")
    bad = [f"{size}/{m}" for size, s in report["sizes"].items() for m, r in s["results"].items()
           if not (math.isfinite(r["final_loss"])
                   and r["steps_done"] == r["warmup_steps"] + r["timed_steps"])]
    if bad:
        raise SystemExit(f"methods that did not train: {', '.join(bad)}")
    return report


if __name__ == "__main__":
    main()
