"""benchmarks/bench_dpo.py: `--quick` writes top-level `ratios.dpo_vs_trl_dpo` and a loss check of
ours against TRL on the same batches; the ratio and check are computed from the right runs. No
timing is asserted."""

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# benchmarks/ is a folder of scripts, not an installed package: load the script by its path.
_spec = importlib.util.spec_from_file_location("bench_dpo", ROOT / "benchmarks" / "bench_dpo.py")
bench_dpo = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_dpo)


def test_ratio_is_ours_over_trl_live_and_loss_check_pairs_repeats():
    """Fails if the ratio is inverted, taken against TRL's precomputed (unsupported) row, or the
    loss check compares runs of different repeats."""
    results = {"ours-live-packed": {"samples_per_s": 30.0}, "ours-live": {"samples_per_s": 25.0},
               "trl-live": {"samples_per_s": 20.0}, "trl-precomputed": {"unsupported": "vision"}}
    assert bench_dpo.ratios(results) == {"dpo_vs_trl_dpo": 1.5,
                                         "dpo_shared_prefix_vs_trl_dpo": 1.25}
    log2 = math.log(2)
    runs = {"ours-live": [{"losses": [log2, 0.70]}, {"losses": [log2, 0.60]}],
            "trl-live": [{"losses": [log2, 0.7005]}, {"losses": [log2, 0.60]}]}
    check = bench_dpo.loss_check(runs)["ours-live_vs_trl-live"]
    assert check["max_abs_step_loss_diff"] == pytest.approx(5e-4)  # repeat 0's step 2
    assert check["agree"] and check["first_losses_are_log2"]
    runs["trl-live"][1]["losses"][1] = 0.70  # repeat 1 now differs by 0.1
    assert not bench_dpo.loss_check(runs)["ours-live_vs_trl-live"]["agree"]


@pytest.mark.slow
@pytest.mark.heavy
def test_quick_writes_ratios_with_tiny_settings(tmp_path):
    """Fails if --quick stops running both sides, or the JSON loses `ratios` or the loss check."""
    out = tmp_path / "dpo.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_dpo.py"), "--quick", "--steps", "3",
         "--warmup", "1", "--batch", "2", "--repeats", "1", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    report = json.loads(out.read_text())
    assert report["settings"]["methods"] == ["ours-live-packed", "ours-live", "trl-live"]
    assert report["settings"]["steps"] == 3  # an explicit flag beats --quick's value
    # --quick trains the demo's frozen tower (ours on cached features): losses still agree below
    assert report["settings"]["fast_options"] is True
    assert report["ratios"]["dpo_vs_trl_dpo"] > 0
    for method in ("ours-live-packed", "ours-live"):
        check = report["loss_check"][f"{method}_vs_trl-live"]
        assert check["first_losses_are_log2"] and check["agree"], check
