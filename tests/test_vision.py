"""Vision pretraining: targets from scene graphs, token-to-cell layout, and a short real run."""

from __future__ import annotations

import torch
from safetensors.torch import load_file

from nsft_ray.config import VisionConfig, WorldConfig
from nsft_ray.models import build_tiny_vlm, load_vlm
from nsft_ray.vision import _pixels, cell_targets, image_tokens, pretrain_vision
from nsft_ray.world import corpus, render, write_world
from nsft_ray.world.scene import POSITIONS, Obj, Scene

WORLD = WorldConfig(n_train=96, n_val=32, n_eval=4, image_size=96, max_objects=4)


def test_cell_targets_by_hand():
    """Fails if a cell's classes are shifted (0 must mean empty), or cells are not row-major."""
    scene = Scene("dotted", (Obj("star", "blue", "large", "top right"),
                             Obj("circle", "red", "small", "bottom left")))
    t = cell_targets([scene], WORLD)
    # shapes (circle, square, triangle, star) -> 1..4; colours red..orange -> 1..6; sizes 1..2
    assert t["shape"].tolist() == [[0, 0, 4, 0, 0, 0, 1, 0, 0]]
    assert t["color"].tolist() == [[0, 0, 3, 0, 0, 0, 1, 0, 0]]
    assert t["size"].tolist() == [[0, 0, 2, 0, 0, 0, 1, 0, 0]]
    assert t["background"].tolist() == [2]  # plain, striped, dotted, checkered
    # the (colour, shape) pair as one class: colour index * 4 shapes + shape index + 1
    assert t["pair"].tolist() == [[0, 0, 2 * 4 + 3 + 1, 0, 0, 0, 1, 0, 0]]
    assert t["cell"].tolist() == [list(range(9))]


def test_image_tokens_follow_the_grid(tmp_path):
    """Fails if the pooled tokens are not in POSITIONS' row-major order: at random init the
    token that changes most when one object is drawn is the one over that object's cell."""
    path = build_tiny_vlm(tmp_path / "m", corpus(WORLD, n=50, seed=0), image_size=96)
    model, processor = load_vlm(path)
    empty = render(Scene("plain", ()), 96)
    images = [empty] + [render(Scene("plain", (Obj("square", "red", "large", p),)), 96)
                        for p in POSITIONS]
    with torch.no_grad():
        tokens = image_tokens(model, _pixels(processor, images))  # (10, 9, D)
    change = (tokens[1:] - tokens[:1]).norm(dim=-1)  # (9 images, 9 cells)
    assert change.argmax(dim=1).tolist() == list(range(9))


def test_pretrain_vision_learns_cells_and_touches_only_the_tower(tmp_path):
    """Fails if the read-out does not beat 'every cell empty' on val, if the LM's weights move
    (only the tower and the connector may train), or if the tower is saved unchanged."""
    write_world(WORLD, tmp_path / "w", seed=0)
    init = build_tiny_vlm(tmp_path / "init", corpus(WORLD, n=100, seed=0), image_size=96)
    summary = pretrain_vision(init, tmp_path / "w", tmp_path / "v",
                              VisionConfig(steps=50, lr=3e-3, batch_size=16), WORLD)
    val = summary["val"]
    assert summary["train_images"] == 96
    # About 2.5 of 9 cells hold an object: "all empty" scores ~0.72 on shape and colour.
    assert val["shape_accuracy"] > 0.85 and val["color_accuracy"] > 0.85, val
    before, after = (load_file(p / "model.safetensors") for p in (init, tmp_path / "v"))
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved and all(k.startswith(("model.vision_model.", "model.connector.")) for k in moved)
    assert any(k.startswith("model.connector.") for k in moved)
