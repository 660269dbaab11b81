"""Model FLOP utilisation (MFU) of the in-process nsft recipe in bf16 on one GPU (issue 12).

    python benchmarks/bench_gpu.py --out $OUT/gpu.json          # on the GPU machine: small, 1b
    python benchmarks/bench_gpu.py --device cpu --dtype float32 --sizes tiny --steps 2 --warmup 1
        --batch 4 --out runs/bench/gpu_smoke.json                # the same path on CPU (a test)

Needs torch, transformers, pyarrow and Pillow, not Ray, DeepSpeed or vLLM: it is the script a
machine lent with only those runs. Per size (`small` ~36M parameters, `1b` ~1.2B, models.SIZES),
offline in a temporary folder, bench_train's assets: ShapesWorld, a randomly initialised Idefics3
VLM and the nSFT conversations of the world's preference rows. Then the nsft recipe in this
process, as bench_train's `nsft` method runs it: `spec.load` in `--dtype` (bf16 weights and
torch AdamW states in bf16, no autocast), the model moved to `--device`, `loop.fit` with
`TorchEngine`, the padded collator, `--batch` rows per step in row order, grad-norm clip 1.0.

Timing: the device is synchronised at the end of every step (`on_step`); the first `--warmup`
steps are excluded. FLOPs: bench_train's `flops_by_shape` (`FlopCounterMode` over forward +
backward of the objective, once per distinct batch shape of the timed steps, after the run):
matmuls and attention (torch's table has the CUDA SDPA kernels, bench_train adds CPU's); not
elementwise ops or the optimizer. The limit: the best of `--reps` square matmuls in `--dtype`
on the device (8192 on a GPU), timed with the device synchronised. MFU = achieved FLOP/s / that
limit, and against the nominal `--peak-tflops` (790: the H200's bf16 matmul as measured on this
workplace's machines).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from bench_train import (  # noqa: E402
    CONVERSATIONS,
    _counts,
    _epoch_batches,
    _rows,
    flops_by_shape,
    prepare_assets,
)

__all__ = ["matmul_limit", "run_size", "main"]

DEFAULT_BATCH = {"tiny": 8, "small": 64, "1b": 32}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_limit(device: torch.device, dtype: torch.dtype, reps: int) -> dict[str, Any]:
    """The best FLOP/s of an n x n x n matmul over `reps` timed products, per size."""
    sizes = (4096, 8192) if device.type == "cuda" else (512, 1024)
    by_size = {}
    for n in sizes:
        a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
        for _ in range(3):  # warm-up: kernel selection, clocks
            a @ b
        _sync(device)
        best = float("inf")
        for _ in range(reps):
            start = time.perf_counter()
            a @ b
            _sync(device)
            best = min(best, time.perf_counter() - start)
        by_size[str(n)] = 2 * n**3 / best
    return {"flops_per_s": max(by_size.values()), "by_size": by_size, "reps": reps}


def _train(cfg: Any, assets: Path, args: argparse.Namespace, batch: int,
           device: torch.device) -> dict[str, Any]:
    """The nsft recipe in this process; the per-step wall times, losses and batches."""
    from nsft_ray.algorithms import ALGORITHMS
    from nsft_ray.loop import Hooks, TorchEngine, fit, make_optimizer, make_scheduler
    from nsft_ray.models import param_count

    total = args.warmup + args.steps
    spec = ALGORITHMS["nsft"]
    model, processor = spec.load(cfg)
    model.to(device)
    objective = spec.objective(cfg, model, device)
    collate = spec.collate(processor, cfg)
    rows = _rows(assets)
    seen: list[dict] = []

    def epochs(epoch: int):
        for b in _epoch_batches(rows, collate, batch):
            seen.append(b)
            yield b

    opt = make_optimizer(model, cfg.optim)
    engine = TorchEngine(model, opt, make_scheduler(opt, cfg.optim, total), cfg.optim.max_grad_norm)
    marks: list[float] = []
    logs: list[dict] = []

    def on_step(state: Any) -> None:
        _sync(device)
        marks.append(time.perf_counter())

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    fit(objective, engine, epochs, total_steps=total, grad_accum=1,
        hooks=Hooks(log=logs.append, log_every=1, on_step=on_step), device=device)
    walls = [start, *marks]
    step_seconds = [b - a for a, b in zip(walls, walls[1:], strict=False)][args.warmup:]
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    timed = seen[args.warmup:total]
    return {"parameters": param_count(model), "step_seconds": step_seconds,
            "losses": [m["train/loss"] for m in logs], "peak_allocated_bytes": peak,
            "flops_per_step": flops_by_shape(model, objective, timed, device)[0],
            "tokens": [_counts(b) for b in timed]}


def run_size(size: str, root: Path, args: argparse.Namespace, device: torch.device,
             limit: float) -> dict[str, Any]:
    """Build the assets of `size`, train, and turn the timings and FLOPs into MFU."""
    from nsft_ray.config import load_config

    batch = args.batch or DEFAULT_BATCH.get(size, 8)
    build_start = time.perf_counter()
    prepared = prepare_assets(root, size, args.images, args.seed)
    build_seconds = time.perf_counter() - build_start
    cfg = load_config(None, [
        f"model.name_or_path={root / 'model'}", f"model.dtype={args.dtype}",
        f"model.attn_implementation={args.attn_implementation}", f"run.seed={args.seed}",
        f"train.data=[{root / CONVERSATIONS}]",
        f"train.micro_batch_size={batch}", "train.grad_accum=1",
        f"train.max_length={args.max_length}", f"train.max_steps={args.warmup + args.steps}",
        "train.shuffle=false", f"optim.lr={args.lr}", "optim.schedule=constant",
        "optim.warmup_ratio=0.0", "optim.weight_decay=0.0", "optim.max_grad_norm=1.0"])
    torch.manual_seed(args.seed)
    run = _train(cfg, root, args, batch, device)
    seconds = sum(run["step_seconds"])
    flops = sum(run["flops_per_step"])
    achieved = flops / seconds
    return {
        "size": size, "parameters": run["parameters"], "batch": batch,
        "attn_implementation": args.attn_implementation or "sdpa",
        "assets": prepared, "build_seconds": build_seconds,
        "timed_steps": args.steps, "warmup_steps": args.warmup,
        "seconds_per_step": seconds / args.steps,
        "median_seconds_per_step": statistics.median(run["step_seconds"]),
        "samples_per_s": batch * args.steps / seconds,
        "trained_tokens_per_s": sum(c["trained"] for c in run["tokens"]) / seconds,
        "padded_tokens_per_step": [batch * c["padded_length"] for c in run["tokens"]],
        "flops_per_step": run["flops_per_step"], "achieved_flops_per_s": achieved,
        "mfu_vs_measured_matmul": achieved / limit,
        "mfu_vs_nominal_peak": achieved / (args.peak_tflops * 1e12),
        "peak_allocated_bytes": run["peak_allocated_bytes"],
        "first_loss": run["losses"][0], "final_loss": run["losses"][-1],
    }


def table(report: dict[str, Any]) -> str:
    lines = ["| size | parameters | batch | s/step | samples/s | TFLOP/s | MFU (measured "
             "matmul) | MFU (nominal peak) | peak GiB | loss first -> last |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in report["sizes"]:
        peak = r["peak_allocated_bytes"]
        lines.append(
            f"| {r['size']} | {r['parameters'] / 1e6:,.1f}M | {r['batch']} | "
            f"{r['seconds_per_step']:.4f} | {r['samples_per_s']:.1f} | "
            f"{r['achieved_flops_per_s'] / 1e12:.2f} | {r['mfu_vs_measured_matmul']:.1%} | "
            f"{r['mfu_vs_nominal_peak']:.1%} | "
            f"{'-' if peak is None else f'{peak / 2**30:.1f}'} | "
            f"{r['first_loss']:.3f} -> {r['final_loss']:.3f} |")
    limit = report["matmul_limit"]["flops_per_s"] / 1e12
    return "\n".join([*lines, f"\nmeasured {report['dtype']} matmul limit: {limit:.1f} TFLOP/s "
                               f"on {report['device_name']}"])


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", nargs="+", default=["small", "1b"])
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batch", type=int, help="rows per step (default per size)")
    p.add_argument("--images", type=int, default=64, help="ShapesWorld train images")
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--reps", type=int, default=10, help="timed matmuls for the limit")
    p.add_argument("--peak-tflops", type=float, default=790.0)
    p.add_argument("--attn-implementation", default="",
                   help="model.attn_implementation (default: transformers' sdpa; "
                        "flash_attention_2 needs the flash-attn package)")
    p.add_argument("--out", type=Path)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = _parse(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no GPU here (--device cpu: the smoke run)")
    dtype = getattr(torch, args.dtype)
    limit = matmul_limit(device, dtype, args.reps)
    print(f"{args.dtype} matmul limit: {limit['flops_per_s'] / 1e12:.2f} TFLOP/s", flush=True)
    report: dict[str, Any] = {
        "device_name": (torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"),
        "torch": torch.__version__, "dtype": args.dtype, "matmul_limit": limit,
        "peak_tflops_nominal": args.peak_tflops, "args": {k: str(v) for k, v in vars(args).items()},
        "sizes": []}
    for size in args.sizes:
        with tempfile.TemporaryDirectory() as tmp:
            result = run_size(size, Path(tmp), args, device, limit["flops_per_s"])
        report["sizes"].append(result)
        print(f"{size}: {result['seconds_per_step']:.4f} s/step, "
              f"MFU {result['mfu_vs_measured_matmul']:.1%}", flush=True)
        if args.out:  # after each size: a run cut short still leaves the sizes it finished
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(report, indent=2))
    print(table(report))
    return report


if __name__ == "__main__":
    main()
