"""train.cache_image_features: a frozen tower + connector's features, computed once per image.

Oracle: the same objective through the model's own forward on pixels (no cache), on the same
weights. Losses and every trainable gradient must agree to 1e-5.
"""

from __future__ import annotations

import io
import os

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"

import torch  # noqa: E402
from PIL import Image  # noqa: E402

from nsft_ray.algorithms import ALGORITHMS, conversation_collate  # noqa: E402
from nsft_ray.algorithms.nsft import nsft_objective  # noqa: E402
from nsft_ray.config import Config, ModelConfig, NSFTConfig, TrainConfig  # noqa: E402
from nsft_ray.image_features import ImageFeatureCache, with_cached_image_features  # noqa: E402
from nsft_ray.models import build_tiny_vlm, freeze, load_vlm  # noqa: E402

CORPUS = ["Is there a red circle in the picture?", "Yes, there is a red circle.",
          "No, there is no blue star.", "There are two squares."] * 30
QA = [{"role": "user", "content": "Is there a red circle in the picture?"},
      {"role": "assistant", "content": "Yes, there is a red circle."}]
NO = [{"role": "user", "content": "Is there a blue star?"},
      {"role": "assistant", "content": "No, there is no blue star."}]


def png(color: str) -> bytes:
    buf = io.BytesIO()
    img = Image.new("RGB", (64, 64), color)
    img.paste((255, 255, 255), (8, 8, 30, 30))  # some structure, not a flat colour
    img.save(buf, format="PNG")
    return buf.getvalue()


def rows(colors: list[str]) -> dict:
    """Columns of conversation rows; odd rows are negatives (nSFT's second term)."""
    return {"id": [f"r{i}" for i in range(len(colors))], "image": [png(c) for c in colors],
            "messages": [QA if i % 2 == 0 else NO for i in range(len(colors))],
            "origin": ["chosen" if i % 2 == 0 else "negative" for i in range(len(colors))]}


@pytest.fixture(scope="module", params=["idefics3", "llava"])
def tiny(request, tmp_path_factory):
    path = build_tiny_vlm(tmp_path_factory.mktemp(request.param) / "m", CORPUS, arch=request.param)
    model, processor = load_vlm(path)
    freeze(model, ("vision", "connector"))
    cfg = Config(model=ModelConfig(freeze=("vision", "connector")),
                 train=TrainConfig(max_length=128))
    return model.train(), processor, cfg


def loss_and_grads(model, objective, batch) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    counts = objective.count(batch)
    sums, _ = objective.forward(model, batch)
    loss = sum(objective.weights[k] * sums[k] / max(counts[k], 1.0) for k in sums)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return float(loss.detach()), grads


def assert_same(a, b):
    assert a[0] == pytest.approx(b[0], abs=1e-5)
    assert set(a[1]) == set(b[1])
    for name in a[1]:
        torch.testing.assert_close(a[1][name], b[1][name], atol=1e-5, rtol=1e-5, msg=name)


def test_cached_features_give_the_uncached_loss_and_gradients(tiny):
    """Fails if the cached path changes the loss or any trainable gradient (wrong scatter order,
    features of a padding image, a graph kept through the frozen tower), on the first epoch
    (features computed) and the second (features reused)."""
    model, processor, cfg = tiny
    batch = conversation_collate(processor, cfg)(rows(["red", "blue", "red", "green"]))
    objective = nsft_objective(NSFTConfig(lam=0.7))
    cache = ImageFeatureCache(model)
    cached = with_cached_image_features(objective, cache)
    expected = loss_and_grads(model, objective, batch)
    assert_same(loss_and_grads(model, cached, batch), expected)
    assert (cache.misses, cache.hits, len(cache)) == (3, 1, 3)  # red is shown twice
    assert_same(loss_and_grads(model, cached, batch), expected)
    assert (cache.misses, cache.hits) == (3, 5)


def test_cache_never_returns_another_images_features(tiny):
    """Fails if the cache is keyed by anything but the image's content (row position, shape,
    conversation): after seeing red, a batch of the same conversations about blue must get
    blue's features, which give another loss than red's."""
    model, processor, cfg = tiny
    collate = conversation_collate(processor, cfg)
    red, blue = collate(rows(["red", "red"])), collate(rows(["blue", "blue"]))
    objective = nsft_objective(NSFTConfig())
    cached = with_cached_image_features(objective, ImageFeatureCache(model))
    loss_red = loss_and_grads(model, objective, red)
    loss_blue = loss_and_grads(model, objective, blue)
    assert abs(loss_red[0] - loss_blue[0]) > 1e-4  # the two images are distinguishable at all
    assert_same(loss_and_grads(model, cached, red), loss_red)
    assert_same(loss_and_grads(model, cached, blue), loss_blue)


def test_a_bounded_cache_evicts_the_least_recently_used_image(tiny):
    """Fails if max_bytes is ignored (the evaluation's cache would grow with every image), if
    eviction drops the image just used rather than the oldest, or if an evicted image comes back
    with another image's features."""
    model, processor, cfg = tiny
    collate = conversation_collate(processor, cfg)
    objective = nsft_objective(NSFTConfig())
    red, blue, green = (collate(rows([c, c])) for c in ("red", "blue", "green"))
    one = ImageFeatureCache(model)
    loss_and_grads(model, with_cached_image_features(objective, one), red)
    size = next(iter(one._features.values()))
    cache = ImageFeatureCache(model, inference=True,
                              max_bytes=2 * size.numel() * size.element_size())
    cached = with_cached_image_features(objective, cache)
    for batch in (red, blue, red, green):  # red is used again, so blue is the oldest
        loss_and_grads(model, cached, batch)
    assert (len(cache), cache.misses, cache.hits) == (2, 3, 5)
    assert_same(loss_and_grads(model, cached, red), loss_and_grads(model, objective, red))
    assert (cache.misses, cache.hits) == (3, 7)  # red was kept
    assert_same(loss_and_grads(model, cached, blue), loss_and_grads(model, objective, blue))
    assert cache.misses == 4  # blue was evicted, and recomputed as blue


def test_config_turns_the_cache_on_only_when_both_parts_are_frozen(tiny):
    """Fails if a trained tower gets cached (stale) features, or if the frozen config forgets it."""
    model, processor, cfg = tiny
    batch = conversation_collate(processor, cfg)(rows(["red", "blue"]))
    spec = ALGORITHMS["nsft"]
    assert_same(loss_and_grads(model, spec.objective(cfg, model, "cpu"), batch),
                loss_and_grads(model, nsft_objective(NSFTConfig()), batch))
    seen = []
    real = ImageFeatureCache.attach
    for c, expect in ((cfg, 1), (Config(model=ModelConfig(freeze=("vision",))), 0),
                      (Config(model=ModelConfig(freeze=("vision", "connector")),
                              train=TrainConfig(cache_image_features=False)), 0)):
        seen.clear()
        ImageFeatureCache.attach = lambda self, m, b: seen.append(1) or real(self, m, b)
        try:
            spec.objective(c, model, "cpu").forward(model, batch)
        finally:
            ImageFeatureCache.attach = real
        assert len(seen) == expect, c.model.freeze


def test_a_trained_tower_is_refused(tmp_path):
    model, _ = load_vlm(build_tiny_vlm(tmp_path / "m", CORPUS))
    freeze(model, ("vision",))
    with pytest.raises(ValueError, match=r"needs model.freeze: \[vision, connector\]"):
        ImageFeatureCache(model)
