"""`nsft-ray compare`: every method from the same base, on the same data, evaluated the same way.

    nsft-ray compare --config jobs/configs/tiny/compare.yaml --out runs/compare

For each seed and each method of ``compare.methods`` (base, sft, nsft, dpo, ppo):

- ``base``  — the starting checkpoint itself, evaluated as the reference point;
- ``sft``   — continual SFT on the chosen answers (origin "chosen" of ``compare.conversations``);
- ``nsft``  — the same chosen conversations plus the corrective ones (origin "negative");
- ``dpo``   — policy + frozen reference on ``compare.preferences``;
- ``ppo``   — actor, critic, reward and reference on their own placement groups; its reward model is
  trained first (Bradley-Terry on the same preferences) and its cost reported with PPO's.

sft, nsft and dpo get the same budget: ``compare.steps`` optimizer steps of
``train.micro_batch_size`` x ``train.grad_accum`` sequences (pairs, for DPO). Each (method, seed)
writes a record under OUT/records/; a repeated command skips finished records (resume at method
level). The report (report.json, report.md, PNG plots) is built from all records by
``nsft_ray.report``.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

from nsft_ray.config import Config, save_config

__all__ = ["compare", "run_method", "role_bytes"]

GRADIENT_METHODS = ("sft", "nsft", "dpo")
KNOWN = ("base", *GRADIENT_METHODS, "ppo")
BYTES_PER_PARAM = {"float32": 4, "bfloat16": 2, "float16": 2}
ADAM_STATES = 2  # AdamW keeps two fp32 moments per trainable parameter


def role_bytes(method: str, cfg: Config, n_params: int, value_head: int = 0
               ) -> tuple[dict[str, int], dict[str, int]]:
    """Parameter and optimizer bytes per resident role (computed from counts, not measured)."""
    p = n_params * BYTES_PER_PARAM[cfg.model.dtype]
    opt = n_params * 4 * ADAM_STATES
    if method == "base":
        return {"policy": p}, {"policy": 0}
    if method == "sft" or (method == "nsft" and cfg.nsft.kl_coef == 0):
        return {"policy": p}, {"policy": opt}
    if method in ("nsft", "dpo"):
        if method == "dpo" and cfg.dpo.precompute_ref:
            return {"policy": p}, {"policy": opt}
        return {"policy": p, "reference": p}, {"policy": opt, "reference": 0}
    head = value_head * BYTES_PER_PARAM[cfg.model.dtype]
    params = {"actor": p, "critic": p + head, "reward": p + head, "reference": p}
    return params, {"actor": opt, "critic": opt + value_head * 4 * ADAM_STATES,
                    "reward": 0, "reference": 0}


def _with(cfg: Config, **sections: dict) -> Config:
    """`cfg` with some fields of some sections replaced: _with(cfg, train={"max_steps": 3})."""
    return dataclasses.replace(cfg, **{
        name: dataclasses.replace(getattr(cfg, name), **fields) for name, fields in sections.items()
    })


def _curve(run_dir: Path, key: str) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [{"step": r.get("step", r.get("iteration")), "loss": r[key]} for r in rows if key in r]


def run_method(method: str, seed: int, cfg: Config, out: Path) -> dict:
    """Train (unless base) and evaluate one method for one seed; return its record."""
    from nsft_ray.eval import evaluate
    from nsft_ray.models import load_vlm, param_count

    c = cfg.compare
    run_dir = out / "runs" / f"{method}-seed{seed}"
    base = _with(cfg, run={"seed": seed, "dir": str(run_dir)},
                 model={"name_or_path": c.base_model})
    summary: dict[str, Any] = {}
    curve: list[dict] = []
    if method in GRADIENT_METHODS:
        from nsft_ray.ray_glue.train import train

        data = c.preferences if method == "dpo" else c.conversations
        stage = _with(base, train={"data": (data,), "max_steps": c.steps},
                      optim={"lr": c.lr})
        summary = train(stage, method)
        curve = _curve(run_dir, f"{method}/loss")
        model_dir = run_dir / "model"
    elif method == "ppo":
        summary = _run_ppo(base, seed, out)
        curve = _curve(run_dir, "ppo/actor/policy_loss")
        model_dir = run_dir / "model"
    else:
        model_dir = Path(c.base_model)
    result = evaluate(str(model_dir), c.eval_data, cfg.eval, seed=seed)
    model, _ = load_vlm(c.base_model)
    n_params = param_count(model)
    hidden = getattr(model.config, "text_config", model.config).hidden_size
    params, optim = role_bytes(method, base, n_params, value_head=hidden + 1)
    memory = summary.get("peak_memory_bytes_per_role") or (
        {"policy": summary["peak_memory_bytes"]} if summary.get("peak_memory_bytes") else {})
    return {
        "method": method, "seed": seed, "eval": result,
        "models_resident": summary.get("models_resident", 1),
        "memory_by_role": memory, "param_bytes_by_role": params,
        "optimizer_bytes_by_role": optim,
        "train_seconds": summary.get("train_seconds", 0.0) + summary.get("reward_seconds", 0.0),
        "samples_per_s": summary.get("samples_per_s"),
        "tokens_per_s": summary.get("tokens_per_s"),
        "steps": summary.get("steps", summary.get("iterations")),
        "curve": curve,
        "model": str(model_dir),
    }


def _run_ppo(cfg: Config, seed: int, out: Path) -> dict:
    """PPO from the base: its Bradley-Terry reward model first (unless given or rule-based)."""
    from nsft_ray.ray_glue.ppo import train_ppo
    from nsft_ray.ray_glue.train import train

    c = cfg.compare
    reward_seconds = 0.0
    ppo = cfg.ppo
    if ppo.reward == "model" and not ppo.reward_model:
        reward_dir = out / "runs" / f"reward-seed{seed}"
        if not (reward_dir / "model").exists():
            start = time.perf_counter()
            train(_with(cfg, run={"dir": str(reward_dir)},
                        train={"data": (c.preferences,), "max_steps": c.steps},
                        optim={"lr": c.lr}), "reward")
            reward_seconds = time.perf_counter() - start
        ppo = dataclasses.replace(ppo, reward_model=str(reward_dir / "model"))
    stage = dataclasses.replace(_with(cfg, train={"data": (c.preferences,)},
                                      optim={"lr": c.ppo_lr or c.lr}), ppo=ppo)
    summary = train_ppo(stage)
    summary["reward_seconds"] = round(reward_seconds, 2)
    return summary


def compare(cfg: Config, out: Path) -> dict:
    """Run every (seed, method) not already recorded under `out`, then write the report."""
    from nsft_ray.ray_glue.train import ensure_ray
    from nsft_ray.report import write_report

    c = cfg.compare
    unknown = [m for m in c.methods if m not in KNOWN]
    if unknown:
        raise ValueError(f"compare.methods: unknown {unknown[0]!r}; choose from {', '.join(KNOWN)}")
    needed = {"compare.base_model": c.base_model, "compare.eval_data": c.eval_data}
    if set(c.methods) & {"sft", "nsft"}:
        needed["compare.conversations"] = c.conversations
    if set(c.methods) & {"dpo", "ppo"}:
        needed["compare.preferences"] = c.preferences
    for key, value in needed.items():
        if not value:
            raise ValueError(f"{key}: required for methods {', '.join(c.methods)}")
        if not Path(value).exists():
            raise FileNotFoundError(f"{key}: {value} does not exist")
    out = out.resolve()
    save_config(cfg, out)
    ensure_ray(cfg.resources.address)
    records = []
    for seed in c.seeds:
        for method in c.methods:
            path = out / "records" / f"{method}-seed{seed}.json"
            if path.exists():
                print(f"=== {method} seed {seed}: recorded, skipped ({path})", flush=True)
            else:
                print(f"\n=== {method} seed {seed}", flush=True)
                record = run_method(method, seed, cfg, out)
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps(record, indent=2))
            records.append(json.loads(path.read_text()))
    agg = write_report(records, out, title=f"nsft-ray compare: {', '.join(c.methods)}, "
                                            f"seeds {', '.join(map(str, c.seeds))}")
    print((out / "report.md").read_text())
    return agg
