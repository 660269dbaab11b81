"""sft: next-token cross-entropy on assistant turns.

    L_sft = - (1 / N) * sum over assistant tokens y_t of log p_theta(y_t | image, y_<t)

N counts the assistant tokens of the whole optimizer step (every assistant turn of a multi-turn
conversation is trained; user turns, template and image tokens are masked by the collator).
Models resident: one (the policy). Used for the base stage on ShapesWorld SFT data and as the
paper's *continual SFT* baseline on the chosen answers of the preference data.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from nsft_ray.logprobs import num_target_tokens, scored_logprobs, target_mask
from nsft_ray.loop import Batch, Objective

__all__ = ["MODELS_RESIDENT", "answer_logprobs", "model_inputs", "sft_objective"]

MODELS_RESIDENT = 1
# Batch keys that describe the rows rather than feed the model.
NON_MODEL_KEYS = frozenset({"labels", "is_negative", "origin", "sequence_ids"})


def model_inputs(batch: Batch) -> dict[str, Any]:
    """The arguments of the VLM's forward (input_ids, attention_mask, pixel_values, ...).

    A packed batch (it has position_ids, see collate.pack) goes without its attention_mask:
    transformers' masking_utils finds the sequence boundaries from position_ids restarting at 0
    only when the 2D mask is None and there is no KV cache. Cached image features
    (image_features.ImageFeatureCache) arrive as `mm_encoder_outputs` instead of pixels.

    No KV cache either way: nothing decodes after a scoring pass, and under no_grad (a frozen
    reference) the cache would keep every layer's keys and values alive until the output is
    dropped (B·T·2·kv·layers values; measured by benchmarks/bench_plan.py).
    """
    inputs: dict[str, Any] = {k: v for k, v in batch.items()
                              if k not in NON_MODEL_KEYS and isinstance(v, Tensor)}
    inputs["use_cache"] = False
    if "position_ids" in inputs:
        inputs.pop("attention_mask", None)
    if "mm_encoder_outputs" in batch:
        inputs["mm_encoder_outputs"] = batch["mm_encoder_outputs"]
    return inputs


def answer_logprobs(model: nn.Module, batch: Batch,
                    inputs: dict[str, Any] | None = None) -> Tensor:
    """`token_logprobs(model(**inputs).logits, labels)`, (R, T - 1) and 0 off the labelled
    tokens, with the output layer and its softmax run only at the positions whose logits score a
    labelled token (`logits_to_keep` as indices): a VLM's image and prompt positions, most of
    its sequence, would get (T, V) logits only to be masked out.

    The kept positions are those that score a label in any row, so one index serves the batch;
    their logits are the full forward's, so the values and gradients are the same.
    """
    labels = batch["labels"]
    scored = target_mask(labels).any(0).nonzero().squeeze(1)  # (K,) positions t scoring t + 1
    logits = model(**(model_inputs(batch) if inputs is None else inputs),
                   logits_to_keep=scored).logits  # (R, K, V)
    values = scored_logprobs(logits, labels[:, 1:].index_select(1, scored))  # (R, K)
    return values.new_zeros(labels.shape[0], labels.shape[1] - 1).index_copy(1, scored, values)


def _token_nll_sum(model: nn.Module, batch: Batch) -> dict[str, Tensor]:
    # The summed token cross-entropy, -sum_t log p(y_t | y_<t) over labelled tokens; the loop
    # divides it by the step's token count (tests/test_loop.py: by hand, and against HF's loss).
    return {"sft": -answer_logprobs(model, batch).sum()}


def sft_objective() -> Objective:
    return Objective(
        weights={"sft": 1.0},
        count=lambda b: {"sft": float(num_target_tokens(b["labels"]))},
        forward=lambda model, b: (_token_nll_sum(model, b), {}),
    )
