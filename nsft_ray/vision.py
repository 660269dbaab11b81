"""Vision pretraining: the miniature's stand-in for a pretrained vision encoder.

Real VLMs start from a vision encoder pretrained on millions of images (CLIP, SigLIP); the tiny
VLM's tower starts at random. Trained from scratch together with the LM it never learns to check
whether a given colour-shape pair is in the image (README: "What the demo shows"). So, before
any language training, the tower and the connector are trained on ShapesWorld's scene graphs:
every image token that covers a grid cell predicts that cell's shape, colour and size ("empty"
included) through linear heads, and the mean token predicts the background:

    L = CE(shape_cell) + CE(color_cell) + CE(size_cell)   (mean over the 9 cells)  + CE(background)

Only the tower and the connector are saved (the heads are thrown away); the LM is untouched.
Afterwards the demo freezes both (`model.freeze: [vision, connector]`), as LLaVA's stage 2 does.
The image tokens are pooled onto the 3x3 grid, so any tower whose tokens form a square grid
divisible by 3 works (Idefics3 at 96 px: one token per cell; LLaVA: 6x6 tokens, 2x2 per cell).
"""

from __future__ import annotations

import io
import math
import random
import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn
from tqdm import tqdm

from nsft_ray.config import VisionConfig, WorldConfig
from nsft_ray.models import load_vlm, part_module
from nsft_ray.schema import loads_meta
from nsft_ray.world.scene import POSITIONS, Scene

__all__ = ["cell_targets", "image_tokens", "pretrain_vision"]

EMPTY = 0  # class 0 of the shape, colour and size heads: no object in the cell
GRID = 3


def cell_targets(scenes: list[Scene], world: WorldConfig) -> dict[str, Tensor]:
    """Per image: shape, color, size class of each of the 9 cells (0: empty) and background.

    Returns {"shape", "color", "size": (B, 9) long, "background": (B,) long}.
    """
    vocab = {"shape": world.shapes, "color": world.colors, "size": world.sizes}
    out = {k: torch.zeros(len(scenes), len(POSITIONS), dtype=torch.long)
           for k in (*vocab, "pair")}
    background = torch.zeros(len(scenes), dtype=torch.long)
    for i, scene in enumerate(scenes):
        background[i] = world.backgrounds.index(scene.background)
        for o in scene.objects:
            cell = POSITIONS.index(o.position)
            for key, words in vocab.items():
                out[key][i, cell] = words.index(getattr(o, key)) + 1  # 0 is EMPTY
            # The (colour, shape) pair as one class: a conjunction the token must carry on its
            # own, so "is there a red circle?" can match one token instead of two half-matches.
            out["pair"][i, cell] = (world.colors.index(o.color) * len(world.shapes)
                                    + world.shapes.index(o.shape) + 1)
    # Which cell a token covers: an explicit position code for "where is ...?" questions.
    out["cell"] = torch.arange(len(POSITIONS)).expand(len(scenes), -1).clone()
    return {**out, "background": background}


def image_tokens(model: nn.Module, pixels: dict[str, Tensor]) -> Tensor:
    """The image tokens the LM sees (after the connector), pooled onto the grid: (B, 9, D)."""
    feats = model.model.get_image_features(**pixels).pooler_output
    if isinstance(feats, (list, tuple)):  # LLaVA returns one tensor per image
        feats = torch.stack(list(feats))
    b, n, d = feats.shape
    side = math.isqrt(n)
    if side * side != n or side % GRID:
        raise ValueError(f"{n} image tokens per image: vision pretraining needs a square grid "
                         f"whose side is a multiple of {GRID}")
    grid = feats.view(b, side, side, d).permute(0, 3, 1, 2)  # (B, D, side, side)
    pooled = F.adaptive_avg_pool2d(grid, GRID)  # (B, D, 3, 3): one vector per cell
    return pooled.flatten(2).transpose(1, 2)  # (B, 9, D), row-major like POSITIONS


class _Heads(nn.Module):
    """Linear read-outs of the cell tokens; thrown away after pretraining."""

    def __init__(self, dim: int, world: WorldConfig):
        super().__init__()
        self.cell = nn.ModuleDict({
            "shape": nn.Linear(dim, len(world.shapes) + 1),
            "color": nn.Linear(dim, len(world.colors) + 1),
            "size": nn.Linear(dim, len(world.sizes) + 1),
            "pair": nn.Linear(dim, len(world.colors) * len(world.shapes) + 1),
            "cell": nn.Linear(dim, len(POSITIONS)),
        })
        self.background = nn.Linear(dim, len(world.backgrounds))

    def forward(self, tokens: Tensor) -> dict[str, Tensor]:
        logits = {k: head(tokens) for k, head in self.cell.items()}  # (B, 9, C)
        logits["background"] = self.background(tokens.mean(1))  # (B, C)
        return logits


def _loss_and_accuracy(logits: dict[str, Tensor], targets: dict[str, Tensor]
                       ) -> tuple[Tensor, dict[str, float]]:
    loss = torch.zeros(())
    accuracy = {}
    for key, lg in logits.items():
        t = targets[key]
        loss = loss + F.cross_entropy(lg.reshape(-1, lg.shape[-1]), t.reshape(-1))
        accuracy[key] = float((lg.argmax(-1) == t).float().mean())
    return loss, accuracy


def _read_split(world_dir: Path, split: str, limit: int) -> tuple[list[Image.Image], list[Scene]]:
    """The distinct images of a split with their scene graphs (at most `limit`)."""
    table = pq.read_table(world_dir / f"sft_{split}.parquet", columns=["image", "meta"])
    images, scenes, seen = [], [], set()
    for row in table.to_pylist():
        if row["image"] in seen:
            continue
        seen.add(row["image"])
        images.append(Image.open(io.BytesIO(row["image"])).convert("RGB"))
        scenes.append(Scene.from_dict(loads_meta(row["meta"])["scene"]))
        if len(images) == limit:
            break
    return images, scenes


def _pixels(processor: Any, images: list[Image.Image]) -> dict[str, Tensor]:
    # One image per sample (a flat list would be read as one sample holding every image).
    out = processor.image_processor([[im] for im in images], return_tensors="pt")
    return {k: v for k, v in out.items() if k in ("pixel_values", "pixel_attention_mask")}


@torch.no_grad()
def _evaluate(model: nn.Module, heads: _Heads, pixels: dict[str, Tensor],
              targets: dict[str, Tensor]) -> dict[str, float]:
    loss, acc = _loss_and_accuracy(heads(image_tokens(model, pixels)), targets)
    return {"loss": float(loss), **{f"{k}_accuracy": v for k, v in acc.items()}}


def pretrain_vision(model_dir: str | Path, world_dir: str | Path, out: str | Path,
                    cfg: VisionConfig, world: WorldConfig, seed: int = 0) -> dict[str, Any]:
    """Train the tower and connector of `model_dir` on the cells of the world's train images;
    report the read-out accuracy on its val images; save the whole model to `out`."""
    start = time.perf_counter()
    world_dir = Path(world_dir)
    model, processor = load_vlm(model_dir)
    train_images, train_scenes = _read_split(world_dir, "train", cfg.max_images)
    val_images, val_scenes = _read_split(world_dir, "val", cfg.val_images)
    train_pixels = _pixels(processor, train_images)
    train_targets = cell_targets(train_scenes, world)
    val_pixels, val_targets = _pixels(processor, val_images), cell_targets(val_scenes, world)

    torch.manual_seed(seed)
    dim = model.config.text_config.hidden_size
    heads = _Heads(dim, world)
    trained = [p for part in ("vision", "connector") for p in part_module(model, part).parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    for p in trained:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(trained + list(heads.parameters()), lr=cfg.lr, weight_decay=0.0)
    rng = random.Random(seed)
    order: list[int] = []
    model.train()
    for _ in tqdm(range(cfg.steps), desc="vision pretraining", unit="step"):
        if len(order) < cfg.batch_size:
            order += rng.sample(range(len(train_images)), len(train_images))
        idx, order = order[:cfg.batch_size], order[cfg.batch_size:]
        pixels = {k: v[idx] for k, v in train_pixels.items()}
        loss, _ = _loss_and_accuracy(heads(image_tokens(model, pixels)),
                                     {k: v[idx] for k, v in train_targets.items()})
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    for p in model.parameters():
        p.requires_grad_(True)
    summary = {"steps": cfg.steps, "train_images": len(train_images),
               "val": _evaluate(model, heads, val_pixels, val_targets),
               "seconds": round(time.perf_counter() - start, 1)}
    out = Path(out)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return summary

