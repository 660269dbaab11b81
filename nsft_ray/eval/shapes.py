"""Attribute, count, position and scene questions about ShapesWorld images, judged by world.check.

One question of each kind per image, drawn with the world's own sampler and templates
("What color is the circle at the top left?", "How many stars are there?" — the shape asked
about may be absent: "There are no stars."). An answer is correct when

- the value it states for the question (read in the question's context, as a short answer is:
  the first colour / size / number / position / background word) is true, and
- the full text commits no error kind against the scene graph (extra false claims count).
Text that states no value at all is wrong.
"""

from __future__ import annotations

import random
from dataclasses import replace

from nsft_ray.config import WorldConfig
from nsft_ray.negatives.claims import Vocabulary
from nsft_ray.stats import binomial_se
from nsft_ray.world.check import answer_errors
from nsft_ray.world.language import Question, sample_question
from nsft_ray.world.scene import Scene

__all__ = ["KINDS", "GROUPS", "shape_questions", "judge", "group_accuracies"]

KINDS = ("color", "size", "count", "position", "scene")
# Result key -> the question kinds it averages over.
GROUPS = {
    "attribute_accuracy": ("color", "size"),
    "count_accuracy": ("count",),
    "position_accuracy": ("position",),
    "scene_accuracy": ("scene",),
}


def shape_questions(
    scene: Scene, rng: random.Random, world: WorldConfig, short: bool = False
) -> list[Question]:
    """One question of each kind in KINDS about `scene`."""
    return [sample_question(scene, rng, world, kind, short) for kind in KINDS]


def judge(q: Question, text: str, scene: Scene, vocab: Vocabulary) -> bool:
    """True when `text` answers `q` correctly (see the module docstring)."""
    asked = answer_errors(replace(q, short=True), text, scene, vocab)
    return asked == [] and answer_errors(q, text, scene, vocab) in ([], None)


def group_accuracies(results: list[tuple[str, bool]]) -> dict[str, float | None]:
    """(kind, correct) pairs -> {group key: accuracy, group key + "_se": its binomial standard
    error}; None for a group without questions."""
    out: dict[str, float | None] = {}
    for key, kinds in GROUPS.items():
        hits = [ok for kind, ok in results if kind in kinds]
        out[key] = sum(hits) / len(hits) if hits else None
        out[f"{key}_se"] = binomial_se(out[key], len(hits)) if hits else None
    return out
