"""Preference rows -> one model batch holding the chosen and the rejected sequences stacked.

A preference row (schema.PREFERENCE_SCHEMA) is (image, prompt, chosen, rejected). It becomes two
conversations about the same image, [user: prompt, assistant: chosen] and [..., rejected],
encoded with `collate.encode_conversation` (labels only on the answer tokens, end-of-turn
included). For B rows the batch has 2B sequences: rows 0..B-1 are the chosen answers, rows
B..2B-1 the rejected ones, in the same order, so one forward scores both halves:

    collate = PreferenceCollator(processor, max_length=256)
    batch = collate(rows)  # input_ids, attention_mask, labels (2B, T), pixel_values (2B, ...)

With `pack_tokens` the 2B sequences, in that order, fill padding-free rows instead
(`collate.pack`: `sequence_ids` says which sequence each token belongs to; `loop.samples_in`
counts them).

If the rows carry precomputed reference log-probs (columns `ref_chosen_logps`,
`ref_rejected_logps`, written by ``ray_glue/dpo.py``), they come through as float32 (B,) tensors.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:
    from transformers import ProcessorMixin

__all__ = ["REF_COLUMNS", "PreferenceCollator", "split_pairs"]

REF_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")


def split_pairs(x: Tensor) -> tuple[Tensor, Tensor]:
    """(2B, ...) stacked as the collator stacks them -> (chosen (B, ...), rejected (B, ...))."""
    if x.shape[0] % 2:
        raise ValueError(f"expected 2B stacked rows (chosen then rejected), got {x.shape[0]}")
    half = x.shape[0] // 2
    return x[:half], x[half:]


class PreferenceCollator:
    """Preference rows (list of dicts or a dict of columns) -> a right-padded 2B-row batch, or
    with `pack_tokens` > 0 (train.pack_tokens) the 2B sequences packed into padding-free rows."""

    def __init__(self, processor: ProcessorMixin, max_length: int, pack_tokens: int = 0):
        from nsft_ray.collate import pad_values  # lazy: see __call__

        self.processor = processor
        self.max_length = max_length
        self.pack_tokens = pack_tokens
        self.pad_values = pad_values(processor)

    def __call__(
        self, batch: Sequence[Mapping[str, Any]] | Mapping[str, Sequence]
    ) -> dict[str, Tensor]:
        # Imported here: nsft_ray.collate pulls in transformers, and the algorithms table imports
        # this module (for REF_COLUMNS, split_pairs) in processes that never collate.
        from nsft_ray.collate import (
            _pad_stack,
            decode_image,
            encode_conversation,
            pack,
            rows_from_batch,
        )

        rows = rows_from_batch(batch)
        if not rows:
            raise ValueError("empty batch: expected at least one preference row")
        chosen, rejected = [], []
        for i, row in enumerate(rows):
            try:
                image = decode_image(row["image"])
                for answer, half in ((row["chosen"], chosen), (row["rejected"], rejected)):
                    messages = [{"role": "user", "content": str(row["prompt"])},
                                {"role": "assistant", "content": str(answer)}]
                    half.append(encode_conversation(self.processor, image, messages,
                                                    self.max_length))
            except (ValueError, KeyError, OSError) as e:
                raise ValueError(f"preference row {row.get('id', i)!r}: {e}") from e
        examples = chosen + rejected
        if self.pack_tokens:
            out = pack(examples, self.pack_tokens, self.pad_values)
        else:
            out = {k: _pad_stack([ex[k] for ex in examples], self.pad_values.get(k, 0))
                   for k in examples[0]}
        present = [c for c in REF_COLUMNS if c in rows[0]]
        if present and len(present) != len(REF_COLUMNS):
            raise ValueError(f"rows carry {present[0]} but not {set(REF_COLUMNS) - set(present)}")
        for c in present:
            missing = [r.get("id", i) for i, r in enumerate(rows) if r[c] is None]
            if missing:
                raise ValueError(f"preference row {missing[0]!r}: {c} is null")
            out[c] = torch.tensor([float(r[c]) for r in rows], dtype=torch.float32)  # (B,)
        return out
