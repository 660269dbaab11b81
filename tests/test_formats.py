"""Published preference layouts (nsft_ray.formats), read as published from tiny fixtures.

Every fixture is written here in the layout's exact published shape (column names, nesting,
types: the `datasets` Image struct, RLHF-V's JSON string, TRL's typed message parts, VLFeedback's
string ratings, HA-DPO's dict by image id); nothing is downloaded. Each has good rows, whose
contract fields are checked against values written by hand, and one bad row per kind of
problem, which must be quarantined with its reason.
"""

import io
import json
import tracemalloc

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from nsft_ray.cli import main
from nsft_ray.config import ConfigError, DataConfig, ValidationConfig, load_config
from nsft_ray.data import (
    DataFileError,
    detect_format,
    iter_preference_batches,
    read_preference_file,
)
from nsft_ray.formats import LAYOUT_REASONS, LAYOUTS
from nsft_ray.schema import PREFERENCE_SCHEMA, loads_meta
from nsft_ray.validate import validate_rows

VCFG = ValidationConfig(max_tokens=64, min_side=8)
IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])  # datasets.Image in Parquet


def png(color: str = "red", size: int = 16) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, format="PNG")
    return buf.getvalue()


def read(path, fmt: str, **cfg) -> tuple[dict, dict]:
    """(valid rows by id, quarantine reason by id) of `path` read as `fmt` and validated."""
    rows = read_preference_file(path, DataConfig(format=fmt, **cfg)).to_pylist()
    valid, bad = validate_rows(rows, VCFG, "preference")
    assert len(valid) + len(bad) == len(rows)
    return {r["id"]: r for r in valid}, {q["id"]: q["reason"] for q in bad}


def detail(path, fmt: str, rid: str) -> str:
    rows = read_preference_file(path, DataConfig(format=fmt)).to_pylist()
    _, bad = validate_rows(rows, VCFG, "preference")
    return next(q["detail"] for q in bad if q["id"] == rid)


# --------------------------------------------------------------------------- fixtures per layout


def write_rlaif_v(d) -> str:
    (d / "imgs").mkdir(exist_ok=True)
    (d / "imgs" / "p.png").write_bytes(png("blue"))
    good = {"ds_name": "OmniLMM", "question": "What color is the square?",
            "chosen": "The square is red.", "rejected": "The square is blue.",
            "origin_dataset": "VQAv2", "origin_split": '{"model": "m", "type": "t"}',
            "image_path": "unused.jpg"}
    rows = [
        {**good, "idx": "0", "image": {"bytes": png(), "path": "a.png"}},
        {**good, "idx": "1", "image": {"bytes": None, "path": "imgs/p.png"}},  # path in struct
        {**good, "idx": "bad-image", "image": {"bytes": b"not a png", "path": None}},
        {**good, "idx": "no-file", "image": {"bytes": None, "path": None},
         "image_path": "gone.jpg"},
        {**good, "idx": "empty", "image": {"bytes": png(), "path": None}, "chosen": "  "},
        {**good, "idx": "no-question", "image": {"bytes": png(), "path": None},
         "question": None},
    ]
    schema = pa.schema([("ds_name", pa.string()), ("image", IMAGE), ("question", pa.string()),
                        ("chosen", pa.string()), ("rejected", pa.string()),
                        ("origin_dataset", pa.string()), ("origin_split", pa.string()),
                        ("idx", pa.string()), ("image_path", pa.string())])
    path = d / "rlaif.parquet"
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    return path


RLAIF_V_BAD = {"bad-image": "undecodable_image", "no-file": "image_not_found",
               "empty": "empty_field", "no-question": "missing_field"}


def write_rlhf_v(d) -> str:
    text = json.dumps({"question": "Describe the image.", "chosen": "A red square.",
                       "rejected": "A red square and a dog."})
    rows = [(7, text), (8, "{not json"), (9, json.dumps({"question": "q", "chosen": "c"})),
            (10, json.dumps(["a list"]))]
    table = pa.table({
        "ds_name": ["RLHF-V"] * 4,
        "image": pa.array([{"bytes": png(), "path": None}] * 4, IMAGE),
        "text": [t for _, t in rows],
        "origin_dataset": ["coco"] * 4, "origin_split": ["train"] * 4,
        "idx": pa.array([i for i, _ in rows], pa.int64()),
        "image_path": ["x.jpg"] * 4})
    path = d / "rlhf.parquet"
    pq.write_table(table, path)
    return path


def msg(role: str, text: str, image: bool = False) -> dict:
    parts = ([{"type": "image", "text": None}] if image else [])
    return {"role": role, "content": [*parts, {"type": "text", "text": text}]}


def write_trl(d) -> str:
    img = {"bytes": png(), "path": None}
    prompt = [msg("system", "Be brief."), msg("user", "<image>What is there?", image=True)]
    good = {"images": [img], "prompt": prompt, "chosen": [msg("assistant", "A red square.")],
            "rejected": [msg("assistant", "A blue circle.")]}
    rows = [good,
            {**good, "images": []},
            {**good, "images": [img, img], "chosen": [msg("assistant", "Two squares.")]},
            {**good, "prompt": [msg("user", "Hi"), msg("assistant", "Hello"),
                                msg("user", "What is there?")]},
            {**good, "chosen": [msg("assistant", "")]}]
    path = d / "trl.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def completion(model: str, faithful: str, helpful: str, response: str) -> dict:
    return {"annotations": {
        "Helpfulness": {"Rating": helpful, "Rationale": "..."},
        "Ethical Considerations": {"Rating": "5", "Rationale": "..."},
        "Visual Faithfulness": {"Rating": faithful, "Rationale": "..."}},
        "model": model, "response": response}


def write_vlfeedback(d) -> str:
    (d / "svit").mkdir(exist_ok=True)
    (d / "svit" / "1.png").write_bytes(png())
    base = {"prompt": "What is in the image?", "models": ["a", "b", "c"], "img_path": "svit/1.png"}
    good = [completion("a", "5", "2", "A red square."), completion("b", "2", "4", "A blue dog."),
            completion("c", "3", "1", "A square.")]
    lines = [
        {**base, "id": "ok", "completions": good},
        {**base, "id": "tie", "completions": [completion("a", "3", "3", "x"),
                                              completion("b", "3", "4", "y")]},
        {**base, "id": "one-rated", "completions": [completion("a", "4", "3", "x"),
                                                    completion("b", "N/A", "4", "y")]},
        {**base, "id": "no-image", "img_path": "svit/missing.png", "completions": good},
        {**base, "id": "bad-completions", "completions": "not a list"},
    ]
    path = d / "vlfeedback.jsonl"
    path.write_text("\n".join([*map(json.dumps, lines), '{"id": "cut", "prompt": "Wh']) + "\n")
    return path


def turns(question: str, answer: str) -> list[dict]:
    return [{"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": answer}]


def write_povid(d) -> str:
    (d / "coco").mkdir(exist_ok=True)
    (d / "coco" / "1.png").write_bytes(png())
    good = {"image": "coco/1.png", "conversations": turns("Describe it.", "A red square."),
            "rejected_conversations": turns("Describe it.", "A blue square.")}
    records = [
        {**good, "id": "ok"},
        {**good, "id": "mismatch",
         "rejected_conversations": turns("What else?", "A cat.")},
        {**good, "id": "long", "conversations": turns("Q1", "A1") + turns("Q2", "A2")},
        {**good, "id": "no-image", "image": "coco/404.png"},
        {**good, "id": "not-turns", "conversations": "Describe it."},
    ]
    path = d / "povid.json"
    path.write_text(json.dumps(records, indent=1))
    return path


def write_llava_rlhf(d) -> str:
    (d / "img.png").write_bytes(png())
    good = {"image": "img.png", "conversations": turns("What is shown?", "placeholder"),
            "output_1": {"from": "llava", "value": "A blue circle."},
            "output_2": {"from": "llava", "value": "A red square."},
            "preference": 2, "hallucination": 1, "flip": False}
    records = [{**good, "id": "ok"}, {**good, "id": "pref3", "preference": 3},
               {**good, "id": "pref-str", "preference": "1"},
               {**good, "id": "empty", "output_1": {"from": "llava", "value": ""},
                "preference": 1}]
    path = d / "llava_rlhf.json"
    path.write_text(json.dumps(records))
    return path


def write_hadpo(d):
    """HA-DPO's llava-v1.5 folder: pope_data.json (list), desc_data.json (dict by image id)."""
    (d / "VG_100K").mkdir(parents=True)
    (d / "VG_100K_2").mkdir()
    (d / "VG_100K" / "11.jpg").write_bytes(png())
    (d / "VG_100K_2" / "12.jpg").write_bytes(png("green"))
    pope = [
        {"image_id": 11, "question": "Is there a cat in the image?", "answer": "no",
         "chosen": "No, there is no cat.", "reject": "Yes, there is a cat.", "correct": False},
        {"image_id": 11, "question": "Is there a square?", "answer": "yes",
         "chosen": "Yes.", "reject": "Yes, there is.", "correct": True},
        {"image_id": 12, "question": "Is there a dog?", "answer": "no",
         "chosen": "No dog.", "rejected": "A dog, yes.", "correct": False},  # InstructBLIP key
        {"image_id": 99, "question": "Is there a dog?", "answer": "no",
         "chosen": "No.", "reject": "Yes.", "correct": False},
    ]
    desc = {"12": {"chosen": ["A green field.", "Green grass."],
                   "rejected": ["A green field with cows.", "Grass and a horse."]},
            "11": {"chosen": [], "rejected": ["A cat."]}}
    (d / "pope_data.json").write_text(json.dumps(pope))
    (d / "desc_data.json").write_text(json.dumps(desc))
    return d


# --------------------------------------------------------------------------------------- tests


def test_rlaif_v_image_struct_bytes_or_path_and_bad_rows(tmp_path):
    """Fails if the Image struct's bytes or its path are ignored, or a bad row is dropped."""
    valid, bad = read(write_rlaif_v(tmp_path), "rlaif-v")
    assert sorted(valid) == ["0", "1"] and bad == RLAIF_V_BAD
    row = valid["0"]
    assert (row["image"], row["prompt"], row["chosen"], row["rejected"], row["source"]) == (
        png(), "What color is the square?", "The square is red.", "The square is blue.",
        "rlaif-v/OmniLMM")
    assert valid["1"]["image"] == png("blue")  # {bytes: null, path} resolved under the root
    assert loads_meta(row["meta"]) == {"ds_name": "OmniLMM", "origin_dataset": "VQAv2",
                                       "origin_split": '{"model": "m", "type": "t"}',
                                       "image_path": "unused.jpg"}


def test_rlhf_v_text_json_field(tmp_path):
    """Fails if RLHF-V's `text` JSON is not unpacked, or a malformed one is not quarantined."""
    path = write_rlhf_v(tmp_path)
    valid, bad = read(path, "rlhf-v")
    assert list(valid) == ["7"]  # idx int64 -> string id
    assert (valid["7"]["prompt"], valid["7"]["chosen"], valid["7"]["rejected"]) == (
        "Describe the image.", "A red square.", "A red square and a dog.")
    assert bad == {"8": "malformed_json", "9": "missing_field", "10": "wrong_type"}
    assert detail(path, "rlhf-v", "8").startswith("text: not valid JSON")
    assert detail(path, "rlhf-v", "9") == ("text: JSON object lacks 'rejected' (expected keys "
                                           "question, chosen, rejected)")


def test_trl_typed_message_parts(tmp_path):
    """Fails if TRL's typed content parts, system message or image list are mishandled."""
    path = write_trl(tmp_path)
    rows = read_preference_file(path, DataConfig(format="trl")).to_pylist()
    valid, bad = validate_rows(rows, VCFG, "preference")
    assert len(valid) == 1 and len(rows) == 5
    row = valid[0]
    assert (row["prompt"], row["chosen"], row["rejected"], row["image"]) == (
        "What is there?", "A red square.", "A blue circle.", png())
    assert loads_meta(row["meta"]) == {"system": ["Be brief."]}
    assert [q["reason"] for q in bad] == ["wrong_type", "wrong_type", "multi_turn", "empty_field"]
    assert bad[0]["detail"] == ("images: expected a list of one image (a row holds one), "
                                "got 0 images")
    # No id column: ids are hashes of the image and texts, the same on every read.
    again = read_preference_file(path, DataConfig(format="trl")).column("id").to_pylist()
    assert again == [r["id"] for r in rows] and len(set(again)) == 5


def test_vlfeedback_best_and_worst_on_the_aspect(tmp_path):
    """Fails if chosen/rejected ignore the configured aspect, or ties are not quarantined."""
    path = write_vlfeedback(tmp_path)
    valid, bad = read(path, "vlfeedback")
    assert list(valid) == ["ok"]
    ok = valid["ok"]  # Visual Faithfulness 5 / 2 / 3: a best, b worst
    assert (ok["chosen"], ok["rejected"], ok["prompt"]) == (
        "A red square.", "A blue dog.", "What is in the image?")
    meta = loads_meta(ok["meta"])
    assert (meta["chosen_model"], meta["rejected_model"], meta["chosen_rating"],
            meta["rejected_rating"]) == ("a", "b", 5.0, 2.0)
    assert bad == {"tie": "rating_tie", "one-rated": "no_preference",
                   "no-image": "image_not_found", "bad-completions": "wrong_type",
                   "vlfeedback-6": "malformed_json"}
    assert "rating 3; no strict preference" in detail(path, "vlfeedback", "tie")
    # Helpfulness 2 / 4 / 1: b best, c worst; and the former tie now has a preference.
    valid, bad = read(path, "vlfeedback", vlfeedback_aspect="Helpfulness")
    assert (valid["ok"]["chosen"], valid["ok"]["rejected"]) == ("A blue dog.", "A square.")
    assert (valid["tie"]["chosen"], valid["tie"]["rejected"]) == ("y", "x")


def test_vlfeedback_aspect_is_checked_at_config_load():
    with pytest.raises(ConfigError, match="data.vlfeedback_aspect"):
        load_config(None, ["data.vlfeedback_aspect=Faithfulness"])
    cfg = load_config(None, ["data.format=vlfeedback", "data.vlfeedback_aspect=Helpfulness"])
    assert cfg.data.vlfeedback_aspect == "Helpfulness"


def test_povid_conversations(tmp_path):
    """Fails if POVID's <image> marker stays in the prompt or a bad conversation is kept."""
    valid, bad = read(write_povid(tmp_path), "povid")
    assert (valid["ok"]["prompt"], valid["ok"]["chosen"], valid["ok"]["rejected"]) == (
        "Describe it.", "A red square.", "A blue square.")
    assert bad == {"mismatch": "prompt_mismatch", "long": "multi_turn",
                   "no-image": "image_not_found", "not-turns": "wrong_type"}


def test_llava_rlhf_preference_picks_the_output(tmp_path):
    """Fails if preference 2 does not make output_2 the chosen answer, or 3 is accepted."""
    valid, bad = read(write_llava_rlhf(tmp_path), "llava-rlhf")
    ok = valid["ok"]
    assert (ok["prompt"], ok["chosen"], ok["rejected"]) == (
        "What is shown?", "A red square.", "A blue circle.")
    assert loads_meta(ok["meta"]) == {"hallucination": 1, "flip": False}
    assert bad == {"pref3": "bad_preference", "pref-str": "bad_preference",
                   "empty": "empty_field"}


def test_hadpo_folder_pope_and_desc(tmp_path):
    """Fails if desc pairs, VG image folders, `reject`/`rejected` or `correct` are mishandled."""
    d = write_hadpo(tmp_path / "hadpo")
    valid, bad = read(d, "hadpo")
    assert sorted(valid) == ["12-desc0", "12-desc1", "pope_data-1", "pope_data-3"]
    assert (valid["pope_data-1"]["chosen"], valid["pope_data-1"]["rejected"]) == (
        "No, there is no cat.", "Yes, there is a cat.")
    assert valid["pope_data-3"]["rejected"] == "A dog, yes."
    assert valid["pope_data-3"]["image"] == png("green")  # found in VG_100K_2/
    desc = valid["12-desc1"]
    assert (desc["chosen"], desc["rejected"], desc["source"]) == (
        "Green grass.", "Grass and a horse.", "hadpo/desc")
    assert desc["prompt"].startswith(("Describe", "Take", "Please", "Could"))
    assert bad == {"pope_data-2": "no_preference", "pope_data-4": "image_not_found",
                   "11-desc0": "missing_field"}
    # The InstructBLIP/MiniGPT-4 desc_data.json: a list of {image_id, chosen[], rejected[]}.
    (tmp_path / "list").mkdir()
    (tmp_path / "list" / "12.jpg").write_bytes(png())
    (tmp_path / "list" / "desc_data.json").write_text(json.dumps(
        [{"image_id": 12, "chosen": ["A field."], "rejected": ["A field, a cow."]}]))
    valid, _ = read(tmp_path / "list" / "desc_data.json", "hadpo")
    assert list(valid) == ["12-desc0"]


def test_every_layout_reason_is_produced(tmp_path):
    """The layouts' own reasons all occur in the fixtures above (none is dead code)."""
    seen = set()
    for write, fmt in [(write_vlfeedback, "vlfeedback"), (write_povid, "povid"),
                       (write_llava_rlhf, "llava-rlhf")]:
        seen |= set(read(write(tmp_path), fmt)[1].values())
    seen |= set(read(write_hadpo(tmp_path / "h"), "hadpo")[1].values())
    assert set(LAYOUT_REASONS) <= seen


WRITERS = {"rlaif-v": write_rlaif_v, "rlhf-v": write_rlhf_v, "trl": write_trl,
           "vlfeedback": write_vlfeedback, "povid": write_povid, "llava-rlhf": write_llava_rlhf}


@pytest.mark.parametrize("fmt", [*WRITERS, "hadpo"])
def test_auto_detects_each_layout_and_reads_the_same(tmp_path, fmt, capsys):
    """Fails if auto picks another layout (or reads differently) for any published layout."""
    path = write_hadpo(tmp_path / "h") if fmt == "hadpo" else WRITERS[fmt](tmp_path)
    assert detect_format(path)[0] == fmt
    auto = read_preference_file(path, DataConfig(format="auto"))
    assert f"detected {fmt}" in capsys.readouterr().err
    assert auto.equals(read_preference_file(path, DataConfig(format=fmt)))


def test_auto_on_our_own_files_and_unknown_files(tmp_path):
    pq.write_table(PREFERENCE_SCHEMA.empty_table(), tmp_path / "ours.parquet")
    assert detect_format(tmp_path / "ours.parquet")[0] == "parquet"
    (tmp_path / "p.jsonl").write_text('{"prompt": "p", "chosen": "c", "rejected": "r"}\n')
    assert detect_format(tmp_path / "p.jsonl")[0] == "jsonl"
    (tmp_path / "x.jsonl").write_text('{"question": "q", "answer": "a"}\n')
    with pytest.raises(DataFileError, match="x.jsonl: data.format=auto: no known layout has "
                                            "json keys answer, question"):
        detect_format(tmp_path / "x.jsonl")


def test_layout_file_errors_name_the_columns(tmp_path):
    pq.write_table(pa.table({"idx": ["1"], "question": ["q"]}), tmp_path / "r.parquet")
    with pytest.raises(DataFileError, match="r.parquet: missing column 'chosen' of "
                                            "data.format=rlaif-v"):
        read_preference_file(tmp_path / "r.parquet", DataConfig(format="rlaif-v"))
    (tmp_path / "p.json").write_text('{"id": 1}')
    with pytest.raises(DataFileError, match="p.json: expected a JSON list of records"):
        read_preference_file(tmp_path / "p.json", DataConfig(format="povid"))


def test_parquet_layout_is_streamed_in_batches(tmp_path):
    """Fails if a Parquet layout is loaded whole: 64 MiB of images, < 24 MiB held at any time.

    Arrow's allocations are sampled while each batch is held, Python's by tracemalloc's peak. A
    reader that calls to_table() or to_pylist() on the whole file holds all 64 MiB in one of
    the two; so does Arrow's default scan (pre_buffer fetches every row group first: measured
    ~100 MiB for a 96 MiB file). Streamed, at most 14 MiB was held (scan buffer + a few groups).
    """
    n, size, group = 128, 512 * 1024, 2
    blob = png()
    schema = pa.schema([("idx", pa.string()), ("image", IMAGE), ("question", pa.string()),
                        ("chosen", pa.string()), ("rejected", pa.string())])
    path = tmp_path / "big.parquet"
    with pq.ParquetWriter(path, schema, compression="none", use_dictionary=False) as w:
        for g in range(n // group):  # row groups of 1 MiB, as a streaming writer leaves them
            rows = [{"idx": str(g * group + i), "question": "q?", "chosen": "y", "rejected": "n",
                     # a real PNG padded to 512 KiB with distinct bytes (PIL ignores the tail)
                     "image": {"bytes": blob + bytes([i]) * (size - len(blob)), "path": None}}
                    for i in range(group)]
            w.write_table(pa.Table.from_pylist(rows, schema=schema))
    held, rows = [], 0
    tracemalloc.start()
    try:
        for batch in iter_preference_batches(path, DataConfig(format="rlaif-v"), batch_rows=4):
            held.append(pa.total_allocated_bytes())
            rows += batch.num_rows
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert rows == n
    assert max(held) < 24 * 2**20, f"arrow held {max(held) / 2**20:.1f} MiB"
    assert peak < 24 * 2**20, f"python peak {peak / 2**20:.1f} MiB"


def test_data_inspect_command(tmp_path, capsys):
    """The CLI shows the detected layout, the mapping, the first rows and counts by reason."""
    path = write_rlaif_v(tmp_path)
    assert main(["data", "inspect", str(path), "data.format=auto", "--rows", "2"]) == 0
    out = capsys.readouterr().out
    assert ("format       rlaif-v  (auto: Parquet columns idx, question, chosen, rejected, "
            "image present)") in out
    assert "rows         6 preference rows read" in out
    assert "  prompt   <- question" in out
    assert "[0] id=0  image=<" in out and "bytes PNG 16x16>" in out
    assert "[2]" not in out  # --rows 2
    assert "validation   read 6 = valid 2 + quarantined 4" in out
    for reason in RLAIF_V_BAD.values():
        assert f"  {reason}" in out
    assert main(["data", "inspect", str(path), "data.format=vlfeedback"]) == 2  # a Parquet file


@pytest.mark.parametrize("fmt", sorted(LAYOUTS))
def test_data_inspect_every_layout(tmp_path, fmt, capsys):
    path = write_hadpo(tmp_path / "h") if fmt == "hadpo" else WRITERS[fmt](tmp_path)
    assert main(["data", "inspect", str(path), f"data.format={fmt}", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    v = report["validation"]
    assert report["format"] == fmt and v["read"] == v["valid"] + v["quarantined"] > 0
    assert v["valid"] >= 1 and v["quarantined"] >= 1
    assert set(report["mapping"]) >= {"id", "image", "prompt", "chosen", "rejected"}


def test_data_convert_writes_our_parquet_and_the_quarantine(tmp_path, capsys):
    """Fails if convert loses a row or writes a bad one: our Parquet then reads back all valid."""
    path, out = write_vlfeedback(tmp_path), tmp_path / "conv"
    assert main(["data", "convert", str(path), "--out", str(out), "data.format=auto"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["format"], summary["read"], summary["valid"]) == ("vlfeedback", 6, 1)
    assert summary["by_reason"] == {"rating_tie": 1, "no_preference": 1, "image_not_found": 1,
                                    "wrong_type": 1, "malformed_json": 1}
    valid, bad = read(out / "preferences.parquet", "parquet")
    assert list(valid) == ["ok"] and not bad
    assert valid["ok"]["chosen"] == "A red square." and valid["ok"]["source"] == "vlfeedback"
    quarantine = pq.read_table(out / "quarantine.parquet").to_pylist()
    assert sorted(q["reason"] for q in quarantine) == sorted(summary["by_reason"])
