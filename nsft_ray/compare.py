"""`nsft-ray compare`: every method from one base, on the same rows, under a declared protocol.

    nsft-ray compare --config jobs/configs/tiny/compare.yaml --out runs/compare \
        compare.seeds=[0,1,2]

The protocol, fixed by the config before anything runs and written into report.json:

1. **Base gate** (on val): the base's POPE accuracy, averaged over the random, popular and
   adversarial probes, must lie in [compare.gate_low, compare.gate_high]. A base outside it stops
   the comparison with a message saying so: a base at chance (or one with nothing left to fix)
   would make every method look alike, and that is not a result about alignment.
2. **Shared rows**: the preference rows whose corrective conversations could be constructed (the
   others are dropped for every method; the count is reported), the first `compare.pairs` of them.
   sft trains on their chosen answers, nsft on their chosen answers and corrections, dpo and the
   reward model on the pairs, ppo on their prompts.
3. **Budget rule**: every method sees each shared pair `compare.epochs` times (steps follow from
   the row counts; PPO's iterations from its rollout batch).
4. **Selection on val**: each of sft, nsft, dpo and ppo has the same number of candidates in
   `compare.grid` (learning rate; DPO's beta; PPO's KL coefficient); at the first seed every
   candidate is trained and scored on val by `compare.select_metric`, and the best is used for
   every seed. The nSFT ablations use nSFT's choice. The eval split is used only for the report.
5. **Seeds** vary the alignment run: its random state and its full data shuffle.

Methods: ``base`` (the starting checkpoint, evaluated), ``sft`` (continual SFT on the chosen
answers), ``nsft`` (chosen + corrective conversations), ``dpo`` (policy + frozen reference),
``ppo`` (actor, critic, reward, reference on their own placement groups; its Bradley-Terry reward
model is trained first, its cost reported with PPO's), and the paper's ablations
``nsft_no_chosen``, ``nsft_kl`` (per-token KL to the base) and ``nsft_refute_only`` (corrections
that only refute). Each (method, seed) writes a record under OUT/records/; a repeated command
skips what is recorded. The report comes from ``nsft_ray.report``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any

from nsft_ray.config import Config, save_config
from nsft_ray.plan import DTYPE_BYTES, ModelShape, method_roles, model_shape

__all__ = ["BaseGateFailed", "check_base_gate", "compare", "run_method", "role_bytes",
           "candidates", "budget", "gate_check", "protocol", "val_score"]

TUNED = ("sft", "nsft", "dpo", "ppo")  # methods with a grid of candidates
# The paper's nSFT ablations: (algorithm, config sections they change).
ABLATIONS: dict[str, dict[str, dict[str, Any]]] = {
    "nsft_no_chosen": {"nsft": {"use_chosen": False}},
    "nsft_kl": {},  # nsft.kl_coef = compare.ablation_kl_coef, set in _stage
    "nsft_refute_only": {},  # conversations built with negatives.corrective=refute_only
}


def algo_of(method: str) -> str:
    """The algorithm a compared method trains with ("" for the base)."""
    return "nsft" if method in ABLATIONS else ("" if method == "base" else method)


def role_bytes(method: str, cfg: Config, shape: ModelShape) -> dict[str, dict[str, int]]:
    """Bytes per worker of each role `method` holds, from the memory planner (nsft_ray/plan.py:
    model.freeze, precision, ZeRO stage, workers, micro-batch and train.max_length counted):
    parameters, optimizer state, and the role's model-attributable peak (parameters, gradients,
    optimizer, activations, KV cache: no runtime), as report fields."""
    if method == "base":
        weights = shape.parameters * DTYPE_BYTES[cfg.model.dtype]
        return {"param_bytes_by_role": {"policy": weights},
                "optimizer_bytes_by_role": {"policy": 0},
                "model_bytes_by_role": {"policy": weights}}
    roles = method_roles(method, cfg, shape)
    return {"param_bytes_by_role": {n: r.memory.parameters for n, r in roles.items()},
            "optimizer_bytes_by_role": {n: r.memory.optimizer for n, r in roles.items()},
            "model_bytes_by_role": {n: r.memory.device() for n, r in roles.items()}}


def _with(cfg: Config, **sections: dict) -> Config:
    """`cfg` with some fields of some sections replaced: _with(cfg, train={"max_steps": 3})."""
    return dataclasses.replace(cfg, **{
        name: dataclasses.replace(getattr(cfg, name), **fields) for name, fields in sections.items()
    })


def candidates(method: str, cfg: Config) -> list[dict[str, dict[str, Any]]]:
    """The grid's candidates of a method, each as config sections to replace."""
    g = cfg.compare.grid
    if method in ("sft", "nsft"):
        return [{"optim": {"lr": lr}} for lr in getattr(g, f"{method}_lr")]
    if method == "dpo":
        return [{"optim": {"lr": lr}, "dpo": {"beta": b}}
                for lr, b in zip(g.dpo_lr, g.dpo_beta, strict=True)]
    if method == "ppo":
        return [{"optim": {"lr": lr}, "ppo": {"kl_coef": k}}
                for lr, k in zip(g.ppo_lr, g.ppo_kl_coef, strict=True)]
    raise ValueError(f"{method!r} has no grid; tuned methods: {', '.join(TUNED)}")


# ---------------------------------------------------------------------------------------------
# The base gate and the shared rows
# ---------------------------------------------------------------------------------------------


class BaseGateFailed(RuntimeError):
    """The base is outside the declared gate: the comparison would not be informative."""


def gate_check(result: dict, low: float, high: float) -> dict[str, Any]:
    """The gate's record from an evaluation of the base on val."""
    settings = ("random", "popular", "adversarial")
    value = sum(result["pope"][s]["accuracy"] for s in settings) / len(settings)
    return {"metric": "val POPE accuracy, mean of random/popular/adversarial",
            "value": round(value, 4), "low": low, "high": high,
            "passed": low <= value <= high,
            "adversarial": result["pope"]["adversarial"]["accuracy"],
            "auroc": result["pope"].get("all", {}).get("auroc")}  # threshold-free, beside it


def check_base_gate(cfg: Config, out: Path) -> dict[str, Any] | None:
    """Evaluate the base's POPE answers on val and check the gate (once; kept in base_gate.json)."""
    from nsft_ray.ray_glue.eval import run_eval

    c = cfg.compare
    path = out / "base_gate.json"
    if not c.gate:
        return None
    if path.exists():
        gate = json.loads(path.read_text())
    else:
        # POPE only: the gate needs no generated caption or answer.
        eval_cfg = dataclasses.replace(cfg.eval, split="val", generate_images=0, image_swap=False)
        result = run_eval(c.base_model, c.eval_data, eval_cfg, seed=cfg.run.seed)
        gate = gate_check(result, c.gate_low, c.gate_high)
        path.write_text(json.dumps(gate, indent=2))
    verdict = "PASSED" if gate["passed"] else "FAILED"
    print(f"base gate {verdict}: {gate['metric']} = {gate['value']:.3f} "
          f"(declared range [{gate['low']:.2f}, {gate['high']:.2f}]; adversarial "
          f"{gate['adversarial']:.3f})", flush=True)
    if not gate["passed"]:
        side = "at or near chance" if gate["value"] < gate["low"] else "leaves too little to fix"
        raise BaseGateFailed(
            f"the base model {c.base_model} fails the base gate ({gate['value']:.3f} outside "
            f"[{gate['low']:.2f}, {gate['high']:.2f}]: its POPE answers are {side}), so the "
            "comparison was not run: its result would say nothing about alignment. Train or "
            f"choose another base (on val), or change the declared gate. See {path}.")
    return gate


def _shared_rows(cfg: Config, out: Path) -> dict[str, Any]:
    """Write OUT/data/: the shared preference rows and their conversations; return the counts."""
    import pyarrow.compute as pc
    import pyarrow.dataset as pads
    import pyarrow.parquet as pq

    from nsft_ray.data import read_preference_file

    c = cfg.compare
    data = out / "data"
    counts_path = data / "counts.json"
    if counts_path.exists():
        return json.loads(counts_path.read_text())
    conversations = pads.dataset(c.conversations).to_table()
    negative = pc.equal(conversations["origin"], "negative")
    constructed = set(conversations.filter(negative)["parent_id"].to_pylist())
    # Any data.format build-negatives read (issue 13's published layouts too); a record the
    # reader could not use has no corrective conversation, so it is dropped for all below.
    prefs = read_preference_file(c.preferences, cfg.data)
    ids = prefs["id"].to_pylist()
    keep = [i for i in ids if i in constructed]
    keep = keep[:c.pairs] if c.pairs else keep
    if not keep:
        raise ValueError(f"compare.conversations: none of the {len(ids)} rows of "
                         f"{c.preferences} has corrective conversations in {c.conversations}")
    data.mkdir(parents=True, exist_ok=True)
    kept = set(keep)
    pq.write_table(prefs.filter(pc.is_in(prefs["id"], value_set=_strings(keep))),
                   data / "preferences.parquet")
    mine = _in_pair_order(
        conversations.filter(pc.is_in(conversations["parent_id"], value_set=_strings(keep))), keep)
    pq.write_table(mine, data / "conversations.parquet")
    origins = mine["origin"].to_pylist()
    counts = {"preference_rows": len(ids), "constructed": len(constructed & set(ids)),
              "dropped_for_all": len(ids) - len(constructed & set(ids)),
              "shared_pairs": len(kept), "chosen_conversations": origins.count("chosen"),
              "negative_conversations": origins.count("negative")}
    if "nsft_refute_only" in c.methods:
        counts["refute_only"] = _refute_only(cfg, data, keep)
    counts_path.write_text(json.dumps(counts, indent=2))
    return counts


def _in_pair_order(table, pair_ids: list[str]):
    """`table`'s conversations ordered by their pair's place in `pair_ids`, then origin (chosen
    before negative), then id.

    build-negatives writes its rows in the order Ray Data's tasks finish, which differs from run
    to run; training shuffles with a seed, but a seeded shuffle of rows in another order is
    another order. Two demos from identical inputs trained sft and nSFT on different orders
    (the rows were the same) and ended with different figures.
    """
    import pyarrow as pa

    place = {pair: i for i, pair in enumerate(pair_ids)}
    rank = pa.array([place[p] for p in table["parent_id"].to_pylist()], type=pa.int64())
    ordered = table.append_column("_pair", rank).sort_by(
        [("_pair", "ascending"), ("origin", "ascending"), ("id", "ascending")])
    return ordered.drop_columns(["_pair"])


def _strings(values: list[str]):
    import pyarrow as pa

    return pa.array(values, type=pa.string())


def _refute_only(cfg: Config, data: Path, pair_ids: list[str]) -> dict[str, int]:
    """The shared rows' conversations built again with refuting turns only (the ablation), in
    the order of `pair_ids` (the shared pairs, as data/preferences.parquet holds them)."""
    import pyarrow.dataset as pads
    import pyarrow.parquet as pq

    from nsft_ray.ray_glue.negatives import build_negatives

    neg = dataclasses.replace(cfg.negatives, corrective="refute_only")
    summary = build_negatives(data / "preferences.parquet", data / "refute_only", cfg.data, neg)
    table = pads.dataset(data / "refute_only" / "conversations").to_table()
    pq.write_table(_in_pair_order(table, pair_ids), data / "conversations_refute_only.parquet")
    return {"negative_conversations": summary["conversations"],
            "quarantined": summary.get("quarantined", 0)}


def budget(method: str, cfg: Config, counts: dict[str, Any]) -> dict[str, Any]:
    """The budget rule made concrete: rows per pass and optimizer steps (PPO: iterations)."""
    c, t = cfg.compare, cfg.train
    pairs = counts["shared_pairs"]
    per_step = t.micro_batch_size * t.grad_accum * cfg.resources.num_workers
    negatives = (counts["refute_only"]["negative_conversations"] if method == "nsft_refute_only"
                 else counts["negative_conversations"])
    rows = {"sft": counts["chosen_conversations"], "dpo": pairs, "ppo": pairs,
            "nsft_no_chosen": negatives}.get(method, counts["chosen_conversations"] + negatives)
    if method == "ppo":
        iterations = math.ceil(c.epochs * pairs / cfg.ppo.rollout_batch_size)
        reward_steps = max(1, math.ceil(c.epochs * pairs / per_step))
        return {"rows": rows, "iterations": iterations, "reward_steps": reward_steps}
    return {"rows": rows, "steps": max(1, math.ceil(c.epochs * rows / per_step))}


# ---------------------------------------------------------------------------------------------
# Training one candidate, selecting on val, evaluating on eval
# ---------------------------------------------------------------------------------------------


def _stage(method: str, candidate: dict, seed: int, cfg: Config, out: Path, run_dir: Path,
           counts: dict) -> Config:
    """The config of one training run of `method` with `candidate` at `seed`."""
    c = cfg.compare
    data = out / "data"
    conversations = data / ("conversations_refute_only.parquet" if method == "nsft_refute_only"
                            else "conversations.parquet")
    rows = data / "preferences.parquet" if method in ("dpo", "ppo") else conversations
    plan = budget(method, cfg, counts)
    sections: dict[str, dict[str, Any]] = {
        "run": {"seed": seed, "dir": str(run_dir)},
        "model": {"name_or_path": c.base_model},
        # The shared rows were validated when they were built (build-negatives).
        "train": {"data": (str(rows),), "max_steps": plan.get("steps", 0), "validate": False},
        "data": {"format": "parquet", "root": ""},  # OUT/data/ is ours, whatever the input was
    }
    for name, fields in candidate.items():
        sections.setdefault(name, {}).update(fields)
    for name, fields in ABLATIONS.get(method, {}).items():
        sections.setdefault(name, {}).update(fields)
    if method == "nsft_kl":
        sections.setdefault("nsft", {})["kl_coef"] = c.ablation_kl_coef
    if method == "ppo":
        sections.setdefault("ppo", {})["iterations"] = plan["iterations"]
    return _with(cfg, **sections)


def _train(method: str, stage: Config, out: Path, counts: dict) -> tuple[dict, list[dict]]:
    """Train one stage; return its summary and loss curve."""
    from nsft_ray.ray_glue.train import train

    run_dir = Path(stage.run.dir)
    if method == "ppo":
        return _run_ppo(stage, out, counts), _curve(run_dir, _loss_key(method))
    return train(stage, algo_of(method)), _curve(run_dir, _loss_key(method))


def _loss_key(method: str) -> str:
    """The metric a method's loss curve is drawn from."""
    return "ppo/actor/policy_loss" if method == "ppo" else f"{algo_of(method)}/loss"


def _curve(run_dir: Path, key: str) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [{"step": r.get("step", r.get("iteration")), "loss": r[key]} for r in rows if key in r]


def _run_ppo(cfg: Config, out: Path, counts: dict) -> dict:
    """PPO from the base: its Bradley-Terry reward model first (unless given or rule-based)."""
    from nsft_ray.ray_glue.ppo import train_ppo
    from nsft_ray.ray_glue.train import train

    reward_seconds = 0.0
    ppo = cfg.ppo
    if ppo.reward == "model" and not ppo.reward_model:
        # One reward model per seed, trained with the DPO budget on the same pairs; its
        # learning rate is the PPO candidate's (the reward model is part of PPO's cost).
        reward_dir = out / "runs" / f"reward-seed{cfg.run.seed}"
        if not (reward_dir / "model").exists():
            start = time.perf_counter()
            steps = budget("ppo", cfg, counts)["reward_steps"]
            train(_with(cfg, run={"dir": str(reward_dir)}, train={"max_steps": steps}), "reward")
            reward_seconds = time.perf_counter() - start
        ppo = dataclasses.replace(ppo, reward_model=str(reward_dir / "model"))
    summary = train_ppo(dataclasses.replace(cfg, ppo=ppo))
    summary["reward_seconds"] = round(reward_seconds, 2)
    # Kept with the run, so a selection run reused for a record still counts the reward model.
    (Path(cfg.run.dir) / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


SELECT_METRICS = {"pope_auroc": "POPE AUROC (adv)", "pope_accuracy": "POPE acc (adv)"}


def val_score(result: dict, metric: str) -> float:
    """The declared selection metric of an evaluation on val (higher is better).

    headline_mean: the mean of the headline metrics, each turned so that higher is better
    (1 - CHAIR_i); a metric that cannot be computed (NaN) is left out of the mean.
    """
    from nsft_ray.stats import HEADLINE, headline_values

    values = headline_values(result["items"])
    if metric != "headline_mean":
        return values[SELECT_METRICS[metric]]
    turned = [v if HEADLINE[k].higher_is_better else 1.0 - v for k, v in values.items()]
    kept = [v for v in turned if not math.isnan(v)]
    return sum(kept) / len(kept) if kept else math.nan


def _select(method: str, cfg: Config, out: Path, counts: dict) -> int:
    """Index of the method's chosen candidate: trained at the first seed, scored on val."""
    from nsft_ray.ray_glue.eval import run_eval

    options = candidates(method, cfg)
    path = out / "selection" / f"{method}.json"
    if len(options) == 1:
        return 0
    if path.exists():
        return json.loads(path.read_text())["chosen"]
    seed = cfg.compare.seeds[0]
    scores = []
    for i, candidate in enumerate(options):
        run_dir = out / "runs" / f"{method}-c{i}-seed{seed}"
        if not (run_dir / "model").exists():
            print(f"\n=== {method} candidate {i} {candidate} (selection on val)", flush=True)
            _train(method, _stage(method, candidate, seed, cfg, out, run_dir, counts), out,
                   counts)
        val_cfg = dataclasses.replace(cfg.eval, split="val", image_swap=False)
        result = run_eval(str(run_dir / "model"), cfg.compare.eval_data, val_cfg, seed=seed)
        scores.append(val_score(result, cfg.compare.select_metric))
    chosen = max(range(len(options)), key=lambda i: scores[i])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"method": method, "metric": cfg.compare.select_metric,
                                "candidates": options, "val_scores": scores, "chosen": chosen,
                                "seed": seed}, indent=2))
    print(f"{method}: candidate {chosen} {options[chosen]} chosen on val "
          f"({cfg.compare.select_metric} {[round(s, 4) for s in scores]})", flush=True)
    return chosen


def run_method(method: str, seed: int, cfg: Config, out: Path, counts: dict,
               chosen: dict[str, int]) -> dict:
    """Train (unless base) and evaluate one method for one seed on eval; return its record."""
    from nsft_ray.ray_glue.eval import run_eval

    c = cfg.compare
    summary: dict[str, Any] = {}
    curve: list[dict] = []
    stage = _with(cfg, run={"seed": seed}, model={"name_or_path": c.base_model})
    model_dir = Path(c.base_model)
    if method != "base":
        tuned = algo_of(method)  # the ablations use nSFT's chosen candidate
        i = chosen[tuned]
        run_dir = out / "runs" / (f"{method}-c{i}-seed{seed}" if method in TUNED
                                  else f"{method}-seed{seed}")
        stage = _stage(method, candidates(tuned, cfg)[i], seed, cfg, out, run_dir, counts)
        if (run_dir / "model").exists() and (run_dir / "summary.json").exists():
            summary = json.loads((run_dir / "summary.json").read_text())  # a selection run
            curve = _curve(run_dir, _loss_key(method))
        else:
            summary, curve = _train(method, stage, out, counts)
        model_dir = run_dir / "model"
    result = run_eval(str(model_dir), c.eval_data, dataclasses.replace(cfg.eval, split="eval"),
                      seed=seed)
    planned = role_bytes(algo_of(method) or "base", stage,
                         model_shape(c.base_model, stage.model.freeze, stage.plan))
    memory = summary.get("peak_memory_bytes_per_role") or (
        {"policy": summary["peak_memory_bytes"]} if summary.get("peak_memory_bytes") else {})
    # What each process held before its model loaded (summary.json's memory; older runs: none).
    measured = (summary.get("memory") or {}).get("measured") or {}
    runtime = {"policy" if g == "trainer" else g: m["runtime_bytes"] for g, m in measured.items()}
    return {
        "method": method, "seed": seed, "eval": result,
        "hyperparameters": candidates(algo_of(method), cfg)[chosen[algo_of(method)]]
        if method != "base" else {},
        "budget": budget(method, cfg, counts) if method != "base" else {},
        "models_resident": summary.get("models_resident", 1),
        "memory_by_role": memory, "runtime_bytes_by_role": runtime, **planned,
        "train_seconds": summary.get("train_seconds", 0.0) + summary.get("reward_seconds", 0.0),
        "samples_per_s": summary.get("samples_per_s"),
        "tokens_per_s": summary.get("tokens_per_s"),
        "steps": summary.get("steps", summary.get("iterations")),
        "curve": curve,
        "model": str(model_dir),
    }


# ---------------------------------------------------------------------------------------------
# The comparison
# ---------------------------------------------------------------------------------------------


def _check_inputs(cfg: Config) -> None:
    c = cfg.compare
    needed = {"compare.base_model": c.base_model, "compare.eval_data": c.eval_data}
    if set(c.methods) - {"base"}:
        needed["compare.conversations"] = c.conversations
        needed["compare.preferences"] = c.preferences
    for key, value in needed.items():
        if not value:
            raise ValueError(f"{key}: required for methods {', '.join(c.methods)}")
        if not Path(value).exists():
            raise FileNotFoundError(f"{key}: {value} does not exist")
    if c.epochs <= 0:
        raise ValueError(f"compare.epochs={c.epochs}: expected > 0")
    # compare sets these itself; a value in the config would be silently replaced, so refuse it.
    defaults = Config()
    owned = {"optim.lr": "compare.grid.*_lr", "train.max_steps": "compare.epochs",
             "dpo.beta": "compare.grid.dpo_beta", "ppo.kl_coef": "compare.grid.ppo_kl_coef",
             "ppo.iterations": "compare.epochs", "nsft.kl_coef": "compare.ablation_kl_coef "
             "(the nsft_kl method)", "nsft.use_chosen": "the nsft_no_chosen method"}
    for key, owner in owned.items():
        section, name = key.split(".")
        if getattr(getattr(cfg, section), name) != getattr(getattr(defaults, section), name):
            raise ValueError(f"{key} is set by compare from {owner}; remove {key} from the "
                             "compare config")


def protocol(cfg: Config, counts: dict, chosen: dict[str, int]) -> dict[str, Any]:
    """What report.json says about how the comparison was run."""
    c = cfg.compare
    methods = [m for m in c.methods if m != "base"]
    return {
        "splits": {"selection": "val", "report": "eval"},
        "seeds": list(c.seeds), "seeds_vary": ["alignment run", "full data shuffle"],
        "shared_rows": counts,
        "budget_rule": f"every method sees each of the {counts.get('shared_pairs')} shared "
                       f"preference pairs {c.epochs:g} time(s)",
        "budget": {m: budget(m, cfg, counts) for m in methods} if counts else {},
        "grid_size": len(candidates("sft", cfg)),
        "select_metric": c.select_metric,
        "chosen": {m: candidates(m, cfg)[i] for m, i in chosen.items()},
        "gate": {"low": c.gate_low, "high": c.gate_high, "enabled": c.gate},
    }


def compare(cfg: Config, out: Path) -> dict:
    """Run the protocol (gate, shared rows, selection on val, seeds) and write the report."""
    from nsft_ray.ray_glue.runtime import ensure_ray
    from nsft_ray.report import write_report

    c = cfg.compare
    _check_inputs(cfg)
    out = out.resolve()
    save_config(cfg, out)
    ensure_ray(cfg.resources.address)
    gate = check_base_gate(cfg, out)
    counts = _shared_rows(cfg, out) if set(c.methods) - {"base"} else {}
    if counts:
        print(f"shared rows: {counts['shared_pairs']} preference pairs for every method "
              f"({counts['dropped_for_all']} of {counts['preference_rows']} dropped for all: no "
              "corrective conversation could be built)", flush=True)
    ablations = set(ABLATIONS) & set(c.methods)  # they use nSFT's choice: nSFT is tuned for them
    tuned = [m for m in TUNED if m in c.methods or (m == "nsft" and ablations)]
    chosen = {m: _select(m, cfg, out, counts) for m in tuned}
    records = []
    for seed in c.seeds:
        for method in c.methods:
            path = out / "records" / f"{method}-seed{seed}.json"
            if path.exists():
                print(f"=== {method} seed {seed}: recorded, skipped ({path})", flush=True)
            else:
                print(f"\n=== {method} seed {seed}", flush=True)
                record = run_method(method, seed, cfg, out, counts, chosen)
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps(record))
            records.append(json.loads(path.read_text()))
    agg = write_report(records, out, title=f"nsft-ray compare: {', '.join(c.methods)}, "
                                            f"seeds {', '.join(map(str, c.seeds))}",
                       base_gate=gate, protocol=protocol(cfg, counts, chosen))
    print((out / "report.md").read_text())
    return agg
