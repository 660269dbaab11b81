"""benchmarks/bench_logits.py runs both variants on padded and packed rows and writes JSON; the
scored-positions variant holds less memory at a grown vocabulary (live-tensor bytes are
deterministic; no timing is asserted)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_logits_writes_both_variants_and_scored_only_holds_less(tmp_path):
    """Fails if a variant or a row layout is skipped, or if the kept-logits path holds the full
    logits anyway (its peak would match the full forward's)."""
    out = tmp_path / "logits.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_logits.py"), "--vocab", "0", "32000",
         "--batch", "8", "--rounds", "1", "--steps", "1", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    results = json.loads(out.read_text())["results"]
    peaks = {(r["vocab"], r["rows"], r["logits"]): r["peak_bytes"] for r in results}
    assert len(peaks) == 8 and {v for v, _, _ in peaks} == {477, 32000}
    for rows in ("padded", "packed"):
        assert peaks[32000, rows, "scored positions"] < 0.8 * peaks[32000, rows, "every position"]
