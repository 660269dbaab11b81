"""dpo: Direct Preference Optimization (Rafailov et al., NeurIPS 2023) on (image, prompt) pairs.

    L_dpo = - mean over pairs of log sigmoid(beta * h),
    h = [log pi(y_w | x) - log pi_ref(y_w | x)] - [log pi(y_l | x) - log pi_ref(y_l | x)]

x = (image, prompt); y_w / y_l the chosen / rejected answer; log pi(y | x) sums the answer's token
log-probs (end-of-turn token included). `dpo.loss` picks the per-pair function of h from
`DPO_LOSSES` (pure functions in losses.py): sigmoid (DPO), ipo (on length-averaged log-probs),
hinge (SLiC-HF), cdpo (conservative, label smoothing), robust (rDPO). `sft_weight` > 0 adds
sft_weight * L_sft(y_w), a token mean over the chosen answers. The DPO term is a mean over the
pairs of the whole optimizer step (count = pairs), so gradient accumulation is exact.

Models resident: the policy and a frozen reference copy of the starting model (2). With
`precompute_ref`, a Ray Data pass (ray_glue/dpo.py) first writes log pi_ref(y_w | x) and
log pi_ref(y_l | x) into the data with `reference_logps`, and training holds the policy only (1).

What it simplifies against RLHF-PPO: the reward is implicit, r(x, y) = beta log pi / pi_ref (the
partition function cancels in h), so there is no reward model, no critic and no sampling; it
learns from the fixed offline pairs only.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from nsft_ray.algorithms.sft import model_inputs
from nsft_ray.config import DPOConfig
from nsft_ray.logprobs import sequence_logprobs, target_mask, token_logprobs
from nsft_ray.loop import Batch, Objective
from nsft_ray.losses import (
    dpo_conservative_loss,
    dpo_robust_loss,
    dpo_sigmoid_loss,
    hinge_loss,
    ipo_loss,
)
from nsft_ray.preference_collate import REF_COLUMNS, split_pairs

__all__ = ["DPO_LOSSES", "dpo_objective", "models_resident", "reference_logps"]

# (policy_chosen, policy_rejected, ref_chosen, ref_rejected: (B,), cfg) -> (mean loss, metrics)
LossFn = Callable[[Tensor, Tensor, Tensor, Tensor, DPOConfig], tuple[Tensor, dict[str, Tensor]]]
DPO_LOSSES: dict[str, LossFn] = {
    "sigmoid": lambda pc, pr, rc, rr, c: dpo_sigmoid_loss(pc, pr, rc, rr, c.beta),
    "ipo": lambda pc, pr, rc, rr, c: ipo_loss(pc, pr, rc, rr, c.beta),
    "hinge": lambda pc, pr, rc, rr, c: hinge_loss(pc, pr, rc, rr, c.beta),
    "cdpo": lambda pc, pr, rc, rr, c: dpo_conservative_loss(pc, pr, rc, rr, c.beta,
                                                            c.label_smoothing),
    "robust": lambda pc, pr, rc, rr, c: dpo_robust_loss(pc, pr, rc, rr, c.beta, c.label_smoothing),
}
AVERAGED = frozenset({"ipo"})  # variants defined on length-averaged log-probs
SMOOTHED = frozenset({"cdpo", "robust"})  # variants that read label_smoothing
METRICS = ("rewards_chosen", "rewards_rejected", "reward_margin", "reward_accuracy")


def models_resident(cfg: DPOConfig) -> int:
    return 1 if cfg.precompute_ref else 2


def _answer_token_logps(model: nn.Module, batch: Batch) -> tuple[Tensor, Tensor]:
    """Token log-probs (2B, T-1) of the stacked chosen/rejected batch, and the answer mask."""
    inputs = {k: v for k, v in model_inputs(batch).items() if k not in REF_COLUMNS}
    logits = model(**inputs).logits
    return token_logprobs(logits, batch["labels"]), target_mask(batch["labels"])


@torch.no_grad()
def reference_logps(reference: nn.Module, batch: Batch) -> tuple[Tensor, Tensor]:
    """Summed answer log-probs under a frozen model: (chosen (B,), rejected (B,)), float32.

    The columns `ref_chosen_logps` / `ref_rejected_logps` that the precompute pass writes; the
    live-reference path computes the same numbers inside the objective.
    """
    token_logps, mask = _answer_token_logps(reference, batch)
    return split_pairs(sequence_logprobs(token_logps, mask))


def dpo_objective(cfg: DPOConfig, reference: nn.Module | None) -> Objective:
    """The DPO objective; `reference` (frozen, eval mode) for the live reference, None when the
    batches carry precomputed `ref_chosen_logps` / `ref_rejected_logps` (cfg.precompute_ref)."""
    if cfg.loss not in DPO_LOSSES:
        raise ValueError(f"dpo.loss={cfg.loss!r}: expected one of {', '.join(DPO_LOSSES)}")
    if cfg.label_smoothing and cfg.loss not in SMOOTHED:
        raise ValueError(f"dpo.label_smoothing={cfg.label_smoothing} has no effect with "
                         f"dpo.loss={cfg.loss!r}; it applies to {', '.join(sorted(SMOOTHED))}")
    if cfg.precompute_ref != (reference is None):
        raise ValueError("dpo: pass a frozen reference model exactly when precompute_ref is false "
                         f"(precompute_ref={cfg.precompute_ref}, reference given: "
                         f"{reference is not None})")
    loss_fn = DPO_LOSSES[cfg.loss]
    weights = {"dpo": 1.0}
    if cfg.sft_weight > 0:
        weights["sft"] = cfg.sft_weight

    def count(batch: Batch) -> dict[str, float]:
        counts = {"dpo": batch["input_ids"].shape[0] / 2}  # pairs
        if "sft" in weights:
            counts["sft"] = float(split_pairs(target_mask(batch["labels"]))[0].sum())
        return counts

    def forward(model: nn.Module, batch: Batch) -> tuple[dict[str, Tensor], dict[str, float]]:
        if reference is None:
            missing = [c for c in REF_COLUMNS if c not in batch]
            if missing:
                raise KeyError(f"dpo.precompute_ref: batch lacks {missing}; run the precompute "
                               "pass (ray_glue/dpo.py) over the data first")
            ref_logps = torch.cat([batch[c].float() for c in REF_COLUMNS])
        else:
            # Reference first: its activations are freed before the policy's graph is built,
            # so the peak holds one forward's activations, not two.
            ref_logps = torch.cat(reference_logps(reference, batch))
        token_logps, mask = _answer_token_logps(model, batch)
        logps = sequence_logprobs(token_logps, mask)  # (2B,) summed over answer tokens
        ref_logps = ref_logps.to(logps)
        if cfg.loss in AVERAGED:
            n_tokens = mask.sum(-1).clamp(min=1)  # (2B,) answer lengths
            logps, ref_logps = logps / n_tokens, ref_logps / n_tokens
        (pc, pr), (rc, rr) = split_pairs(logps), split_pairs(ref_logps)
        loss, metrics = loss_fn(pc, pr, rc, rr, cfg)
        sums = {"dpo": loss * pc.shape[0]}  # every variant is a mean over pairs
        if "sft" in weights:
            sums["sft"] = -split_pairs(token_logps)[0].sum()  # masked positions are already 0
        extra = {k: float(metrics[k]) for k in METRICS}
        extra.update(logps_chosen=float(pc.detach().mean()),
                     logps_rejected=float(pr.detach().mean()))
        return sums, extra

    return Objective(weights=weights, count=count, forward=forward)
