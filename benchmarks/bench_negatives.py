"""build-negatives throughput on N ShapesWorld pairs, and its quarantine of corrupted rows.

    python benchmarks/bench_negatives.py --pairs 10000 --out runs/bench/negatives.json

Writes a ShapesWorld preference set of `--pairs` pairs, appends one corrupted copy of a good row per
corruption below, runs the Ray Data pipeline (read -> validate -> construct -> write) and prints a
table: rows read / valid / quarantined by reason / conversations, wall seconds and rows per second.
The identity read == constructed + quarantined is checked by the pipeline itself.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
from PIL import Image

from nsft_ray.config import Config, WorldConfig, load_config
from nsft_ray.schema import preference_table
from nsft_ray.world import write_world


def _png(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), "white").save(buf, format="PNG")
    return buf.getvalue()


def corruptions(good: dict) -> list[tuple[str, dict]]:
    """One bad copy of `good` per kind of damage (the expected quarantine reason first)."""
    return [
        ("empty_image", {**good, "image": b""}),
        ("undecodable_image", {**good, "image": b"\x89PNG not really"}),
        ("undecodable_image", {**good, "image": good["image"][: len(good["image"]) // 2]}),
        ("image_too_large", {**good, "image": _png(2048, 1024)}),
        ("image_too_small", {**good, "image": _png(4, 4)}),
        ("missing_field", {**good, "chosen": None}),
        ("empty_field", {**good, "prompt": "   "}),
        ("chosen_equals_rejected", {**good, "rejected": "  " + good["chosen"].upper()}),
        ("too_many_tokens", {**good, "chosen": "red circle " * 400}),
        ("no_error_found", {**good, "rejected": good["chosen"] + " Indeed."}),
    ]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=10000)
    parser.add_argument("--out", default="runs/bench/negatives.json")
    parser.add_argument("--workdir", default="")
    parser.add_argument("overrides", nargs="*",
                        help="config overrides, e.g. negatives.batch_size=512")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    cfg: Config = load_config(None, ["data.validation.max_tokens=256", *args.overrides])
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_negatives_"))

    t0 = time.perf_counter()
    world = WorldConfig(n_train=(args.pairs + 1) // 2, n_eval=2, pairs_per_image=2)
    write_world(world, work / "world", seed=0)
    prefs = pq.read_table(work / "world" / "pref_train.parquet").to_pylist()[: args.pairs]
    # Corrupt a caption pair (text-diff finds its error), so each damage has one cause.
    good = next(r for r in prefs if "Describe" in r["prompt"])
    bad = corruptions(good)
    rows = prefs + [{**row, "id": f"corrupt-{i}-{reason}"} for i, (reason, row) in enumerate(bad)]
    pq.write_table(preference_table(rows), work / "pairs.parquet")
    world_seconds = time.perf_counter() - t0

    from nsft_ray.ray_glue.negatives import build_negatives

    t1 = time.perf_counter()
    summary = build_negatives(work / "pairs.parquet", work / "negatives", cfg.data, cfg.negatives)
    seconds = time.perf_counter() - t1

    quarantine = pq.read_table(work / "negatives" / "quarantine.parquet").to_pylist()
    got = {q["id"]: q["reason"] for q in quarantine if q["id"].startswith("corrupt-")}
    expected = {f"corrupt-{i}-{reason}": reason for i, (reason, _) in enumerate(bad)}
    result = {
        "pairs": args.pairs, "corrupted_rows": len(bad), "world_seconds": round(world_seconds, 1),
        "build_negatives_seconds": round(seconds, 1),
        "rows_per_second": round(summary["read"] / seconds, 1),
        "summary": summary, "corrupted_rows_reasons": got,
        "corrupted_rows_as_expected": got == expected,
        "cpus": os.cpu_count(), "load_average": os.getloadavg()[0],
    }
    print("\n| pairs | corrupted | read | constructed | quarantined | negative convs "
          "| chosen convs | seconds | rows/s |")
    print("|---|---|---|---|---|---|---|---|---|")
    print(f"| {args.pairs} | {len(bad)} | {summary['read']} | {summary['constructed']} | "
          f"{summary['quarantined']} | {summary['conversations']} | "
          f"{summary['chosen_conversations']} | {seconds:.1f} | {result['rows_per_second']} |")
    print("\nquarantined by stage and reason:",
          json.dumps(summary["quarantined_by_stage"], indent=1))
    print("corrupted rows quarantined with the expected reason:",
          result["corrupted_rows_as_expected"])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
