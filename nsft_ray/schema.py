"""The data contract: Arrow schemas for preference rows and conversation rows.

Preference row (one human/AI judgement about one image)::

    id        string   unique within the dataset
    image     binary   encoded image bytes (PNG/JPEG/...); readers resolve paths into bytes
    prompt    string   the user's question about the image
    chosen    string   the preferred answer
    rejected  string   the dispreferred answer (it carries the negative supervision)
    source    string   where the row came from (e.g. "shapesworld/synthetic")
    meta      string   JSON object: anything else (ShapesWorld keeps the scene graph and error kind)

Conversation row (what SFT and nSFT train on)::

    id           string
    parent_id    string   id of the preference row it was built from (null for plain SFT data)
    image        binary
    messages     list<struct<role: string, content: string>>   roles: user | assistant
    origin       string   sft | chosen | negative
    error_kinds  list<string>   codebook kinds a negative conversation corrects
    meta         string   JSON object

The image belongs to the first user turn; message contents are plain text (no image placeholder).
"""

from __future__ import annotations

import json
from typing import Any

import pyarrow as pa

__all__ = [
    "PREFERENCE_SCHEMA",
    "CONVERSATION_SCHEMA",
    "QUARANTINE_SCHEMA",
    "ORIGINS",
    "ROLES",
    "preference_table",
    "conversation_table",
    "quarantine_table",
    "dumps_meta",
    "loads_meta",
]

ORIGINS = ("sft", "chosen", "negative")
ROLES = ("user", "assistant")

MESSAGE_TYPE = pa.struct([("role", pa.string()), ("content", pa.string())])

PREFERENCE_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("image", pa.binary()),
        ("prompt", pa.string()),
        ("chosen", pa.string()),
        ("rejected", pa.string()),
        ("source", pa.string()),
        ("meta", pa.string()),
    ]
)

CONVERSATION_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("parent_id", pa.string()),
        ("image", pa.binary()),
        ("messages", pa.list_(MESSAGE_TYPE)),
        ("origin", pa.string()),
        ("error_kinds", pa.list_(pa.string())),
        ("meta", pa.string()),
    ]
)

# A quarantined row keeps its id, the stage that rejected it, the reason, and the row itself as
# JSON (image bytes are replaced by their length so the file stays small and readable).
QUARANTINE_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("stage", pa.string()),
        ("reason", pa.string()),
        ("detail", pa.string()),
        ("row", pa.string()),
    ]
)


def dumps_meta(meta: dict[str, Any] | None) -> str:
    return json.dumps(meta or {}, sort_keys=True)


def loads_meta(meta: str | None) -> dict[str, Any]:
    return json.loads(meta) if meta else {}


def preference_table(rows: list[dict[str, Any]]) -> pa.Table:
    """Rows (dicts with the preference fields; meta may be a dict) -> a PREFERENCE_SCHEMA table."""
    cols = {name: [] for name in PREFERENCE_SCHEMA.names}
    for r in rows:
        for name in PREFERENCE_SCHEMA.names:
            v = r.get(name)
            if name == "meta" and not isinstance(v, str):
                v = dumps_meta(v)
            if name == "source" and v is None:
                v = ""
            cols[name].append(v)
    return pa.table(cols, schema=PREFERENCE_SCHEMA)


def conversation_table(rows: list[dict[str, Any]]) -> pa.Table:
    """Rows (dicts with the conversation fields) -> a CONVERSATION_SCHEMA table."""
    cols = {name: [] for name in CONVERSATION_SCHEMA.names}
    for r in rows:
        for name in CONVERSATION_SCHEMA.names:
            v = r.get(name)
            if name == "meta" and not isinstance(v, str):
                v = dumps_meta(v)
            if name == "error_kinds" and v is None:
                v = []
            if name == "messages":
                v = [{"role": m["role"], "content": m["content"]} for m in v]
            cols[name].append(v)
    return pa.table(cols, schema=CONVERSATION_SCHEMA)


def quarantine_table(rows: list[dict[str, Any]]) -> pa.Table:
    """Rows (id, stage, reason, detail, row as dict or JSON) -> a QUARANTINE_SCHEMA table."""
    cols = {name: [] for name in QUARANTINE_SCHEMA.names}
    for r in rows:
        for name in QUARANTINE_SCHEMA.names:
            v = r.get(name, "")
            if name == "row" and not isinstance(v, str):
                v = json.dumps(_jsonable(v), sort_keys=True, default=str)
            cols[name].append("" if v is None else str(v))
    return pa.table(cols, schema=QUARANTINE_SCHEMA)


def _jsonable(row: Any) -> Any:
    if isinstance(row, dict):
        return {k: _jsonable(v) for k, v in row.items()}
    if isinstance(row, (list, tuple)):
        return [_jsonable(v) for v in row]
    if isinstance(row, (bytes, bytearray, memoryview)):
        return f"<{len(bytes(row))} bytes>"
    if hasattr(row, "tolist"):  # numpy scalars/arrays from Ray Data batches
        return _jsonable(row.tolist())
    return row
