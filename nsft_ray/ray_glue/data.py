"""Ray Data glue: read preference / conversation rows, validate them, split off the quarantine.

    ds = read_preferences("prefs.parquet", cfg.data)
    valid, counts = validate_dataset(ds, cfg.data.validation, "preference", "OUT/q/validate")
    print(summarize(counts))

The row-level work is nsft_ray.data / nsft_ray.validate run inside Ray tasks; the driver only
reads Parquet metadata, counts and the (small, image-free) quarantine rows.
"""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray

from nsft_ray.config import DataConfig, ValidationConfig
from nsft_ray.data import (
    PARQUET_FORMATS,
    DataFileError,
    check_conversation_columns,
    check_input,
    check_parquet_columns,
    identity_mapping,
    normalize_parquet,
    open_parquet,
    records_to_table,
    resolve_format,
    resolve_root,
    split_records,
    streaming_scan_options,
)
from nsft_ray.formats import LAYOUTS
from nsft_ray.schema import CONVERSATION_SCHEMA, PREFERENCE_SCHEMA, QUARANTINE_SCHEMA
from nsft_ray.validate import (
    QuarantineCounts,
    ValidateBatchFn,
    check_counts,
    quarantine_rows,
    summarize,
)

__all__ = [
    "read_preferences",
    "read_conversations",
    "validate_dataset",
    "split_quarantine",
    "write_parquet_single",
    "merge_quarantine",
    "summarize",
    "QuarantineCounts",
]

QUARANTINE_COLUMNS = ["quarantine_reason", "quarantine_detail"]
QUARANTINE_FILE = "quarantine.parquet"


def _preference_parquet(p: Path, cfg: DataConfig) -> ray.data.Dataset:
    schema = open_parquet(p).schema  # footers only: the driver never reads the rows
    check_parquet_columns(schema, cfg, p)
    # Ray Data streams the file by batches in its read tasks (without pre-buffering the whole
    # file: streaming_scan_options); the mapping below runs per batch in its tasks.
    ds = ray.data.read_parquet(str(p), fragment_scan_options=streaming_scan_options())
    if cfg.format == "parquet" and schema.equals(PREFERENCE_SCHEMA) and identity_mapping(cfg):
        return ds
    return ds.map_batches(normalize_parquet, batch_format="pyarrow", fn_kwargs={
        "cfg": cfg, "root": str(resolve_root(p, cfg)), "source": p.name})


def _records_batch(batch: pa.Table, cfg: DataConfig, root: str, kind: str) -> pa.Table:
    return records_to_table(batch.to_pylist(), cfg, Path(root), kind)


def _json_records(p: Path, cfg: DataConfig, kind: str) -> ray.data.Dataset:
    # Not ray.data.read_json: pyarrow's JSON reader fails a whole file on one bad line and loses
    # line numbers. Files are split into numbered lines here; each line is parsed (and its image
    # loaded) in map_batches, so a bad line becomes one quarantined row.
    files = ([str(f) for f in sorted(p.iterdir()) if f.suffix in (".json", ".jsonl")]
             if p.is_dir() else [str(p)])
    if not files:
        raise DataFileError(f"{p}: folder holds no .json or .jsonl files")
    fmt = cfg.format
    lines = ray.data.read_binary_files(files, include_paths=True).flat_map(
        lambda r: split_records(r["bytes"], r["path"], fmt))
    return lines.map_batches(_records_batch, batch_format="pyarrow", fn_kwargs={
        "cfg": cfg, "root": str(resolve_root(p, cfg)), "kind": kind})


def _conversation_parquet(p: Path, cfg: DataConfig) -> ray.data.Dataset:
    check_conversation_columns(open_parquet(p).schema, p)
    return ray.data.read_parquet(str(p), columns=CONVERSATION_SCHEMA.names)


# The same formats as the local readers in nsft_ray.data (the published layouts included).
RAY_PREFERENCE_READERS = {
    "parquet": _preference_parquet,
    "jsonl": lambda p, cfg: _json_records(p, cfg, "preference"),
    **{name: _preference_parquet if name in PARQUET_FORMATS
       else (lambda p, cfg: _json_records(p, cfg, "preference")) for name in LAYOUTS},
}
RAY_CONVERSATION_READERS = {
    "parquet": _conversation_parquet,
    "llava": lambda p, cfg: _json_records(p, cfg, "conversation"),
}


def read_preferences(path: str | Path, cfg: DataConfig) -> ray.data.Dataset:
    """Preference rows (PREFERENCE_SCHEMA) from a file or folder in `cfg.format`, read lazily."""
    cfg = resolve_format(path, cfg)  # data.format=auto: detected here, in the driver
    p = check_input(path, cfg, RAY_PREFERENCE_READERS, "preference")
    return RAY_PREFERENCE_READERS[cfg.format](p, cfg)


def read_conversations(path: str | Path, cfg: DataConfig) -> ray.data.Dataset:
    """Conversation rows from our Parquet (format=parquet) or LLaVA JSON (format=llava)."""
    cfg = resolve_format(path, cfg)
    p = check_input(path, cfg, RAY_CONVERSATION_READERS, "conversation")
    return RAY_CONVERSATION_READERS[cfg.format](p, cfg)


def validate_dataset(ds: ray.data.Dataset, cfg: ValidationConfig, kind: str,
                     quarantine_dir: str | Path, stage: str = "validate",
                     ) -> tuple[ray.data.Dataset, QuarantineCounts]:
    """Check every row with ValidateBatchFn, then :func:`split_quarantine`.

    With `cfg.tokenizer` the checks run in an actor pool (each actor loads the tokenizer once);
    without one the validator has nothing to load, and plain tasks run it in Ray's pooled worker
    processes: an actor pool starts a fresh process per run, one more serial step (1-2 s on 2
    cores) before every training run's first step.
    """
    if cfg.tokenizer:
        checked = ds.map_batches(ValidateBatchFn, fn_constructor_args=(cfg, kind),
                                 batch_format="pyarrow", batch_size=cfg.batch_size,
                                 compute=ray.data.ActorPoolStrategy(size=cfg.concurrency))
    else:
        checked = ds.map_batches(_validate_batch, fn_kwargs={"cfg": cfg, "kind": kind},
                                 batch_format="pyarrow", batch_size=cfg.batch_size)
    return split_quarantine(checked, stage=stage, quarantine_dir=quarantine_dir)


def _validate_batch(batch: pa.Table, cfg: ValidationConfig, kind: str) -> pa.Table:
    return ValidateBatchFn(cfg, kind)(batch)


def _count_reasons(batch: pa.Table) -> pa.Table:
    counts = batch.group_by("quarantine_reason").aggregate([("quarantine_reason", "count")])
    # By name: pyarrow versions disagree on whether keys or aggregates come first.
    return pa.table({"reason": counts["quarantine_reason"], "n": counts["quarantine_reason_count"]})


def _valid_only(batch: pa.Table) -> pa.Table:
    return batch.filter(pc.equal(batch["quarantine_reason"], "")).drop_columns(QUARANTINE_COLUMNS)


def split_quarantine(ds: ray.data.Dataset, *, stage: str, quarantine_dir: str | Path,
                     ) -> tuple[ray.data.Dataset, QuarantineCounts]:
    """Write rows with a quarantine_reason to QUARANTINE_DIR/quarantine.parquet; return the rest.

    The returned dataset has the two quarantine columns dropped. Counts are
    ``{"read", "valid", "quarantined", "by_reason"}`` and read == valid + quarantined is checked.
    """
    # Materialize ONCE: the counts, the quarantine file and the valid rows all come from this one
    # pass. Without it every consumer would re-run the upstream read, image decoding, tokenizing
    # (or LLM construction), three times over, and could even see different rows.
    mat = ds.materialize()
    read = mat.count()
    qfile = Path(quarantine_dir) / QUARANTINE_FILE
    if read == 0:  # an empty dataset has no schema to check; its quarantine is empty too
        write_parquet_single(QUARANTINE_SCHEMA.empty_table(), qfile)
        return mat, {"read": 0, "valid": 0, "quarantined": 0, "by_reason": {}}
    missing = [c for c in QUARANTINE_COLUMNS if c not in mat.schema().names]
    if missing:
        raise ValueError(f"stage {stage}: dataset lacks {', '.join(missing)}; expected the output "
                         "of ValidateBatchFn or another step that adds both quarantine columns")
    by_reason: dict[str, int] = {}
    for r in mat.map_batches(_count_reasons, batch_format="pyarrow", batch_size=None).take_all():
        by_reason[r["reason"]] = by_reason.get(r["reason"], 0) + int(r["n"])
    valid = by_reason.pop("", 0)
    counts: QuarantineCounts = {"read": read, "valid": valid,
                                "quarantined": sum(by_reason.values()), "by_reason": by_reason}
    check_counts(counts, stage)
    bad = mat.map_batches(quarantine_rows, batch_format="pyarrow", fn_kwargs={"stage": stage})
    qpath = write_parquet_single(bad, qfile, QUARANTINE_SCHEMA)
    written = pq.read_metadata(qpath).num_rows
    if written != counts["quarantined"]:
        raise AssertionError(f"stage {stage}: {qpath} holds {written} rows, but "
                             f"{counts['quarantined']} were counted as quarantined")
    return mat.map_batches(_valid_only, batch_format="pyarrow"), counts


def write_parquet_single(data: ray.data.Dataset | pa.Table, path: str | Path,
                         schema: pa.Schema | None = None) -> Path:
    """Write ONE Parquet file at `path` (not a folder of shards); for small outputs only.

    A Dataset's blocks are gathered in the driver (to_arrow_refs + concat), which is right for
    quarantine files and summaries; big outputs belong in ``ds.write_parquet(folder)``, and the
    readers accept either. The file appears atomically (written beside, then renamed).
    """
    if isinstance(data, pa.Table):
        table = data
    else:
        tables = [t for t in ray.get(data.to_arrow_refs()) if t.num_rows]
        if not tables and schema is None:
            raise ValueError(f"{path}: the dataset is empty and no schema was given for the file")
        table = pa.concat_tables(tables) if tables else schema.empty_table()
    if schema is not None:
        table = table.select(schema.names).cast(schema)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, out)
    return out


def merge_quarantine(dirs: list[str | Path], out_path: str | Path) -> Path:
    """Concatenate the quarantine Parquet files of several stages into one file at `out_path`."""
    tables = []
    for d in map(Path, dirs):
        if not d.is_dir():
            raise FileNotFoundError(f"{d}: quarantine folder does not exist (expected the "
                                    "quarantine_dir a split_quarantine stage wrote)")
        tables += [pq.read_table(f, schema=QUARANTINE_SCHEMA) for f in sorted(d.glob("*.parquet"))]
    table = pa.concat_tables(tables) if tables else QUARANTINE_SCHEMA.empty_table()
    return write_parquet_single(table, out_path, QUARANTINE_SCHEMA)
