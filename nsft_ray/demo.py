"""`make demo`: the miniature RLHF-vs-nSFT experiment end to end on an embedded local Ray.

    world ─► init tiny VLM ─► vision pretraining ─► [grounding: existence questions] ─► base SFT
          ─► on-policy negatives (sampled from base)
          ─► build-negatives ─► compare: base gate on val, shared rows, base, sft, nsft, dpo, ppo
             from the same base ─► report

Everything goes under OUT (default runs/demo): world/, prefs/, negatives/, runs/<method>-seed<s>/
(run folders), models/<method>/ (Hugging Face folders), records/, report.md, report.json and PNG
plots. A stage whose output exists is not run again, so an interrupted demo picks up where it
stopped.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path
from typing import Any

from nsft_ray.compare import _with, check_base_gate, compare
from nsft_ray.config import Config, save_config

__all__ = ["run_demo"]


def _stage(name: str, out: Path) -> bool:
    done = out.exists()
    print(f"\n=== {name}: {'already done, skipped' if done else 'running'} ({out})", flush=True)
    return not done


class _Timer:
    """Seconds per stage, for demo.json."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def __call__(self, name: str, fn) -> Any:
        t = time.perf_counter()
        result = fn()
        self.seconds[name] = round(time.perf_counter() - t, 1)
        return result


def _base(cfg: Config, out: Path, timed: _Timer) -> Path:
    """world -> tiny VLM -> vision pretraining -> base SFT; returns the base model folder."""
    from nsft_ray.models import build_tiny_vlm
    from nsft_ray.ray_glue.train import train
    from nsft_ray.vision import pretrain_vision
    from nsft_ray.world import corpus, write_world

    models, world = out / "models", out / "world"
    if _stage("world (train / val / eval splits)", world / "world.json"):
        timed("world", lambda: write_world(cfg.world, world, seed=cfg.run.seed))
    init = models / "init"
    if _stage("init tiny VLM", init):
        timed("init", lambda: build_tiny_vlm(
            init, corpus(cfg.world, n=4000, seed=cfg.run.seed), size=cfg.model.size,
            arch=cfg.model.arch, image_size=cfg.world.image_size, seed=cfg.run.seed))
    start_from = init
    if cfg.vision.steps:  # the stand-in for a pretrained vision encoder (nsft_ray/vision.py)
        vision = models / "vision"
        if _stage("vision pretraining (each cell's shape, colour, size)", vision):
            summary = timed("vision", lambda: pretrain_vision(
                init, world, vision, cfg.vision, cfg.world, seed=cfg.run.seed))
            print(f"vision read-out on val: {summary['val']}", flush=True)
        start_from = vision
    if cfg.demo.grounding_steps:
        grounding = models / "grounding"
        if _stage("grounding SFT (single-turn existence questions)", grounding):
            timed("grounding", lambda: _grounding(cfg, out, start_from, grounding))
        start_from = grounding
    base = models / "base"
    if _stage("base SFT", base):
        base_run = out / "runs" / "base"
        timed("base", lambda: train(_with(
            cfg, run={"dir": str(base_run)}, model={"name_or_path": str(start_from)},
            train={"data": (str(world / "sft_train.parquet"),), "max_steps": cfg.demo.base_steps,
                   "cache_encoded": True},  # 1.6 epochs: rows and images encoded once
            optim={"lr": cfg.demo.base_lr}), "sft"))
        shutil.copytree(base_run / "model", base)
    return base


def _grounding(cfg: Config, out: Path, start_from: Path, model_out: Path) -> None:
    """SFT on the train split's single-turn existence conversations only (ids "...-existN")."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from nsft_ray.ray_glue.train import train

    rows = pq.read_table(out / "world" / "sft_train.parquet")
    existence = rows.filter(pc.match_substring(rows["id"], "-exist"))
    path = out / "world" / "sft_train_existence.parquet"
    pq.write_table(existence, path)
    run = out / "runs" / "grounding"
    train(_with(cfg, run={"dir": str(run)}, model={"name_or_path": str(start_from)},
                train={"data": (str(path),), "max_steps": cfg.demo.grounding_steps,
                       "micro_batch_size": cfg.demo.grounding_batch_size,
                       "cache_encoded": True},  # 12 epochs over 4,000 rows: encoded once
                optim={"lr": cfg.demo.grounding_lr}), "sft")
    shutil.copytree(run / "model", model_out)


def _negatives(cfg: Config, out: Path, base: Path, timed: _Timer) -> tuple[Path, Path]:
    """Preference pairs with rejections sampled from the base, then corrective conversations."""
    from nsft_ray.ray_glue.negatives import build_negatives
    from nsft_ray.ray_glue.sampling import RaySampler
    from nsft_ray.world import write_world

    prefs = out / "prefs"
    if _stage("preference data (negatives sampled from base)", prefs / "world.json"):
        if cfg.demo.policy_negatives:
            with RaySampler(str(base), actors=cfg.demo.sampler_actors,
                            temperature=cfg.world.policy_temperature,
                            max_new_tokens=cfg.world.policy_max_new_tokens,
                            batch_size=cfg.world.policy_batch_size, seed=cfg.run.seed) as sampler:
                timed("prefs", lambda: write_world(
                    dataclasses.replace(cfg.world, negatives="policy"), prefs,
                    seed=cfg.run.seed, sampler=sampler))
        else:
            timed("prefs", lambda: write_world(cfg.world, prefs, seed=cfg.run.seed))
    negatives = out / "negatives"
    if _stage("build-negatives", negatives / "summary.json"):
        timed("negatives", lambda: build_negatives(prefs / "pref_train.parquet", negatives,
                                                   cfg.data, cfg.negatives))
    return prefs / "pref_train.parquet", negatives / "conversations"


def run_demo(out: Path, cfg: Config) -> dict:
    from nsft_ray.ray_glue.runtime import ensure_ray

    start = time.perf_counter()
    out = out.resolve()
    save_config(cfg, out)
    ensure_ray(cfg.resources.address)
    timed = _Timer()
    base = _base(cfg, out, timed)
    compare_cfg = _with(cfg, compare={"base_model": str(base), "eval_data": str(out / "world")})
    # The declared gate, before anything is spent on negatives: a failed base stops here.
    print("\n=== base gate (POPE on val)", flush=True)
    timed("gate", lambda: check_base_gate(compare_cfg, out))
    preferences, conversations = _negatives(cfg, out, base, timed)
    compare_cfg = _with(compare_cfg, compare={"preferences": str(preferences),
                                              "conversations": str(conversations)})
    agg = timed("compare", lambda: compare(compare_cfg, out))
    models = out / "models"
    for path in sorted((out / "records").glob("*-seed*.json")):
        record = json.loads(path.read_text())
        target = models / record["method"]
        if record["method"] != "base" and not target.exists():
            shutil.copytree(record["model"], target)  # models/<method>/: a Hugging Face folder
    report = {"methods": agg, "stage_seconds": timed.seconds,
              "demo_seconds": round(time.perf_counter() - start, 1)}
    (out / "demo.json").write_text(json.dumps(report, indent=2))
    print(f"\nreport: {out / 'report.md'}  {out / 'report.json'}  (+ PNG plots); "
          f"{report['demo_seconds']} s this invocation; models in {models}")
    return report
