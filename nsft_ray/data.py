"""Readers: preference rows (our Parquet, JSONL + image folder, the published layouts of
:mod:`nsft_ray.formats`) and conversation rows (LLaVA JSON).

    table = read_preference_file("prefs.jsonl", DataConfig(format="jsonl", chosen_key="answer_a"))

Every reader returns a PREFERENCE_SCHEMA or CONVERSATION_SCHEMA table with ONE row per input record.
A record the reader cannot use (an invalid JSON line, a missing key, a value of the wrong type, an
image file that does not exist) still becomes a row: the unusable fields are None and
``meta["read_error"] = {"reason": ..., "detail": ...}``, which the validator turns into a quarantine
reason. So ``read == valid + quarantined`` holds end to end. Only problems with a whole file raise
:class:`DataFileError` (missing file, wrong format, a required Parquet column absent).

Image references are resolved against ``DataConfig.root``, by default the input's folder (the
input itself when it is a folder of shards). The functions below work on one file or one batch
at a time, so ``nsft_ray.ray_glue.data`` runs the same code inside Ray Data tasks; Parquet is
read batch by batch (:func:`iter_preference_batches`), JSON a document per file.
``data.format=auto`` detects the layout from the columns or the first record's keys
(:func:`detect_format`) and says what it detected.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.dataset as pads

from nsft_ray.config import DataConfig
from nsft_ray.formats import LAYOUTS, detect_layout, document_records, record_mapper
from nsft_ray.schema import CONVERSATION_SCHEMA, PREFERENCE_SCHEMA, dumps_meta, loads_meta

__all__ = [
    "DataFileError",
    "FORMAT_KIND",
    "PARQUET_FORMATS",
    "READ_ERROR",
    "resolve_root",
    "split_records",
    "records_to_table",
    "normalize_parquet",
    "check_parquet_columns",
    "check_conversation_columns",
    "check_input",
    "identity_mapping",
    "layout_row",
    "open_parquet",
    "streaming_scan_options",
    "detect_format",
    "resolve_format",
    "iter_preference_batches",
    "PREFERENCE_READERS",
    "CONVERSATION_READERS",
    "read_preference_file",
    "read_conversation_file",
]

READ_ERROR = "read_error"  # meta key carrying a reader's {"reason", "detail"} to the validator
FORMAT_KIND = {"parquet": "preference", "jsonl": "preference", "llava": "conversation",
               **{name: "preference" for name in LAYOUTS}}
# Formats stored as Parquet: read batch by batch, never as a whole file.
PARQUET_FORMATS = {"parquet", *(n for n, lay in LAYOUTS.items() if lay.storage == "parquet")}
READ_BATCH_ROWS = 256  # rows per Parquet batch in the local readers
# LLaVA speaker names -> contract roles; anything else is kept so the validator can name it.
LLAVA_ROLES = {"human": "user", "gpt": "assistant", "user": "user", "assistant": "assistant"}
IMAGE_PLACEHOLDER = "<image>"


class DataFileError(ValueError):
    """A whole input file is unusable; the message names the file and what was expected."""


def resolve_root(path: str | Path, cfg: DataConfig) -> Path:
    """The folder image paths are relative to: `cfg.root`, else the input's folder."""
    if cfg.root:
        return Path(cfg.root)
    p = Path(path)
    return p if p.is_dir() else p.parent


def _read_error(reason: str, detail: str) -> dict[str, str]:
    return {READ_ERROR: {"reason": reason, "detail": detail}}


def _jsonable(v: Any) -> Any:
    """Extra columns go into meta JSON; bytes become their length (as in quarantine rows)."""
    if isinstance(v, (bytes, bytearray)):
        return f"<{len(v)} bytes>"
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return v if isinstance(v, (str, int, float, bool, type(None))) else str(v)


def _load_image(ref: Any, root: Path, key: str) -> tuple[bytes | None, dict]:
    """An image reference (bytes, path, HF {"bytes", "path"} struct) -> (bytes, read error)."""
    if ref is None or isinstance(ref, bytes):
        return ref, {}
    if isinstance(ref, dict):  # Hugging Face `Image` feature as stored in Parquet
        has_bytes = ref.get("bytes") is not None
        return _load_image(ref["bytes"] if has_bytes else ref.get("path"), root, key)
    if isinstance(ref, list) and len(ref) == 1:  # TRL/LLaVA "images": [path]
        return _load_image(ref[0], root, key)
    if not isinstance(ref, str):
        what = f"a list of {len(ref)}" if isinstance(ref, list) else type(ref).__name__
        return None, _read_error("wrong_type", f"{key}: expected one image (bytes or path), "
                                               f"got {what}")
    p = Path(ref) if Path(ref).is_absolute() else root / ref
    try:
        return p.read_bytes(), {}
    except FileNotFoundError:
        return None, _read_error("image_not_found", f"{key}: file {p} does not exist "
                                                    f"(path {ref!r} resolved against {root})")
    except OSError as e:
        return None, _read_error("image_unreadable", f"{key}: cannot read {p}: {e}")


def _text(raw: dict, key: str, field: str) -> tuple[str | None, dict]:
    v = raw.get(key)
    if v is None or isinstance(v, str):
        return v, {}
    return None, _read_error("wrong_type", f"{field} (key {key!r}): expected a string, "
                                           f"got {type(v).__name__} {str(v)[:40]!r}")


def _meta(raw: dict, used: set[str]) -> tuple[dict, dict]:
    """Input meta (JSON string or object) plus every column not mapped onto the contract."""
    m = raw.get("meta")
    err: dict = {}
    if m is None or m == "":
        m = {}
    elif isinstance(m, str):
        try:
            m = json.loads(m)
        except json.JSONDecodeError:
            m, err = {"meta_text": m}, _read_error("wrong_type", "meta: expected a JSON object")
    if not isinstance(m, dict):
        m, err = {"meta_value": _jsonable(m)}, _read_error("wrong_type", "meta: expected an object")
    extras = {k: _jsonable(v) for k, v in raw.items() if k not in used | {"meta"}}
    return {**extras, **m}, err


def preference_row(raw: dict, cfg: DataConfig, root: Path, fallback_id: str | None,
                   source: str) -> dict[str, Any]:
    """One input record (after the column mapping keys) -> a preference row dict."""
    errors: list[dict] = []  # the first read error is the one reported
    row: dict[str, Any] = {}
    rid = raw.get(cfg.id_key)
    row["id"] = fallback_id if rid is None else str(rid)
    ref = raw.get(cfg.image_key)
    row["image"], err = _load_image(ref if ref is not None else raw.get("image_path"), root,
                                    "image")
    errors.append(err)
    for field in ("prompt", "chosen", "rejected"):
        row[field], err = _text(raw, getattr(cfg, f"{field}_key"), field)
        errors.append(err)
    row["source"] = raw.get("source") if isinstance(raw.get("source"), str) else source
    used = {cfg.id_key, cfg.image_key, "image_path", cfg.prompt_key, cfg.chosen_key,
            cfg.rejected_key, "source"}
    meta, err = _meta(raw, used)
    errors.append(err)
    row["meta"] = dumps_meta({**meta, **next((e for e in errors if e), {})})
    return row


def conversation_row(raw: dict, cfg: DataConfig, root: Path, fallback_id: str | None,
                     source: str) -> dict[str, Any]:
    """A LLaVA record {"id", "image", "conversations": [{"from", "value"}]} -> conversation row."""
    errors: list[dict] = []
    rid = raw.get(cfg.id_key)
    image, err = _load_image(raw.get(cfg.image_key), root, "image")
    errors.append(err)
    turns, messages = raw.get("conversations"), None
    if isinstance(turns, list) and all(isinstance(t, dict) for t in turns):
        messages = [{"role": LLAVA_ROLES.get(t.get("from"), t.get("from")),
                     "content": t["value"].replace(IMAGE_PLACEHOLDER, "").strip()
                     if isinstance(t.get("value"), str) else None} for t in turns]
    elif turns is not None:
        errors.append(_read_error("wrong_type", "conversations: expected a list of "
                                                "{'from', 'value'} objects"))
    meta, err = _meta(raw, {cfg.id_key, cfg.image_key, "conversations"})
    errors.append(err)
    return {"id": fallback_id if rid is None else str(rid), "parent_id": None, "image": image,
            "messages": messages, "origin": "sft", "error_kinds": [],
            "meta": dumps_meta({"source": source, **meta, **next((e for e in errors if e), {})})}


IDENTITY = DataConfig()  # a layout's mapped record already uses the contract's names


def layout_row(raw: dict, cfg: DataConfig, root: Path, fallback_id: str | None,
               source: str) -> dict[str, Any]:
    """One record of a published layout (`cfg.format`, see nsft_ray.formats) -> a preference row.

    The layout's own error (a rating tie, a malformed JSON field, ...) is the one reported, before
    any the generic reading finds (a missing image file, a non-string text).
    """
    mapped = record_mapper(cfg.format, cfg.vlfeedback_aspect)(raw)
    error = mapped.pop("error", None)
    candidates = mapped.pop("image_candidates", None)
    if mapped.get("image") is None and candidates:
        found = next((c for c in candidates if (root / c).is_file()), None)
        mapped["image"] = found
        if found is None and error is None:
            error = ("image_not_found", f"image: none of {', '.join(candidates)} exists under "
                                        f"the data root {root}")
    mapped["meta"] = _jsonable(mapped.get("meta") or {})
    row = preference_row(mapped, IDENTITY, root, fallback_id, source)
    if error:
        row["meta"] = dumps_meta({**loads_meta(row["meta"]), **_read_error(*error)})
    return row


def _is_document(data: bytes, path: str, fmt: str) -> bool:
    """True when the file is one JSON document (a list, or HA-DPO's dict), not JSON Lines."""
    layout = LAYOUTS.get(fmt)
    if fmt == "llava" or (layout is not None and layout.storage == "json"):
        return not path.endswith(".jsonl")
    # A JSON Lines layout (VLFeedback) re-published as one JSON array is read as the array.
    return layout is not None and data.lstrip()[:1] == b"["


def _document_records(data: bytes, path: str, fmt: str) -> list:
    try:
        doc = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataFileError(f"{path}: not valid JSON ({e}); data.format={fmt} is a JSON "
                            "document per file (JSON Lines in a .jsonl file)") from e
    if fmt == "llava":
        if not isinstance(doc, list):
            raise DataFileError(f"{path}: expected a JSON list of LLaVA records, "
                                f"got a JSON {type(doc).__name__}")
        return doc
    try:
        return document_records(fmt, doc)
    except ValueError as e:
        raise DataFileError(f"{path}: {e} (data.format={fmt})") from e


def split_records(data: bytes, path: str, fmt: str) -> list[dict[str, Any]]:
    """A JSONL or JSON-array file's bytes -> [{"path", "line", "text"}], one per record.

    Lines are split here and parsed in :func:`records_to_table`, so one bad line costs one row.
    """
    if data[:4] == b"PAR1":
        raise DataFileError(f"{path}: this is a Parquet file, but data.format={fmt!r}; set "
                            "data.format=parquet (our contract), rlaif-v, rlhf-v, trl or auto")
    if _is_document(data, path, fmt):
        records = _document_records(data, path, fmt)
        return [{"path": path, "line": i, "text": json.dumps(r)} for i, r in enumerate(records, 1)]
    if data.lstrip()[:1] == b"[":
        raise DataFileError(f"{path}: a JSON array, not JSON Lines (one object per line); "
                            "for LLaVA conversation JSON set data.format=llava")
    out = []
    for n, line in enumerate(data.split(b"\n"), 1):
        if line.strip():  # blank lines hold no record
            # Undecodable bytes become U+FFFD: the row is kept and its text shows where.
            out.append({"path": path, "line": n, "text": line.decode("utf-8", "replace")})
    return out


def records_to_table(records: Iterable[dict[str, Any]], cfg: DataConfig, root: Path,
                     kind: str) -> pa.Table:
    """[{"path", "line", "text"}] -> a PREFERENCE_SCHEMA or CONVERSATION_SCHEMA table (`kind`)."""
    make, schema = {"preference": (preference_row, PREFERENCE_SCHEMA),
                    "conversation": (conversation_row, CONVERSATION_SCHEMA)}[kind]
    if cfg.format in LAYOUTS:
        make = layout_row
    rows = []
    for rec in records:
        p = Path(rec["path"])
        fallback_id, where = f"{p.stem}-{rec['line']}", f"{p.name} line {rec['line']}"
        try:
            raw = json.loads(rec["text"])
        except json.JSONDecodeError as e:
            raw, err = None, _read_error("malformed_json", f"{where}: {e}")
        else:
            err = {} if isinstance(raw, dict) else _read_error(
                "wrong_type", f"{where}: expected a JSON object, got {type(raw).__name__}")
        if err:  # an unusable record still becomes a row, so the validator can quarantine it
            row = make({}, cfg, root, fallback_id, p.name)
            row["meta"] = dumps_meta({"line": rec["line"], "text": rec["text"][:2000], **err})
        else:
            row = make(raw, cfg, root, fallback_id, p.name)
        rows.append(row)
    return pa.Table.from_pylist(rows, schema=schema)


def check_parquet_columns(schema: pa.Schema, cfg: DataConfig, path: str | Path) -> None:
    """Raise DataFileError naming the first required column (after the mapping) that is absent."""
    names = set(schema.names)
    if cfg.format in LAYOUTS:  # a published layout's columns are fixed, not mapped
        missing = [c for c in LAYOUTS[cfg.format].signature if c not in names]
        if missing:
            raise DataFileError(
                f"{path}: missing column {missing[0]!r} of data.format={cfg.format} (expected "
                f"{', '.join(LAYOUTS[cfg.format].signature)}); columns present: "
                f"{', '.join(schema.names)}")
        return
    for field in ("id", "prompt", "chosen", "rejected"):
        key = getattr(cfg, f"{field}_key")
        if key not in names:
            raise DataFileError(
                f"{path}: missing column {key!r} (data.{field}_key) for field {field!r}; "
                f"columns present: {', '.join(schema.names)}")
    if cfg.image_key not in names and "image_path" not in names:
        raise DataFileError(
            f"{path}: no image column: expected {cfg.image_key!r} (data.image_key; encoded bytes) "
            f"or 'image_path' (paths under the root); columns present: {', '.join(schema.names)}")


def identity_mapping(cfg: DataConfig) -> bool:
    """True when every *_key names the contract's own column (nothing to map)."""
    fields = ("id", "image", "prompt", "chosen", "rejected")
    return all(getattr(cfg, f"{f}_key") == f for f in fields)


def normalize_parquet(batch: pa.Table, cfg: DataConfig, root: str, source: str) -> pa.Table:
    """A Parquet batch in the user's columns -> PREFERENCE_SCHEMA (mapping, image paths, meta)."""
    if cfg.format in LAYOUTS:
        rows = [layout_row(r, cfg, Path(root), None, source) for r in batch.to_pylist()]
        return pa.Table.from_pylist(rows, schema=PREFERENCE_SCHEMA)
    if batch.schema.equals(PREFERENCE_SCHEMA) and identity_mapping(cfg):
        return batch  # our own files: nothing to map
    rows = [preference_row(r, cfg, Path(root), None, source) for r in batch.to_pylist()]
    return pa.Table.from_pylist(rows, schema=PREFERENCE_SCHEMA)


def open_parquet(path: Path) -> pads.Dataset:
    """A Parquet file or folder of shards, opened lazily (footers only)."""
    try:
        return pads.dataset(path, format="parquet")
    except (pa.ArrowInvalid, OSError) as e:
        raise DataFileError(f"{path}: not a readable Parquet file or folder of shards ({e})") from e


def streaming_scan_options() -> pads.ParquetFragmentScanOptions:
    """Parquet scan options under which memory stays flat whatever the file's size.

    Arrow's default pre_buffer=True fetches every row group's column chunks of the file before
    the first batch: measured, a 96 MiB file of images held 100 MiB while read 8 rows at a time,
    and 16 MiB without it (tests/test_formats.py).
    """
    return pads.ParquetFragmentScanOptions(pre_buffer=False, use_buffered_stream=True,
                                           buffer_size=8 << 20)


def _parquet_batches(path: Path, cfg: DataConfig, batch_rows: int) -> Iterator[pa.Table]:
    dataset = open_parquet(path)
    check_parquet_columns(dataset.schema, cfg, path)
    root = str(resolve_root(path, cfg))
    # No read-ahead and no scan threads either: both decode batches (images) ahead of us, and
    # the mapping below, in Python, is the slow part anyway.
    for batch in dataset.to_batches(batch_size=batch_rows, batch_readahead=0,
                                    fragment_readahead=0, use_threads=False,
                                    fragment_scan_options=streaming_scan_options()):
        yield normalize_parquet(pa.Table.from_batches([batch]), cfg, root, path.name)


def _json_files(path: Path) -> list[Path]:
    return ([f for f in sorted(path.iterdir()) if f.suffix in (".json", ".jsonl")]
            if path.is_dir() else [path])


def _json_batches(path: Path, cfg: DataConfig, kind: str, batch_rows: int,
                  ) -> Iterator[pa.Table]:
    root = resolve_root(path, cfg)
    for f in _json_files(path):  # a JSON document is parsed whole, one file at a time
        records = split_records(f.read_bytes(), str(f), cfg.format)
        for start in range(0, len(records), batch_rows):
            yield records_to_table(records[start:start + batch_rows], cfg, root, kind)


def iter_preference_batches(path: str | Path, cfg: DataConfig,
                            batch_rows: int = READ_BATCH_ROWS) -> Iterator[pa.Table]:
    """A preference input as PREFERENCE_SCHEMA tables of at most `batch_rows` rows.

    Parquet (ours and the published Parquet layouts) is read a batch at a time, never as a
    whole file, so memory stays flat whatever the file's size; JSON one file at a time.
    `data.format=auto` is resolved first (and what was detected is printed).
    """
    cfg = resolve_format(path, cfg)
    p = check_input(path, cfg, PREFERENCE_READERS, "preference")
    if cfg.format in PARQUET_FORMATS:
        yield from _parquet_batches(p, cfg, batch_rows)
    else:
        yield from _json_batches(p, cfg, "preference", batch_rows)


def _concat(tables: Iterable[pa.Table], schema: pa.Schema) -> pa.Table:
    tables = list(tables)
    return pa.concat_tables(tables) if tables else schema.empty_table()


def _read_parquet(path: Path, cfg: DataConfig) -> pa.Table:
    return _concat(_parquet_batches(path, cfg, READ_BATCH_ROWS), PREFERENCE_SCHEMA)


def _read_json_records(path: Path, cfg: DataConfig, kind: str) -> pa.Table:
    schema = PREFERENCE_SCHEMA if kind == "preference" else CONVERSATION_SCHEMA
    return _concat(_json_batches(path, cfg, kind, READ_BATCH_ROWS), schema)


def check_conversation_columns(schema: pa.Schema, path: str | Path) -> None:
    """Raise DataFileError naming the conversation columns our Parquet lacks."""
    missing = [n for n in CONVERSATION_SCHEMA.names if n not in schema.names]
    if missing:
        raise DataFileError(f"{path}: missing conversation column(s) {', '.join(missing)}; "
                            f"expected {', '.join(CONVERSATION_SCHEMA.names)}")


def _read_conversation_parquet(path: Path, cfg: DataConfig) -> pa.Table:
    table = open_parquet(path).to_table()
    check_conversation_columns(table.schema, path)
    return table.select(CONVERSATION_SCHEMA.names).cast(CONVERSATION_SCHEMA)


PREFERENCE_READERS = {
    "parquet": _read_parquet,
    "jsonl": lambda path, cfg: _read_json_records(path, cfg, "preference"),
    # The published layouts (nsft_ray.formats): Parquet ones by batch, JSON ones by file.
    **{name: _read_parquet if name in PARQUET_FORMATS
       else (lambda path, cfg: _read_json_records(path, cfg, "preference")) for name in LAYOUTS},
}
CONVERSATION_READERS = {
    "parquet": _read_conversation_parquet,
    "llava": lambda path, cfg: _read_json_records(path, cfg, "conversation"),
}


def check_input(path: str | Path, cfg: DataConfig, readers: dict, what: str) -> Path:
    """The input as a Path; DataFileError if it is absent or `cfg.format` has no reader here."""
    p = Path(path)
    if not p.exists():
        raise DataFileError(f"{p}: no such file or folder ({what} input, data.format={cfg.format})")
    if cfg.format not in readers:
        raise DataFileError(f"{p}: data.format={cfg.format!r} cannot hold {what} rows; "
                            f"expected one of {', '.join(readers)}")
    return p


def read_preference_file(path: str | Path, cfg: DataConfig) -> pa.Table:
    """A preference file (or folder of shards) in `cfg.format` -> a PREFERENCE_SCHEMA table."""
    cfg = resolve_format(path, cfg)
    p = check_input(path, cfg, PREFERENCE_READERS, "preference")
    return PREFERENCE_READERS[cfg.format](p, cfg)


def read_conversation_file(path: str | Path, cfg: DataConfig) -> pa.Table:
    """Our conversation Parquet or LLaVA JSON (cfg.format) -> a CONVERSATION_SCHEMA table."""
    cfg = resolve_format(path, cfg)
    p = check_input(path, cfg, CONVERSATION_READERS, "conversation")
    return CONVERSATION_READERS[cfg.format](p, cfg)


def _first_record_keys(f: Path) -> list[str]:
    """The keys of a JSON file's first record: one line of JSON Lines, else the whole document."""
    with f.open("rb") as fh:
        line = fh.readline()
    try:
        first = json.loads(line) if line.lstrip()[:1] == b"{" else None
    except json.JSONDecodeError:
        first = None  # a pretty-printed document: its first line is not a record
    if first is None:
        try:
            doc = json.loads(f.read_bytes())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataFileError(f"{f}: data.format=auto: not JSON Lines and not a JSON "
                                f"document ({e})") from e
        first = next((r for r in doc if isinstance(r, dict)), {}) if isinstance(doc, list) else doc
    values = list(first.values()) if isinstance(first, dict) else []
    if values and all(isinstance(v, dict) and "chosen" in v for v in values):
        return ["image_id", *values[0]]  # HA-DPO's desc_data.json: {image_id: {chosen, ...}}
    return list(first) if isinstance(first, dict) else []


def detect_format(path: str | Path) -> tuple[str, str]:
    """The data.format of a file or folder, from its Parquet columns or first JSON record.

    Returns (format, what was seen); DataFileError when no format matches, naming the keys.
    """
    p = Path(path)
    if not p.exists():
        raise DataFileError(f"{p}: no such file or folder (data.format=auto)")
    suffixes = (".parquet", ".json", ".jsonl")
    files = [f for f in sorted(p.iterdir()) if f.suffix in suffixes] if p.is_dir() else [p]
    if not files:
        raise DataFileError(f"{p}: data.format=auto: the folder holds no "
                            f"{', '.join(suffixes)} files")
    with files[0].open("rb") as fh:
        is_parquet = fh.read(4) == b"PAR1"
    if is_parquet:
        keys, storage = open_parquet(p).schema.names, "parquet"
    else:
        keys, storage = _first_record_keys(files[0]), "json"
    name, why = detect_layout(keys, storage)
    if name is None:
        raise DataFileError(f"{p}: data.format=auto: {why}; set data.format explicitly")
    return name, why


def resolve_format(path: str | Path, cfg: DataConfig) -> DataConfig:
    """`cfg` itself, or for data.format=auto a copy with the detected format (printed)."""
    if cfg.format != "auto":
        return cfg
    name, why = detect_format(path)
    print(f"data.format=auto: {path}: detected {name} ({why})", file=sys.stderr)
    return dataclasses.replace(cfg, format=name)
