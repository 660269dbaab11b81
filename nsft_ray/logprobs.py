"""Token and sequence log-probabilities from a causal LM's logits (shared by every algorithm).

Alignment convention, the one place this project shifts for causal prediction:
functions here take `logits` (B, T, V) and `labels` (B, T) *unshifted*, exactly as a Hugging Face
causal LM returns / consumes them (`model(input_ids).logits`, `labels` = input_ids with -100 on
positions that are not trained). Position t of the logits predicts token t + 1, so every per-token
output has shape (B, T - 1) and is aligned to `labels[:, 1:]`:

    token_logprobs(logits, labels)[:, t] == log p(labels[:, t + 1] | tokens[:, : t + 1])

`target_mask(labels)` gives the matching (B, T - 1) boolean mask (True where a label is trained).
Callers never slice `[:, 1:]` / `[:, :-1]` themselves.
"""

from __future__ import annotations

import torch
from torch import Tensor

IGNORE_INDEX = -100  # Hugging Face's label value for "no loss on this position"

__all__ = [
    "IGNORE_INDEX",
    "entropy_from_logits",
    "num_target_tokens",
    "scored_logprobs",
    "sequence_logprobs",
    "sums_by_sequence",
    "target_mask",
    "token_logprobs",
]


def _check_logits_labels(logits: Tensor, labels: Tensor) -> None:
    if logits.ndim != 3:
        raise ValueError(f"logits must be (B, T, V), got shape {tuple(logits.shape)}")
    if labels.shape != logits.shape[:2]:
        raise ValueError(
            f"labels must be (B, T) = {tuple(logits.shape[:2])} to match logits, "
            f"got {tuple(labels.shape)}"
        )


def _predicting_logits(logits: Tensor) -> Tensor:
    """(B, T, V) -> (B, T - 1, V): the logits that predict labels[:, 1:] (drop the last step)."""
    return logits[:, :-1, :]


def target_mask(labels: Tensor) -> Tensor:
    """(B, T) labels -> (B, T - 1) bool mask, True where labels[:, 1:] is trained (not -100)."""
    return labels[:, 1:] != IGNORE_INDEX


def num_target_tokens(labels: Tensor) -> Tensor:
    """Number of trained tokens (int64 scalar); the denominator of a token-mean loss.

    A training loop sums this over all micro-batches of one optimizer step (and over ranks)
    before the backward passes, so the accumulated gradient is a mean over every token in the step.
    """
    return target_mask(labels).sum()


def token_logprobs(logits: Tensor, labels: Tensor) -> Tensor:
    """log p(label | prefix) per token: (B, T, V), (B, T) unshifted -> (B, T - 1), 0 where -100.

    log_softmax(x)_y = x_y - logsumexp(x). The log-sum-exp runs one row at a time so the only
    full-vocabulary temporary is (T, V) in float32, never a (B, T, V) copy; results are float32
    (float64 if the logits are float64), which keeps bf16 logits from losing precision.
    """
    _check_logits_labels(logits, labels)
    return scored_logprobs(_predicting_logits(logits), labels[:, 1:])


def scored_logprobs(pred: Tensor, targets: Tensor) -> Tensor:
    """log p(target) from the logits that predict it, already aligned: pred (B, K, V) and targets
    (B, K), -100 where nothing is scored -> (B, K), 0 there. `token_logprobs` is this on the
    shifted (B, T - 1) pair; a forward that kept only the scoring positions' logits
    (`logits_to_keep`) calls it on those."""
    mask = targets != IGNORE_INDEX
    index = targets.masked_fill(~mask, 0)  # any valid index; masked out below
    out_dtype = torch.promote_types(pred.dtype, torch.float32)
    picked = pred.gather(-1, index.unsqueeze(-1)).squeeze(-1).to(out_dtype)
    log_norm = torch.stack([torch.logsumexp(row.to(out_dtype), dim=-1) for row in pred])
    return (picked - log_norm).masked_fill(~mask, 0.0)


def sequence_logprobs(token_logps: Tensor, mask: Tensor, average: bool = False) -> Tensor:
    """(B, T) per-token log-probs and mask -> (B,) sum over masked tokens (mean if `average`).

    `average=True` gives the length-normalised log-prob (IPO, SimPO); a row with no masked
    tokens gives 0 rather than NaN.
    """
    if mask.shape != token_logps.shape:
        raise ValueError(
            f"mask must match token_logps {tuple(token_logps.shape)}, got {tuple(mask.shape)}"
        )
    weights = mask.to(token_logps.dtype)
    total = (token_logps * weights).sum(dim=-1)
    if not average:
        return total
    return total / weights.sum(dim=-1).clamp(min=1.0)


def sums_by_sequence(values: Tensor, sequence_ids: Tensor) -> Tensor:
    """Per-target values of packed rows (R, T - 1), as `token_logprobs` aligns them, and the
    packed rows' sequence ids (R, T), -1 on padding (collate.pack) -> (N,) sums per sequence.

    The value at [:, t] scores token t + 1, so it belongs to that token's sequence (collate.pack
    masks each sequence's first label, so no sequence is scored from another's tokens).
    """
    if values.shape != (sequence_ids.shape[0], sequence_ids.shape[1] - 1):
        raise ValueError(f"values {tuple(values.shape)} must be (R, T - 1) for sequence_ids "
                         f"{tuple(sequence_ids.shape)}")
    owner = sequence_ids[:, 1:]
    real = owner >= 0
    out = values.new_zeros(int(sequence_ids.max()) + 1)
    return out.index_add(0, owner[real], values[real])


def entropy_from_logits(logits: Tensor, mask: Tensor) -> Tensor:
    """Entropy of each next-token distribution: (B, T, V) unshifted, (B, T - 1) mask -> (B, T - 1).

    Entry [:, t] is H(p(. | tokens[:, : t + 1])), the distribution that `token_logprobs[:, t]`
    samples from; 0 where `mask` is False. Gradients flow (PPO's entropy bonus). Computed one row
    at a time in float32 for the same memory reason as `token_logprobs`.
    """
    if logits.ndim != 3:
        raise ValueError(f"logits must be (B, T, V), got shape {tuple(logits.shape)}")
    pred = _predicting_logits(logits)
    if mask.shape != pred.shape[:2]:
        raise ValueError(
            f"mask must be (B, T - 1) = {tuple(pred.shape[:2])} (aligned to labels[:, 1:]), "
            f"got {tuple(mask.shape)}"
        )
    out_dtype = torch.promote_types(logits.dtype, torch.float32)
    rows = []
    for row in pred:
        logp = torch.log_softmax(row.to(out_dtype), dim=-1)
        # Entries masked to -inf (p = 0) contribute 0, not 0 * -inf = NaN.
        logp = logp.masked_fill(torch.isneginf(logp), 0.0)
        rows.append(-(logp.exp() * logp).sum(dim=-1))
    return torch.stack(rows) * mask.to(out_dtype)
