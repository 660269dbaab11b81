"""One file per algorithm; each builds a `loop.Objective` and says which models it holds.

`ALGORITHMS` is the one visible dispatch table the trainers, the CLI and the comparison use. An
entry says how to build the trained module and its objective, how many models are resident,
which rows it trains on, how rows become tensors, and how the trained module is exported.
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nsft_ray.algorithms.dpo import dpo_objective
from nsft_ray.algorithms.dpo import models_resident as dpo_models_resident
from nsft_ray.algorithms.nsft import models_resident as nsft_models_resident
from nsft_ray.algorithms.nsft import nsft_objective
from nsft_ray.algorithms.reward import load_reward_model, reward_objective, save_reward_model
from nsft_ray.algorithms.sft import sft_objective
from nsft_ray.config import Config
from nsft_ray.loop import Objective

__all__ = ["ALGORITHMS", "AlgorithmSpec", "conversation_collate", "frozen", "frozen_copy",
           "image_features_cached", "load_policy", "preference_collate", "save_policy"]


def frozen(model: nn.Module) -> nn.Module:
    """`model` itself, frozen: eval mode, no parameter takes a gradient (a reference, a reward)."""
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def frozen_copy(model: nn.Module) -> nn.Module:
    """A frozen reference copy of `model` in eval mode (the second resident model)."""
    return frozen(copy.deepcopy(model))


def load_policy(cfg: Config) -> tuple[nn.Module, Any]:
    from nsft_ray.models import freeze, load_vlm

    model, processor = load_vlm(cfg.model.name_or_path, dtype=cfg.model.dtype,
                                attn_implementation=cfg.model.attn_implementation)
    freeze(model, cfg.model.freeze)
    return model, processor


def save_policy(module: nn.Module, processor: Any, out: Path, state_dict: dict | None) -> None:
    module.save_pretrained(out, state_dict=state_dict)
    processor.save_pretrained(out)


def conversation_collate(processor: Any, cfg: Config) -> Callable[[dict], dict]:
    """Conversation rows -> padded (or packed: train.pack_tokens) tensors with assistant-only
    labels and an `is_negative` flag per row (B,), or per token (R, T) when packed."""
    from nsft_ray.collate import Collator

    collator = Collator(processor, cfg.train.max_length, cache=cfg.train.cache_encoded,
                        pack_tokens=pack_budget(cfg))

    def collate(batch: dict) -> dict:
        out = collator(batch)
        negative = torch.tensor([o == "negative" for o in batch["origin"]])  # (B,)
        if "sequence_ids" in out:  # packed rows: flag each token by its conversation
            ids = out["sequence_ids"]  # (R, T), -1 on padding
            negative = negative[ids.clamp(min=0)] & (ids >= 0)
        out["is_negative"] = negative
        return out

    return collate


def preference_collate(processor: Any, cfg: Config) -> Callable[[dict], dict]:
    """Preference rows -> 2B stacked chosen/rejected sequences (+ precomputed reference logps),
    packed into padding-free rows with train.pack_tokens."""
    from nsft_ray.preference_collate import PreferenceCollator

    return PreferenceCollator(processor, cfg.train.max_length, pack_budget(cfg))


def pack_budget(cfg: Config) -> int:
    """train.pack_tokens as the collators apply it. Flash attention kernels find packed
    sequences from their restarting position_ids only in a batch of ONE row (transformers'
    `_is_packed_sequence`); given several rows they would attend across the sequences of each.
    So under them a micro-batch packs into a single row, however long."""
    from transformers.utils.generic import is_flash_attention_requested

    if cfg.train.pack_tokens and is_flash_attention_requested(
            requested_attention_implementation=cfg.model.attn_implementation or None):
        return sys.maxsize
    return cfg.train.pack_tokens


def image_features_cached(cfg: Config) -> bool:
    """train.cache_image_features applies: the parts that make image features are frozen."""
    return cfg.train.cache_image_features and {"vision", "connector"} <= set(cfg.model.freeze)


def _cached(cfg: Config, model: nn.Module, objective: Objective) -> Objective:
    """`objective`, fed each image's features computed once when nothing that makes them trains.

    A frozen reference (dpo, nsft's KL) is a copy of the same frozen tower, so it is fed the same
    features."""
    if not image_features_cached(cfg):
        return objective
    from nsft_ray.image_features import ImageFeatureCache, with_cached_image_features

    return with_cached_image_features(objective, ImageFeatureCache(model))


def _sft(cfg: Config, model: nn.Module, device: torch.device) -> Objective:
    return _cached(cfg, model, sft_objective())


def _dpo(cfg: Config, model: nn.Module, device: torch.device) -> Objective:
    reference = None if cfg.dpo.precompute_ref else frozen_copy(model).to(device)
    return _cached(cfg, model, dpo_objective(cfg.dpo, reference))


def _nsft(cfg: Config, model: nn.Module, device: torch.device) -> Objective:
    reference = frozen_copy(model).to(device) if cfg.nsft.kl_coef > 0 else None
    return _cached(cfg, model, nsft_objective(cfg.nsft, reference))


@dataclass(frozen=True)
class AlgorithmSpec:
    objective: Callable[[Config, nn.Module, torch.device], Objective]
    models_resident: Callable[[Config], int]
    # Conversation origins it trains on by default; None: it trains on preference rows.
    origins: Callable[[Config], tuple[str, ...] | None]
    collate: Callable[[Any, Config], Callable[[dict], dict]] = conversation_collate
    load: Callable[[Config], tuple[nn.Module, Any]] = load_policy
    save: Callable[[nn.Module, Any, Path, dict | None], None] = save_policy
    extra: dict = field(default_factory=dict)


ALGORITHMS: dict[str, AlgorithmSpec] = {
    "sft": AlgorithmSpec(
        objective=_sft,
        models_resident=lambda cfg: 1,
        origins=lambda cfg: ("sft", "chosen"),
    ),
    "nsft": AlgorithmSpec(
        objective=_nsft,
        models_resident=lambda cfg: nsft_models_resident(cfg.nsft),
        origins=lambda cfg: ("chosen", "negative") if cfg.nsft.use_chosen else ("negative",),
    ),
    "dpo": AlgorithmSpec(
        objective=_dpo,
        models_resident=lambda cfg: dpo_models_resident(cfg.dpo),
        origins=lambda cfg: None,
        collate=preference_collate,
    ),
    "reward": AlgorithmSpec(
        objective=lambda cfg, model, device: reward_objective(),
        models_resident=lambda cfg: 1,
        origins=lambda cfg: None,
        collate=preference_collate,
        load=load_reward_model,
        save=save_reward_model,
    ),
}
