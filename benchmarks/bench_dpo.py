"""DPO throughput and memory: ours (live reference, precomputed reference) against TRL's DPOTrainer.

    .venv/bin/python benchmarks/bench_dpo.py --quick --out runs/bench/dpo_quick.json
    .venv/bin/python benchmarks/bench_dpo.py --steps 30 --batch 8 --repeats 3

Same tiny Idefics3 VLM, same ShapesWorld pairs in the same order (TRL with
train_sampling_strategy="sequential", ours unshuffled), same batch (pairs per step), beta, learning
rate (constant, AdamW, clipping at 1.0) and max_length. Each method runs in its own subprocess, so
the peak RSS is that method's alone. Ours runs in-process with `loop.fit` + `TorchEngine` (no Ray,
no DeepSpeed), collating images on the fly like TRL's collator, with dpo.shared_prefix (the
default: image, prompt and the answers' common opening once per pair, continuations on its KV
cache); `ours-live-stacked` is the same with shared_prefix off (one forward over 2B rows);
`ours-live-packed` packs the 2B sequences into padding-free rows of up to `--max-length` tokens
(`train.pack_tokens`; one forward, attention kept within each sequence). The
precomputed path runs the reference pass in a separate process first (as the Ray Data actor does)
and trains with one model. TRL runs as ENVIRONMENT.md says is fair on CPU: bf16/fp16 off, gradient
checkpointing off, an explicit ref_model; TRL 1.16 has no shared-prefix option, disables
padding_free and refuses precompute_ref_log_probs for vision data (the script records that).
samples/s = pairs per second over the steps after `--warmup`; with `--repeats` the methods run
round-robin and the table shows the median run (JSON: all). Every method runs with `--threads`
torch threads (default 1: on a shared 2-core machine two OpenMP threads per process ran 10x slower
than one); the JSON records the load average around the run.

`--fast-options`: every method trains what the demo trains, vision tower and connector frozen
(`model.freeze: [vision, connector]`; TRL: the same parameters frozen before the trainer builds its
optimizer), and ours feeds each image's features, computed once, to the policy and to the frozen
reference (`train.cache_image_features`, as bench_train.py's nsft): with the tower frozen there is
no reason to run it for every sequence of every model. TRL has no such option and runs the tower in
each of its forward passes.

`--quick` (under 4 minutes on 2 cores): ours-live-packed, ours-live and trl-live, all with a live
reference (2 models resident), 8 steps of 8 pairs, 3 interleaved repeats, `--fast-options`; the
JSON's `ratios.dpo_vs_trl_dpo` = median ours-live-packed pairs/s / median trl-live pairs/s (our
fast configuration, declared before measuring it, as bench_train's nsft packs its rows; TRL 1.16
turns padding_free off for vision data), `ratios.dpo_shared_prefix_vs_trl_dpo` the same for
ours-live, and `loss_check` compares each of ours' step losses with TRL's (same batches, same
start: they should agree).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

METHODS = ("ours-live", "ours-live-stacked", "ours-live-packed", "ours-precomputed", "trl-live",
           "trl-precomputed")
QUICK = {"steps": 8, "warmup": 2, "batch": 8, "repeats": 3,
         "methods": ["ours-live-packed", "ours-live", "trl-live"], "fast_options": True}
# ratios: ours (method) over trl-live, like for like (a live reference on both sides).
RATIOS = (("ours-live-packed", "dpo_vs_trl_dpo"), ("ours-live", "dpo_shared_prefix_vs_trl_dpo"),
          ("ours-live-stacked", "dpo_stacked_vs_trl_dpo"))
# --fast-options: the demo's frozen tower, and the cached image features it allows (ours only).
FAST_OPTIONS = ("model.freeze=[vision,connector]", "train.cache_image_features=true")
# Step losses of ours and TRL on the same batches agree to this (float32, different kernels and
# tokenisation paths); step 1 is log 2 on both (policy == reference).
LOSS_TOLERANCE = 2e-3
NOTES = {
    "ours-live": "loop.fit + TorchEngine in-process (no Ray); policy + frozen reference; "
                 "shared prefix",
    "ours-live-stacked": "as ours-live with dpo.shared_prefix=false (2B full rows per forward)",
    "ours-live-packed": "as ours-live with train.pack_tokens=--max-length (2B sequences packed "
                        "into padding-free rows, one forward)",
    "ours-precomputed": "reference pass in its own process, then loop.fit with the policy only",
    "trl-live": "TRL 1.16 DPOTrainer, explicit ref_model, fp32, no grad checkpointing",
    "trl-precomputed": "TRL 1.16 DPOTrainer with precompute_ref_log_probs=True",
}


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def rate(times: list[float], batch: int, warmup: int) -> float:
    """Pairs per second between the end of step `warmup` and the end of the last step."""
    if len(times) <= warmup:
        raise ValueError(f"need more than --warmup={warmup} steps, got {len(times)}")
    return batch * (len(times) - warmup) / (times[-1] - times[warmup - 1])


def load_rows(path: Path, n: int) -> list[dict]:
    import pyarrow.parquet as pq

    rows = pq.read_table(path).to_pylist()
    if len(rows) < n:
        raise ValueError(f"{path} holds {len(rows)} pairs, the benchmark needs {n}")
    return rows[:n]


# ------------------------------------------------------------------------------- one method each


def precompute(args: argparse.Namespace) -> dict:
    """The reference pass (what ray_glue/dpo.py's actor does), writing the columns to Parquet."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from nsft_ray.algorithms.dpo import reference_logps
    from nsft_ray.models import load_vlm
    from nsft_ray.preference_collate import PreferenceCollator

    start = time.perf_counter()
    rows = load_rows(args.data, args.steps * args.batch)
    model, processor = load_vlm(args.model)
    collate = PreferenceCollator(processor, args.max_length)
    for i in range(0, len(rows), 16):
        chosen, rejected = reference_logps(model, collate(rows[i:i + 16]))
        for r, c, j in zip(rows[i:i + 16], chosen.tolist(), rejected.tolist(), strict=True):
            r.update(ref_chosen_logps=c, ref_rejected_logps=j)
    pq.write_table(pa.Table.from_pylist(rows), args.work / "ref_logps.parquet")
    return {"seconds": time.perf_counter() - start, "peak_rss_bytes": peak_rss()}


def ours(args: argparse.Namespace, precomputed: bool, shared_prefix: bool = True,
         packed: bool = False) -> dict:
    import torch

    from nsft_ray.algorithms import ALGORITHMS
    from nsft_ray.config import OptimConfig, load_config
    from nsft_ray.loop import Hooks, TorchEngine, fit, make_optimizer, make_scheduler

    torch.manual_seed(0)
    data = args.work / "ref_logps.parquet" if precomputed else args.data
    rows = load_rows(data, args.steps * args.batch)
    # The model and objective a dpo training run builds (load + model.freeze, the frozen
    # reference copy, the feature cache when the tower is frozen).
    cfg = load_config(None, [f"model.name_or_path={args.model}", f"dpo.beta={args.beta}",
                             f"dpo.precompute_ref={str(precomputed).lower()}",
                             f"dpo.shared_prefix={str(shared_prefix).lower()}",
                             f"train.max_length={args.max_length}",
                             f"train.pack_tokens={args.max_length if packed else 0}",
                             *(FAST_OPTIONS if args.fast_options else ())])
    model, processor = ALGORITHMS["dpo"].load(cfg)
    objective = ALGORITHMS["dpo"].objective(cfg, model, torch.device("cpu"))
    optim = OptimConfig(lr=args.lr, schedule="constant", warmup_ratio=0.0, max_grad_norm=1.0)
    optimizer = make_optimizer(model, optim)
    engine = TorchEngine(model, optimizer, make_scheduler(optimizer, optim, args.steps), 1.0)
    collate = ALGORITHMS["dpo"].collate(processor, cfg)  # PreferenceCollator, packed or not
    times: list[float] = []
    losses: list[float] = []

    def epochs(epoch: int):
        return (collate(rows[i:i + args.batch]) for i in range(0, len(rows), args.batch))

    hooks = Hooks(log=lambda m: losses.append(m["dpo/loss"]), log_every=1,
                  on_step=lambda s: times.append(time.perf_counter()))
    fit(objective, engine, epochs, total_steps=args.steps, grad_accum=1, hooks=hooks,
        prefix="dpo")
    return {"samples_per_s": rate(times, args.batch, args.warmup), "peak_rss_bytes": peak_rss(),
            "first_loss": losses[0], "last_loss": losses[-1], "losses": losses,
            "models_resident": 2 - precomputed}


def trl(args: argparse.Namespace, precomputed: bool) -> dict:
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from nsft_ray.collate import decode_image
    from nsft_ray.models import freeze, load_vlm

    torch.manual_seed(0)
    rows = load_rows(args.data, args.steps * args.batch)
    model, processor = load_vlm(args.model)
    if args.fast_options:  # the same trainable weights as ours' model.freeze
        freeze(model, ("vision", "connector"))
    ref_model, _ = load_vlm(args.model)
    dataset = Dataset.from_list([{
        "images": [decode_image(r["image"])],
        "prompt": [{"role": "user", "content": r["prompt"]}],
        "chosen": [{"role": "assistant", "content": r["chosen"]}],
        "rejected": [{"role": "assistant", "content": r["rejected"]}],
    } for r in rows])
    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, *_args, **_kwargs):
            times.append(time.perf_counter())

    config = DPOConfig(
        output_dir=str(args.work / "trl"), use_cpu=True, report_to=[], bf16=False, fp16=False,
        gradient_checkpointing=False, per_device_train_batch_size=args.batch,
        max_steps=args.steps, learning_rate=args.lr, lr_scheduler_type="constant",
        warmup_steps=0, max_grad_norm=1.0, beta=args.beta, loss_type=["sigmoid"],
        max_length=args.max_length, logging_steps=1, save_strategy="no", seed=0,
        dataloader_num_workers=0, precompute_ref_log_probs=precomputed,
        train_sampling_strategy="sequential",  # ours' batches, in ours' order: comparable losses
    )
    try:
        trainer = DPOTrainer(model=model, ref_model=None if precomputed else ref_model,
                             args=config, train_dataset=dataset, processing_class=processor,
                             callbacks=[Clock()])
    except (ValueError, NotImplementedError) as e:
        return {"unsupported": str(e).splitlines()[0][:160]}
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"samples_per_s": rate(times, args.batch, args.warmup), "peak_rss_bytes": peak_rss(),
            "first_loss": losses[0], "last_loss": losses[-1], "losses": losses,
            "models_resident": 2}


def run_one(args: argparse.Namespace) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    if args.method == "precompute":
        return precompute(args)
    if args.method.startswith("ours"):
        return ours(args, precomputed=args.method == "ours-precomputed",
                    shared_prefix=args.method != "ours-live-stacked",
                    packed=args.method == "ours-live-packed")
    return trl(args, precomputed=args.method == "trl-precomputed")


# ------------------------------------------------------------------------------- driver


def spawn(args: argparse.Namespace, method: str) -> dict:
    cmd = [sys.executable, __file__, "--method", method, "--work", str(args.work),
           "--model", str(args.model), "--data", str(args.data), "--steps", str(args.steps),
           "--batch", str(args.batch), "--warmup", str(args.warmup), "--lr", str(args.lr),
           "--beta", str(args.beta), "--max-length", str(args.max_length),
           "--threads", str(args.threads), *(["--fast-options"] if args.fast_options else [])]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise RuntimeError(f"{method} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def build_assets(work: Path, pairs: int, size: str) -> tuple[Path, Path]:
    from nsft_ray.config import WorldConfig
    from nsft_ray.models import build_tiny_vlm
    from nsft_ray.world import corpus, write_world

    wcfg = WorldConfig(n_train=(pairs + 1) // 2, n_eval=2, pairs_per_image=2)
    write_world(wcfg, work / "world", seed=0)
    model = build_tiny_vlm(work / "model", corpus(WorldConfig(), n=300, seed=0), size=size)
    return model, work / "world" / "pref_train.parquet"


def median_run(runs: list[dict]) -> dict:
    """The run with the median samples/s (the lower middle one for an even count)."""
    if "unsupported" in runs[0]:
        return runs[0]
    return sorted(runs, key=lambda r: r["samples_per_s"])[(len(runs) - 1) // 2]


def ratios(results: dict[str, dict]) -> dict[str, float]:
    """Ours over TRL in median pairs/s, like for like: both with a live reference."""
    out = {}
    trl_rate = results.get("trl-live", {}).get("samples_per_s")
    for name, key in RATIOS:
        if trl_rate and "samples_per_s" in results.get(name, {}):
            out[key] = results[name]["samples_per_s"] / trl_rate
    return out


def loss_check(runs: dict[str, list[dict]]) -> dict:
    """Step losses of each of our live methods against TRL's, repeat by repeat (same batches)."""
    out = {}
    trl_runs = [r for r in runs.get("trl-live", []) if "losses" in r]
    for name, _ in RATIOS:
        pairs = list(zip(runs.get(name, []), trl_runs, strict=False))
        if not pairs:
            continue
        diff = max(abs(a - b) for ours_run, trl_run in pairs
                   for a, b in zip(ours_run["losses"], trl_run["losses"], strict=True))
        first = [r["losses"][0] for run in pairs for r in run]
        out[f"{name}_vs_trl-live"] = {
            "max_abs_step_loss_diff": diff, "tolerance": LOSS_TOLERANCE,
            "first_losses_are_log2": all(abs(x - math.log(2)) < 1e-4 for x in first),
            "agree": diff <= LOSS_TOLERANCE}
    return out


def table(results: dict[str, dict]) -> str:
    head = f"{'method':<18} {'pairs/s':>8} {'peak RSS MiB':>12} {'models':>6} {'loss@1':>7} " \
           f"{'loss@end':>8}  notes"
    lines = [head, "-" * len(head)]
    for name, r in results.items():
        if "unsupported" in r:
            lines.append(f"{name:<18} {'n/a':>8} {'n/a':>12} {'':>6} {'':>7} {'':>8}  "
                         f"unsupported: {r['unsupported']}")
            continue
        rss = r["peak_rss_bytes"] / 2**20
        extra = ""
        if "precompute_seconds" in r:
            extra = (f"; reference pass {r['precompute_seconds']:.1f} s, "
                     f"{r['precompute_peak_rss_bytes'] / 2**20:.0f} MiB peak in its process")
        lines.append(f"{name:<18} {r['samples_per_s']:>8.1f} {rss:>12.0f} "
                     f"{r['models_resident']:>6} {r['first_loss']:>7.4f} {r['last_loss']:>8.4f}"
                     f"  {NOTES[name]}{extra}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch", type=int, default=8, help="pairs per optimizer step")
    p.add_argument("--warmup", type=int, default=3, help="steps left out of samples/s")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--size", choices=["tiny", "small"], default="tiny")
    p.add_argument("--threads", type=int, default=1, help="torch threads per method")
    p.add_argument("--repeats", type=int, default=1, help="runs per method (median shown)")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--fast-options", action="store_true",
                   help="freeze vision + connector for every method; ours also feeds each "
                        "image's features, computed once, to the policy and the reference")
    p.add_argument("--quick", action="store_true",
                   help=f"ours-live vs trl-live, median of 3 interleaved repeats: {QUICK}")
    p.add_argument("--out", type=Path, default=Path("runs/bench/dpo.json"))
    p.add_argument("--method", help=argparse.SUPPRESS)  # internal: run one method, print RESULT
    p.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:  # explicit flags on the command line still win
        given = {a.split("=")[0] for a in (argv if argv is not None else sys.argv[1:])}
        for key, value in QUICK.items():
            if f"--{key.replace('_', '-')}" not in given:
                setattr(args, key, value)
    if args.method:
        print("RESULT " + json.dumps(run_one(args)), flush=True)
        return

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        args.work = Path(tmp)
        args.model, args.data = build_assets(args.work, args.steps * args.batch, args.size)
        runs: dict[str, list[dict]] = {m: [] for m in args.methods}
        for _ in range(args.repeats):  # round-robin: a burst of load hits every method alike
            for method in args.methods:
                if method == "ours-precomputed":
                    pre = spawn(args, "precompute")
                result = spawn(args, method)
                if method == "ours-precomputed":
                    result.update(precompute_seconds=pre["seconds"],
                                  precompute_peak_rss_bytes=pre["peak_rss_bytes"])
                runs[method].append(result)
                print(f"{method}: {result}", file=sys.stderr, flush=True)
    results = {m: median_run(r) for m, r in runs.items()}
    print(table(results))
    summary = {"ratios": ratios(results), "loss_check": loss_check(runs)}
    print(json.dumps(summary, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: getattr(args, k) for k in ("steps", "batch", "warmup", "lr", "beta",
                                              "max_length", "size", "threads", "repeats",
                                              "methods", "fast_options", "quick")}
    load = {"before": load_before, "after": os.getloadavg(), "cpus": os.cpu_count()}
    args.out.write_text(json.dumps({**summary, "settings": settings, "load_average": load,
                                    "notes": {m: NOTES[m] for m in args.methods},
                                    "results": results, "runs": runs}, indent=2))
    print(f"load average before {load_before[0]:.1f}, after {load['after'][0]:.1f} "
          f"on {load['cpus']} CPUs")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
