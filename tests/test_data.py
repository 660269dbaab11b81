"""Readers: our Parquet (bytes or image_path), JSONL + image folder, LLaVA JSON; bad rows kept."""

import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from nsft_ray.config import DataConfig
from nsft_ray.data import DataFileError, read_conversation_file, read_preference_file
from nsft_ray.schema import (
    CONVERSATION_SCHEMA,
    PREFERENCE_SCHEMA,
    conversation_table,
    loads_meta,
    preference_table,
)


def png(w: int = 16, h: int = 16, color: str = "red") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), color).save(buf, format="PNG")
    return buf.getvalue()


def pref(i: int, **over) -> dict:
    row = {"id": f"r{i}", "image": png(), "prompt": f"What is shown {i}?",
           "chosen": "A red square.", "rejected": "A blue circle.", "source": "test",
           "meta": {"i": i}}
    return {**row, **over}


def read_error(row: dict) -> dict | None:
    return loads_meta(row["meta"]).get("read_error")


def test_parquet_roundtrip_with_image_bytes(tmp_path):
    table = preference_table([pref(0), pref(1)])
    pq.write_table(table, tmp_path / "p.parquet")
    got = read_preference_file(tmp_path / "p.parquet", DataConfig())
    assert got.schema.equals(PREFERENCE_SCHEMA)
    assert got.to_pylist() == table.to_pylist()


def test_parquet_folder_of_shards(tmp_path):
    (tmp_path / "shards").mkdir()
    for k in range(2):
        pq.write_table(preference_table([pref(k)]), tmp_path / "shards" / f"{k}.parquet")
    got = read_preference_file(tmp_path / "shards", DataConfig())
    assert sorted(got.column("id").to_pylist()) == ["r0", "r1"]


def test_parquet_image_path_resolved_against_file_folder_or_root(tmp_path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.png").write_bytes(png(color="blue"))
    table = pa.table({"id": ["a", "b"], "image_path": ["imgs/a.png", "imgs/missing.png"],
                      "prompt": ["p", "p"], "chosen": ["c", "c"], "rejected": ["r", "r"],
                      "difficulty": [3, 4]})
    pq.write_table(table, tmp_path / "p.parquet")
    rows = read_preference_file(tmp_path / "p.parquet", DataConfig()).to_pylist()
    assert rows[0]["image"] == png(color="blue")
    assert loads_meta(rows[0]["meta"]) == {"difficulty": 3}  # extra column -> meta
    assert rows[0]["source"] == "p.parquet"
    # A missing image is not dropped: the row stays, image None, the reason in meta.
    assert rows[1]["image"] is None
    assert read_error(rows[1])["reason"] == "image_not_found"
    assert "missing.png" in read_error(rows[1])["detail"]

    # data.root overrides the default (the Parquet file's folder).
    (tmp_path / "other" / "imgs").mkdir(parents=True)
    (tmp_path / "other" / "imgs" / "a.png").write_bytes(png(color="green"))
    cfg = DataConfig(root=str(tmp_path / "other"))
    assert read_preference_file(tmp_path / "p.parquet", cfg).to_pylist()[0]["image"] == png(
        color="green")


def test_parquet_column_mapping_and_hf_image_struct(tmp_path):
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table({
        "idx": pa.array([7], pa.int64()),
        "img": pa.array([{"bytes": png(), "path": None}], image_type),
        "question": ["q?"], "good": ["yes"], "bad": ["no"]})
    pq.write_table(table, tmp_path / "hf.parquet")
    cfg = DataConfig(id_key="idx", image_key="img", prompt_key="question", chosen_key="good",
                     rejected_key="bad")
    row = read_preference_file(tmp_path / "hf.parquet", cfg).to_pylist()[0]
    assert (row["id"], row["image"], row["prompt"], row["chosen"], row["rejected"]) == (
        "7", png(), "q?", "yes", "no")
    assert loads_meta(row["meta"]) == {}


def test_parquet_file_errors_name_file_and_column(tmp_path):
    pq.write_table(pa.table({"id": ["a"], "image": [b"x"], "prompt": ["p"], "chosen": ["c"]}),
                   tmp_path / "p.parquet")
    with pytest.raises(DataFileError, match=r"p\.parquet: missing column 'rejected'"):
        read_preference_file(tmp_path / "p.parquet", DataConfig())
    pq.write_table(pa.table({"id": ["a"], "prompt": ["p"], "chosen": ["c"], "rejected": ["r"]}),
                   tmp_path / "q.parquet")
    with pytest.raises(DataFileError, match="no image column.*'image'.*image_path"):
        read_preference_file(tmp_path / "q.parquet", DataConfig())
    with pytest.raises(DataFileError, match="nope.parquet: no such file"):
        read_preference_file(tmp_path / "nope.parquet", DataConfig())
    (tmp_path / "t.parquet").write_text("not parquet")
    with pytest.raises(DataFileError, match="not a readable Parquet"):
        read_preference_file(tmp_path / "t.parquet", DataConfig())
    with pytest.raises(DataFileError, match="cannot hold preference rows"):
        read_preference_file(tmp_path / "p.parquet", DataConfig(format="llava"))


def write_jsonl(path, lines: list) -> None:
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")


def test_jsonl_column_mapping_generated_ids_and_meta(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "1.png").write_bytes(png(color="red"))
    (tmp_path / "images" / "2.png").write_bytes(png(color="blue"))
    write_jsonl(tmp_path / "prefs.jsonl", [
        {"question": "q1", "img": "images/1.png", "good": "g1", "bad": "b1", "annotator": "ann"},
        "",  # a blank line is no record, but line numbers keep counting
        {"question": "q2", "img": "images/2.png", "good": "g2", "bad": "b2", "uid": "x2"},
    ])
    cfg = DataConfig(format="jsonl", id_key="uid", image_key="img", prompt_key="question",
                     chosen_key="good", rejected_key="bad")
    rows = read_preference_file(tmp_path / "prefs.jsonl", cfg).to_pylist()
    assert [r["id"] for r in rows] == ["prefs-1", "x2"]  # missing id -> f"{stem}-{line}"
    assert [r["image"] for r in rows] == [png(color="red"), png(color="blue")]
    assert [(r["prompt"], r["chosen"], r["rejected"]) for r in rows] == [
        ("q1", "g1", "b1"), ("q2", "g2", "b2")]
    assert loads_meta(rows[0]["meta"]) == {"annotator": "ann"}
    assert rows[0]["source"] == "prefs.jsonl"


def test_jsonl_bad_lines_become_rows_with_reasons(tmp_path):
    (tmp_path / "ok.png").write_bytes(png())
    (tmp_path / "adir.png").mkdir()
    good = {"id": "g", "image": "ok.png", "prompt": "p", "chosen": "c", "rejected": "r"}
    write_jsonl(tmp_path / "d.jsonl", [
        good,
        '{"id": "broken", "prompt": ',  # line 2: invalid JSON
        {**good, "id": "nokey", "chosen": None},  # JSON null
        {k: v for k, v in good.items() if k != "rejected"} | {"id": "missing"},
        {**good, "id": "num", "chosen": 42},
        [1, 2],  # line 6: JSON, but not an object
        {**good, "id": "noimg", "image": "gone.png"},
        {**good, "id": "dir", "image": "adir.png"},
        {**good, "id": "many", "image": ["ok.png", "ok.png"]},
    ])
    rows = read_preference_file(tmp_path / "d.jsonl", DataConfig(format="jsonl")).to_pylist()
    assert len(rows) == 9  # nothing dropped
    errors = {r["id"]: (read_error(r) or {}).get("reason") for r in rows}
    assert errors == {"g": None, "d-2": "malformed_json", "nokey": None, "missing": None,
                      "num": "wrong_type", "d-6": "wrong_type", "noimg": "image_not_found",
                      "dir": "image_unreadable", "many": "wrong_type"}
    by_id = {r["id"]: r for r in rows}
    assert "d.jsonl line 2" in read_error(by_id["d-2"])["detail"]
    assert loads_meta(by_id["d-2"]["meta"])["text"] == '{"id": "broken", "prompt": '
    assert by_id["missing"]["rejected"] is None and by_id["nokey"]["chosen"] is None
    assert "chosen (key 'chosen'): expected a string, got int" in read_error(by_id["num"])["detail"]


def test_jsonl_wrong_format_errors(tmp_path):
    pq.write_table(preference_table([pref(0)]), tmp_path / "x.jsonl")
    with pytest.raises(DataFileError, match="x.jsonl: this is a Parquet file.*format=parquet"):
        read_preference_file(tmp_path / "x.jsonl", DataConfig(format="jsonl"))
    (tmp_path / "arr.jsonl").write_text('[{"id": 1}]')
    with pytest.raises(DataFileError, match="a JSON array, not JSON Lines"):
        read_preference_file(tmp_path / "arr.jsonl", DataConfig(format="jsonl"))


def test_llava_json_to_conversation_rows(tmp_path):
    (tmp_path / "coco").mkdir()
    (tmp_path / "coco" / "1.png").write_bytes(png(color="yellow"))
    records = [
        {"id": "000001", "image": "coco/1.png", "dataset": "coco",
         "conversations": [{"from": "human", "value": "<image>\nWhat is this?"},
                           {"from": "gpt", "value": "A yellow square."},
                           {"from": "human", "value": "Any dogs?"},
                           {"from": "gpt", "value": "No."}]},
        {"image": "coco/none.png", "conversations": [{"from": "human", "value": "Hi <image>"}]},
        {"id": 3, "image": "coco/1.png", "conversations": "not a list"},
    ]
    (tmp_path / "llava.json").write_text(json.dumps(records))
    table = read_conversation_file(tmp_path / "llava.json", DataConfig(format="llava"))
    assert table.schema.equals(CONVERSATION_SCHEMA)
    rows = table.to_pylist()
    assert rows[0]["messages"] == [
        {"role": "user", "content": "What is this?"},
        {"role": "assistant", "content": "A yellow square."},
        {"role": "user", "content": "Any dogs?"}, {"role": "assistant", "content": "No."}]
    assert rows[0]["image"] == png(color="yellow") and rows[0]["origin"] == "sft"
    assert rows[0]["parent_id"] is None and rows[0]["error_kinds"] == []
    assert loads_meta(rows[0]["meta"]) == {"dataset": "coco", "source": "llava.json"}
    assert rows[1]["id"] == "llava-2" and rows[1]["messages"][0]["content"] == "Hi"
    assert read_error(rows[1])["reason"] == "image_not_found"
    assert rows[2]["id"] == "3" and rows[2]["messages"] is None
    assert read_error(rows[2])["reason"] == "wrong_type"


def test_llava_file_errors(tmp_path):
    (tmp_path / "bad.json").write_text('[{"id": 1}, ')
    with pytest.raises(DataFileError, match="bad.json: not valid JSON"):
        read_conversation_file(tmp_path / "bad.json", DataConfig(format="llava"))
    (tmp_path / "obj.json").write_text('{"id": 1}')
    with pytest.raises(DataFileError, match="expected a JSON list of LLaVA records, got a JSON d"):
        read_conversation_file(tmp_path / "obj.json", DataConfig(format="llava"))


def test_conversation_parquet_roundtrip(tmp_path):
    table = conversation_table([{"id": "c", "parent_id": "p", "image": png(), "origin": "negative",
                                 "messages": [{"role": "user", "content": "Dog?"},
                                              {"role": "assistant", "content": "No dog."}],
                                 "error_kinds": ["existence"], "meta": {}}])
    pq.write_table(table, tmp_path / "c.parquet")
    got = read_conversation_file(tmp_path / "c.parquet", DataConfig())
    assert got.to_pylist() == table.to_pylist()
    pq.write_table(preference_table([pref(0)]), tmp_path / "p.parquet")
    with pytest.raises(DataFileError, match="missing conversation column"):
        read_conversation_file(tmp_path / "p.parquet", DataConfig())
