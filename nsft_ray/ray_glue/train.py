"""Launch a trainer on Ray Train: data streamed by Ray Data into DeepSpeed (or DDP) workers.

The worker function is the plain loop of ``nsft_ray.loop`` plus three marked Ray touch points:
(1) the dataset shard, (2) ``ray.train.report`` of metrics, (3) checkpoints. Re-running with the
same ``run.dir`` resumes from the latest checkpoint (Ray Train restores its checkpoint manager
from the storage folder); a worker that dies is restarted by Ray Train up to
``train.max_failures`` times and continues from the last checkpoint.

Before training, every row of ``train.data`` is validated (``train.validate``, one Ray Data
pass): bad rows go to RUN/quarantine/quarantine.parquet with their reason, the rest are trained
on, and summary.json's ``data`` holds the counts (read == valid + quarantined).

Run folder::

    RUN/config.yaml  metrics.jsonl  metrics.csv  tb/  ray/  model/  quarantine/  summary.json
"""

from __future__ import annotations

import copy
import itertools
import json
import math
import os
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import ray
import ray.train
import torch
from ray.data.collate_fn import NumpyBatchCollateFn
from ray.data.expressions import col
from ray.train import (
    Checkpoint,
    CheckpointConfig,
    DataConfig,
    FailureConfig,
    RunConfig,
    ScalingConfig,
)
from ray.train.torch import TorchConfig, TorchTrainer

from nsft_ray.algorithms import ALGORITHMS
from nsft_ray.config import Config, ResourcesConfig, from_dict, save_config, to_dict
from nsft_ray.loop import (
    Hooks,
    MetricsWriter,
    TorchEngine,
    TrainState,
    current_memory_bytes,
    fit,
    make_optimizer,
    make_scheduler,
    read_metrics,
)
from nsft_ray.plan import memory_split
from nsft_ray.ray_glue.data import (
    QUARANTINE_FILE,
    read_conversations,
    read_preferences,
    validate_dataset,
)
from nsft_ray.ray_glue.placement import check_memory, on_gpus, worker_options
from nsft_ray.ray_glue.runtime import TRAIN_LOGGING, ensure_ray, quiet_train_reports, step_bar
from nsft_ray.validate import QuarantineCounts, summarize

__all__ = ["train", "train_loop_per_worker", "build_train_dataset", "row_kind", "MetricsWriter",
           "read_workers"]

WORKERS_FILE = "workers.jsonl"


# ------------------------------------------------------------------------------------ driver side

def row_kind(cfg: Config, algo: str) -> str:
    """"conversation" for algorithms trained on conversation rows (sft, nsft), else "preference"."""
    return "preference" if ALGORITHMS[algo].origins(cfg) is None else "conversation"


def build_train_dataset(cfg: Config, algo: str,
                        ) -> tuple[ray.data.Dataset, QuarantineCounts | None]:
    """The training rows as a lazy Ray Dataset (never pulled into the driver), and their counts.

    Every `train.data` path is read by the `data.format` reader for the algorithm's rows; with
    `train.validate` the rows are checked in one Ray Data pass and the bad ones are written to
    RUN/quarantine/quarantine.parquet (counts returned; None when validation is off). The origin
    filter comes last, so a quarantined row is counted whatever its origin.
    """
    if not cfg.train.data:
        raise ValueError(f"train.data: give the file(s) or folder(s) to train {algo} on")
    missing = [p for p in cfg.train.data if not Path(p).exists()]
    if missing:
        raise FileNotFoundError(f"train.data: {missing[0]} does not exist")
    kind = row_kind(cfg, algo)
    if kind == "preference" and cfg.train.origins:
        raise ValueError(f"train.origins={list(cfg.train.origins)}: {algo} trains on preference "
                         "rows, which have no origin; leave train.origins empty")
    read = read_conversations if kind == "conversation" else read_preferences
    parts = [read(p, cfg.data) for p in cfg.train.data]
    for part in parts:
        # Deterministic block order from the first read on (the validation pass materializes),
        # so a resumed run sees its rows in the order the interrupted one did.
        part.context.execution_options.preserve_order |= cfg.train.preserve_order
    ds = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
    counts = None
    if cfg.train.validate:
        qdir = Path(cfg.run.dir).resolve() / "quarantine"
        ds, counts = validate_dataset(ds, cfg.data.validation, kind, qdir)
        print(f"train.data validated ({kind} rows; bad rows in {qdir / QUARANTINE_FILE}):\n"
              f"{summarize(counts)}", flush=True)
    origins = cfg.train.origins or ALGORITHMS[algo].origins(cfg)
    if origins:  # conversation data; preference-row algorithms (origins None) take every row
        ds = ds.filter(expr=col("origin").is_in(sorted(origins)))
    if cfg.train.shuffle:
        # A full shuffle seeded by run.seed, so another seed trains on the rows in another order
        # (the workers' local shuffle buffer alone only mixes neighbouring rows of file order).
        ds = ds.random_shuffle(seed=cfg.run.seed)
    if cfg.train.materialize:
        ds = ds.materialize()  # small data only: a lazy pipeline re-reads the files every epoch
    return ds, counts


def train(cfg: Config, algo: str) -> dict:
    """Train `algo` on Ray Train; return the run summary (also written to RUN/summary.json)."""
    if algo not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {algo!r}; choose one of {', '.join(ALGORITHMS)}")
    if not cfg.model.name_or_path:
        raise ValueError("model.name_or_path: the checkpoint folder to start from is required")
    run_dir = Path(cfg.run.dir).resolve()
    started = time.time()
    save_config(cfg, run_dir)
    ensure_ray(cfg.resources.address)
    ds, counts, rows = _prepare(cfg, algo, run_dir)
    per_step = cfg.train.micro_batch_size * cfg.train.grad_accum * cfg.resources.num_workers
    total_steps = cfg.train.max_steps or max(1, math.floor(cfg.train.epochs * rows / per_step))

    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": to_dict(cfg), "algo": algo, "total_steps": total_steps,
                           "run_dir": str(run_dir)},
        scaling_config=_scaling(cfg.resources),
        torch_config=TorchConfig(backend="nccl" if on_gpus(cfg.resources) else "gloo"),
        run_config=RunConfig(
            name=algo,
            storage_path=str(run_dir / "ray"),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.num_to_keep),
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
            logging_config=TRAIN_LOGGING,
        ),
        datasets={"train": ds},
        dataset_config=DataConfig(execution_options=_ingest_options(cfg.train.preserve_order)),
    )
    fit_start = time.time()
    result = trainer.fit()
    seconds = time.time() - fit_start
    metrics = read_metrics(run_dir)
    train_metrics = [m for m in metrics if f"{algo}/samples_per_s" in m]
    workers = read_workers(run_dir)  # rank, node id, start step and runtime of every start
    summary = {
        "algo": algo,
        "rows": rows,
        "data": ({**counts, "quarantine": str(run_dir / "quarantine" / QUARANTINE_FILE)}
                 if counts else None),
        "steps": total_steps,
        "train_seconds": round(seconds, 2),
        "samples_per_s": _mean([m[f"{algo}/samples_per_s"] for m in train_metrics]),
        "tokens_per_s": _mean([m.get(f"{algo}/tokens_per_s", 0.0) for m in train_metrics]),
        "peak_memory_bytes": _peak(metrics),
        "models_resident": ALGORITHMS[algo].models_resident(cfg),
        "final_loss": train_metrics[-1][f"{algo}/loss"] if train_metrics else None,
        "checkpoint": result.checkpoint.path if result.checkpoint else None,
        "model": str(run_dir / "model") if cfg.train.export else None,
        "num_workers": cfg.resources.num_workers,
        "workers": workers,
        # The worker's peak, its runtime before the model loaded, and the planner's parts.
        "memory": memory_split(algo, cfg, {"trainer": _peak(metrics)}, {"trainer": max(
            (w.get("runtime_bytes", 0) for w in workers), default=0)}),
        "deepspeed_stage": (cfg.deepspeed.zero_stage(cfg.resources.num_workers)
                            if cfg.deepspeed.enabled else None),
        "startup_seconds": _startup(started, fit_start, workers, metrics),
    }
    if algo == "reward" and cfg.reward.eval_data and cfg.train.export:  # held-out accuracy
        from nsft_ray.algorithms.reward import evaluate_reward_model

        res = cfg.resources
        task = ray.remote(evaluate_reward_model).options(**worker_options(res))
        summary["reward_eval"] = ray.get(task.remote(
            run_dir / "model", cfg.reward.eval_data, max_length=cfg.train.max_length,
            batch_size=cfg.reward.eval_batch_size, device="cuda" if on_gpus(res) else "cpu"))
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _prepare(cfg: Config, algo: str, run_dir: Path,
             ) -> tuple[ray.data.Dataset, QuarantineCounts | None, int]:
    """The memory check, then the validated training rows (with the reference log-probs for
    dpo.precompute_ref) and their counts; raises when nothing is left to train on."""
    check_memory(algo, cfg)  # a run that cannot fit fails here, in seconds
    ds, counts = build_train_dataset(cfg, algo)
    rows = ds.count()
    if rows == 0:
        dropped = (f"{counts['quarantined']} quarantined, see {run_dir / 'quarantine'}; "
                   if counts else "")
        raise ValueError(f"train.data: no rows to train {algo} on ({dropped}after the origin "
                         "filter)")
    if algo == "dpo" and cfg.dpo.precompute_ref:  # reference log-probs first: 1 model in training
        from nsft_ray.ray_glue.dpo import with_reference_logps

        ds = with_reference_logps(ds, cfg, run_dir)  # checks that every row comes back once
    return ds, counts, rows


def _startup(started: float, fit_start: float, workers: list[dict],
             metrics: list[dict]) -> dict[str, float] | None:
    """Where the time from `train()` to the first optimizer step went (first worker start):
    prepare (config, memory check, validation, materialize), workers (Train controller, worker
    processes and their imports), model load, engine init (DeepSpeed or torch), first step
    (the data stream's start and the step itself)."""
    first = next((m["first_step_time"] for m in metrics if "first_step_time" in m), None)
    worker = min(workers, key=lambda w: w["time"], default=None)
    if first is None or worker is None or "entered" not in worker:
        return None
    marks = {"prepare": fit_start, "workers": worker["entered"],
             "model_load": worker["model_loaded"], "engine_init": worker["engine_ready"],
             "first_step": first}
    out, last = {}, started
    for name, t in marks.items():
        out[name], last = round(t - last, 2), t
    out["total"] = round(first - started, 2)
    return out


def _peak(metrics: list[dict]) -> int:
    return max((m["peak_memory_bytes"] for m in metrics), default=0)


def _scaling(res: ResourcesConfig) -> ScalingConfig:
    """One worker per accelerator; a non-GPU accelerator (a simulated cluster's custom
    resource) is asked for by name and the workers train on CPU."""
    per_worker = {"CPU": res.cpus_per_worker}
    if res.use_gpu and not on_gpus(res):
        per_worker[res.accelerator] = 1.0
    return ScalingConfig(num_workers=res.num_workers, use_gpu=on_gpus(res),
                         resources_per_worker=per_worker)


def _ingest_options(preserve_order: bool) -> ray.data.ExecutionOptions:
    """The driver's Ray Data execution options (as Ray Train's default), fixed row order if asked.

    Without preserve_order the streaming split hands blocks to whichever worker asks first (and
    prefers local ones), so which rows a worker sees, and in what order, varies between runs; a
    resumed run then skips the wrong micro-batches and losses stop being reproducible.
    """
    # A copy, not DataConfig.default_ingest_options(): that passes the deprecated
    # exclude_resources to ExecutionOptions and warns on every run.
    options = copy.deepcopy(ray.data.DataContext.get_current().execution_options)
    if preserve_order:
        options.preserve_order = True
    return options


def _mean(xs: list[float]) -> float:
    return round(sum(xs) / len(xs), 3) if xs else 0.0


# ------------------------------------------------------------------------------------ worker side


def _make_engine(model: torch.nn.Module, cfg: Config, total_steps: int, world_size: int,
                 device: torch.device):
    if cfg.deepspeed.enabled:
        from nsft_ray.ray_glue.deepspeed import DeepSpeedEngine

        return DeepSpeedEngine(
            model, cfg.deepspeed, cfg.optim, micro_batch_size=cfg.train.micro_batch_size,
            grad_accum=cfg.train.grad_accum, world_size=world_size, total_steps=total_steps,
            on_gpu=device.type == "cuda",
        )
    # DDP via Ray Train; find_unused_parameters because some vision towers have unused layers.
    wrapped = ray.train.torch.prepare_model(model, parallel_strategy_kwargs={
        "find_unused_parameters": True})
    optimizer = make_optimizer(wrapped, cfg.optim)
    return TorchEngine(wrapped, optimizer, make_scheduler(optimizer, cfg.optim, total_steps),
                       cfg.optim.max_grad_norm)


class NumpyCollate(NumpyBatchCollateFn):
    """Ray Data's typed wrapper for our collators (numpy batch in, torch tensors out); a bare
    function is deprecated since Ray 2.47."""

    def __init__(self, collate) -> None:
        self.collate = collate

    def __call__(self, batch: dict) -> dict:
        return self.collate(batch)


class FirstBatchEarly:
    """An iterator whose first item is fetched in a background thread from construction on;
    `batches()` then yields that item and the rest, once (None on a second call). The first
    item of a Ray Data shard costs its stream's start (the split coordinator actor, the first
    blocks read and formatted): about 1.5 s on the tiny configs, most of it waiting on other
    processes, so it overlaps model loading well."""

    def __init__(self, items: Iterable) -> None:
        self._it, self._first, self._error = iter(items), [], None
        self._thread = threading.Thread(target=self._fetch, name="first-batch", daemon=True)
        self._thread.start()

    def _fetch(self) -> None:
        try:
            self._first.append(next(self._it))
        except StopIteration:
            pass
        except BaseException as e:  # noqa: BLE001 - raised in the training thread by batches()
            self._error = e

    def batches(self) -> Iterator | None:
        if self._thread is None:
            return None
        self._thread.join()
        self._thread = None
        if self._error is not None:
            raise self._error
        return itertools.chain(self._first, self._it)


def train_loop_per_worker(config: dict) -> None:
    """Runs on every Ray Train worker."""
    entered = time.time()  # the start-up breakdown in summary.json starts here
    quiet_train_reports()
    cfg: Config = from_dict(Config, config["cfg"])
    algo, total_steps = config["algo"], config["total_steps"]
    run_dir = Path(config["run_dir"])
    ctx = ray.train.get_context()
    rank, world_size = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(cfg.run.seed + rank)
    device = ray.train.torch.get_device()

    spec = ALGORITHMS[algo]
    runtime = current_memory_bytes(device)  # torch, Ray and the data stack, before any model
    shard = ray.train.get_dataset_shard("train")  # (1) this worker's stream of rows

    def epoch_seed(epoch: int) -> int:  # the local shuffle's and the length grouping's
        return cfg.run.seed * 1000 + epoch

    def shuffle(epoch: int) -> dict:
        return ({"local_shuffle_buffer_size": 8 * cfg.train.micro_batch_size,
                 "local_shuffle_seed": epoch_seed(epoch)} if cfg.train.shuffle else {})

    def raw_batches(epoch: int) -> Iterable[dict]:
        return shard.iter_batches(batch_size=cfg.train.micro_batch_size, batch_format="numpy",
                                  drop_last=True, **shuffle(epoch))

    # A fresh start reads epoch 0 from the beginning: start that stream now, so that starting
    # the split and reading the first blocks overlap loading the model instead of following it.
    early = (FirstBatchEarly(raw_batches(0))
             if not cfg.train.prefetch_collate and ray.train.get_checkpoint() is None else None)
    model, processor = spec.load(cfg)
    model.to(device)
    loaded = time.time()
    objective = spec.objective(cfg, model, device)
    engine = _make_engine(model, cfg, total_steps, world_size, device)
    startup = {"entered": round(entered, 3), "model_loaded": round(loaded, 3),
               "engine_ready": round(time.time(), 3)}

    state = TrainState()
    checkpoint = ray.train.get_checkpoint()  # (3) resume: the latest reported checkpoint, if any
    if checkpoint:
        with checkpoint.as_directory() as d:
            state = TrainState(**engine.load(Path(d))["train_state"])
    _record_worker(run_dir, rank, state.step, runtime, startup)

    collate = spec.collate(processor, cfg)

    def epochs(epoch: int):
        if cfg.train.prefetch_collate:  # collated in Ray Data's iterator thread
            return shard.iter_torch_batches(batch_size=cfg.train.micro_batch_size,
                                            collate_fn=NumpyCollate(collate), drop_last=True,
                                            **shuffle(epoch))
        # Collated here, on the training thread: the same batches (Ray Data's thread still
        # fetches, shuffles and formats them), without two threads contending for the GIL.
        started = early.batches() if early is not None and epoch == 0 else None
        rows = started if started is not None else raw_batches(epoch)
        if cfg.train.group_by_length:
            from nsft_ray.collate import group_by_length  # transformers: only where it trains

            rows = group_by_length(rows, cfg.train.group_by_length, epoch_seed(epoch))
        return map(collate, rows)

    writer = MetricsWriter(run_dir) if rank == 0 else None
    bar = step_bar(algo, total_steps, state.step, show=rank == 0)
    hooks = _worker_hooks(cfg, algo, engine, run_dir, rank, writer, bar)
    fit(objective, engine, epochs, total_steps=total_steps, grad_accum=cfg.train.grad_accum,
        hooks=hooks, state=state, device=device, prefix=algo)
    bar.close()
    if cfg.train.export:
        export(spec, engine.module(), processor, run_dir / "model",
               zero3=cfg.deepspeed.enabled and cfg.deepspeed.zero_stage(world_size) == 3,
               rank=rank)
    if writer:
        writer.close()


def _worker_hooks(cfg: Config, algo: str, engine, run_dir: Path, rank: int,
                  writer: MetricsWriter | None, bar) -> Hooks:
    """How a worker's loop reports: metrics to the run folder (rank 0) and to Ray Train, each
    checkpoint through Ray Train, the step bar, and the test-only fault injection."""
    # When this start's first step ended (wall clock), sent once with the next log: the end of
    # summary.json's start-up breakdown.
    first_step: dict = {"time": None, "sent": False}

    def log(metrics: dict) -> None:
        if first_step["time"] is not None and not first_step["sent"]:
            metrics["first_step_time"], first_step["sent"] = first_step["time"], True
        if writer:
            writer.write(metrics)
            bar.set_description(f"{algo} loss {metrics.get(f'{algo}/loss', float('nan')):.4f}")
        ray.train.report(metrics)  # (2)

    def save(st: TrainState, metrics: dict) -> None:
        with tempfile.TemporaryDirectory() as d:
            engine.save(Path(d), {"train_state": st.to_dict()})
            # DeepSpeed: every rank wrote its shards; plain torch: rank 0 holds everything.
            keep = cfg.deepspeed.enabled or rank == 0
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(d) if keep else None)

    def crash_once(st: TrainState) -> None:
        marker = run_dir / f".crashed_at_{cfg.train.crash_at_step}"
        if rank == 0 and st.step == cfg.train.crash_at_step and not marker.exists():
            marker.touch()
            # Ray Train's controller collects reports when it polls the workers (every 2 s): wait
            # so the previous checkpoint is registered, as it would be for a crash at a random time.
            time.sleep(5)
            os._exit(1)  # fault injection: the worker process dies like an OOM-killed one

    def on_step(st: TrainState) -> None:
        if first_step["time"] is None:
            first_step["time"] = round(time.time(), 3)
        if cfg.train.crash_at_step:
            crash_once(st)

    return Hooks(log=log, checkpoint=save, log_every=cfg.train.log_every,
                 checkpoint_every=cfg.train.checkpoint_every, progress=bar.update,
                 on_step=on_step)


def _record_worker(run_dir: Path, rank: int, step: int, runtime_bytes: int,
                   startup: dict[str, float]) -> None:
    """Where this worker runs, the step it starts from, its memory before the model loaded and
    when its start-up stages ended (wall clock), one line per worker start (restarts included):
    summary.json's `workers`, `memory` and `startup_seconds`, and what a multi-node run is
    checked by."""
    ctx = ray.get_runtime_context()
    line = {"rank": rank, "node_id": ctx.get_node_id(), "pid": os.getpid(), "start_step": step,
            "time": round(time.time(), 3), "runtime_bytes": runtime_bytes, **startup}
    with (run_dir / WORKERS_FILE).open("a") as f:  # short appends: whole lines on one machine
        f.write(json.dumps(line) + "\n")


def read_workers(run_dir: Path) -> list[dict]:
    path = run_dir / WORKERS_FILE
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def export(spec, module: torch.nn.Module, processor, out: Path, *, zero3: bool,
           rank: int) -> None:
    """Write a Hugging Face folder (model + processor) that `load_vlm` reloads."""
    from nsft_ray.ray_glue.deepspeed import gathered_state_dict

    state = gathered_state_dict(module, zero3=zero3)  # collective under ZeRO-3
    if rank == 0:
        spec.save(module, processor, out, state)
