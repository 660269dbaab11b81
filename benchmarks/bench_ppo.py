"""PPO step breakdown (generation / experience / train / sync seconds) and per-role peak memory.

    .venv/bin/python benchmarks/bench_ppo.py --iterations 4 --engines hf vllm \
        --out runs/bench/ppo.json

Builds the tiny Idefics3 VLM, a ShapesWorld split and a stand-in reward model (a fresh value
head) in a temporary folder, then runs `train_ppo` on a local Ray (four roles, each on its own
placement group, plus the rollout engine) once per engine. Phase times are means over the
iterations after `--warmup`; memory is each role's peak (RSS on CPU, summed over its actors).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

PHASES = ("generation", "experience", "train", "sync")


def build_assets(root: Path) -> dict[str, Path]:
    import nsft_ray.world as world
    from nsft_ray.config import WorldConfig
    from nsft_ray.models import VLMWithValueHead, build_tiny_vlm, load_vlm, save_value_model

    model = build_tiny_vlm(root / "model", world.corpus(WorldConfig(), n=300, seed=0))
    world.write_world(WorldConfig(n_train=64, n_eval=8), root / "world", seed=0)
    base, processor = load_vlm(model)
    save_value_model(VLMWithValueHead(base), root / "reward", processor)
    return {"model": model, "data": root / "world" / "pref_train.parquet",
            "reward": root / "reward"}


def run(engine: str, assets: dict[str, Path], args: argparse.Namespace, out_dir: Path) -> dict:
    from nsft_ray.config import load_config
    from nsft_ray.ray_glue.ppo import train_ppo

    cfg = load_config(None, [
        f"run.dir={out_dir / engine}", f"model.name_or_path={assets['model']}",
        f"train.data=[{assets['data']}]", f"ppo.reward_model={assets['reward']}",
        f"ppo.engine={engine}", f"ppo.iterations={args.iterations}",
        f"ppo.rollout_batch_size={args.batch}", f"ppo.mini_batch_size={args.batch // 2}",
        f"ppo.max_new_tokens={args.max_new_tokens}", "ppo.checkpoint_every=0",
        "optim.lr=1e-4", "optim.schedule=constant", "optim.warmup_ratio=0.0",
    ])
    summary = train_ppo(cfg)
    lines = [json.loads(s) for s in (out_dir / engine / "metrics.jsonl").read_text().splitlines()]
    timed = lines[args.warmup:] or lines
    phases = {p: sum(m[f"ppo/time/{p}_s"] for m in timed) / len(timed) for p in PHASES}
    return {
        "engine": engine,
        "iterations": len(lines),
        "seconds_per_iteration": phases | {"total": sum(phases.values())},
        "samples_per_s": sum(m["samples"] for m in timed) / sum(phases.values()),
        "peak_memory_bytes_per_role": summary["peak_memory_bytes_per_role"],
        "peak_memory_bytes": summary["peak_memory_bytes"],
        "models_resident": summary["models_resident"],
    }


def table(results: list[dict]) -> str:
    roles = list(results[0]["peak_memory_bytes_per_role"])
    head = ["engine", *[f"{p} s" for p in PHASES], "total s", "samples/s",
            *[f"{r} MiB" for r in roles], "sum MiB"]
    rows = [" | ".join(head), " | ".join("---" for _ in head)]
    for r in results:
        s, mem = r["seconds_per_iteration"], r["peak_memory_bytes_per_role"]
        cells = [r["engine"], *[f"{s[p]:.3f}" for p in PHASES], f"{s['total']:.3f}",
                 f"{r['samples_per_s']:.2f}", *[f"{mem[k] / 2**20:.0f}" for k in roles],
                 f"{r['peak_memory_bytes'] / 2**20:.0f}"]
        rows.append(" | ".join(cells))
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1, help="iterations left out of the means")
    parser.add_argument("--batch", type=int, default=8, help="prompts per iteration (even)")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--engines", nargs="+", default=["hf"], choices=["hf", "vllm"])
    parser.add_argument("--num-cpus", type=int, default=8, help="CPUs the local Ray announces")
    parser.add_argument("--out", type=Path, default=Path("runs/bench/ppo.json"))
    args = parser.parse_args()

    import ray

    ray.init(num_cpus=args.num_cpus, include_dashboard=False, runtime_env={"env_vars": {
        "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}})
    with tempfile.TemporaryDirectory() as tmp:
        assets = build_assets(Path(tmp) / "assets")
        results = [run(e, assets, args, Path(tmp) / "runs") for e in args.engines]
    ray.shutdown()
    print(table(results))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"config": {k: str(v) for k, v in vars(args).items()},
                                    "results": results}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":  # vLLM's workers start with spawn
    main()
