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

from nsft_ray.logprobs import num_target_tokens
from nsft_ray.loop import Batch, Objective
from nsft_ray.losses import sft_loss_sum

__all__ = ["MODELS_RESIDENT", "model_inputs", "sft_objective"]

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


def _token_nll_sum(model: nn.Module, batch: Batch) -> dict[str, Tensor]:
    total, _ = sft_loss_sum(model(**model_inputs(batch)).logits, batch["labels"])
    return {"sft": total}


def sft_objective() -> Objective:
    return Objective(
        weights={"sft": 1.0},
        count=lambda b: {"sft": float(num_target_tokens(b["labels"]))},
        forward=lambda model, b: (_token_nll_sum(model, b), {}),
    )
