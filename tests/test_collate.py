"""Conversation rows -> model batches: assistant-only labels, truncation, padding, Ray batches."""

from __future__ import annotations

import io
import os

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"

import torch  # noqa: E402
from PIL import Image  # noqa: E402

from nsft_ray.collate import (  # noqa: E402
    IGNORE_INDEX,
    Collator,
    _assistant_mask_by_prefixes,
    encode_conversation,
)
from nsft_ray.generation import encode_prompt, to_chat  # noqa: E402
from nsft_ray.models import build_tiny_vlm, load_vlm  # noqa: E402
from nsft_ray.schema import conversation_table  # noqa: E402

CORPUS = [
    "Is there a red circle in the picture?", "Yes, there is a red circle.",
    "How many squares are there?", "There are two squares.", "There is one circle.",
    "Where is the blue star? The blue star is at the top left.",
    "What is the background of the picture? The background is striped.",
] * 20
EOT = "<end_of_utterance>"
TWO_TURNS = [
    {"role": "user", "content": "Is there a red circle in the picture?"},
    {"role": "assistant", "content": "Yes, there is a red circle."},
    {"role": "user", "content": "How many squares are there?"},
    {"role": "assistant", "content": "There are two squares."},
]


def png(color: str = "red", size: tuple[int, int] = (64, 64)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def image(color: str = "red") -> Image.Image:
    return Image.new("RGB", (64, 64), color)


@pytest.fixture(scope="module", params=["idefics3", "llava"])
def processor(request, tmp_path_factory):
    path = build_tiny_vlm(tmp_path_factory.mktemp(request.param) / "m", CORPUS, arch=request.param)
    return load_vlm(path)[1]


def labelled_spans(processor, labels: torch.Tensor) -> list[str]:
    """Decode each contiguous run of labelled tokens."""
    spans, run = [], []
    for t in labels.tolist() + [IGNORE_INDEX]:
        if t != IGNORE_INDEX:
            run.append(t)
        elif run:
            spans.append(processor.tokenizer.decode(run))
            run = []
    return spans


def test_two_turn_labels_are_exactly_the_answers_plus_end_of_turn(processor):
    ex = encode_conversation(processor, image(), TWO_TURNS, max_length=256)
    labels, ids = ex["labels"], ex["input_ids"]
    assert labelled_spans(processor, labels) == [
        f"Yes, there is a red circle.{EOT}", f"There are two squares.{EOT}"]
    kept = labels != IGNORE_INDEX
    assert torch.equal(labels[kept], ids[kept])
    # Image tokens are present (expanded by the processor) and never labelled.
    is_image = ids == processor.image_token_id
    expected_image_tokens = {"Idefics3Processor": 4, "LlavaProcessor": 16}
    assert int(is_image.sum()) == expected_image_tokens[type(processor).__name__]
    assert not kept[is_image].any()
    # What is not labelled decodes to the user turns and template text.
    text = processor.tokenizer.decode(ids[~kept & ~is_image])
    assert "Is there a red circle in the picture?" in text and "Yes, there" not in text
    assert ex["attention_mask"].tolist() == [1] * len(ids)


def test_generation_markers_and_prefix_rendering_agree(processor):
    """The fallback for templates without {% generation %} gives the same mask as the markers."""
    ex = encode_conversation(processor, image(), TWO_TURNS, max_length=256)
    by_prefixes = _assistant_mask_by_prefixes(processor, to_chat(image(), TWO_TURNS),
                                              ex["input_ids"])
    assert torch.equal(by_prefixes, ex["labels"] != IGNORE_INDEX)


def test_truncation_keeps_the_head_and_refuses_useless_cuts(processor):
    full = encode_conversation(processor, image(), TWO_TURNS, max_length=256)
    n = len(full["input_ids"])
    second_answer_end = int((full["labels"] != IGNORE_INDEX).nonzero().max())
    cut = encode_conversation(processor, image(), TWO_TURNS, max_length=second_answer_end - 2)
    for key in ("input_ids", "labels", "attention_mask"):
        assert len(cut[key]) == second_answer_end - 2
    assert torch.equal(cut["labels"], full["labels"][: second_answer_end - 2])
    assert labelled_spans(processor, cut["labels"])[0] == f"Yes, there is a red circle.{EOT}"
    first_label = int((full["labels"] != IGNORE_INDEX).nonzero().min())
    with pytest.raises(ValueError, match="no assistant token is left"):
        encode_conversation(processor, image(), TWO_TURNS, max_length=first_label)
    image_pos = int((full["input_ids"] == processor.image_token_id).nonzero().min())
    with pytest.raises(ValueError, match=f"{n} tokens and its image ends.*cut the image"):
        encode_conversation(processor, image(), TWO_TURNS, max_length=image_pos + 1)


def test_bad_messages_name_the_problem():
    with pytest.raises(ValueError, match=r"messages\[0\].role='assistant'"):
        to_chat(image(), [{"role": "assistant", "content": "Hi"}])
    with pytest.raises(ValueError, match=r"messages\[2\].role='assistant'"):
        to_chat(image(), TWO_TURNS[:2] + TWO_TURNS[1:2])
    with pytest.raises(ValueError, match="messages is empty"):
        to_chat(image(), [])


def rows():
    return [
        {"id": "a", "parent_id": None, "image": png("red"), "messages": TWO_TURNS,
         "origin": "sft", "error_kinds": [], "meta": {}},
        {"id": "b", "parent_id": "p", "image": png("blue", (80, 48)), "messages": TWO_TURNS[:2],
         "origin": "negative", "error_kinds": ["existence"], "meta": {}},
    ]


def test_collator_right_pads_and_stacks_vision_tensors(processor):
    batch = Collator(processor, max_length=256)(rows())
    lengths = [len(encode_conversation(processor, image(), m, 256)["input_ids"])
               for m in (TWO_TURNS, TWO_TURNS[:2])]
    B, T = 2, max(lengths)
    for key in ("input_ids", "attention_mask", "labels"):
        assert batch[key].shape == (B, T) and batch[key].dtype == torch.long
    short = lengths[1]
    assert batch["attention_mask"][1].tolist() == [1] * short + [0] * (T - short)
    assert (batch["labels"][1, short:] == IGNORE_INDEX).all()
    assert (batch["input_ids"][1, short:] == processor.tokenizer.pad_token_id).all()
    if type(processor).__name__ == "Idefics3Processor":
        assert batch["pixel_values"].shape == (B, 1, 3, 64, 64)
        assert batch["pixel_attention_mask"].shape == (B, 1, 64, 64)
    else:
        assert batch["pixel_values"].shape == (B, 3, 64, 64)
    vision_keys = processor.image_processor.model_input_names
    assert set(batch) == {"input_ids", "attention_mask", "labels", *vision_keys}


def test_collator_accepts_ray_style_column_batches(processor):
    """Ray Data's iter_batches gives a dict of numpy columns (messages: arrays of dicts)."""
    table = conversation_table(rows())
    columns = {name: table.column(name).to_numpy(zero_copy_only=False)
               for name in table.column_names}
    collate = Collator(processor, max_length=256)
    from_columns, from_rows = collate(columns), collate(table.to_pylist())
    assert set(from_columns) == set(from_rows)
    assert all(torch.equal(from_columns[k], from_rows[k]) for k in from_rows)


def test_cached_collator_gives_the_same_batches_and_encodes_each_row_once(processor, monkeypatch):
    """train.cache_encoded: fails if a cached batch differs from an uncached one, if a row is
    encoded again in a later epoch, if a row that shares an id but not its content reuses the
    other's labels, or if two conversations about one image hold two copies of its pixels."""
    import nsft_ray.collate as collate_module

    calls = []
    real = collate_module.encode_conversation
    monkeypatch.setattr(collate_module, "encode_conversation",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    same_id_other_text = {**rows()[0], "messages": [
        {"role": "user", "content": "How many squares are there?"},
        {"role": "assistant", "content": "There is one circle."}]}
    batch = [*rows(), same_id_other_text]
    plain = Collator(processor, max_length=256)(batch)
    cached = Collator(processor, max_length=256, cache=True)
    for _epoch in range(3):
        got = cached(batch)
        assert set(got) == set(plain) and all(torch.equal(got[k], plain[k]) for k in plain)
    assert len(calls) == 3 + 3  # the plain pass, then the first cached epoch only
    assert len(cached._conversations) == 3 and len(cached._images) == 2
    first, third = (cached._conversations[k] for k in list(cached._conversations)[::2])
    assert first["pixel_values"] is third["pixel_values"]  # one image, one tensor


def test_collator_names_the_bad_row(processor):
    bad = rows()
    bad[1]["messages"] = [{"role": "assistant", "content": "No."}]
    with pytest.raises(ValueError, match=r"row 'b': messages\[0\]"):
        Collator(processor, max_length=256)(bad)
    bad = rows()
    bad[0]["image"] = b"not an image"
    with pytest.raises(ValueError, match="row 'a': cannot identify image"):
        Collator(processor, max_length=256)(bad)
    bad[0]["image"] = None
    with pytest.raises(ValueError, match="row 'a': image is missing"):
        Collator(processor, max_length=256)(bad)
    bad = rows()
    bad[1]["messages"] = None
    with pytest.raises(ValueError, match="row 'b': messages is empty"):
        Collator(processor, max_length=256)(bad)


def test_encode_prompt_is_left_padded_and_ends_in_assistant_header(processor):
    enc = encode_prompt(processor, [image(), image("blue")],
                        ["Is there a red circle in the picture?", "Why?"])
    pad = processor.tokenizer.pad_token_id
    ids, mask = enc["input_ids"], enc["attention_mask"]
    assert ids[1, 0] == pad and mask[1, 0] == 0 and mask[:, -1].tolist() == [1, 1]
    header = processor.tokenizer.encode("<|im_start|>assistant\n", add_special_tokens=False)
    assert ids[:, -len(header):].tolist() == [header, header]


# --- length-grouped micro-batches (train.group_by_length) -------------------------------------


def _column_batches(lengths: list[int], size: int) -> list[dict]:
    """Conversation column batches as Ray Data's numpy iter_batches gives them: row k's answer
    has lengths[k] characters; ids and origins ride along to check the columns stay aligned."""
    import numpy as np

    batches = []
    for start in range(0, len(lengths), size):
        ks = range(start, min(start + size, len(lengths)))
        msgs = np.empty(len(ks), dtype=object)
        # Each row's messages as Ray Data gives a list<struct> column: a numpy object array.
        msgs[:] = [np.array([{"role": "user", "content": "q"},
                             {"role": "assistant", "content": "a" * lengths[k]}]) for k in ks]
        batches.append({"id": np.array([f"r{k}" for k in ks], dtype=object), "messages": msgs,
                        "origin": np.array(["negative" if k % 2 else "chosen" for k in ks],
                                           dtype=object),
                        "weight": np.array([float(k) for k in ks])})
    return batches


def test_group_by_length_sorts_each_window_and_keeps_every_row_once():
    """Fails if a row is lost or repeated, if columns are sliced apart (an id with another row's
    messages), if a window is not sorted into micro-batches of neighbouring lengths, or if the
    same seed does not give the same batches (a resumed run skips batches by count)."""
    from nsft_ray.collate import group_by_length, text_length

    lengths = [1, 10, 2, 9, 50, 5, 40, 6, 3, 30, 4, 20]  # 6 micro-batches of 2
    out = list(group_by_length(_column_batches(lengths, 2), window=4, seed=0))
    assert all(len(b["id"]) == 2 for b in out) and len(out) == 6
    ids = [i for b in out for i in b["id"]]
    assert sorted(ids) == sorted(f"r{k}" for k in range(12))  # every row once
    for b in out:  # columns aligned: id rK holds row K's answer, origin and weight
        for j, i in enumerate(b["id"]):
            k = int(i[1:])
            assert len(b["messages"][j][1]["content"]) == lengths[k]
            assert b["origin"][j] == ("negative" if k % 2 else "chosen")
            assert b["weight"][j] == float(k) and b["weight"].dtype.kind == "f"
    # Window 1 = micro-batches 0-3 (rows 0-7): sorted lengths 1 2 5 6 | 9 10 40 50, cut in
    # pairs; window 2 = rows 8-11: 3 4 | 20 30. Hand-computed, in any order within a window.
    pairs = [sorted(text_length(b, j) - 1 for j in range(2)) for b in out]  # minus the "q"
    assert sorted(map(tuple, pairs[:4])) == [(1, 2), (5, 6), (9, 10), (40, 50)]
    assert sorted(map(tuple, pairs[4:])) == [(3, 4), (20, 30)]
    again = list(group_by_length(_column_batches(lengths, 2), window=4, seed=0))
    assert [list(b["id"]) for b in again] == [list(b["id"]) for b in out]
    orders = {tuple(i for b in group_by_length(_column_batches(lengths, 2), 4, seed)
                    for i in b["id"]) for seed in range(6)}
    assert len(orders) > 1  # the order of the micro-batches is shuffled by the seed


def test_group_by_length_cuts_padding_and_reads_preference_rows():
    """The point of it: the padded length summed over batches falls. By hand (each row + 1 for
    the question): pairs (51,2) (41,3) (31,4) (21,5) pad to 2 x (51+41+31+21) = 288; grouped,
    (2,3) (4,5) (21,31) (41,51) pad to 2 x (3+5+31+51) = 180. Preference rows are measured by
    prompt, chosen and rejected."""
    import numpy as np

    from nsft_ray.collate import group_by_length, text_length

    lengths = [50, 1, 40, 2, 30, 3, 20, 4]
    padded = lambda bs: sum(max(text_length(b, j) for j in range(len(b["id"]))) * len(b["id"])  # noqa: E731
                            for b in bs)
    plain = _column_batches(lengths, 2)
    assert (padded(plain), padded(list(group_by_length(plain, window=4, seed=1)))) == (288, 180)
    pref = {"id": np.array(["a", "b"], dtype=object), "prompt": np.array(["pp", "p"], dtype=object),
            "chosen": np.array(["ccc", "c"], dtype=object),
            "rejected": np.array(["r", "rrrr"], dtype=object)}
    assert [text_length(pref, 0), text_length(pref, 1)] == [6, 6]
    with pytest.raises(ValueError, match="window=0"):
        list(group_by_length(plain, window=0, seed=0))
