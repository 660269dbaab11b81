"""benchmarks/bench_train.py: the JSON it writes; that every method (in-process nsft, nsft through
Ray Train + DeepSpeed, TRL's SFTTrainer) trained the same tokens in every step; that the Ray path
reproduces the in-process losses and TRL's first loss is nsft's token-weighted mean; that the
data-wait fractions and FLOP rates are well formed. No timing is asserted."""

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# benchmarks/ is a folder of scripts, not an installed package: load the script by its path.
_spec = importlib.util.spec_from_file_location("bench_train",
                                               ROOT / "benchmarks" / "bench_train.py")
bench_train = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_train)
markdown_table = bench_train.markdown_table
STEPS, WARMUP, BATCH = 2, 1, 4
# One Ray method keeps the test short; ray_zero0 differs only by deepspeed.stage.
METHODS = ["nsft", "ray_zero2", "trl_sft"]
RESULT_KEYS = {
    "method", "note", "steps_done", "warmup_steps", "timed_steps", "batch", "timed_seconds",
    "seconds_per_step", "median_seconds_per_step", "cpu_seconds_per_step", "samples_per_cpu_s",
    "samples_per_s", "tokens_per_s", "input_tokens_per_s", "data_wait_seconds_per_step",
    "data_wait_fraction", "data_wait_includes", "trained_tokens_per_step",
    "input_tokens_per_step", "padded_length_per_step", "first_loss", "final_loss", "losses",
    "rss_first_step_mib", "peak_rss_mib", "torch_threads", "load_average_1min",
    "process_seconds", "runs", "flops_per_step_mean", "achieved_flops_per_s",
    "achieved_flops_per_cpu_s", "mfu", "mfu_cpu",
}
RAY_KEYS = {
    "deepspeed_stage", "observed_seconds_per_step", "ray_processes_cpu_seconds_per_step",
    "ray_processes_pss_mib", "driver_peak_rss_mib", "seconds_to_first_step", "worker_env",
    "chosen_losses", "negative_losses", "train_summary", "cpu_window_steps", "worker_vmhwm_mib",
}


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.heavy
def test_bench_train_runs_every_method(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_train.py"), "--out", str(out),
         "--steps", str(STEPS), "--warmup", str(WARMUP), "--batch", str(BATCH), "--images", "4",
         "--methods", *METHODS],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    report = json.loads(out.read_text())
    assert {"benchmark", "date", "settings", "machine", "sizes"} <= set(report)
    assert report["settings"]["batch"] == BATCH and list(report["sizes"]) == ["tiny"]
    assert report["machine"]["matmul_flops_per_s"] > 0
    size = report["sizes"]["tiny"]
    assert size["settings"] == {"size": "tiny", "steps": STEPS, "warmup": WARMUP}
    # 4 images x 2 preference pairs, each -> 1 chosen + >= 1 negative conversation.
    assert size["data"]["preference_rows"] == 8
    assert size["data"]["chosen"] == 8 and size["data"]["negative"] >= 8
    flops = size["flops"]["flops_per_step"]
    assert len(flops) == WARMUP + STEPS and all(f > 0 for f in flops)
    assert list(size["results"]) == METHODS
    for method, r in size["results"].items():
        assert RESULT_KEYS <= set(r), (method, RESULT_KEYS - set(r))
        assert r["method"] == method
        assert len(r["runs"]) == 1 and r["runs"][0]["samples_per_s"] == r["samples_per_s"]
        assert r["steps_done"] == WARMUP + STEPS  # every method trained every step
        assert len(r["losses"]) == WARMUP + STEPS
        assert all(math.isfinite(x) and x > 0 for x in r["losses"]), (method, r["losses"])
        assert r["final_loss"] == r["losses"][-1]
        for key in ("samples_per_s", "tokens_per_s", "seconds_per_step",
                    "median_seconds_per_step", "cpu_seconds_per_step", "peak_rss_mib", "mfu"):
            assert r[key] > 0, (method, key)
        assert r["peak_rss_mib"] >= r["rss_first_step_mib"] > 0
        assert 0.0 <= r["data_wait_fraction"] <= 1.0
        assert r["data_wait_seconds_per_step"] <= r["seconds_per_step"]
        # Timed throughput covers exactly the post-warm-up steps.
        assert r["samples_per_s"] == pytest.approx(STEPS * BATCH / r["timed_seconds"])
        assert r["samples_per_cpu_s"] == pytest.approx(BATCH / r["cpu_seconds_per_step"])
        timed_tokens = sum(r["trained_tokens_per_step"][WARMUP:])
        assert r["tokens_per_s"] == pytest.approx(timed_tokens / r["timed_seconds"])
        assert r["achieved_flops_per_s"] == pytest.approx(sum(flops[WARMUP:]) / r["timed_seconds"])
        assert f"| {method} |" in proc.stdout
    res = report["sizes"]["tiny"]["results"]
    ray = res["ray_zero2"]
    assert RAY_KEYS <= set(ray), RAY_KEYS - set(ray)
    assert ray["deepspeed_stage"] == 2 and ray["train_summary"]["steps"] == WARMUP + STEPS
    assert ray["worker_env"]["OMP_NUM_THREADS"] == "1"  # same thread count as the others
    assert ray["worker_vmhwm_mib"] > 0 and ray["driver_peak_rss_mib"] > 0
    assert ray["ray_processes_pss_mib"] > ray["driver_peak_rss_mib"] / 2  # sum incl. driver
    # Same rows, same order, same assistant-only masks: identical tokens in every step.
    for key in ("trained_tokens_per_step", "input_tokens_per_step", "padded_length_per_step"):
        assert res["nsft"][key] == res["trl_sft"][key] == ray[key], key
    checks = size["checks"]
    assert checks["trained_tokens_match"] and checks["input_tokens_match"]
    # The same objective on the same batches with the same optimizer: the same losses, whether
    # in-process or in a Ray Train worker under DeepSpeed ZeRO-2 (fp32; float rounding only).
    assert checks["ray_zero2_vs_nsft_max_loss_abs_diff"] < 1e-3
    # Before any update TRL's token mean is nsft's two term means weighted by their tokens.
    assert checks["trl_first_loss_vs_nsft_token_mean_abs_diff"] < 1e-4
    nsft = res["nsft"]  # lam = 1: the logged loss is the sum of its two token means
    assert nsft["final_loss"] == pytest.approx(nsft["chosen_losses"][-1]
                                               + nsft["negative_losses"][-1])
    ratio = nsft["median_samples_per_s"] / res["trl_sft"]["median_samples_per_s"]
    assert report["ratios"] == size["ratios"] == {"nsft_vs_trl_sft": pytest.approx(ratio)}
    assert ratio > 0


@pytest.mark.slow
@pytest.mark.heavy
def test_bench_train_quick_compares_fast_nsft_with_trl(tmp_path):
    """--quick's path with tiny steps: fails if the fast options (frozen tower, cached features
    and encodings, packed rows) change what nsft trains (TRL's first loss, the trained tokens) or
    if the top-level ratios are missing."""
    out = tmp_path / "quick.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_train.py"), "--quick", "--out", str(out),
         "--steps", "1", "--warmup", "1", "--repeats", "1", "--batch", str(BATCH),
         "--images", "4"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    report = json.loads(out.read_text())
    assert report["settings"]["fast_options"] and report["settings"]["quick"]
    res = report["sizes"]["tiny"]["results"]
    assert list(res) == ["nsft", "trl_sft"]
    assert report["ratios"]["nsft_vs_trl_sft"] > 0
    checks = report["sizes"]["tiny"]["checks"]
    assert checks["trained_tokens_match"] and checks["input_tokens_match"]
    assert checks["trl_first_loss_vs_nsft_token_mean_abs_diff"] < 1e-4
    # Packed rows: nsft's rows are fewer and longer than TRL's padded ones, never more tokens.
    assert all(p <= 256 for p in res["nsft"]["padded_length_per_step"])
    assert "Ratios (median samples/s" in proc.stdout


def test_markdown_table_formats_a_report():
    result = {"samples_per_s": 12.345, "tokens_per_s": 300.4, "seconds_per_step": 0.6481,
              "median_seconds_per_step": 0.5, "cpu_seconds_per_step": 0.25,
              "data_wait_fraction": 0.123, "peak_rss_mib": 700.2,
              "achieved_flops_per_s": 25.5e9, "mfu": 0.26, "mfu_cpu": 0.311,
              "final_loss": 4.10444, "note": "path"}
    ray = {**result, "observed_seconds_per_step": 0.7, "ray_processes_cpu_seconds_per_step": 0.3,
           "ray_processes_pss_mib": 4000.0, "seconds_to_first_step": 31.2}
    report = {
        "settings": {"batch": 8, "lr": 5e-4, "threads": 1, "repeats": 2, "ray_train_poll_s": 0.05},
        "machine": {"cpus": 2, "load_average": [3.5, 2.0, 1.0], "matmul_flops_per_s": 98e9,
                    "matmul_flops_per_cpu_s": 99e9},
        "sizes": {"tiny": {
            "settings": {"size": "tiny", "steps": 20, "warmup": 3},
            "results": {"nsft": result, "ray_zero2": ray},
            "data": {"parameters": 1_603_072, "conversations": 64, "chosen": 32, "negative": 32,
                     "preference_rows": 32},
            "flops": {"flops_per_step": [3e9, 4e9], "matmul_limit": {"reps": 10}},
            "checks": {"trained_tokens_match": True, "ray_zero2_vs_nsft_max_loss_abs_diff": 2e-6},
        }},
    }
    table = markdown_table(report, "tiny").splitlines()
    assert table[0].startswith("| method | samples/s | trained tok/s |")
    assert table[2] == ("| nsft | 12.3 | 300 | 0.648 (0.500) | 0.250 | 12% | 700 | 25.5 | "
                        "26% / 31% | 4.1044 | path |")
    assert table[3].startswith("| ray_zero2 | 12.3 |")
    assert "1.6M params" in table[5] and "load average 3.5" in table[5]
    assert "best of 2 interleaved runs per method" in table[5]
    assert "3.50 G on average" in table[6] and "98.0 GFLOP/s" in table[6]
    assert "ray_zero2 0.700 s" in table[7] and "ray_zero2 4000 MiB" in table[7]
    assert table[8] == ("Checks: per-step trained tokens: True; ray zero2 vs nsft max loss: "
                        "2.0e-06.")
