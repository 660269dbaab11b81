"""The comparison report on synthetic records (no models): statistics, bolding, files, plots."""

import json
import math

import pytest
from PIL import Image

from nsft_ray.report import METRICS, aggregate, markdown_table, plot_quality, write_report


def _eval(acc: float | None = 0.8, chair_i: float | None = 0.2, count: float | None = 0.5) -> dict:
    return {"pope": {"adversarial": {"accuracy": acc, "precision": 0.7, "recall": 0.9, "f1": 0.75,
                                     "yes_ratio": 0.55, "auroc": 0.8, "balanced_accuracy": 0.7}},
            "pope_swap": {"adversarial": {"accuracy": 0.5, "auroc": 0.5}},
            "chair": {"chair_i": chair_i, "chair_s": 0.4, "object_recall": 0.6,
                      "object_precision": 0.8},
            "yes_no_accuracy": 0.8, "attribute_accuracy": 0.7, "count_accuracy": count,
            "position_accuracy": 0.6, "scene_accuracy": 0.9,
            "examples": [{"question": "Is there a dog?", "answer": "No."}] * 50}


def _record(method: str, seed: int, ev: dict, mem: dict | None = None, n: int = 1,
            secs: float = 40.0, floor: float = 0.5) -> dict:
    return {"method": method, "seed": seed, "eval": ev, "models_resident": n,
            "memory_by_role": mem if mem is not None else {"policy": 100 * 2**20},
            "param_bytes_by_role": {"policy": 6_400_000},
            "optimizer_bytes_by_role": {"policy": 12_800_000},
            "train_seconds": secs, "samples_per_s": 30.0,
            "tokens_per_s": 2500.0, "steps": 100,
            "curve": [{"step": s, "loss": floor + 2.0 / (s / 10 + seed + 1)}
                      for s in range(0, 100, 10)]}


def _records() -> list[dict]:
    """base (1 seed), sft and nsft (3 seeds each), ppo (2 seeds, 4 roles)."""
    ppo_mem = {"actor": 300 * 2**20, "critic": 300 * 2**20, "reward": 200 * 2**20,
               "reference": 200 * 2**20}
    rs = [_record("base", 0, _eval(0.5, 0.5, 0.3))]
    rs[0]["curve"] = []
    rs += [_record("sft", s, _eval(a, c, 0.5), floor=0.8) for s, (a, c) in
           enumerate([(0.70, 0.30), (0.72, 0.28), (0.74, 0.35)])]
    rs += [_record("nsft", s, _eval(a, c, 0.6), secs=s * 10.0) for s, (a, c) in
           enumerate([(0.80, 0.10), (0.90, 0.12), (0.85, 0.08)])]
    rs += [_record("ppo", s, _eval(0.78, 0.2, None), ppo_mem, n=4, floor=0.2) for s in range(2)]
    for r in rs[-2:]:
        r["model_bytes_by_role"] = {"actor": 10 * 2**20, "critic": 20 * 2**20}
    # The first ppo run recorded what each role's process held before its model loaded.
    rs[-2]["runtime_bytes_by_role"] = {"actor": 100 * 2**20, "critic": 100 * 2**20,
                                       "reward": 50 * 2**20, "reference": 50 * 2**20}
    return rs


def test_mean_and_sample_std_by_hand():
    agg = aggregate(_records())
    assert list(agg) == ["base", "sft", "nsft", "ppo"]  # first-seen order
    acc = agg["nsft"]["metrics"]["POPE acc (adv)"]
    # mean = (0.80 + 0.90 + 0.85) / 3 = 0.85; deviations -0.05, 0.05, 0
    # sample variance = (0.0025 + 0.0025 + 0) / (3 - 1) = 0.0025 -> std 0.05
    assert acc["mean"] == pytest.approx(0.85) and acc["std"] == pytest.approx(0.05)
    assert acc["values"] == [0.80, 0.90, 0.85]
    # 95% t-interval: 0.85 ± t(0.975, 2) * 0.05 / sqrt(3) = 0.85 ± 4.303 * 0.028868 = ± 0.1242
    assert acc["ci_low"] == pytest.approx(0.85 - 0.1242, abs=2e-4)
    assert acc["ci_high"] == pytest.approx(0.85 + 0.1242, abs=2e-4)
    assert agg["base"]["metrics"]["POPE acc (adv)"]["ci_low"] is None  # one seed: no interval
    chair = agg["sft"]["metrics"]["CHAIR_i"]
    # mean 0.31; deviations -0.01, -0.03, 0.04 -> (1e-4 + 9e-4 + 16e-4) / 2 = 13e-4
    assert chair["mean"] == pytest.approx(0.31) and chair["std"] == pytest.approx(math.sqrt(13e-4))
    assert agg["base"]["metrics"]["CHAIR_i"]["std"] == 0.0  # one seed
    assert agg["nsft"]["train_seconds"] == pytest.approx(10.0)  # (0 + 10 + 20) / 3
    assert agg["nsft"]["seeds"] == [0, 1, 2]
    # ppo: peak = sum over its four roles (1000 MiB), mean over 2 seeds.
    assert agg["ppo"]["peak_memory_bytes"] == 1000 * 2**20
    assert agg["ppo"]["models_resident"] == 4
    assert list(agg["ppo"]["memory_by_role"]) == ["actor", "critic", "reward", "reference"]
    assert agg["sft"]["param_bytes_by_role"] == {"policy": 6_400_000}


def test_none_values_are_skipped_not_zero():
    rs = [_record("dpo", s, _eval(a, count=c)) for s, (a, c) in
          enumerate([(0.6, None), (None, 0.4), (0.8, 0.8)])]
    rs[1]["train_seconds"] = None
    rs[1]["memory_by_role"] = {"policy": None, "reference": None}  # nothing measured
    rs[2]["eval"]["pope"]["adversarial"]["f1"] = float("nan")
    agg = aggregate(rs)["dpo"]
    assert agg["metrics"]["POPE acc (adv)"]["values"] == [0.6, 0.8]
    assert agg["metrics"]["POPE acc (adv)"]["mean"] == pytest.approx(0.7)
    assert agg["metrics"]["count"]["mean"] == pytest.approx(0.6)
    assert agg["metrics"]["POPE F1 (adv)"]["values"] == [0.75, 0.75]  # NaN skipped too
    assert agg["train_seconds"] == pytest.approx(40.0)
    assert agg["peak_memory_bytes"] == 100 * 2**20  # the unmeasured seed does not pull it down
    # A method where nothing was measured: "–", no crash.
    empty = aggregate([{"method": "base", "seed": 0, "eval": None}])["base"]
    assert empty["metrics"]["count"] == {"mean": None, "ci_low": None, "ci_high": None,
                                         "std": None, "values": []}
    row = markdown_table({"base": empty}).splitlines()[2]
    # every metric, models resident, peak memory, model memory measured and planned, train s,
    # samples/s
    assert row.count("–") == len(METRICS) + 6


def _cell(table: str, method: str, label: str) -> str:
    lines = table.splitlines()
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    for line in lines[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells[0] == method:
            return cells[head.index(label)]
    raise AssertionError(f"no row {method!r}")


def test_bold_goes_to_the_best_cell_each_direction():
    table = markdown_table(aggregate(_records()))
    # higher is better: nsft has the best POPE accuracy (0.85), ± the 95% half-width 0.124
    assert _cell(table, "nsft", "POPE acc (adv)") == "**0.850** ± 0.124"
    assert "**" not in _cell(table, "sft", "POPE acc (adv)")
    # lower is better: nsft has the lowest CHAIR_i (0.10), base the highest (0.50)
    assert _cell(table, "nsft", "CHAIR_i").startswith("**0.100**")
    assert "**" not in _cell(table, "base", "CHAIR_i")
    # all equal (obj recall is 0.6 everywhere): no bold; yes-ratio has no direction
    assert all("**" not in _cell(table, m, "obj recall") for m in ("base", "sft", "ppo"))
    assert all("**" not in _cell(table, m, "yes-ratio (adv)") for m in ("base", "nsft"))
    assert all("**" not in _cell(table, m, "swap AUROC (adv)") for m in ("base", "nsft"))
    # ppo has no count accuracy at all: "–", and the best count is nsft's
    assert _cell(table, "ppo", "count") == "–"
    assert _cell(table, "nsft", "count") == "**0.600** ± 0.000"
    assert _cell(table, "ppo", "peak memory (MiB)") == "1000.0"
    assert _cell(table, "ppo", "models resident") == "4"
    # The planner's model memory: the sum over roles (here 10 + 20 MiB), "–" when not recorded.
    assert _cell(table, "ppo", "model memory (MiB, plan)") == "30.0"
    assert _cell(table, "sft", "model memory (MiB, plan)") == "–"
    # Measured: the peaks less the runtimes, 1000 - 300 MiB, from the one run that has both.
    assert _cell(table, "ppo", "model memory (MiB, measured)") == "700.0"
    assert _cell(table, "sft", "model memory (MiB, measured)") == "–"


def test_ties_for_best_are_bolded_alike():
    rs = [_record(m, 0, _eval(chair_i=c)) for m, c in [("a", 0.2), ("b", 0.3), ("c", 0.2)]]
    table = markdown_table(aggregate(rs))
    assert [_cell(table, m, "CHAIR_i") for m in "abc"] == ["**0.200**", "0.300", "**0.200**"]


def test_one_seed_shows_no_plus_minus():
    table = markdown_table(aggregate(_records()))
    base_row = next(line for line in table.splitlines() if line.startswith("| base "))
    assert "±" not in base_row
    sft_row = next(line for line in table.splitlines() if line.startswith("| sft "))
    assert sft_row.count("±") == len(METRICS)


def test_bad_records_raise_naming_the_record():
    with pytest.raises(ValueError, match="record 1: method='sft' seed=0 appears twice"):
        aggregate([_record("sft", 0, _eval()), _record("sft", 0, _eval())])
    with pytest.raises(ValueError, match="record 0: expected a dict with a non-empty 'method'"):
        aggregate([{"seed": 0}])
    with pytest.raises(ValueError, match="method 'dpo': models_resident differs"):
        aggregate([_record("dpo", 0, _eval(), n=2), _record("dpo", 1, _eval(), n=1)])


def test_write_report_writes_every_file(tmp_path):
    records = _records()
    agg = write_report(records, tmp_path / "out", title="Tiny comparison")
    out = tmp_path / "out"
    for name in ("quality.png", "memory.png", "curves.png"):
        with Image.open(out / name) as im:
            im.verify()
            assert im.format == "PNG" and im.size[0] >= 600 and im.size[1] >= 400
        assert (out / name).stat().st_size > 15_000  # a drawn plot, not a blank canvas
    data = json.loads((out / "report.json").read_text())
    assert data["methods"] == json.loads(json.dumps(agg))
    assert len(data["records"]) == len(records)
    assert "examples" not in data["records"][0]["eval"]
    assert data["records"][0]["eval"]["pope"]["adversarial"]["accuracy"] == 0.5
    assert "examples" in records[0]["eval"]  # the caller's records are not modified
    md = (out / "report.md").read_text()
    assert md.startswith("# Tiny comparison\n")
    assert markdown_table(agg) in md
    for name in ("quality.png", "memory.png", "curves.png"):
        assert f"]({name})" in md
    assert "`eval.chair.chair_i` (lower is better)" in md


def test_plot_without_any_curve_or_memory(tmp_path):
    rs = [{"method": "base", "seed": 0, "eval": _eval(), "curve": []}]
    write_report(rs, tmp_path)
    with Image.open(tmp_path / "curves.png") as im:
        assert im.format == "PNG"
    plot_quality(aggregate(rs), tmp_path / "q.png")
    assert (tmp_path / "q.png").stat().st_size > 10_000


def _items(n_images: int, count_right: int, halluc: int, auroc_good: bool) -> dict:
    """Per-item eval rows for `n_images` images: one count question (the first `count_right`
    images right), one caption (3 mentions; the first `halluc` images with one hallucinated) and
    two adversarial POPE probes (yes, no) scored in the right order when `auroc_good`."""
    cols: dict[str, list] = {k: [] for k in ("key", "kind", "correct", "label", "settings",
                                             "score", "hallucinated", "mentions")}

    def add(**row):
        for k in cols:
            cols[k].append(row.get(k))

    for i in range(n_images):
        add(key=f"im{i}|count|How many?", kind="count", correct=i < count_right)
        add(key=f"im{i}|caption|Describe.", kind="caption", correct=i >= halluc,
            hallucinated=int(i < halluc), mentions=3)
        for label in (True, False):
            gap = (1.0 if label else -1.0) * (1 if auroc_good else -1) + i / 1000
            add(key=f"im{i}|pope|{label}", kind="pope", correct=(gap > 0) == label,
                label=label, settings=["adversarial"], score=gap)
    return cols


def test_verdicts_on_hand_built_records(tmp_path):
    """nSFT: every count right, no hallucination, perfect AUROC; DPO: half the counts right,
    every caption with one hallucination in 3 mentions, inverted AUROC; SFT identical to DPO.
    So nSFT vs DPO is better on count (+0.5), CHAIR_i (-1/3) and AUROC (+1); DPO vs SFT is
    indistinguishable everywhere (delta exactly 0)."""
    rs = [_record(m, 0, {**_eval(), "items": _items(40, *args)}) for m, args in
          [("nsft", (40, 0, True)), ("dpo", (20, 40, False)), ("sft", (20, 40, False)),
           ("base", (0, 40, False))]]
    gate = {"passed": True, "pope_auroc": 0.71}
    protocol = {"split": "eval", "seeds": [0], "decided_on": "val"}
    write_report(rs, tmp_path, title="Verdicts", base_gate=gate, protocol=protocol)
    data = json.loads((tmp_path / "report.json").read_text())
    assert data["base_gate"] == gate and data["protocol"] == protocol
    assert "items" not in data["records"][0]["eval"]  # bulky; kept in the records themselves
    got = {(v["method"], v["versus"], v["metric"]): v for v in data["verdicts"]}
    assert {k[:2] for k in got} == {("nsft", "sft"), ("nsft", "dpo"), ("dpo", "sft")}  # no ppo
    count = got[("nsft", "dpo", "count")]
    assert count["delta"] == pytest.approx(0.5) and count["verdict"] == "better"
    assert count["ci_low"] > 0 and count["n_seeds"] == 1
    chair = got[("nsft", "dpo", "CHAIR_i")]
    assert chair["delta"] == pytest.approx(-1 / 3) and chair["verdict"] == "better"
    assert got[("nsft", "dpo", "POPE AUROC (adv)")]["delta"] == pytest.approx(1.0)
    assert all(v["verdict"] == "indistinguishable" and v["delta"] == 0
               for k, v in got.items() if k[:2] == ("dpo", "sft"))
    md = (tmp_path / "report.md").read_text()
    assert md.startswith("# Verdicts\n\n## Verdicts\n\n- nSFT vs SFT, ")
    assert "- nSFT vs DPO, count: better (+0.500, 95% CI +" in md
    assert "- nSFT vs DPO, CHAIR_i: better (-0.333, 95% CI -" in md
    assert "- DPO vs SFT, attribute" not in md  # no attribute items: no verdict
    assert "come from one seed" in md and "- **pope_auroc**: 0.71" in md
    assert md.index("## Verdicts") < md.index("## Protocol") < md.index("## Results")


def test_no_items_no_verdicts(tmp_path):
    write_report(_records(), tmp_path)
    assert json.loads((tmp_path / "report.json").read_text())["verdicts"] == []
    assert "No verdicts" in (tmp_path / "report.md").read_text()
