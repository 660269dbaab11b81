"""SFT training throughput: nsft-ray's `sft` and `nsft` trainers vs TRL's `SFTTrainer`, in one run.

    python benchmarks/bench_sft.py --out runs/bench_sft.json [--steps 40 --batch 8 --size tiny]

Builds, offline in a temporary folder, a small ShapesWorld, a randomly initialised tiny Idefics3 VLM
and the nSFT conversations of the world's preference rows (chosen + negatives, `construct_rows`).
Every method then trains the SAME model (one saved init), on the SAME rows in the SAME order
(sequential, incomplete last batch dropped), with the same batch size, optimizer (AdamW, constant
LR, no warm-up schedule, grad-norm clip 1.0), max_length and number of steps:

- `sft`: nsft-ray's `sft` objective (one token mean) through `loop.fit` + `TorchEngine`, called
  directly (no Ray: no Ray Data, no Ray Train worker, no object store; the collator runs inline).
  It trains the nSFT rows here, not chosen-only rows as the continual-SFT baseline does, so all
  three methods process identical batches;
- `nsft`: the `nsft` objective (chosen term + lam * negative term, each a token mean), same path;
- `trl_sft`: TRL's `SFTTrainer` with `assistant_only_loss=True`; our chat template carries
  `{% generation %}` markers, so TRL trains exactly the tokens our collator labels (the JSON's
  `checks.trained_tokens_match` compares them step by step) and its losses equal `sft`'s.

Each method runs in a fresh subprocess (this script with `--one`), so peak RSS does not mix, with
`--threads` torch threads (default 1: see `_parse`), `--repeats` times, interleaved with the other
methods; the fastest run is reported and every run's throughput is kept in the JSON.
The first `--warmup` steps are excluded from the timing; every timed step includes collating its
batch (PNG decode + chat template + image processor), as both trainers do on the fly.
Tokens/s counts trained (loss) tokens; `input_tokens_per_s` in the JSON counts every
non-padding token. Besides wall time, each run records its process's CPU time over the timed
steps: with one thread it is the wall time the step would take on an idle core, and it moves far
less than wall time when other jobs share the machine. Timings are measurements, never asserted.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository's packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

__all__ = ["METHODS", "prepare_assets", "run_one", "measure", "run_bench", "markdown_table",
           "main"]

METHODS = ("sft", "nsft", "trl_sft")
NOTES = {
    "sft": "nsft-ray loop.fit + TorchEngine, in-process (no Ray)",
    "nsft": "same path; loss = chosen mean + lam * negative mean",
    "trl_sft": "TRL SFTTrainer, assistant_only_loss=True, fp32, no grad checkpointing",
}
CONVERSATIONS = "conversations.parquet"


# ---------------------------------------------------------------------------------------------
# Assets (parent process)
# ---------------------------------------------------------------------------------------------


def prepare_assets(root: Path, size: str, images: int, seed: int) -> dict[str, Any]:
    """World, tiny VLM (root/model), chosen + negative conversations (root/CONVERSATIONS)."""
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
# One method (child process)
# ---------------------------------------------------------------------------------------------


def _rss_mib() -> float:
    """Peak RSS of this process so far, MiB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _trained_tokens(labels: Any) -> int:
    """Tokens the loss trains on: shifted labels that are not -100 (the causal-LM shift)."""
    return int((labels[:, 1:] != -100).sum())


def _run_ours(method: str, assets: Path, args: argparse.Namespace) -> dict[str, Any]:
    import pyarrow.parquet as pq

    from nsft_ray.algorithms import ALGORITHMS
    from nsft_ray.config import Config, OptimConfig, TrainConfig
    from nsft_ray.loop import Hooks, TorchEngine, fit, make_optimizer, make_scheduler
    from nsft_ray.models import load_vlm

    total = args.warmup + args.steps
    cfg = Config(train=TrainConfig(max_length=args.max_length, micro_batch_size=args.batch))
    optim = OptimConfig(lr=args.lr, schedule="constant", warmup_ratio=0.0, max_grad_norm=1.0)
    model, processor = load_vlm(assets / "model")
    spec = ALGORITHMS[method]
    objective = spec.objective(cfg, model, "cpu")
    collate = spec.collate(processor, cfg)
    rows = pq.read_table(assets / CONVERSATIONS).to_pylist()
    counts: list[tuple[int, int]] = []  # (trained, input) tokens per micro-batch, in order

    def epochs(epoch: int):
        for start in range(0, len(rows) - args.batch + 1, args.batch):  # drop the last partial
            chunk = rows[start:start + args.batch]
            batch = collate({k: [r[k] for r in chunk] for k in chunk[0]})  # Ray Data's columns
            counts.append((_trained_tokens(batch["labels"]), int(batch["attention_mask"].sum())))
            yield batch

    opt = make_optimizer(model, optim)
    engine = TorchEngine(model, opt, make_scheduler(opt, optim, total), optim.max_grad_norm)
    logs: list[dict] = []
    marks: list[tuple[float, float]] = []
    hooks = Hooks(log=logs.append, log_every=1, on_step=lambda s: marks.append(_now()))
    rss_setup = _rss_mib()
    start = _now()
    state = fit(objective, engine, epochs, total_steps=total, grad_accum=1, hooks=hooks)
    losses = [m["train/loss"] for m in logs]
    extra = {k.removeprefix("train/"): logs[-1][k] for k in logs[-1]
             if k in ("train/chosen_loss", "train/negative_loss")}
    return _summary(args, start, marks, counts, losses, state.step, rss_setup, extra)


def _run_trl(assets: Path, args: argparse.Namespace) -> dict[str, Any]:
    import datasets
    import pyarrow.parquet as pq
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from nsft_ray.collate import decode_image
    from nsft_ray.models import load_vlm

    total = args.warmup + args.steps
    model, processor = load_vlm(assets / "model")
    rows = pq.read_table(assets / CONVERSATIONS).to_pylist()
    dataset = datasets.Dataset.from_list(
        [{"images": [decode_image(r["image"])], "messages": r["messages"]} for r in rows])
    config = SFTConfig(
        output_dir=str(assets / "trl_out"), max_steps=total, per_device_train_batch_size=args.batch,
        learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0, optim="adamw_torch",
        weight_decay=0.0, max_grad_norm=1.0, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8,
        # Fair on CPU: TRL's defaults (bf16 autocast, gradient checkpointing) are ~5x slower here.
        bf16=False, fp16=False, gradient_checkpointing=False, use_cpu=True,
        assistant_only_loss=True, max_length=args.max_length, packing=False,
        train_sampling_strategy="sequential", dataloader_drop_last=True, dataloader_num_workers=0,
        logging_steps=1, save_strategy="no", report_to=[], disable_tqdm=True, seed=args.seed,
    )
    marks: list[tuple[float, float]] = []

    class StepTimes(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            marks.append(_now())

    trainer = SFTTrainer(model=model, args=config, train_dataset=dataset,
                         processing_class=processor, callbacks=[StepTimes()])
    counts: list[tuple[int, int]] = []
    trl_collate = trainer.data_collator

    def counting_collate(examples: list[dict]) -> dict:
        batch = trl_collate(examples)
        counts.append((_trained_tokens(batch["labels"]), int(batch["attention_mask"].sum())))
        return batch

    trainer.data_collator = counting_collate  # read when train() builds its dataloader
    rss_setup = _rss_mib()
    start = _now()
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    # The dataloader may fetch a batch ahead: only the first `total` batches were trained on.
    return _summary(args, start, marks, counts[:total], losses, trainer.state.global_step,
                    rss_setup, {})


def _now() -> tuple[float, float]:
    """(wall clock, this process's CPU time), seconds."""
    return time.perf_counter(), time.process_time()


def _summary(args: argparse.Namespace, start: tuple[float, float],
             marks: list[tuple[float, float]], counts: list[tuple[int, int]],
             losses: list[float], steps_done: int, rss_setup: float,
             extra: dict[str, Any]) -> dict[str, Any]:
    """Throughput over the steps after warm-up; per-step trained tokens and losses for checks."""
    total = args.warmup + args.steps
    if len(marks) != total or len(counts) < total:
        raise RuntimeError(f"expected {total} steps and batches, got {len(marks)} step "
                           f"times and {len(counts)} batches")
    t0 = marks[args.warmup - 1] if args.warmup else start
    seconds, cpu_seconds = marks[-1][0] - t0[0], marks[-1][1] - t0[1]
    walls = [t[0] for t in (t0, *marks[args.warmup:])]
    step_seconds = sorted(b - a for a, b in zip(walls, walls[1:], strict=False))
    timed = counts[args.warmup:total]
    return {
        "steps_done": steps_done, "warmup_steps": args.warmup, "timed_steps": args.steps,
        "batch": args.batch, "timed_seconds": seconds,
        "seconds_per_step": seconds / args.steps,
        # CPU time of this process: what the work costs, whatever other jobs do to wall time.
        "cpu_seconds_per_step": cpu_seconds / args.steps,
        "samples_per_cpu_s": args.steps * args.batch / cpu_seconds,
        # Less sensitive than the mean to other jobs' bursts on a shared machine.
        "median_seconds_per_step": step_seconds[len(step_seconds) // 2],
        "samples_per_s": args.steps * args.batch / seconds,
        "tokens_per_s": sum(t for t, _ in timed) / seconds,
        "input_tokens_per_s": sum(n for _, n in timed) / seconds,
        "trained_tokens_per_step": [t for t, _ in counts[:total]],
        "first_loss": losses[0], "final_loss": losses[-1], "losses": losses,
        "rss_setup_mib": rss_setup, "peak_rss_mib": _rss_mib(), **extra,
    }


def run_one(method: str, assets: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Train `method` in this process and return its measurements."""
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    load_before = os.getloadavg()[0]
    runners: dict[str, Callable[[], dict[str, Any]]] = {
        "sft": lambda: _run_ours("sft", assets, args),
        "nsft": lambda: _run_ours("nsft", assets, args),
        "trl_sft": lambda: _run_trl(assets, args),
    }
    if method not in runners:
        raise ValueError(f"method {method!r}: expected one of {', '.join(runners)}")
    result = runners[method]()
    result.update(method=method, torch_threads=torch.get_num_threads(), note=NOTES[method],
                  load_average_1min=[load_before, os.getloadavg()[0]])  # before, after
    return result


# ---------------------------------------------------------------------------------------------
# Parent: one subprocess per method, the table, the JSON
# ---------------------------------------------------------------------------------------------


def _shared_flags(args: argparse.Namespace) -> list[str]:
    return ["--steps", str(args.steps), "--warmup", str(args.warmup), "--batch", str(args.batch),
            "--max-length", str(args.max_length), "--lr", str(args.lr), "--seed", str(args.seed),
            "--threads", str(args.threads)]


def measure(method: str, assets: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Run `method` in a fresh Python process (this script with --one) and read its result."""
    result_file = assets / f"result_{method}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--one", method,
           "--assets", str(assets), "--result", str(result_file), *_shared_flags(args)]
    threads = str(args.threads)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    wall = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0 or not result_file.is_file():
        tail = (proc.stdout + proc.stderr)[-4000:]
        raise RuntimeError(f"method {method} failed (exit {proc.returncode}):\n{tail}")
    result = json.loads(result_file.read_text())
    result["process_seconds"] = time.perf_counter() - wall  # imports + setup + training
    return result


def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    """Prepare assets in a temporary folder, measure every method, return the report."""
    started = datetime.datetime.now().astimezone()
    machine = _machine()
    with tempfile.TemporaryDirectory(prefix="bench_sft_") as tmp:
        assets = Path(tmp)
        data = prepare_assets(assets, args.size, args.images, args.seed)
        runs: dict[str, list[dict[str, Any]]] = {m: [] for m in args.methods}
        for _ in range(args.repeats):
            for m in args.methods:  # interleaved, so a burst of other jobs hits every method
                runs[m].append(measure(m, assets, args))
    results = {m: _best(rs) for m, rs in runs.items()}
    report = {
        "benchmark": "bench_sft", "date": started.isoformat(timespec="seconds"),
        "settings": {"size": args.size, "steps": args.steps, "warmup": args.warmup,
                     "batch": args.batch, "max_length": args.max_length, "lr": args.lr,
                     "seed": args.seed, "threads": args.threads, "repeats": args.repeats},
        "data": data, "machine": machine, "results": results,
    }
    machine["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    if "sft" in results and "trl_sft" in results:
        sft, trl = results["sft"], results["trl_sft"]
        report["checks"] = {
            "trained_tokens_match": (sft["trained_tokens_per_step"]
                                     == trl["trained_tokens_per_step"]),
            "first_loss_abs_diff": abs(sft["first_loss"] - trl["first_loss"]),
            "max_loss_abs_diff": max(abs(a - b) for a, b in zip(sft["losses"], trl["losses"],
                                                                 strict=True)),
        }
    return report


def _best(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The fastest run of a method (other jobs only ever slow a run down), with every run's
    throughput and load under `runs`; peak RSS is the largest of all runs."""
    best = dict(min(runs, key=lambda r: r["timed_seconds"]))
    keep = ("samples_per_s", "seconds_per_step", "cpu_seconds_per_step", "peak_rss_mib",
            "load_average_1min")
    best["runs"] = [{k: r[k] for k in keep} for r in runs]
    best["peak_rss_mib"] = max(r["peak_rss_mib"] for r in runs)
    return best


def _machine() -> dict[str, Any]:
    import torch
    import transformers
    import trl

    return {"cpus": os.cpu_count(), "gpu": torch.cuda.is_available(),
            "load_average": [round(x, 2) for x in os.getloadavg()],
            "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "trl": trl.__version__}


def markdown_table(report: dict[str, Any]) -> str:
    """The results as a Markdown table (one row per method) with the settings underneath."""
    lines = ["| method | samples/s | trained tok/s | s/step (median) | CPU s/step | "
             "samples/CPU-s | peak RSS MiB | final loss | path |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for method, r in report["results"].items():
        lines.append(f"| {method} | {r['samples_per_s']:.1f} | {r['tokens_per_s']:.0f} | "
                     f"{r['seconds_per_step']:.3f} ({r['median_seconds_per_step']:.3f}) | "
                     f"{r['cpu_seconds_per_step']:.3f} | {r['samples_per_cpu_s']:.1f} | "
                     f"{r['peak_rss_mib']:.0f} | "
                     f"{r['final_loss']:.4f} | {r['note']} |")
    s, d, m = report["settings"], report["data"], report["machine"]
    runs = f"best of {s['repeats']} interleaved runs per method"
    lines.append("")
    lines.append(f"{s['size']} Idefics3 ({d['parameters'] / 1e6:.1f}M params), batch {s['batch']}, "
                 f"{s['steps']} timed steps after {s['warmup']} warm-up, lr {s['lr']}, "
                 f"{s['threads']} torch thread(s) per process, "
                 f"{runs if s['repeats'] > 1 else 'one run per method'}; "
                 f"{d['conversations']} conversations ({d['chosen']} chosen + {d['negative']} "
                 f"negative) from {d['preference_rows']} preference rows; {m['cpus']} CPUs, "
                 f"1-min load average {m['load_average'][0]} at the start.")
    if "checks" in report:
        c = report["checks"]
        lines.append(f"sft vs trl_sft: trained tokens per step identical: "
                     f"{c['trained_tokens_match']}; loss differs by {c['first_loss_abs_diff']:.1e} "
                     f"at step 1, by at most {c['max_loss_abs_diff']:.1e} over all steps.")
    return "\n".join(lines)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, help="write the JSON report here")
    p.add_argument("--steps", type=int, default=40, help="timed optimizer steps per method")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps before timing")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", choices=("tiny", "small"), default="tiny")
    p.add_argument("--images", type=int, default=32, help="ShapesWorld train images")
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--seed", type=int, default=0)
    # 1 by default: on a shared 2-core machine, 2 OpenMP threads contend with other jobs and
    # steps became 10-30x slower and erratic; one thread per process gives stable numbers.
    p.add_argument("--threads", type=int, default=1, help="torch threads per method process")
    p.add_argument("--repeats", type=int, default=1,
                   help="fresh processes per method, interleaved; the fastest is reported")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    # Internal: one method in this process (the parent starts a fresh process per method).
    p.add_argument("--one", choices=METHODS, help=argparse.SUPPRESS)
    p.add_argument("--assets", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for name, low in (("steps", 1), ("warmup", 0), ("batch", 1), ("threads", 1), ("repeats", 1)):
        if getattr(args, name) < low:
            p.error(f"--{name} {getattr(args, name)}: expected >= {low}")
    if args.one is None and args.out is None:
        p.error("--out is required")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = _parse(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may reach a model hub
    if args.one:
        result = run_one(args.one, args.assets, args)
        args.result.write_text(json.dumps(result))
        return result
    report = run_bench(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(markdown_table(report))
    print(f"\nJSON: {args.out}")
    bad = [m for m, r in report["results"].items()
           if not (math.isfinite(r["final_loss"]) and r["steps_done"] == args.warmup + args.steps)]
    if bad:
        raise SystemExit(f"methods that did not train: {', '.join(bad)}")
    return report


if __name__ == "__main__":
    main()
