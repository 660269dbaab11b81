"""The comparison report: verdicts, quality x memory x time x models resident, over methods and
seeds.

    agg = write_report(records, "runs/compare", base_gate=gate, protocol=protocol)
    # report.json/.md, quality/memory/curves.png

One RECORD per (method, seed), as `nsft_ray.compare` builds it:
    {"method", "seed", "eval" (nsft_ray.eval.evaluate's result, with its per-item "items"),
     "models_resident", "memory_by_role" (measured process peaks) / "param_bytes_by_role" /
     "optimizer_bytes_by_role" / "model_bytes_by_role" (the memory planner's, runtime excluded)
     ({role: bytes}), "train_seconds", "samples_per_s", "tokens_per_s", "steps",
     "curve" ([{"step", "loss"}])}
Each metric is the mean over seeds with its 95% t-interval (stats.mean_ci). VERDICTS compare
methods pairwise (PAIRS) on the headline metrics (stats.HEADLINE) by a paired bootstrap over
seeds and eval images (stats.paired_bootstrap): "better" / "worse" when the 95% interval of the
difference excludes 0, else "indistinguishable". report.md opens with them in words.
Missing values (None, NaN, absent keys) are skipped, never counted as zero; a method whose every
seed lacks a value shows "–". Plots are drawn on bare matplotlib Figures (Agg), no pyplot state.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from nsft_ray.stats import HEADLINE, mean_ci, paired_bootstrap, verdict

__all__ = ["METRICS", "PAIRS", "aggregate", "markdown_table", "verdicts", "verdict_lines",
           "plot_quality", "plot_memory", "plot_curves", "write_report"]

# (column label, path into the eval result, higher_is_better). None: no better direction, so no
# cell of that column is bolded (NOTES says what to read instead).
METRICS: tuple[tuple[str, tuple[str, ...], bool | None], ...] = (
    ("POPE AUROC (adv)", ("pope", "adversarial", "auroc"), True),
    ("POPE acc (adv)", ("pope", "adversarial", "accuracy"), True),
    ("bal. acc (adv)", ("pope", "adversarial", "balanced_accuracy"), True),
    ("POPE F1 (adv)", ("pope", "adversarial", "f1"), True),
    ("yes-ratio (adv)", ("pope", "adversarial", "yes_ratio"), None),
    ("swap AUROC (adv)", ("pope_swap", "adversarial", "auroc"), None),
    ("CHAIR_i", ("chair", "chair_i"), False),
    ("CHAIR_s", ("chair", "chair_s"), False),
    ("obj recall", ("chair", "object_recall"), True),
    ("attribute", ("attribute_accuracy",), True),
    ("count", ("count_accuracy",), True),
    ("position", ("position_accuracy",), True),
    ("scene", ("scene_accuracy",), True),
)
NOTES = {
    # pope_items draws k positives and k negatives per image and setting
    "yes-ratio (adv)": "best near 0.5, the share of yes labels",
    "swap AUROC (adv)": "image-swap control: the same probes with another image's pixels, "
                        "scored against the original labels; a model that uses the image falls "
                        "to 0.5, one that ignores it keeps its POPE AUROC",
}
# (method, versus) pairs given a verdict, when both methods are in the records.
PAIRS = (("nsft", "sft"), ("nsft", "dpo"), ("nsft", "ppo"), ("dpo", "sft"))
NAMES = {"nsft": "nSFT", "sft": "SFT", "dpo": "DPO", "ppo": "PPO", "base": "base"}
SCALARS = ("train_seconds", "samples_per_s", "tokens_per_s", "steps")  # mean over seeds
ROLE_FIELDS = ("memory_by_role", "runtime_bytes_by_role", "param_bytes_by_role",
               "optimizer_bytes_by_role", "model_bytes_by_role")
MIB = 2**20
DASH = "–"


def _present(v: Any) -> bool:
    return v is not None and not (isinstance(v, float) and math.isnan(v))


def _get(tree: Any, path: Sequence[str]) -> Any:
    for key in path:
        if not isinstance(tree, dict):
            return None
        tree = tree.get(key)
    return tree


def _mean(values: Sequence[float]) -> float | None:
    return statistics.fmean(values) if values else None


def _run_totals(records: Sequence[dict], field: str) -> list[float]:
    """Per run, the sum of `field`'s roles (memory of one run = its roles' together); runs
    that recorded none of them are left out."""
    return [sum(float(v) for v in by_role.values() if _present(v))
            for r in records if (by_role := r.get(field))
            and any(_present(v) for v in by_role.values())]


def _model_measured(records: Sequence[dict]) -> float | None:
    """Mean over runs of the measured peak less the runtime baseline, summed over a run's
    processes; runs that did not record their runtime (0 or absent) are left out."""
    runs = [sum(peak[g] - runtime[g] for g in peak)
            for r in records if (peak := r.get("memory_by_role"))
            and (runtime := r.get("runtime_bytes_by_role"))
            and all(runtime.get(g) for g in peak)]
    return _mean(runs)


def _mean_by_role(dicts: list[dict | None]) -> dict[str, float]:
    """Role -> mean over the seeds that measured it (roles in first-seen order)."""
    values: dict[str, list[float]] = {}
    for d in dicts:
        for role, v in (d or {}).items():
            if _present(v):
                values.setdefault(role, []).append(float(v))
    return {role: statistics.fmean(vs) for role, vs in values.items()}


def _group(records: Sequence[dict]) -> dict[str, list[dict]]:
    """Records by method, first-seen order; a missing method or a repeated (method, seed) raises."""
    groups: dict[str, list[dict]] = {}
    seen = set()
    for i, r in enumerate(records):
        if not isinstance(r, dict) or not r.get("method"):
            raise ValueError(f"record {i}: expected a dict with a non-empty 'method', "
                             f"got {r!r:.80}")
        key = (r["method"], r.get("seed"))
        if key in seen:
            raise ValueError(f"record {i}: method={key[0]!r} seed={key[1]!r} appears twice")
        seen.add(key)
        groups.setdefault(r["method"], []).append(r)
    return groups


def aggregate(records: Sequence[dict]) -> dict[str, dict[str, Any]]:
    """Per method: metric mean, 95% t-interval (ci_low/ci_high, None with one seed), std and
    values over seeds; memory (bytes), time and throughput means."""
    out: dict[str, dict[str, Any]] = {}
    for method, rs in _group(records).items():
        metrics = {}
        for label, path, _ in METRICS:
            vs = [float(v) for r in rs if _present(v := _get(r.get("eval"), path))]
            mean, lo, hi = mean_ci(vs)
            metrics[label] = {"mean": mean, "ci_low": lo, "ci_high": hi, "values": vs,
                              "std": statistics.stdev(vs) if len(vs) > 1 else (0.0 if vs else None)}
        resident = {r["models_resident"] for r in rs if _present(r.get("models_resident"))}
        if len(resident) > 1:  # the same method keeps the same models; differing counts is a bug
            raise ValueError(f"method {method!r}: models_resident differs across seeds: {resident}")
        agg: dict[str, Any] = {
            "seeds": [r.get("seed") for r in rs],
            "metrics": metrics,
            "models_resident": resident.pop() if resident else None,
            # measured process peaks; the planner's model-attributable bytes (no runtime)
            "peak_memory_bytes": _mean(_run_totals(rs, "memory_by_role")),
            "model_memory_bytes": _mean(_run_totals(rs, "model_bytes_by_role")),
            # measured peaks less what each process held before loading a model
            "model_measured_bytes": _model_measured(rs),
            **{f: _mean_by_role([r.get(f) for r in rs]) for f in ROLE_FIELDS},
            **{f: _mean([float(r[f]) for r in rs if _present(r.get(f))]) for f in SCALARS},
        }
        out[method] = agg
    return out


def _fmt(v: float | None, digits: int) -> str:
    return DASH if v is None else f"{v:.{digits}f}"


def _half_width(s: dict[str, Any]) -> float | None:
    """Half the width of the 95% t-interval (symmetric about the mean); None for one seed."""
    return None if s.get("ci_low") is None else (s["ci_high"] - s["ci_low"]) / 2


def markdown_table(agg: dict[str, dict[str, Any]]) -> str:
    """Method x metric, "mean ± half-width of the 95% t-interval over seeds" (no ± for one
    seed), the best mean per column in bold."""
    best: dict[str, str] = {}
    for label, _, higher in METRICS:
        # Compare what is displayed, so equal-looking cells are bolded alike.
        means = [round(m["metrics"][label]["mean"], 3) for m in agg.values()
                 if m["metrics"][label]["mean"] is not None]
        # No bold when every method shares the value: then no method is better.
        if higher is not None and len(set(means)) > 1:
            best[label] = _fmt(max(means) if higher else min(means), 3)
    head = ["method", "seeds", *[label for label, _, _ in METRICS],
            "models resident", "peak memory (MiB)", "model memory (MiB, measured)",
            "model memory (MiB, plan)", "train s",
            "samples/s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method, m in agg.items():
        cells = [method, str(len(m["seeds"]))]
        for label, _, _ in METRICS:
            s = m["metrics"][label]
            text = _fmt(s["mean"], 3)
            text = f"**{text}**" if best.get(label) == text else text
            half = _half_width(s)
            cells.append(text + ("" if half is None else f" ± {half:.3f}"))
        mem, measured = m["peak_memory_bytes"], m.get("model_measured_bytes")
        model = m.get("model_memory_bytes")
        cells += [DASH if m["models_resident"] is None else str(m["models_resident"]),
                  *(_fmt(None if b is None else b / MIB, 1) for b in (mem, measured, model)),
                  _fmt(m["train_seconds"], 1), _fmt(m["samples_per_s"], 1)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _figure(width: float, height: float):  # -> matplotlib.figure.Figure
    # A bare Figure renders with Agg on savefig and touches no global pyplot/backend state.
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=110, layout="constrained")


def _colours(methods: Sequence[str]) -> dict[str, Any]:
    """One colour per method, the same in every plot (tab10 in method order)."""
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return {m: cmap(i % 10) for i, m in enumerate(methods)}


def plot_quality(agg: dict[str, dict[str, Any]], path: str | Path) -> None:
    """Grouped bars: one group per metric, one bar per method, error bars = 95% t-interval."""
    fig = _figure(min(14.0, 9.0 + 0.6 * len(agg)), 5.0)
    ax = fig.add_subplot()
    colours, n = _colours(list(agg)), max(len(agg), 1)
    width = 0.8 / n
    for j, (method, m) in enumerate(agg.items()):
        stats = [m["metrics"][label] for label, _, _ in METRICS]
        xs = [i + (j - (n - 1) / 2) * width for i in range(len(METRICS))]
        means = [math.nan if s["mean"] is None else s["mean"] for s in stats]
        errs = [_half_width(s) or 0.0 for s in stats]
        ax.bar(xs, means, width, yerr=errs, capsize=2, color=colours[method],
               label=f"{method} (n={len(m['seeds'])})", error_kw={"elinewidth": 1})
    arrows = {True: " ↑", False: " ↓", None: ""}  # swap AUROC: read beside POPE AUROC
    ax.set_xticks(range(len(METRICS)), [label + arrows[h] for label, _, h in METRICS],
                  rotation=30, ha="right")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("score (mean, 95% interval over seeds)")
    ax.set_title("Quality per metric (↑ higher is better, ↓ lower is better)")
    ax.grid(axis="y", alpha=0.3)
    # Outside the axes, so it never hides a bar near 1.0.
    ax.legend(title="method", fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.savefig(path)


def plot_memory(agg: dict[str, dict[str, Any]], path: str | Path) -> None:
    """Peak memory per method, stacked by role, labelled with the number of models resident."""
    fig = _figure(max(6.0, 1.2 * len(agg) + 2), 4.6)
    ax = fig.add_subplot()
    roles = list(dict.fromkeys(r for m in agg.values() for r in m["memory_by_role"]))
    from matplotlib import colormaps

    cmap = colormaps["Set2"]
    methods = list(agg)
    bottom = [0.0] * len(methods)
    for k, role in enumerate(roles):
        heights = [agg[m]["memory_by_role"].get(role, 0.0) / MIB for m in methods]
        ax.bar(methods, heights, 0.6, bottom=bottom, color=cmap(k % 8), label=role,
               edgecolor="white")
        bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
    top = max(bottom, default=0.0) or 1.0
    for i, m in enumerate(methods):
        n = agg[m]["models_resident"]
        note = "no memory measured" if not bottom[i] else f"{bottom[i]:.0f} MiB"
        note += "" if n is None else f"\n{n} model{'s' if n != 1 else ''}"
        ax.text(i, bottom[i] + 0.02 * top, note, ha="center", va="bottom", fontsize=8)
    ax.set_ylim(0, top * 1.2)
    ax.set_ylabel("peak memory (MiB, mean over seeds)")
    ax.set_title("Peak training memory per method, by role")
    ax.grid(axis="y", alpha=0.3)
    if roles:
        ax.legend(title="role", fontsize=8, loc="upper left")
    fig.savefig(path)


def plot_curves(records: Sequence[dict], path: str | Path) -> None:
    """Training loss vs step: thin lines per seed, a thick line for the mean per step per method."""
    fig = _figure(8.0, 4.6)
    ax = fig.add_subplot()
    groups = _group(records)
    colours = _colours(list(groups))
    drawn = False
    for method, rs in groups.items():
        by_step: dict[float, list[float]] = {}
        runs = 0
        for r in rs:
            pts = [(p["step"], float(p["loss"])) for p in r.get("curve") or []
                   if _present(p.get("step")) and _present(p.get("loss"))]
            if pts:
                runs += 1
                ax.plot(*zip(*pts, strict=True), color=colours[method], lw=0.8, alpha=0.35)
            for step, loss in pts:
                by_step.setdefault(step, []).append(loss)
        if by_step:
            steps = sorted(by_step)
            ax.plot(steps, [statistics.fmean(by_step[s]) for s in steps], color=colours[method],
                    lw=2.4, label=f"{method} (mean of {runs})")
            drawn = True
    if not drawn:
        ax.text(0.5, 0.5, "no training curves recorded", ha="center", va="center",
                transform=ax.transAxes)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.set_title("Training loss (thin: each seed, thick: mean over seeds)")
    ax.grid(alpha=0.3)
    if drawn:
        ax.legend(title="method", fontsize=8)
    fig.savefig(path)


def verdicts(records: Sequence[dict], n_boot: int = 2000, seed: int = 0) -> list[dict[str, Any]]:
    """{method, versus, metric, delta, ci_low, ci_high, verdict, n_seeds} for each pair of PAIRS
    present and each headline metric the items can give (stats.paired_bootstrap, seeds and eval
    images resampled jointly; delta = metric(method) - metric(versus))."""
    items: dict[str, dict[Any, dict]] = {}
    for method, rs in _group(records).items():
        items[method] = {r.get("seed"): it for r in rs
                         if (it := (r.get("eval") or {}).get("items"))}
    out = []
    for method, versus in PAIRS:
        a, b = items.get(method), items.get(versus)
        if not a or not b or not set(a) & set(b):
            continue
        for metric in HEADLINE.values():
            d = paired_bootstrap(a, b, metric, n_boot=n_boot, seed=seed)
            if math.isnan(d.delta):  # e.g. no logit scores: no AUROC to compare
                continue
            out.append({"method": method, "versus": versus, "metric": metric.name,
                        "delta": d.delta, "ci_low": d.ci_low, "ci_high": d.ci_high,
                        "verdict": verdict(*d, metric.higher_is_better),
                        "n_seeds": len(set(a) & set(b))})
    return out


def verdict_lines(rows: Sequence[dict[str, Any]]) -> list[str]:
    """The verdicts in words, one bullet each, and whether they rest on one seed."""
    if not rows:
        return ["No verdicts: the records hold no per-item eval results for any pair of "
                + ", ".join(f"{NAMES[m]} vs {NAMES[v]}" for m, v in PAIRS) + "."]
    lines = [f"- {NAMES.get(r['method'], r['method'])} vs {NAMES.get(r['versus'], r['versus'])}, "
             f"{r['metric']}: {r['verdict']} ({r['delta']:+.3f}, 95% CI {r['ci_low']:+.3f} to "
             f"{r['ci_high']:+.3f})" for r in rows]
    if any(r["n_seeds"] == 1 for r in rows):
        lines += ["", "These verdicts come from one seed: the intervals resample the eval images "
                      "only, not training runs, so they say nothing of seed-to-seed variation."]
    return lines


def _section(title: str, d: dict[str, Any]) -> list[str]:
    """A markdown section listing a dict (nested values as JSON)."""
    def text(v: Any) -> str:
        return json.dumps(v, default=_jsonable) if isinstance(v, dict | list) else str(v)

    return [f"## {title}", "", *[f"- **{k}**: {text(v)}" for k, v in d.items()], ""]


def _jsonable(o: Any) -> Any:
    if hasattr(o, "item"):  # numpy / torch scalars
        return o.item()
    raise TypeError(f"report.json: cannot serialise {type(o).__name__} {o!r:.80}")


def write_report(
    records: Sequence[dict], out_dir: str | Path, title: str = "nsft-ray: method comparison",
    base_gate: dict[str, Any] | None = None, protocol: dict[str, Any] | None = None,
) -> dict[str, dict[str, Any]]:
    """Write report.json, report.md, quality.png, memory.png, curves.png; return the aggregate.

    report.json: {"title", "verdicts", "base_gate", "protocol", "methods" (the aggregate),
    "records"}; base_gate and protocol are passed through as given (None when not given).
    report.md opens with the verdicts in words, then the protocol and base gate, then the table.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    agg = aggregate(records)
    found = verdicts(records)
    # The examples and per-item rows are bulky and already in each run's record / eval output.
    raw = [{**r, "eval": {k: v for k, v in (r.get("eval") or {}).items()
                          if k not in ("examples", "items")}} for r in records]
    (out / "report.json").write_text(json.dumps(
        {"title": title, "verdicts": found, "base_gate": base_gate, "protocol": protocol,
         "methods": agg, "records": raw}, indent=2, default=_jsonable))
    plot_quality(agg, out / "quality.png")
    plot_memory(agg, out / "memory.png")
    plot_curves(records, out / "curves.png")
    md = [f"# {title}", "", "## Verdicts", "", *verdict_lines(found), ""]
    md += _section("Protocol", protocol) if protocol else []
    md += _section("Base gate", base_gate) if base_gate else []
    md += ["## Results", "", markdown_table(agg), "",
           "- Quality per metric (mean, 95% interval over seeds): ![quality](quality.png)",
           "- Peak memory per method, by role: ![memory](memory.png)",
           "- Training loss curves: ![curves](curves.png)", "", "## Metrics", ""]
    direction = {True: "higher is better", False: "lower is better"}
    md += [f"- **{label}**: `eval.{'.'.join(p)}` ({NOTES.get(label) or direction[h]})"
           for label, p, h in METRICS]
    md += ["- **models resident**: models held in memory while training (policy, reference, "
           "critic, reward)",
           "- **peak memory**: sum over roles of each role's measured peak, mean over seeds",
           "- **train s**, **samples/s**: training wall time and throughput, mean over seeds",
           "", "Cells: mean over seeds ± half-width of its 95% t-interval (no ± with one seed). "
           "Bold: the best mean of a column (ties alike; none when all are equal); "
           "–: not measured.",
           "", "Verdicts: delta = metric(method) - metric(versus), 95% percentile interval of a "
           "paired bootstrap (2,000 replicates) that resamples seeds and, within each, eval "
           "images (all probes of an image together); better/worse when the interval excludes "
           "0. POPE metrics use the adversarial setting."]
    (out / "report.md").write_text("\n".join(md) + "\n")
    return agg
