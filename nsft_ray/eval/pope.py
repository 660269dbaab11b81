"""POPE-style object-existence probes from scene graphs (Li et al., EMNLP 2023).

Per image: k present objects ("Is there a red circle in the picture?", answer yes) and, for each
setting, k absent (colour, shape) combinations (answer no), k = min(per_image, present, absent):

- random:      any absent combination, uniformly.
- popular:     the absent combinations most frequent across the evaluated images.
- adversarial: the absent combinations most similar to what is present: ranked first by how many
               present objects share their shape or colour ("a blue circle" beside a red circle
               and a blue square), then by how often they co-occur with the present combinations
               in the evaluated images. (ShapesWorld draws objects independently, so co-occurrence
               alone is near-uniform; shared shape/colour is the confusable signal.)

Ties are broken by a seeded random order, so the probes are a pure function of (scenes, seed).
A present object is never sampled as a negative. Metrics follow POPE: accuracy, precision,
recall, F1 and yes-ratio, with "yes" as the positive class; plus balanced accuracy (mean of the
recall on yes and on no), binomial standard errors, and the threshold-free AUROC of a yes-minus-no
score (pope_metrics).
"""

from __future__ import annotations

import math
import random
import re
from collections import Counter
from dataclasses import dataclass

from nsft_ray.stats import auroc, binomial_se, hanley_mcneil_se
from nsft_ray.world.language import similarity
from nsft_ray.world.scene import Scene

__all__ = ["SETTINGS", "PopeItem", "object_stats", "pope_items", "parse_yes_no", "yes_no_metrics",
           "pope_metrics"]

SETTINGS = ("random", "popular", "adversarial")
Combo = tuple[str, str]  # (color, shape)


@dataclass(frozen=True)
class PopeItem:
    """One existence probe; `settings` lists the POPE settings it belongs to (shared positives)."""

    color: str
    shape: str
    label: bool  # True: the object is in the image
    settings: tuple[str, ...]


def object_stats(scenes: list[Scene]) -> tuple[Counter, Counter]:
    """(frequency of each combo, co-occurrence count of each ordered pair of combos)."""
    freq: Counter = Counter()
    cooc: Counter = Counter()
    for scene in scenes:
        combos = [(o.color, o.shape) for o in scene.objects]
        freq.update(combos)
        cooc.update((a, b) for a in combos for b in combos if a != b)
    return freq, cooc


def _negatives(
    scene: Scene, setting: str, k: int, absent: list[Combo], rng: random.Random,
    freq: Counter, cooc: Counter,
) -> list[Combo]:
    order = {c: rng.random() for c in absent}  # the seeded tie-break
    present = [(o.color, o.shape) for o in scene.objects]
    if setting == "random":
        return rng.sample(absent, k)
    if setting == "popular":
        return sorted(absent, key=lambda c: (-freq[c], order[c]))[:k]
    if setting == "adversarial":
        # The same similarity the world uses for its adversarial "no" training questions.
        return sorted(absent, key=lambda c: (-similarity(c, scene),
                                             -sum(cooc[(p, c)] for p in present), order[c]))[:k]
    raise ValueError(f"POPE setting {setting!r}: expected one of {SETTINGS}")


def pope_items(
    scene: Scene, combos: list[Combo], per_image: int, rng: random.Random,
    freq: Counter, cooc: Counter,
) -> list[PopeItem]:
    """The probes of one image: k positives shared by all settings, k negatives per setting."""
    present = [(o.color, o.shape) for o in scene.objects]
    absent = [c for c in combos if c not in present]
    k = min(per_image, len(present), len(absent))
    positives = rng.sample(present, k)
    items = [PopeItem(c, s, True, SETTINGS) for c, s in positives]
    chosen: dict[Combo, list[str]] = {}
    for setting in SETTINGS:
        for c in _negatives(scene, setting, k, absent, rng, freq, cooc):
            chosen.setdefault(c, []).append(setting)
    items += [PopeItem(c, s, False, tuple(settings)) for (c, s), settings in chosen.items()]
    return items


_WORD = re.compile(r"[a-z']+")
_NEGATIVE = {"no", "not", "none", "isn't", "aren't", "nothing", "neither"}


def parse_yes_no(text: str) -> bool | None:
    """Yes (True) / no (False) from free text; None when it says neither.

    The first "yes" or "no" word decides ("Yes, there is ..." / "No, there is no ...");
    without one, a negation word means no ("There isn't a red circle") and "there is/are"
    means yes; anything else is unparsed.
    """
    words = _WORD.findall((text or "").lower().replace("\u2019", "'"))
    for w in words:
        if w in ("yes", "no"):
            return w == "yes"
    if _NEGATIVE & set(words):
        return False
    joined = " ".join(words)
    return True if ("there is" in joined or "there are" in joined) else None


def yes_no_metrics(labels: list[bool], preds: list[bool | None]) -> dict[str, float | int | None]:
    """POPE metrics with "yes" as the positive class, each rate with its binomial standard error
    (`<rate>_se` = sqrt(p (1 - p) / n) over the probes the rate counts; F1 has none).

    An unparsed answer (None) is wrong for accuracy and counts as "not yes" for precision,
    recall and yes-ratio; `unparsed` reports how many there were. Balanced accuracy is the mean
    of the recall on yes and on no (a constant answer scores 0.5 whatever the label balance).
    Empty: every rate is 0 and every standard error None.
    """
    if len(labels) != len(preds):
        raise ValueError(f"{len(labels)} labels but {len(preds)} predictions; expected one each")
    n = len(labels)
    pairs = list(zip(labels, preds, strict=True))
    tp = sum(p is True and t for t, p in pairs)
    fp = sum(p is True and not t for t, p in pairs)
    tn = sum(p is False and not t for t, p in pairs)
    n_pos = sum(labels)
    n_neg = n - n_pos
    correct = tp + tn
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / n_pos if n_pos else 0.0
    recall_no = tn / n_neg if n_neg else 0.0
    accuracy, yes_ratio = (correct / n, (tp + fp) / n) if n else (0.0, 0.0)
    balanced_se = (math.sqrt(recall * (1 - recall) / n_pos + recall_no * (1 - recall_no) / n_neg)
                   / 2 if n_pos and n_neg else None)
    return {
        "accuracy": accuracy,
        "precision": precision,
        "recall": recall,
        "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
        "yes_ratio": yes_ratio,
        "balanced_accuracy": (recall + recall_no) / 2,
        "accuracy_se": binomial_se(accuracy, n),
        "precision_se": binomial_se(precision, tp + fp),
        "recall_se": binomial_se(recall, n_pos),
        "yes_ratio_se": binomial_se(yes_ratio, n),
        "balanced_accuracy_se": balanced_se,
        "n": n,
        "unparsed": sum(p is None for p in preds),
    }


def pope_metrics(
    labels: list[bool], preds: list[bool | None], scores: list[float | None] | None = None
) -> dict[str, float | int | None]:
    """yes_no_metrics plus `auroc` of `scores` (yes-minus-no logit gaps; Mann-Whitney, ties 1/2)
    and its Hanley-McNeil `auroc_se`; both None without scores, with a missing one, or without
    both labels."""
    out = yes_no_metrics(labels, preds)
    area = auroc(labels, scores) if scores is not None else None
    n_pos = sum(labels)
    out["auroc"] = area
    out["auroc_se"] = None if area is None else hanley_mcneil_se(area, n_pos, len(labels) - n_pos)
    return out
