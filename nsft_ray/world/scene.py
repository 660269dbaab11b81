"""ShapesWorld scene graphs: up to nine coloured shapes on a 3x3 grid over a patterned background.

Constraints (so every referring expression names exactly one object): at most one object per
grid cell, and each (color, shape) pair at most once per scene.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from typing import Any

from nsft_ray.config import WorldConfig

__all__ = ["POSITIONS", "Obj", "Scene", "sample_scene", "split_of"]

# Row-major names of the 3x3 grid cells; the index is row * 3 + column.
POSITIONS = (
    "top left", "top", "top right",
    "left", "center", "right",
    "bottom left", "bottom", "bottom right",
)
# Of every SPLIT_BUCKETS scenes (by hash), one belongs to eval, one to val, the rest to train.
SPLIT_BUCKETS = 10


@dataclass(frozen=True)
class Obj:
    shape: str
    color: str
    size: str
    position: str

    def to_dict(self) -> dict[str, str]:
        return {"shape": self.shape, "color": self.color, "size": self.size,
                "position": self.position}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Obj:
        missing = [k for k in ("shape", "color", "size", "position") if k not in d]
        if missing:
            raise ValueError(f"scene object {d!r}: missing key {missing[0]!r}")
        return cls(d["shape"], d["color"], d["size"], d["position"])


@dataclass(frozen=True)
class Scene:
    """A background style and objects, kept sorted in reading order of their cells."""

    background: str
    objects: tuple[Obj, ...]

    def __post_init__(self) -> None:
        for o in self.objects:
            if o.position not in POSITIONS:
                raise ValueError(f"object {o}: position must be one of {POSITIONS}")
        cells = [o.position for o in self.objects]
        if len(set(cells)) != len(cells):
            raise ValueError(f"scene {self.objects}: two objects share a grid cell")
        pairs = [(o.color, o.shape) for o in self.objects]
        if len(set(pairs)) != len(pairs):
            raise ValueError(f"scene {self.objects}: a (color, shape) pair occurs twice")
        # Canonical order: equal scenes compare, hash and caption identically.
        ordered = tuple(sorted(self.objects, key=lambda o: POSITIONS.index(o.position)))
        object.__setattr__(self, "objects", ordered)

    def count(self, shape: str) -> int:
        return sum(o.shape == shape for o in self.objects)

    def at(self, position: str) -> Obj | None:
        return next((o for o in self.objects if o.position == position), None)

    def find(self, shape: str, color: str) -> Obj | None:
        return next((o for o in self.objects if (o.shape, o.color) == (shape, color)), None)

    def to_dict(self) -> dict[str, Any]:
        return {"background": self.background, "objects": [o.to_dict() for o in self.objects]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Scene:
        if "background" not in d or "objects" not in d:
            raise ValueError(f"scene {d!r}: expected keys 'background' and 'objects'")
        return cls(d["background"], tuple(Obj.from_dict(o) for o in d["objects"]))

    def key(self) -> str:
        """Canonical JSON text of the scene (hashing, split assignment)."""
        return json.dumps(self.to_dict(), sort_keys=True)


def sample_scene(rng: random.Random, cfg: WorldConfig) -> Scene:
    """Draw a scene with cfg.min_objects..cfg.max_objects objects (capped by the grid)."""
    most = min(cfg.max_objects, len(POSITIONS), len(cfg.shapes) * len(cfg.colors))
    if not 1 <= cfg.min_objects <= most:
        raise ValueError(
            f"world.min_objects={cfg.min_objects}: expected 1..{most} "
            f"(world.max_objects={cfg.max_objects}, 9 grid cells, shapes x colors pairs)"
        )
    n = rng.randint(cfg.min_objects, most)
    pairs = rng.sample([(c, s) for s in cfg.shapes for c in cfg.colors], n)
    cells = rng.sample(POSITIONS, n)
    objs = [Obj(s, c, rng.choice(cfg.sizes), p) for (c, s), p in zip(pairs, cells, strict=True)]
    return Scene(rng.choice(cfg.backgrounds), tuple(objs))


def split_of(scene: Scene) -> str:
    """'train', 'val' or 'eval', fixed by the scene's content, so no two splits share a scene."""
    digest = hashlib.sha256(scene.key().encode()).digest()
    bucket = int.from_bytes(digest[:8], "big") % SPLIT_BUCKETS
    return {0: "eval", 1: "val"}.get(bucket, "train")
