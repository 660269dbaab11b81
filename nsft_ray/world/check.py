"""Check a text against a scene graph: which codebook error kinds do its claims commit?"""

from __future__ import annotations

from dataclasses import replace

from nsft_ray.negatives.claims import Claims, ObjectClaim, Vocabulary, extract_claims
from nsft_ray.world.language import Question, answer_text, parse_short
from nsft_ray.world.scene import Scene

__all__ = ["contradictions", "is_correct", "answer_errors"]


def _object_error(c: ObjectClaim, scene: Scene) -> str | None:
    """The error kind of one object claim, or None when the scene bears it out."""
    stated = {"color": c.color, "size": c.size, "position": c.position}

    def matches(o) -> bool:
        return o.shape == c.object and all(v is None or getattr(o, k) == v
                                           for k, v in stated.items())

    if not c.present:  # "there is no red circle" while there is one
        return "existence" if any(matches(o) for o in scene.objects) else None
    if any(matches(o) for o in scene.objects):
        return None
    if c.position is not None:
        o = scene.at(c.position)
        if o is not None and o.shape == c.object:  # the right thing in the right place, wrong look
            return "attribute"
    same = [o for o in scene.objects if o.shape == c.object and c.color in (None, o.color)]
    if not same:
        return "existence"
    # Every object of that shape (and color) lies elsewhere, or it differs only in size.
    return "spatial" if c.position is not None else "attribute"


def _errors(claims: Claims, scene: Scene) -> list[str]:
    kinds = [k for c in claims.objects if (k := _object_error(c, scene))]
    kinds += ["count" for shape, n in claims.counts.items() if scene.count(shape) != n]
    if claims.scene is not None and claims.scene != scene.background:
        kinds.append("scene")
    return list(dict.fromkeys(kinds))  # unique, in order of first appearance


def contradictions(text: str, scene: Scene, vocab: Vocabulary) -> list[str]:
    """Error kinds ("existence", "attribute", "count", "spatial", "scene") that `text` commits."""
    return _errors(extract_claims(text, vocab), scene)


def is_correct(text: str, scene: Scene, vocab: Vocabulary) -> bool:
    """True when `text` makes at least one checkable claim and none contradicts the scene."""
    claims = extract_claims(text, vocab)
    has_claims = bool(claims.objects or claims.counts or claims.scene)
    return has_claims and not _errors(claims, scene)


def answer_errors(q: Question, text: str, scene: Scene, vocab: Vocabulary) -> list[str] | None:
    """Error kinds of `text` as an answer to `q`; None when it states nothing checkable.

    A short answer ("red", "two") carries no claim by itself: it is read in the context of its
    question by turning it into the full answer sentence first.
    """
    if q.short:
        value = parse_short(q, text, vocab)
        if value is None:
            return None
        text = answer_text(replace(q, short=False), value)
    claims = extract_claims(text, vocab)
    if not (claims.objects or claims.counts or claims.scene):
        return None
    return _errors(claims, scene)
