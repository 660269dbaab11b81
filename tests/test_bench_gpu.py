"""benchmarks/bench_gpu.py, the GPU MFU script, run on CPU in bf16 at `tiny` (its smoke run): it
needs no Ray, DeepSpeed, vLLM or TRL (the lent GPU machine has none), trains, and counts each
step's FLOPs as a hand formula bounds them. No timing is asserted."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROBE = """
import runpy, sys
sys.argv = ["bench_gpu.py", *sys.argv[1:]]
try:
    runpy.run_path("benchmarks/bench_gpu.py", run_name="__main__")
finally:
    print("LOADED", sorted(m for m in ("ray", "deepspeed", "vllm", "trl") if sys.modules.get(m)))
"""


def test_bench_gpu_smoke_run_trains_and_counts_flops_as_a_formula_bounds_them(tmp_path):
    """Per step, the LM layers' matmuls alone cost 6 * layers * (4h^2 + 3h*ffn) FLOPs per padded
    token (forward 2, backward 4; tiny: h 128, ffn 512, 4 layers); attention, the vision tower
    and the output layer at the scored positions add less than half of that again. Fails if the
    backward is not counted (a third), a shape is counted for another (the steps' lengths
    differ), or MFU is not achieved / limit. Also fails if the script imports Ray, DeepSpeed,
    vLLM or TRL (deepspeed is installed here but not there, so it is masked)."""
    out = tmp_path / "gpu.json"
    proc = subprocess.run(
        [sys.executable, "-c", "import sys; sys.modules['deepspeed'] = None\n" + PROBE,
         "--device", "cpu", "--dtype", "bfloat16", "--sizes", "tiny", "--steps", "3",
         "--warmup", "1", "--batch", "4", "--images", "8", "--reps", "2", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "LOADED []" in proc.stdout
    report = json.loads(out.read_text())
    (run,) = report["sizes"]
    assert run["size"] == "tiny" and run["timed_steps"] == 3 and len(run["flops_per_step"]) == 3
    per_token = 6 * 4 * (4 * 128**2 + 3 * 128 * 512)
    assert len(set(run["padded_tokens_per_step"])) > 1  # the shapes differ between steps
    for flops, tokens in zip(run["flops_per_step"], run["padded_tokens_per_step"], strict=True):
        assert per_token * tokens <= flops <= 1.5 * per_token * tokens, (flops, tokens)
    achieved = sum(run["flops_per_step"]) / (run["seconds_per_step"] * 3)
    assert abs(run["achieved_flops_per_s"] / achieved - 1) < 1e-9
    limit = report["matmul_limit"]["flops_per_s"]
    assert abs(run["mfu_vs_measured_matmul"] - achieved / limit) < 1e-9
    assert run["final_loss"] < run["first_loss"]  # it trained
