import io
import json

import pyarrow as pa
import pyarrow.parquet as pq

from nsft_ray.schema import (
    CONVERSATION_SCHEMA,
    PREFERENCE_SCHEMA,
    QUARANTINE_SCHEMA,
    conversation_table,
    loads_meta,
    preference_table,
    quarantine_table,
)


def _roundtrip(table: pa.Table) -> pa.Table:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    buf.seek(0)
    return pq.read_table(buf)


def test_preference_roundtrip():
    rows = [{"id": "a", "image": b"\x89PNG", "prompt": "p", "chosen": "c", "rejected": "r",
             "source": "s", "meta": {"k": [1, 2]}}]
    t = _roundtrip(preference_table(rows))
    assert t.schema.equals(PREFERENCE_SCHEMA)
    got = t.to_pylist()[0]
    assert got["image"] == b"\x89PNG" and loads_meta(got["meta"]) == {"k": [1, 2]}


def test_conversation_roundtrip():
    rows = [{"id": "a/neg0", "parent_id": "a", "image": b"x",
             "messages": [{"role": "user", "content": "Is there a dog?"},
                          {"role": "assistant", "content": "No, there is no dog."}],
             "origin": "negative", "error_kinds": ["existence"], "meta": {}}]
    t = _roundtrip(conversation_table(rows))
    assert t.schema.equals(CONVERSATION_SCHEMA)
    got = t.to_pylist()[0]
    assert got["messages"][1] == {"role": "assistant", "content": "No, there is no dog."}
    assert got["error_kinds"] == ["existence"] and got["parent_id"] == "a"


def test_quarantine_row_replaces_bytes_by_length():
    t = quarantine_table([{"id": "x", "stage": "validate", "reason": "empty_image",
                           "detail": "image", "row": {"id": "x", "image": b"12345"}}])
    assert t.schema.equals(QUARANTINE_SCHEMA)
    assert json.loads(t.column("row")[0].as_py()) == {"id": "x", "image": "<5 bytes>"}
