"""Validation: every quarantine reason triggered by a corrupted row; read = valid + quarantined."""

import io
import json

import pyarrow as pa
import pytest
from PIL import Image

from nsft_ray.config import DataConfig, ValidationConfig
from nsft_ray.data import read_conversation_file, read_preference_file
from nsft_ray.formats import LAYOUT_REASONS
from nsft_ray.schema import QUARANTINE_SCHEMA, preference_table
from nsft_ray.validate import (
    REASONS,
    ValidateBatchFn,
    check_counts,
    quarantine_rows,
    summarize,
    validate_rows,
)

CFG = ValidationConfig(max_tokens=20, max_pixels=64 * 64, min_side=8)


def image(w: int = 16, h: int = 16, fmt: str = "PNG", noise: bool = False) -> bytes:
    im = Image.effect_noise((w, h), 50).convert("RGB") if noise else Image.new("RGB", (w, h))
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


def pref(i: int, **over) -> dict:
    row = {"id": f"r{i}", "image": image(), "prompt": "What shape is it?",
           "chosen": "A red square.", "rejected": "A blue circle.", "source": "t", "meta": "{}"}
    return {**row, **over}


def conv(i: int, **over) -> dict:
    row = {"id": f"c{i}", "parent_id": None, "image": image(), "origin": "sft",
           "messages": [{"role": "user", "content": "Is there a dog?"},
                        {"role": "assistant", "content": "No, there is no dog."}],
           "error_kinds": [], "meta": "{}"}
    return {**row, **over}


def missing(row: dict, key: str) -> dict:
    return {k: v for k, v in row.items() if k != key}


png, jpeg = image(64, 64, noise=True), image(64, 64, "JPEG", noise=True)
# One corrupted row per validator reason (reader reasons are covered through files below).
PREF_CASES = {
    "missing_field": missing(pref(1), "rejected"),
    "wrong_type": pref(2, chosen=3),
    "empty_field": pref(3, prompt="   "),
    "chosen_equals_rejected": pref(4, chosen="A Blue  circle.", rejected="a blue circle."),
    "empty_image": pref(5, image=b""),
    "undecodable_image": pref(6, image=b"not an image at all"),
    "image_too_large": pref(7, image=image(65, 64)),
    "image_too_small": pref(8, image=image(7, 30)),
    "too_many_tokens": pref(9, rejected="word " * 17),  # 4 prompt words + 17 > 20
    "duplicate_id": pref(0),
}
CONV_CASES = {
    "bad_origin": conv(1, origin="positive"),
    "bad_messages": conv(2, messages=[{"role": "assistant", "content": "Hello"},
                                      {"role": "user", "content": "Hi"}]),
}


@pytest.mark.parametrize("reason", list(PREF_CASES))
def test_each_preference_reason(reason):
    valid, quarantined = validate_rows([pref(0), PREF_CASES[reason]], CFG, "preference")
    assert [r["id"] for r in valid] == ["r0"]
    assert [q["reason"] for q in quarantined] == [reason]
    assert quarantined[0]["stage"] == "validate" and quarantined[0]["detail"]


def test_details_name_field_and_expectation():
    details = {r: validate_rows([PREF_CASES[r]], CFG, "preference")[1][0]["detail"]
               for r in PREF_CASES if r != "duplicate_id"}
    assert details["missing_field"] == "field 'rejected' is missing (expected string)"
    assert details["wrong_type"] == "field 'chosen': expected string, got int"
    assert details["image_too_large"] == "field 'image': 65x64 = 4160 pixels > max_pixels 4096"
    assert details["image_too_small"] == "field 'image': 7x30, a side < min_side 8"
    assert details["too_many_tokens"] == "prompt + rejected: 21 words > max_tokens 20"


def test_truncated_images_are_undecodable():
    # PNG: verify() finds the truncation; JPEG: verify() passes, only load() finds it.
    for data in (png[: len(png) // 2], jpeg[: len(jpeg) // 2]):
        q = validate_rows([pref(0, image=data)], CFG, "preference")[1]
        assert q[0]["reason"] == "undecodable_image", q
    assert validate_rows([pref(0, image=png), pref(1, image=jpeg)], CFG, "preference")[1] == []


def test_first_failing_check_wins():
    row = pref(1, prompt="", chosen="same", rejected="same", image=b"")
    assert validate_rows([row], CFG, "preference")[1][0]["reason"] == "empty_field"


def test_conversation_reasons():
    bad = {
        "bad_origin": conv(1, origin="positive"),
        "bad_messages": conv(2, messages=[{"role": "assistant", "content": "Hello"},
                                          {"role": "user", "content": "Hi"}]),
        "missing_field": conv(3, messages=None),
        "wrong_type": conv(4, error_kinds="existence"),
    }
    odd = conv(5, messages=[{"role": "user", "content": "Dog?"}])
    empty = conv(6, messages=[{"role": "user", "content": "Dog?"},
                              {"role": "assistant", "content": " "}])
    rows = [conv(0), *bad.values(), odd, empty]
    valid, q = validate_rows(rows, CFG, "conversation")
    assert [r["id"] for r in valid] == ["c0"]
    assert [x["reason"] for x in q] == [*bad, "bad_messages", "bad_messages"]
    assert q[1]["detail"] == "messages[0]: role 'assistant', expected 'user'"
    assert q[-2]["detail"].startswith("messages: 1 turns; expected user/assistant pairs")
    assert q[-1]["detail"] == "messages[1] (assistant): content is empty"


def test_every_reason_and_accounting(tmp_path):
    """All reasons at once, through the readers too: read == valid + quarantined."""
    (tmp_path / "ok.png").write_bytes(image())
    (tmp_path / "adir.png").mkdir()
    good = {"image": "ok.png", "prompt": "p", "chosen": "c", "rejected": "r"}
    lines = [json.dumps({**good, "id": "j0"}), "{not json",
             json.dumps({**good, "id": "j2", "image": "gone.png"}),
             json.dumps({**good, "id": "j3", "image": "adir.png"})]
    (tmp_path / "d.jsonl").write_text("\n".join(lines))
    from_file = read_preference_file(tmp_path / "d.jsonl", DataConfig(format="jsonl")).to_pylist()
    rows = [pref(0), *PREF_CASES.values(), *from_file]
    valid, q = validate_rows(rows, CFG, "preference")
    _, cq = validate_rows(list(CONV_CASES.values()), CFG, "conversation")
    assert len(valid) + len(q) == len(rows)
    assert sorted(r["id"] for r in valid) == ["j0", "r0"]
    # The published layouts' own reasons are produced in tests/test_formats.py.
    assert {x["reason"] for x in q + cq} == set(REASONS) - set(LAYOUT_REASONS)
    assert {x["reason"]: x["detail"] for x in q}["malformed_json"].startswith("d.jsonl line 2:")


def test_llava_rows_validate(tmp_path):
    (tmp_path / "a.png").write_bytes(image())
    recs = [{"id": "ok", "image": "a.png", "conversations": [
                {"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "A dog."}]},
            {"id": "sys", "image": "a.png", "conversations": [
                {"from": "system", "value": "Be nice."}, {"from": "gpt", "value": "Ok."}]}]
    (tmp_path / "l.json").write_text(json.dumps(recs))
    rows = read_conversation_file(tmp_path / "l.json", DataConfig(format="llava")).to_pylist()
    valid, q = validate_rows(rows, CFG, "conversation")
    assert [r["id"] for r in valid] == ["ok"]
    assert q[0]["detail"] == "messages[0]: role 'system', expected 'user'"


def test_batch_fn_on_arrow_and_quarantine_rows():
    table = preference_table([pref(0), pref(1, image=b""), pref(2, chosen="A blue circle.")])
    out = ValidateBatchFn(CFG, "preference")(table)
    assert out.column_names == table.column_names + ["quarantine_reason", "quarantine_detail"]
    assert out.column("quarantine_reason").to_pylist() == ["", "empty_image",
                                                           "chosen_equals_rejected"]
    q = quarantine_rows(out, stage="validate")
    assert q.schema.equals(QUARANTINE_SCHEMA)
    assert q.column("id").to_pylist() == ["r1", "r2"]
    row = json.loads(q.column("row")[1].as_py())
    assert row["image"] == f"<{len(image())} bytes>" and "quarantine_reason" not in row


def test_tokenizer_counts_tokens_not_words(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["[UNK]", "a", "b", ",", "what", "?"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()  # splits "a,b" into a , b
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(tmp_path)
    row = pref(1, prompt="what?", chosen="a,b,a,b", rejected="b")  # 2 + 7 tokens, 1 + 1 words
    words = ValidationConfig(max_tokens=8)
    assert validate_rows([row], words, "preference")[1] == []
    q = validate_rows([row], ValidationConfig(max_tokens=8, tokenizer=str(tmp_path)),
                      "preference")[1]
    assert q[0]["detail"] == "prompt + chosen: 9 tokens > max_tokens 8"
    with pytest.raises(FileNotFoundError, match="validation.tokenizer: .*nowhere is not a folder"):
        ValidateBatchFn(ValidationConfig(tokenizer=str(tmp_path / "nowhere")), "preference")


def test_counts_check_and_summary():
    ok = {"read": 5, "valid": 3, "quarantined": 2, "by_reason": {"empty_image": 2}}
    check_counts(ok, "validate")
    with pytest.raises(AssertionError, match="stage validate: row accounting broken: read 6"):
        check_counts({**ok, "read": 6}, "validate")
    with pytest.raises(AssertionError):
        check_counts({**ok, "by_reason": {"empty_image": 1}}, "validate")
    text = summarize(ok)
    assert text.splitlines()[0].split() == ["read", "5"]
    assert text.splitlines()[-1].split() == ["empty_image", "2"]


def test_unknown_kind():
    with pytest.raises(ValueError, match="kind='pairs': expected one of preference, conversation"):
        ValidateBatchFn(CFG, "pairs")


def test_empty_batch():
    out = ValidateBatchFn(CFG, "preference")(preference_table([]))
    assert out.num_rows == 0 and out.schema.field("quarantine_reason").type == pa.string()
