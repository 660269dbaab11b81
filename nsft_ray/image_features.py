"""Image features computed once per image when the vision tower and the connector are frozen.

With `model.freeze: [vision, connector]` nothing that turns pixels into the language model's image
embeddings ever changes, so the features of an image are the same at every step, epoch and
conversation that shows it. :class:`ImageFeatureCache` computes them once per image, keyed by a
hash of the exact pixel tensors the model would see, and passes them through transformers' own
`mm_encoder_outputs` argument (Idefics3, LLaVA), which skips the vision tower and the connector.
Exact: the loss and every trainable gradient equal the uncached forward's
(tests/test_image_features.py).

    objective = with_cached_image_features(objective, ImageFeatureCache(model))

Memory: one (image tokens, hidden) tensor per distinct image, on the model's device.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import replace

import torch
from torch import Tensor, nn
from transformers.modeling_outputs import BaseModelOutputWithPooling

from nsft_ray.loop import Batch, Objective

__all__ = ["ImageFeatureCache", "with_cached_image_features", "features_are_frozen"]

# Batch keys holding an Idefics3 / LLaVA image; replaced by `mm_encoder_outputs` when cached.
PIXEL_KEYS = ("pixel_values", "pixel_attention_mask")
SUPPORTED = ("idefics3", "llava")  # model types whose forward takes `mm_encoder_outputs`


def features_are_frozen(model: nn.Module) -> bool:
    """True when no parameter of the vision tower or the connector takes a gradient."""
    from nsft_ray.models import part_module

    return not any(p.requires_grad for part in ("vision", "connector")
                   for p in part_module(model, part).parameters())


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)  # DDP / DeepSpeed keep the bare model in .module


class ImageFeatureCache:
    """Per-image features of a frozen vision tower + connector, computed on first sight.

    inference=True is for a model that only answers (evaluation, scoring): under no_grad in
    eval mode an image's features never change, so neither the freeze nor the dropout check
    applies. max_bytes bounds the cache (least recently used images go first); None: no bound.
    """

    def __init__(self, model: nn.Module, *, inference: bool = False,
                 max_bytes: int | None = None):
        model = _unwrap(model)
        self.model_type = model.config.model_type
        self._features: OrderedDict[bytes, Tensor] = OrderedDict()
        self._bytes, self.max_bytes = 0, max_bytes
        self.hits = 0
        self.misses = 0
        if self.model_type not in SUPPORTED:
            raise ValueError(f"train.cache_image_features: {self.model_type!r} models are not "
                             "supported (expected idefics3 or llava)")
        if not inference:
            self._check_deterministic(model)

    @staticmethod
    def _check_deterministic(model: nn.Module) -> None:
        if not features_are_frozen(model):
            raise ValueError("train.cache_image_features needs model.freeze: [vision, connector] "
                             "(trained image features change every step)")
        from nsft_ray.models import part_module

        # A dropout that is on in train mode would make the uncached features random: caching
        # one draw would not be the same training.
        for part in ("vision", "connector"):
            for m in part_module(model, part).modules():
                if isinstance(m, nn.Dropout) and m.p > 0:
                    raise ValueError(f"train.cache_image_features: the {part} part has dropout "
                                     f"p={m.p}; its features are not deterministic")
        vision_cfg = getattr(model.config, "vision_config", None)
        if getattr(vision_cfg, "attention_dropout", 0.0):
            raise ValueError("train.cache_image_features: vision_config.attention_dropout="
                             f"{vision_cfg.attention_dropout}; its features are not deterministic")

    def __len__(self) -> int:
        return len(self._features)

    def attach(self, model: nn.Module, batch: Batch) -> Batch:
        """`batch` without its pixel tensors, with `mm_encoder_outputs` holding their features."""
        if "pixel_values" not in batch:
            return batch
        images = self._images(batch)  # the real images, in the order the model scatters them
        keys = [_key(image) for image in images]
        first = {k: i for i, k in reversed(list(enumerate(keys)))}  # one compute per new image
        missing = [i for k, i in first.items() if k not in self._features]
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        found: dict[bytes, Tensor] = {k: self._features[k] for k in first if k in self._features}
        if missing:
            with torch.no_grad():  # frozen: no gradient would reach these parameters anyway
                new = self._compute(_unwrap(model), [images[i] for i in missing])
            found.update((keys[i], f) for i, f in zip(missing, new, strict=True))
        for k in first:  # after the lookup, so an eviction cannot lose this batch's features
            self._keep(k, found[k])
        features = [found[k] for k in keys]
        # Idefics3 scatters one (n_images, tokens, hidden) tensor; LLaVA concatenates a list.
        pooled = torch.stack(features) if self.model_type == "idefics3" else features
        out = {k: v for k, v in batch.items() if k not in PIXEL_KEYS}
        out["mm_encoder_outputs"] = {"image": BaseModelOutputWithPooling(pooler_output=pooled)}
        return out

    def _keep(self, key: bytes, features: Tensor) -> None:
        """Store (or refresh) one image's features; evict the least recently used past
        max_bytes."""
        if key in self._features:
            self._features.move_to_end(key)
            return
        self._features[key] = features
        self._bytes += features.numel() * features.element_size()
        while self.max_bytes is not None and self._bytes > self.max_bytes and self._features:
            _, old = self._features.popitem(last=False)
            self._bytes -= old.numel() * old.element_size()

    def _images(self, batch: Batch) -> list[dict[str, Tensor]]:
        """One dict of pixel tensors per real image, row-major (the image-token order)."""
        pixels = batch["pixel_values"]
        if self.model_type == "llava":  # (B, 3, H, W): one image per row
            return [{"pixel_values": p} for p in pixels]
        masks = batch.get("pixel_attention_mask")  # Idefics3: (B, N, 3, H, W), (B, N, H, W)
        flat = pixels.flatten(0, 1)
        flat_masks = None if masks is None else masks.flatten(0, 1)
        # Padding images are all zeros; Idefics3's get_image_features drops them the same way.
        real = (flat != 0).flatten(1).any(1)
        return [{"pixel_values": flat[i]} if flat_masks is None
                else {"pixel_values": flat[i], "pixel_attention_mask": flat_masks[i]}
                for i in real.nonzero().flatten().tolist()]

    def _compute(self, model: nn.Module, images: list[dict[str, Tensor]]) -> list[Tensor]:
        """Features of `images` through the model's own get_image_features, one per image."""
        stacked = {k: torch.stack([im[k] for im in images]) for k in images[0]}
        if self.model_type == "idefics3":
            masks = stacked.get("pixel_attention_mask")
            out = model.model.get_image_features(  # expects (B, N, ...): one row of N images
                stacked["pixel_values"].unsqueeze(0),
                None if masks is None else masks.unsqueeze(0), return_dict=True)
            return list(out.pooler_output.unbind(0))
        cfg = model.config
        out = model.model.get_image_features(
            pixel_values=stacked["pixel_values"], vision_feature_layer=cfg.vision_feature_layer,
            vision_feature_select_strategy=cfg.vision_feature_select_strategy, return_dict=True)
        return list(out.pooler_output)


def _key(image: dict[str, Tensor]) -> bytes:
    """Content hash of one image's pixel tensors (shape and dtype included)."""
    h = hashlib.blake2b(digest_size=16)
    for name in sorted(image):
        t = image[name].detach().contiguous().cpu()
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes())  # raw bytes, any dtype
    return h.digest()


def with_cached_image_features(objective: Objective, cache: ImageFeatureCache) -> Objective:
    """`objective` whose forward sees cached image features instead of pixels."""
    return replace(objective, forward=lambda model, b: objective.forward(model,
                                                                         cache.attach(model, b)))
