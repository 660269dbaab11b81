"""nsft: continual SFT with negative supervision (Zhu et al., CVPR 2025).

    L = L_sft(chosen) + lam * L_sft(G(rejected; chosen, codebook))   [+ kl_coef * KL(pi || pi_ref)]

G, the constructor (``nsft_ray.negatives``), turned every rejected answer into corrective
conversations about the same image whose answers are correct, so both terms are plain SFT losses:
each is a token mean over its own conversations in the optimizer step. ``use_chosen=False`` gives
the paper's "without chosen" variant (lam * negatives only). The optional KL term is a per-token
estimate (k3 by default) on the same tokens against a frozen reference copy of the starting
model; only then are two models resident, otherwise one — against two for DPO and four for PPO.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from nsft_ray.algorithms.sft import answer_logprobs, model_inputs
from nsft_ray.config import NSFTConfig
from nsft_ray.logprobs import target_mask
from nsft_ray.loop import Batch, Objective
from nsft_ray.losses import kl_k3

__all__ = ["models_resident", "nsft_objective"]


def models_resident(cfg: NSFTConfig) -> int:
    return 2 if cfg.kl_coef > 0 else 1


def _term_masks(batch: Batch) -> dict[str, Tensor]:
    """(B, T-1) masks of trained tokens, split by conversation origin."""
    mask = target_mask(batch["labels"])
    negative = batch["is_negative"].bool()
    # (B,): one flag per row; (R, T): packed rows flag each token, aligned here with its target.
    negative = negative.unsqueeze(1) if negative.dim() == 1 else negative[:, 1:]
    return {"chosen": mask & ~negative, "negative": mask & negative}


def nsft_objective(cfg: NSFTConfig, reference: nn.Module | None = None) -> Objective:
    """Build the objective; `reference` (frozen, eval mode) is required when cfg.kl_coef > 0."""
    if cfg.kl_coef > 0 and reference is None:
        raise ValueError("nsft.kl_coef > 0 needs a frozen reference model")
    weights = {"negative": cfg.lam}
    if cfg.use_chosen:
        weights["chosen"] = 1.0
    if cfg.kl_coef > 0:
        weights["kl"] = cfg.kl_coef

    def count(batch: Batch) -> dict[str, float]:
        masks = _term_masks(batch)
        counts = {k: float(masks[k].sum()) for k in ("chosen", "negative") if k in weights}
        if "kl" in weights:
            counts["kl"] = float(target_mask(batch["labels"]).sum())
        return counts

    def forward(model: nn.Module, batch: Batch) -> tuple[dict[str, Tensor], dict[str, float]]:
        inputs = model_inputs(batch)
        logps = answer_logprobs(model, batch, inputs)  # (B, T-1)
        masks = _term_masks(batch)
        sums = {k: -(logps * masks[k]).sum() for k in ("chosen", "negative") if k in weights}
        extra: dict[str, float] = {}
        if "kl" in weights:
            with torch.no_grad():
                ref_logps = answer_logprobs(reference, batch, inputs)
            mask = target_mask(batch["labels"])
            sums["kl"] = (kl_k3(logps, ref_logps) * mask).sum()
        return sums, extra

    return Objective(weights=weights, count=count, forward=forward)
