"""`nsft-ray data inspect | convert`: how a file will be read, before anything trains on it.

    report = inspect_input("RLAIF-V-Dataset/", DataConfig(format="auto"))
    print(format_report(report))
    summary = convert_input("vlfeedback.jsonl", DataConfig(format="vlfeedback"), "prefs/")

One streaming pass over the input (Parquet a batch at a time) with the same readers and the same
validator as build-negatives and train: the format (and what detected it), the row count, which
column feeds which field of the data contract, the first rows, and the quarantine counts by
reason with one example each. ``convert`` writes the valid rows as our preference Parquet (for
what takes only that, e.g. ``compare.preferences``) and the rest to quarantine.parquet. Both run
without Ray.
"""

from __future__ import annotations

import dataclasses
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from nsft_ray.config import DataConfig
from nsft_ray.data import (
    detect_format,
    iter_preference_batches,
    open_parquet,
    read_conversation_file,
    resolve_format,
)
from nsft_ray.formats import LAYOUTS
from nsft_ray.schema import CONVERSATION_SCHEMA, PREFERENCE_SCHEMA, QUARANTINE_SCHEMA
from nsft_ray.validate import QuarantineCounts, ValidateBatchFn, check_counts, quarantine_rows

__all__ = ["inspect_input", "format_report", "contract_mapping", "convert_input"]

TEXT_CHARS = 70  # characters of each text shown per row


def contract_mapping(cfg: DataConfig) -> dict[str, str]:
    """Contract field -> where `cfg.format` takes it from (column, key or rule)."""
    if cfg.format in LAYOUTS:
        return {k: v.replace("<aspect>", repr(cfg.vlfeedback_aspect))
                for k, v in LAYOUTS[cfg.format].mapping.items()}
    if cfg.format == "llava":
        return {"id": cfg.id_key, "image": cfg.image_key,
                "messages": "conversations: human -> user, gpt -> assistant (<image> removed)",
                "origin": "'sft'", "meta": "source file, every other key"}
    keys = {f: getattr(cfg, f"{f}_key") for f in ("id", "prompt", "chosen", "rejected")}
    return {"id": keys["id"] + ("" if cfg.format == "parquet" else ", else <file>-<line>"),
            "image": f"{cfg.image_key} (bytes, a path under the root, or a {{bytes, path}} "
                     "struct), else image_path",
            "prompt": keys["prompt"], "chosen": keys["chosen"], "rejected": keys["rejected"],
            "source": "source, else the file name", "meta": "meta, plus every other column"}


def _is_conversation_parquet(path: Path, cfg: DataConfig) -> bool:
    if cfg.format != "parquet":
        return False
    names = set(open_parquet(path).schema.names)
    return "messages" in names and "chosen" not in names


def _batches(path: Path, cfg: DataConfig, kind: str) -> Iterator[pa.Table]:
    if kind == "preference":
        yield from iter_preference_batches(path, cfg)
    else:  # conversation files (LLaVA JSON, our conversation Parquet) are read whole
        yield read_conversation_file(path, cfg)


def _image_summary(data: Any) -> str:
    if not isinstance(data, bytes):
        return "None"
    try:
        with Image.open(io.BytesIO(data)) as im:
            return f"<{len(data)} bytes {im.format} {im.size[0]}x{im.size[1]}>"
    except Exception:  # PIL raises many types; the validator reports the reason
        return f"<{len(data)} bytes, not an image>"


def _short(v: Any, limit: int = TEXT_CHARS) -> str:
    text = v if isinstance(v, str) else json.dumps(v, default=str)
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _show(row: dict) -> dict[str, str]:
    return {k: _image_summary(v) if k == "image" else _short(v) for k, v in row.items()}


def inspect_input(path: str | Path, cfg: DataConfig, n_rows: int = 3) -> dict[str, Any]:
    """Read and validate `path` as build-negatives and train would; return what was seen.

    Keys: path, format, detected (how the format was chosen), kind, rows, mapping, first_rows,
    validation {read, valid, quarantined, by_reason}, examples {reason: (id, detail)}.
    Duplicate ids are caught within a batch, as in the Ray Data validation pass.
    """
    p = Path(path)
    detected = f"data.format={cfg.format}"
    if cfg.format == "auto":
        fmt, why = detect_format(p)
        cfg, detected = dataclasses.replace(cfg, format=fmt), f"auto: {why}"
    kind = ("conversation" if cfg.format == "llava" or (p.exists() and
                                                         _is_conversation_parquet(p, cfg))
            else "preference")
    validator = ValidateBatchFn(cfg.validation, kind)
    first: list[dict] = []
    by_reason: dict[str, int] = {}
    examples: dict[str, tuple[str, str]] = {}
    rows = 0
    for batch in _batches(p, cfg, kind):
        records = batch.to_pylist()
        rows += len(records)
        first += [_show(r) for r in records[:max(0, n_rows - len(first))]]
        for r, (reason, detail) in zip(records, validator.check_rows(records), strict=True):
            if reason:
                by_reason[reason] = by_reason.get(reason, 0) + 1
                examples.setdefault(reason, (str(r.get("id")), detail))
    bad = sum(by_reason.values())
    if kind == "conversation":
        mapping = (contract_mapping(cfg) if cfg.format == "llava"
                   else {f: f for f in CONVERSATION_SCHEMA.names})
    else:
        mapping = contract_mapping(cfg)
    return {"path": str(p), "format": cfg.format, "detected": detected, "kind": kind,
            "rows": rows, "mapping": mapping, "first_rows": first,
            "validation": {"read": rows, "valid": rows - bad, "quarantined": bad,
                           "by_reason": dict(sorted(by_reason.items(), key=lambda kv: -kv[1]))},
            "examples": examples}


def format_report(report: dict[str, Any]) -> str:
    """The report as text: one block per question a user asks before training on a file."""
    v = report["validation"]
    lines = [f"input        {report['path']}",
             f"format       {report['format']}  ({report['detected']})",
             f"rows         {report['rows']} {report['kind']} rows read",
             "mapping      contract field <- source"]
    width = max(map(len, report["mapping"]), default=0)
    lines += [f"  {field:<{width}} <- {src}" for field, src in report["mapping"].items()]
    lines.append(f"first rows   ({len(report['first_rows'])})")
    for i, row in enumerate(report["first_rows"]):
        lines += [f"  [{i}] " + "  ".join(f"{k}={val}" for k, val in row.items()
                                          if k in ("id", "image"))]
        lines += [f"      {k}: {val}" for k, val in row.items() if k not in ("id", "image")]
    lines.append(f"validation   read {v['read']} = valid {v['valid']} + quarantined "
                 f"{v['quarantined']}")
    for reason, n in v["by_reason"].items():
        rid, detail = report["examples"][reason]
        lines.append(f"  {reason:<24}{n:>6}   e.g. {rid}: {_short(detail, 160)}")
    return "\n".join(lines)


def convert_input(path: str | Path, cfg: DataConfig, out_dir: str | Path) -> dict[str, Any]:
    """Preference data in `cfg.format` -> OUT/preferences.parquet (valid rows, our contract),
    OUT/quarantine.parquet (the rest, with reasons) and OUT/summary.json; streamed by batch.

    Duplicate ids are caught within a batch, as in the Ray Data validation pass.
    """
    cfg = resolve_format(path, cfg)  # auto: the summary names the detected format
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    validator = ValidateBatchFn(cfg.validation, "preference")
    counts: QuarantineCounts = {"read": 0, "valid": 0, "quarantined": 0, "by_reason": {}}
    with pq.ParquetWriter(out / "preferences.parquet", PREFERENCE_SCHEMA) as good, \
            pq.ParquetWriter(out / "quarantine.parquet", QUARANTINE_SCHEMA) as bad:
        for batch in iter_preference_batches(path, cfg):
            checked = validator(batch)
            reasons = checked.column("quarantine_reason").to_pylist()
            valid = batch.filter(pa.array([not r for r in reasons]))
            quarantined = quarantine_rows(checked, stage="validate")
            good.write_table(valid)
            bad.write_table(quarantined)
            counts["read"] += batch.num_rows
            counts["valid"] += valid.num_rows
            counts["quarantined"] += quarantined.num_rows
            for r in filter(None, reasons):
                counts["by_reason"][r] = counts["by_reason"].get(r, 0) + 1
    check_counts(counts, "convert")  # what was written adds up to what was read
    summary = {"input": str(path), "format": cfg.format, **counts,
               "outputs": {"preferences": str(out / "preferences.parquet"),
                           "quarantine": str(out / "quarantine.parquet")}}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
