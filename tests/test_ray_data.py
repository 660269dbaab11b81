"""Ray Data glue: read -> validate -> quarantine Parquet on a local 2-CPU Ray."""

import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from nsft_ray.config import DataConfig, ValidationConfig
from nsft_ray.schema import PREFERENCE_SCHEMA, QUARANTINE_SCHEMA, preference_table

ray = pytest.importorskip("ray")
from nsft_ray.ray_glue.data import (  # noqa: E402
    merge_quarantine,
    read_conversations,
    read_preferences,
    split_quarantine,
    summarize,
    validate_dataset,
    write_parquet_single,
)

pytestmark = pytest.mark.ray
CFG = ValidationConfig(max_tokens=20, max_pixels=64 * 64, min_side=8, batch_size=8)


@pytest.fixture(scope="module")
def local_ray(ray_session):
    return ray_session


def png(w: int = 16, h: int = 16) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), "red").save(buf, format="PNG")
    return buf.getvalue()


def pref(i: int, **over) -> dict:
    row = {"id": f"g{i:02d}", "image": png(), "prompt": "What is it?", "chosen": "A red square.",
           "rejected": "A blue circle.", "source": "t", "meta": {"i": i}}
    return {**row, **over}


BAD = {
    "b0": ("empty_image", {"image": b""}),
    "b1": ("undecodable_image", {"image": b"garbage"}),
    "b2": ("image_too_small", {"image": png(4, 4)}),
    "b3": ("image_too_large", {"image": png(100, 100)}),
    "b4": ("chosen_equals_rejected", {"rejected": "a red  SQUARE."}),
    "b5": ("empty_field", {"prompt": ""}),
    "b6": ("missing_field", {"chosen": None}),
    "b7": ("too_many_tokens", {"rejected": "very " * 30}),
}


def test_parquet_read_validate_quarantine(local_ray, tmp_path):
    rows = [pref(i) for i in range(20)] + [pref(0, id=k, **v[1]) for k, v in BAD.items()]
    pq.write_table(preference_table(rows), tmp_path / "prefs.parquet")

    ds = read_preferences(tmp_path / "prefs.parquet", DataConfig())
    valid, counts = validate_dataset(ds, CFG, "preference", tmp_path / "q" / "validate")

    assert counts == {"read": 28, "valid": 20, "quarantined": 8,
                      "by_reason": {reason: 1 for reason, _ in BAD.values()}}
    good = valid.to_arrow_refs()
    table = pa.concat_tables(ray.get(good))
    assert table.schema.names == PREFERENCE_SCHEMA.names  # quarantine columns dropped
    assert sorted(table.column("id").to_pylist()) == [f"g{i:02d}" for i in range(20)]

    q = pq.read_table(tmp_path / "q" / "validate" / "quarantine.parquet")
    assert q.schema.equals(QUARANTINE_SCHEMA)
    got = {r["id"]: r for r in q.to_pylist()}
    assert {k: r["reason"] for k, r in got.items()} == {k: v[0] for k, v in BAD.items()}
    assert all(r["stage"] == "validate" and r["detail"] for r in got.values())
    row = json.loads(got["b2"]["row"])
    assert row["image"] == f"<{len(png(4, 4))} bytes>" and row["prompt"] == "What is it?"
    assert "quarantine_reason" not in row
    assert summarize(counts).splitlines()[2].split() == ["quarantined", "8"]

    # A second stage's quarantine merges with the first into one file.
    empty_stage = valid.map_batches(
        lambda b: b.append_column("quarantine_reason", pa.array([""] * b.num_rows, pa.string()))
        .append_column("quarantine_detail", pa.array([""] * b.num_rows, pa.string())),
        batch_format="pyarrow")
    _, c2 = split_quarantine(empty_stage, stage="construct", quarantine_dir=tmp_path / "q" / "c")
    assert c2 == {"read": 20, "valid": 20, "quarantined": 0, "by_reason": {}}
    merged = merge_quarantine([tmp_path / "q" / "validate", tmp_path / "q" / "c"],
                              tmp_path / "quarantine.parquet")
    assert pq.read_table(merged).num_rows == 8

    # The valid rows written as one file read back through the same reader.
    write_parquet_single(valid, tmp_path / "valid.parquet")
    again = read_preferences(tmp_path / "valid.parquet", DataConfig()).count()
    assert again == 20


def test_mapped_parquet_with_image_paths_on_ray(local_ray, tmp_path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.png").write_bytes(png(12, 12))
    table = pa.table({"uid": ["a", "b"], "image_path": ["imgs/a.png", "imgs/nope.png"],
                      "q": ["Shape?", "Shape?"], "chosen": ["Square.", "Square."],
                      "rejected": ["Circle.", "Circle."], "split": ["train", "train"]})
    pq.write_table(table, tmp_path / "m.parquet")
    ds = read_preferences(tmp_path / "m.parquet", DataConfig(id_key="uid", prompt_key="q"))
    valid, counts = validate_dataset(ds, CFG, "preference", tmp_path / "q")
    assert counts == {"read": 2, "valid": 1, "quarantined": 1,
                      "by_reason": {"image_not_found": 1}}
    [row] = valid.take_all()
    assert (row["id"], row["image"], row["prompt"]) == ("a", png(12, 12), "Shape?")
    assert json.loads(row["meta"]) == {"split": "train"}
    with pytest.raises(ValueError, match="m.parquet: missing column 'prompt'"):
        read_preferences(tmp_path / "m.parquet", DataConfig(id_key="uid"))


def test_jsonl_and_llava_on_ray(local_ray, tmp_path):
    (tmp_path / "ok.png").write_bytes(png())
    good = {"question": "q", "img": "ok.png", "good": "yes", "bad": "no"}
    lines = [json.dumps(good), "{broken", json.dumps({**good, "img": "missing.png"}),
             json.dumps({**good, "bad": "YES "})]
    (tmp_path / "d.jsonl").write_text("\n".join(lines))
    cfg = DataConfig(format="jsonl", image_key="img", prompt_key="question", chosen_key="good",
                     rejected_key="bad")
    ds = read_preferences(tmp_path / "d.jsonl", cfg)
    valid, counts = validate_dataset(ds, CFG, "preference", tmp_path / "q")
    assert counts == {"read": 4, "valid": 1, "quarantined": 3, "by_reason": {
        "malformed_json": 1, "image_not_found": 1, "chosen_equals_rejected": 1}}
    assert valid.take_all()[0]["id"] == "d-1"
    q = pq.read_table(tmp_path / "q" / "quarantine.parquet").to_pylist()
    assert {r["id"]: r["reason"] for r in q} == {
        "d-2": "malformed_json", "d-3": "image_not_found", "d-4": "chosen_equals_rejected"}

    recs = [{"id": "a", "image": "ok.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "Red."}]}]
    (tmp_path / "l.json").write_text(json.dumps(recs))
    conv = read_conversations(tmp_path / "l.json", DataConfig(format="llava")).take_all()
    assert [m["content"] for m in conv[0]["messages"]] == ["What?", "Red."]
