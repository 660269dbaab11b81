"""benchmarks/bench_plan.py: the memory planner's prediction against measurement, on CPU.

The oracle is torch's MemTracker (every live tensor storage, the CPU counterpart of CUDA's
max_memory_allocated) over real recipe steps; the prediction is nsft_ray.plan for the same model
and shapes. Fails when a formula drifts from what the recipes hold by more than 15% either way,
for sft, nsft with its KL reference, dpo with a live reference and PPO's four roles, at the tiny
and the small model sizes (issue 14, item 5).
"""

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# benchmarks/ is a folder of scripts, not an installed package: load the script by its path.
_spec = importlib.util.spec_from_file_location("bench_plan", ROOT / "benchmarks" / "bench_plan.py")
bench_plan = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_plan)

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("size", ["tiny", "small"])
def test_predicted_peak_per_role_is_within_15_percent_of_measured(size, tmp_path, capsys):
    results = bench_plan.measure(size, tmp_path, batch=4, max_new_tokens=16)
    with capsys.disabled():
        print("\n" + bench_plan.table(results))
    assert {(r["method"], r["role"]) for r in results} >= {
        ("sft", "policy"), ("nsft+kl", "policy+reference"), ("dpo", "policy+reference"),
        *(("ppo", role) for role in ("actor", "critic", "reward", "reference"))}
    off = [f"{r['method']} {r['role']}: {r['ratio']:.3f}" for r in results
           if not 0.85 <= r["ratio"] <= 1.15]
    assert not off, off
