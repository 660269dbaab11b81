"""CHAIR-style object hallucination metrics for captions (Rohrbach et al., EMNLP 2018).

What counts as an object mention (read with `extract_claims`, the shared grammar):
- every affirmative object claim: a sentence naming exactly one object, with its colour if the
  sentence gives one ("There is a small red circle at the top left." -> red circle);
  negated ones ("there is no red circle") assert nothing and are not mentions;
- a positive count claim ("two circles") for a shape that no object claim of the caption names
  is one mention of the bare shape (so "A plain picture with one star." is not lost, while the
  world's own caption, whose per-object sentences repeat the head's counts, is not counted twice).
A mention is hallucinated when no object in the scene has its shape (and its colour, if stated);
size and position errors are attribute/spatial errors, scored elsewhere, not hallucinations.

    CHAIR_i = hallucinated mentions / all mentions             (over all captions)
    CHAIR_s = captions with >= 1 hallucinated mention / all captions
    object recall    = true objects mentioned / all true objects
    object precision = correct mentions / all mentions  (= 1 - CHAIR_i)
A true object is mentioned by a correct mention of its colour and shape, or by a bare mention of
its shape (each bare mention covers one so-far-uncovered object of that shape).
Standard errors (`<metric>_se`): CHAIR_i, object recall and precision are ratios of sums over
captions (delta method, stats.ratio_se); CHAIR_s is a binomial rate.
"""

from __future__ import annotations

from dataclasses import dataclass

from nsft_ray.negatives.claims import Vocabulary, extract_claims
from nsft_ray.stats import binomial_se, ratio_se
from nsft_ray.world.scene import Scene

__all__ = ["Mention", "CaptionScore", "object_mentions", "score_caption", "chair_metrics"]


@dataclass(frozen=True)
class Mention:
    shape: str
    color: str | None  # None: the caption names the shape without a colour


@dataclass(frozen=True)
class CaptionScore:
    mentions: int
    hallucinated: int
    covered: int  # true objects the caption mentions
    objects: int  # true objects in the image


def object_mentions(text: str, vocab: Vocabulary) -> list[Mention]:
    """The object mentions of `text`, as defined in the module docstring."""
    claims = extract_claims(text, vocab)
    out = [Mention(c.object, c.color) for c in claims.objects if c.present]
    named = {m.shape for m in out}
    out += [Mention(shape, None) for shape, n in claims.counts.items()
            if n > 0 and shape not in named]
    return out


def score_caption(text: str, scene: Scene, vocab: Vocabulary) -> CaptionScore:
    """Mentions, hallucinated mentions and covered objects of one caption against its scene."""
    mentions = object_mentions(text, vocab)
    real = [m for m in mentions
            if any(o.shape == m.shape and m.color in (None, o.color) for o in scene.objects)]
    covered = {(m.color, m.shape) for m in real if m.color is not None}
    for m in real:
        if m.color is None:  # a bare shape covers one object of that shape not yet covered
            free = [o for o in scene.objects
                    if o.shape == m.shape and (o.color, o.shape) not in covered]
            if free:
                covered.add((free[0].color, free[0].shape))
    return CaptionScore(len(mentions), len(mentions) - len(real), len(covered), len(scene.objects))


def chair_metrics(scores: list[CaptionScore]) -> dict[str, float | int | None]:
    """CHAIR_i, CHAIR_s, object recall and precision over captions (micro-averaged), with SEs."""
    mentions = sum(s.mentions for s in scores)
    hallucinated = sum(s.hallucinated for s in scores)
    objects = sum(s.objects for s in scores)
    n = len(scores)
    chair_s = sum(s.hallucinated > 0 for s in scores) / n if n else 0.0
    chair_i_se = ratio_se([s.hallucinated for s in scores], [s.mentions for s in scores])
    return {
        "chair_i": hallucinated / mentions if mentions else 0.0,
        "chair_s": chair_s,
        "object_recall": sum(s.covered for s in scores) / objects if objects else 0.0,
        "object_precision": (mentions - hallucinated) / mentions if mentions else 0.0,
        "chair_i_se": chair_i_se,
        "chair_s_se": binomial_se(chair_s, n),
        "object_recall_se": ratio_se([s.covered for s in scores], [s.objects for s in scores]),
        "object_precision_se": chair_i_se,  # 1 - CHAIR_i: the same spread
        "n_captions": n,
        "mentions": mentions,
        "hallucinated": hallucinated,
        "captions_without_mentions": sum(s.mentions == 0 for s in scores),
    }
