"""Conversation rows -> model batches, through the processor's chat template.

A conversation row (schema.CONVERSATION_SCHEMA) holds image bytes and messages [{role, content}];
the image belongs to the first user turn. Training labels are the token ids of every assistant
turn, including its end-of-turn token (so the model learns to stop); everything else is -100.

    collate = Collator(processor, max_length=256)
    batch = collate(rows)   # input_ids, attention_mask, labels (B, T) + pixel_values, ...

Truncation rule: a sequence longer than max_length keeps its first max_length tokens (the image
sits at the start, later turns are cut). A cut that would split the image or leave no assistant
token to learn from raises ValueError naming the row: validation should have quarantined it.
"""

from __future__ import annotations

import hashlib
import io
import random
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from transformers import ProcessorMixin

from nsft_ray.generation import pad_token_id, to_chat

__all__ = [
    "IGNORE_INDEX",
    "Collator",
    "pack",
    "pad_values",
    "decode_image",
    "encode_conversation",
    "group_by_length",
    "rows_from_batch",
    "text_length",
]

IGNORE_INDEX = -100
TEXT_KEYS = frozenset({"input_ids", "attention_mask", "labels"})  # the rest: vision tensors
_GENERATION_MARKER = re.compile(r"{%-?\s*generation\s*-?%}")


def decode_image(data: bytes | Image.Image) -> Image.Image:
    """Encoded image bytes (PNG/JPEG/...) -> an RGB PIL image."""
    if isinstance(data, Image.Image):
        return data.convert("RGB")
    return Image.open(io.BytesIO(bytes(data))).convert("RGB")


def encode_conversation(
    processor: ProcessorMixin, image: Image.Image, messages: Sequence[Mapping[str, Any]],
    max_length: int,
) -> dict[str, Tensor]:
    """One conversation -> input_ids, attention_mask, labels (T,) and the processor's vision
    tensors for this one example (e.g. pixel_values (N_img, 3, H, W), pixel_attention_mask)."""
    chat = to_chat(image, messages)
    # Templates with {% generation %} markers (ours) give the assistant mask directly; for other
    # templates (most hub checkpoints) it is computed by rendering prefixes of the conversation.
    has_markers = bool(_GENERATION_MARKER.search(processor.chat_template or ""))
    # Python lists first, tensors after: with return_tensors="pt" transformers builds the
    # assistant mask by iterating the offset-mapping tensor element by element, which made
    # encoding 2.3x slower (3.2 against 1.4 ms a demo row; the same tensors either way).
    enc = processor.apply_chat_template(
        chat, tokenize=True, return_dict=True, return_assistant_tokens_mask=has_markers,
    )
    enc.convert_to_tensors(tensor_type="pt")
    input_ids = enc.pop("input_ids")[0]  # (T,)
    if has_markers:
        assistant = enc.pop("assistant_masks")[0].bool()
    else:
        assistant = _assistant_mask_by_prefixes(processor, chat, input_ids)
    example = {
        "input_ids": input_ids,
        "attention_mask": enc.pop("attention_mask")[0],
        "labels": torch.where(assistant, input_ids, IGNORE_INDEX),
    }
    if len(input_ids) > max_length:
        image_positions = (input_ids == getattr(processor, "image_token_id", -1)).nonzero()
        if len(image_positions) and image_positions.max() >= max_length:
            raise ValueError(
                f"conversation has {len(input_ids)} tokens and its image ends at token "
                f"{int(image_positions.max()) + 1}: max_length={max_length} would cut the image"
            )
        example = {k: v[:max_length] for k, v in example.items()}
        if not (example["labels"] != IGNORE_INDEX).any():
            raise ValueError(
                f"conversation has {len(input_ids)} tokens; truncated to max_length={max_length} "
                "no assistant token is left to learn from"
            )
    example.update({k: v[0] for k, v in enc.items()})  # vision tensors, without the batch dim
    return example


def _assistant_mask_by_prefixes(
    processor: ProcessorMixin, chat: list[dict], input_ids: Tensor
) -> Tensor:
    """Assistant mask for templates without {% generation %} markers.

    Turn i's answer = the tokens between chat[:i] rendered with the generation prompt and
    chat[:i+1], cut after the first eos (a template's trailing newline is not the answer).
    """
    mask = torch.zeros_like(input_ids, dtype=torch.bool)
    eos = processor.tokenizer.eos_token_id

    def ids(turns: list[dict], add_generation_prompt: bool) -> Tensor:
        out = processor.apply_chat_template(
            turns, add_generation_prompt=add_generation_prompt, tokenize=True,
            return_dict=True, return_tensors="pt",
        )
        return out["input_ids"][0]

    for i, turn in enumerate(chat):
        if turn["role"] != "assistant":
            continue
        start = len(ids(chat[:i], True))
        upto = ids(chat[:i + 1], False)
        if not torch.equal(upto, input_ids[: len(upto)]):
            raise ValueError(
                f"chat template is not prefix-stable at turn {i}: cannot locate the assistant "
                "tokens; add {% generation %} markers to the template"
            )
        end = len(upto)
        eos_at = (upto[start:] == eos).nonzero()
        if len(eos_at):
            end = start + int(eos_at[0]) + 1
        mask[start:end] = True
    return mask


def rows_from_batch(batch: Sequence[Mapping[str, Any]] | Mapping[str, Sequence]) -> list[dict]:
    """A list of rows, or a dict of columns (Ray Data `iter_batches`), -> a list of row dicts."""
    if isinstance(batch, Mapping):
        n = len(next(iter(batch.values()), []))
        return [{k: col[i] for k, col in batch.items()} for i in range(n)]
    return [dict(r) for r in batch]


def pad_values(processor: ProcessorMixin) -> dict[str, int]:
    """What right padding fills in: the pad (or eos) id, attention 0, and no label."""
    return {"input_ids": pad_token_id(processor.tokenizer), "attention_mask": 0,
            "labels": IGNORE_INDEX}


class Collator:
    """Conversation rows -> a right-padded training batch of torch tensors.

    Returns input_ids, attention_mask, labels (B, T) and every vision tensor the processor makes
    (pixel_values, and pixel_attention_mask for Idefics3), zero-padded to a common shape.
    """

    def __init__(self, processor: ProcessorMixin, max_length: int, cache: bool = False,
                 pack_tokens: int = 0):
        self.processor = processor
        self.max_length = max_length
        self.pack_tokens = pack_tokens  # > 0: padding-free rows (see `pack`), train.pack_tokens
        self.pad_values = pad_values(processor)
        # cache=True keeps every encoded conversation for the next epoch (train.cache_encoded):
        # the chat template, tokenizer and image processor are about a third of a tiny model's
        # step on CPU, and their output for a row never changes. Images are kept once however
        # many conversations show them (their vision tensors are shared, not copied).
        self.cache = cache
        self._conversations: dict[bytes, dict[str, Tensor]] = {}
        self._images: dict[bytes, dict[str, Tensor]] = {}

    def __call__(
        self, batch: Sequence[Mapping[str, Any]] | Mapping[str, Sequence]
    ) -> dict[str, Tensor]:
        examples = []
        for i, row in enumerate(rows_from_batch(batch)):
            try:
                if row.get("image") is None:
                    raise ValueError("image is missing; expected encoded image bytes")
                messages = [] if row.get("messages") is None else list(row["messages"])
                examples.append(self._encode(row["image"], messages))
            except (ValueError, OSError) as e:  # OSError: PIL cannot decode the bytes
                raise ValueError(f"row {row.get('id', i)!r}: {e}") from e
        if not examples:
            raise ValueError("empty batch: expected at least one conversation row")
        if self.pack_tokens:
            return pack(examples, self.pack_tokens, self.pad_values)
        return {k: _pad_stack([ex[k] for ex in examples], self.pad_values.get(k, 0))
                for k in examples[0]}

    def _encode(self, image: bytes, messages: list) -> dict[str, Tensor]:
        if not self.cache or not isinstance(image, (bytes, bytearray)):
            return encode_conversation(self.processor, decode_image(image), messages,
                                       self.max_length)
        # Keyed by content, not by row id: a repeated id with other content is never confused.
        image_key = hashlib.blake2b(image, digest_size=16).digest()
        key = image_key + hashlib.blake2b(repr(messages).encode(), digest_size=16).digest()
        if key not in self._conversations:
            example = encode_conversation(self.processor, decode_image(image), messages,
                                          self.max_length)
            text = {k: v for k, v in example.items() if k in TEXT_KEYS}
            vision = self._images.setdefault(
                image_key, {k: v for k, v in example.items() if k not in TEXT_KEYS})
            self._conversations[key] = {**text, **vision}
        return self._conversations[key]


def pack(examples: Sequence[Mapping[str, Tensor]], pack_tokens: int,
         pad: Mapping[str, int]) -> dict[str, Tensor]:
    """Encoded conversations -> padding-free rows of up to `pack_tokens` tokens each.

    Conversations keep their order and fill rows one after another (a conversation longer than
    the budget gets a row of its own). Returns input_ids, labels, attention_mask (1 on tokens,
    0 on the row's tail padding; for token counts only, see sft.model_inputs), position_ids
    (R, T), restarting at 0 with each conversation, which is how transformers' masking_utils
    keeps attention within it, and sequence_ids (R, T): the index of each token's conversation
    in `examples`, -1 on padding. The tail padding starts a sequence of its own, so no real
    token attends to it. Vision tensors stay one entry per conversation, (B, ...) as unpacked:
    the model scatters image features into image tokens in row-major order, which packing in
    order preserves.
    """
    rows: list[list[int]] = []
    used = pack_tokens
    for i, ex in enumerate(examples):
        n = len(ex["input_ids"])
        if used + n > pack_tokens:
            rows.append([])
            used = 0
        rows[-1].append(i)
        used += n
    T = max(sum(len(examples[i]["input_ids"]) for i in row) for row in rows)
    keys = ("input_ids", "labels", "attention_mask", "position_ids", "sequence_ids")
    out: dict[str, list[Tensor]] = {k: [] for k in keys}
    for row in rows:
        parts: dict[str, list[Tensor]] = {k: [] for k in keys}
        for i in row:
            ex = examples[i]
            n = len(ex["input_ids"])
            labels = ex["labels"].clone()  # the cached example is shared: never edit it
            labels[0] = IGNORE_INDEX  # no conversation's first token is predicted from another's
            for k, v in (("input_ids", ex["input_ids"]), ("labels", labels),
                         ("attention_mask", ex["attention_mask"]),
                         ("position_ids", torch.arange(n)), ("sequence_ids", torch.full((n,), i))):
                parts[k].append(v)
        tail = T - sum(len(p) for p in parts["input_ids"])
        fill = {**pad, "position_ids": None, "sequence_ids": -1}
        for k in keys:
            parts[k].append(torch.arange(tail) if k == "position_ids"
                            else torch.full((tail,), fill[k], dtype=torch.long))
            out[k].append(torch.cat(parts[k]).long())
    packed = {k: torch.stack(v) for k, v in out.items()}
    for k in examples[0]:
        if k not in TEXT_KEYS:
            packed[k] = _pad_stack([ex[k] for ex in examples], pad.get(k, 0))
    return packed


def _pad_stack(tensors: list[Tensor], value: int) -> Tensor:
    """Pad each tensor at the end of every dim to the largest shape, then stack: (B, ...)."""
    shape = [max(t.shape[d] for t in tensors) for d in range(tensors[0].dim())]
    out = tensors[0].new_full((len(tensors), *shape), value)
    for i, t in enumerate(tensors):
        out[(i, *(slice(0, s) for s in t.shape))] = t
    return out


def text_length(batch: Mapping[str, Sequence], i: int) -> int:
    """Characters of text in row `i` of a column batch: the message contents of a conversation
    row, prompt + chosen + rejected of a preference row. A tokenizer-free proxy for its tokens
    (the image adds the same number of tokens to every row)."""
    if "messages" in batch:  # a list, or (from Ray Data) a numpy array of {role, content}
        messages = batch["messages"][i]
        return 0 if messages is None else sum(len(str(m["content"])) for m in messages)
    return sum(len(str(batch[k][i] or "")) for k in ("prompt", "chosen", "rejected") if k in batch)


def group_by_length(batches: Iterable[Mapping[str, Sequence]], window: int, seed: int,
                    ) -> Iterator[dict[str, np.ndarray]]:
    """Length-grouped micro-batches (train.group_by_length): the rows of every `window`
    consecutive micro-batches are sorted by `text_length`, cut back into micro-batches of the
    same size and yielded in an order shuffled with `seed`. Each micro-batch then pads to a
    length close to its rows' own (the demo's nSFT rows: 58% of a random batch's tokens are
    padding, 12% with a window of 16), every row is still yielded once, and a run with the same
    seed and input order gets the same batches (resume skips them by count). Column batches in
    and out, as Ray Data's `iter_batches(batch_format="numpy")` gives them."""
    if window < 1:
        raise ValueError(f"window={window}: expected >= 1 micro-batches")
    rng = random.Random(seed)
    pool: list[Mapping[str, Sequence]] = []
    for batch in batches:
        pool.append(batch)
        if len(pool) == window:
            yield from _sorted_cut(pool, rng)
            pool = []
    if pool:
        yield from _sorted_cut(pool, rng)


def _sorted_cut(pool: list[Mapping[str, Sequence]], rng: random.Random) -> list[dict]:
    size = len(next(iter(pool[0].values())))
    rows = {k: np.concatenate([np.asarray(b[k]) for b in pool]) for k in pool[0]}
    n = len(next(iter(rows.values())))
    order = sorted(range(n), key=lambda i: text_length(rows, i))  # stable: ties keep order
    cuts = [order[i:i + size] for i in range(0, n, size)]
    rng.shuffle(cuts)
    return [{k: col[idx] for k, col in rows.items()} for idx in cuts]
