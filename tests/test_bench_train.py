"""benchmarks/bench_sft.py: the JSON it writes, that every method trained, that nsft-ray's sft and
TRL's SFTTrainer train the same tokens to the same first loss. No timing is asserted."""

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# benchmarks/ is a folder of scripts, not an installed package: load the script by its path.
_spec = importlib.util.spec_from_file_location("bench_sft", ROOT / "benchmarks" / "bench_sft.py")
bench_sft = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_sft)
METHODS, markdown_table = bench_sft.METHODS, bench_sft.markdown_table
STEPS, WARMUP, BATCH = 2, 1, 4
RESULT_KEYS = {
    "method", "note", "steps_done", "warmup_steps", "timed_steps", "batch", "timed_seconds",
    "seconds_per_step", "median_seconds_per_step", "cpu_seconds_per_step", "samples_per_cpu_s",
    "samples_per_s", "tokens_per_s",
    "input_tokens_per_s",
    "trained_tokens_per_step", "first_loss", "final_loss", "losses", "rss_setup_mib",
    "peak_rss_mib", "torch_threads", "load_average_1min", "process_seconds", "runs",
}


@pytest.mark.slow
def test_bench_sft_runs_every_method(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_sft.py"), "--out", str(out),
         "--steps", str(STEPS), "--warmup", str(WARMUP), "--batch", str(BATCH), "--images", "4",
         "--repeats", "1"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    report = json.loads(out.read_text())
    assert {"benchmark", "date", "settings", "data", "machine", "results", "checks"} <= set(report)
    assert report["settings"]["steps"] == STEPS and report["settings"]["batch"] == BATCH
    # 4 images x 2 preference pairs, each -> 1 chosen + >= 1 negative conversation.
    assert report["data"]["preference_rows"] == 8
    assert report["data"]["chosen"] == 8 and report["data"]["negative"] >= 8
    assert list(report["results"]) == list(METHODS)
    for method, r in report["results"].items():
        assert RESULT_KEYS <= set(r), (method, RESULT_KEYS - set(r))
        assert r["method"] == method
        assert len(r["runs"]) == 1 and r["runs"][0]["samples_per_s"] == r["samples_per_s"]
        assert r["steps_done"] == WARMUP + STEPS  # every method trained every step
        assert len(r["losses"]) == WARMUP + STEPS
        assert all(math.isfinite(x) and x > 0 for x in r["losses"]), (method, r["losses"])
        assert r["final_loss"] == r["losses"][-1]
        for key in ("samples_per_s", "tokens_per_s", "seconds_per_step",
                    "median_seconds_per_step", "cpu_seconds_per_step", "peak_rss_mib"):
            assert r[key] > 0, (method, key)
        assert r["peak_rss_mib"] >= r["rss_setup_mib"]
        # Timed throughput covers exactly the post-warm-up steps.
        assert r["samples_per_s"] == pytest.approx(STEPS * BATCH / r["timed_seconds"])
        assert r["samples_per_cpu_s"] == pytest.approx(BATCH / r["cpu_seconds_per_step"])
        timed_tokens = sum(r["trained_tokens_per_step"][WARMUP:])
        assert r["tokens_per_s"] == pytest.approx(timed_tokens / r["timed_seconds"])
    res = report["results"]
    # Same rows, same order, same assistant-only masks: identical trained tokens in every step.
    assert res["sft"]["trained_tokens_per_step"] == res["trl_sft"]["trained_tokens_per_step"]
    assert res["nsft"]["trained_tokens_per_step"] == res["sft"]["trained_tokens_per_step"]
    assert report["checks"]["trained_tokens_match"] is True
    # Same init, batch and masks: the first-step loss (before any update) is the same number.
    assert res["trl_sft"]["first_loss"] == pytest.approx(res["sft"]["first_loss"], abs=1e-5)
    # nsft with lam = 1 logs the sum of its two token means.
    nsft = res["nsft"]
    assert nsft["final_loss"] == pytest.approx(nsft["chosen_loss"] + nsft["negative_loss"])
    for method in METHODS:
        assert f"| {method} |" in proc.stdout


def test_markdown_table_formats_a_report():
    result = {"samples_per_s": 12.345, "tokens_per_s": 300.4, "seconds_per_step": 0.6481,
              "median_seconds_per_step": 0.5, "cpu_seconds_per_step": 0.25,
              "samples_per_cpu_s": 32.0,
              "peak_rss_mib": 700.2, "final_loss": 4.10444, "note": "path"}
    report = {
        "results": {"sft": result},
        "settings": {"size": "tiny", "batch": 8, "steps": 20, "warmup": 3, "lr": 5e-4,
                     "threads": 1, "repeats": 2},
        "data": {"parameters": 1_603_072, "conversations": 64, "chosen": 32, "negative": 32,
                 "preference_rows": 32},
        "machine": {"cpus": 2, "load_average": [3.5, 2.0, 1.0]},
        "checks": {"trained_tokens_match": True, "first_loss_abs_diff": 0.0,
                   "max_loss_abs_diff": 2.5e-7},
    }
    table = markdown_table(report).splitlines()
    assert table[0].startswith("| method | samples/s |")
    assert table[2] == "| sft | 12.3 | 300 | 0.648 (0.500) | 0.250 | 32.0 | 700 | 4.1044 | path |"
    assert "1.6M params" in table[4] and "load average 3.5" in table[4]
    assert "best of 2 interleaved runs per method" in table[4]
    assert table[5] == ("sft vs trl_sft: trained tokens per step identical: True; loss differs by "
                        "0.0e+00 at step 1, by at most 2.5e-07 over all steps.")
