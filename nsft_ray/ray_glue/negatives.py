"""`build-negatives` on Ray Data: preference Parquet -> validated rows -> corrective conversations.

    read ──► validate ──┬─► quarantine (stage=validate)
                        ▼
                 construct (NegativesBatchFn: template | text-diff | llm via an actor pool)
                        ├─► quarantine (stage=construct)
                        ▼
                 OUT/conversations/*.parquet   OUT/quarantine.parquet   OUT/summary.json

Every preference row read ends either as conversations or in quarantine with its reason:
``read == constructed + quarantined`` is checked before the summary is written.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import ray

from nsft_ray.config import DataConfig, NegativesConfig
from nsft_ray.negatives.pipeline import NegativesBatchFn, corrective_answer_counts
from nsft_ray.ray_glue.data import (
    merge_quarantine,
    read_preferences,
    split_quarantine,
    validate_dataset,
)
from nsft_ray.ray_glue.runtime import ensure_ray

__all__ = ["build_negatives"]


def build_negatives(
    input_path: str | Path,
    out_dir: str | Path,
    data_cfg: DataConfig,
    neg_cfg: NegativesConfig,
) -> dict:
    """Run the pipeline and write conversations, quarantine and summary under `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    ensure_ray()

    ds = read_preferences(input_path, data_cfg)
    valid, v_counts = validate_dataset(
        ds, data_cfg.validation, kind="preference", quarantine_dir=out / "_quarantine" / "validate"
    )

    llm = neg_cfg.constructor == "llm"
    constructed = valid.map_batches(
        NegativesBatchFn,
        fn_constructor_kwargs={"cfg": neg_cfg},
        batch_format="pyarrow",
        batch_size=neg_cfg.batch_size,
        # One actor per LLM engine; the rule-based constructors are cheap, one actor suffices.
        compute=ray.data.ActorPoolStrategy(size=neg_cfg.llm.concurrency if llm else 1),
        num_gpus=neg_cfg.llm.num_gpus if llm else 0,
    )
    conversations, c_counts = split_quarantine(
        constructed, stage="construct", quarantine_dir=out / "_quarantine" / "construct"
    )
    conv_dir = out / "conversations"
    conversations.write_parquet(str(conv_dir))
    quarantined = merge_quarantine(
        [out / "_quarantine" / "validate", out / "_quarantine" / "construct"],
        out / "quarantine.parquet",
    )

    by_origin = _count_origins(conversations)
    # A failed preference row is one row in the construct stage; a good one yields >= 1 rows.
    constructed_rows = v_counts["valid"] - c_counts["quarantined"]
    summary = {
        "input": str(input_path),
        "constructor": neg_cfg.constructor,
        "read": v_counts["read"],
        "valid": v_counts["valid"],
        "quarantined": v_counts["quarantined"] + c_counts["quarantined"],
        "quarantined_by_stage": {
            "validate": v_counts["by_reason"],
            "construct": c_counts["by_reason"],
        },
        "constructed": constructed_rows,
        "conversations": by_origin.get("negative", 0),
        "chosen_conversations": by_origin.get("chosen", 0),
        "corrective": neg_cfg.corrective,
        # Streamed through the driver: a few strings per row, read from the materialized rows.
        "corrective_answers": corrective_answer_counts(
            conversations.select_columns(["origin", "messages", "meta"]).iter_rows()
        ),
        "seconds": round(time.perf_counter() - start, 2),
        "outputs": {"conversations": str(conv_dir), "quarantine": str(quarantined)},
    }
    if summary["read"] != summary["constructed"] + summary["quarantined"]:
        raise RuntimeError(f"row accounting broken (read != constructed + quarantined): {summary}")
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(_counts_table(summary))
    print(f"conversations: {summary['conversations']} negative, "
          f"{summary['chosen_conversations']} chosen  ({summary['seconds']} s)")
    return summary


def _counts_table(summary: dict) -> str:
    """read / valid / constructed / quarantined, then the reasons of each stage: a row that
    passes validation can still yield no conversation (its reason is in the construct stage)."""
    lines = [f"{key:<30}{summary[key]:>8}"
             for key in ("read", "valid", "constructed", "quarantined")]
    for stage, reasons in summary["quarantined_by_stage"].items():
        for reason, n in sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0])):
            lines.append(f"  {stage + ': ' + reason:<28}{n:>8}")
    return "\n".join(lines)


def _origin_counts(batch: pa.Table) -> pa.Table:
    counts = pc.value_counts(batch.column("origin")).to_pylist()
    return pa.table({"origin": [c["values"] for c in counts], "n": [c["counts"] for c in counts]})


def _count_origins(ds: ray.data.Dataset) -> dict[str, int]:
    """Conversations per origin: one tiny table per block, summed in the driver (no shuffle)."""
    totals: dict[str, int] = {}
    for row in ds.select_columns(["origin"]).map_batches(
        _origin_counts, batch_format="pyarrow", batch_size=None
    ).iter_rows():
        totals[row["origin"]] = totals.get(row["origin"], 0) + int(row["n"])
    return totals
