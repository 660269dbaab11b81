"""Find the visual errors of a rejected answer by comparing its claims with the chosen answer's.

Pure logic on :class:`Claims`; no scene graph, no meta. The chosen answer is the truth, but it may
be partial, so a correction is written only when the chosen text supports its answer:

- count: the rejected text says "three circles" and the chosen text gives another number (or is
  a complete description, see `_is_complete`, that lists no circles);
- attribute / spatial: a rejected object is matched to a chosen one (same object and position,
  else same object and colour, else the only such object) and a colour, size or position differs;
- existence: a rejected object that matches nothing and that the chosen text rules out ("there is
  no red circle", zero circles, or every circle listed with another colour); or a denied object
  ("there is no red circle") that the chosen text has;
- scene: both texts name a background and they differ.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from nsft_ray.negatives.claims import Claims, ObjectClaim, number_word

__all__ = ["Correction", "find_corrections"]


@dataclass(frozen=True)
class Correction:
    """One error: the codebook kind, the template to write, and the template's fields."""

    kind: str
    template: str
    fields: dict[str, str]


def _phrase(*words: str | None) -> str:
    return " ".join(w for w in words if w)


def _is_complete(claims: Claims) -> bool:
    """A text naming the scene and counting objects (a caption) lists every object there is."""
    return claims.scene is not None and bool(claims.counts)


def _true_count(chosen: Claims, obj: str) -> int | None:
    """How many `obj` the chosen text says there are, or None if it does not say."""
    if obj in chosen.counts:
        return chosen.counts[obj]
    denied_all = any(
        c.object == obj and not c.present and not (c.color or c.size or c.position)
        for c in chosen.objects
    )
    return 0 if denied_all or _is_complete(chosen) else None


def _present(chosen: Claims, obj: str) -> list[ObjectClaim]:
    listed = [c for c in chosen.objects if c.present and c.object == obj]
    described = [c for c in listed if c.color or c.size or c.position]
    # A bare mention ("a picture with one triangle.") restates a count; the described claims are
    # the objects themselves, so counting both would list the same triangle twice.
    return described or listed


def _count_correction(obj: str, n: int) -> Correction:
    template = {0: "zero", 1: "one"}.get(n, "many")
    fields = {"object": obj, "objects": obj + "s", "number": number_word(n)}
    return Correction("count", template, fields)


def _absent_thing(chosen: Claims, r: ObjectClaim) -> str | None:
    """The phrase ("blue circle") the chosen text proves absent for claim `r`, or None."""
    thing = _phrase(r.color, r.object)
    if _true_count(chosen, r.object) == 0:
        return thing
    for c in chosen.objects:  # an explicit denial: "there is no blue circle"
        if not c.present and c.object == r.object and c.color in (None, r.color):
            if not (c.size or c.position):
                return thing
    listed = _present(chosen, r.object)
    every_one_listed = len(listed) == _true_count(chosen, r.object)
    if r.color and every_one_listed and all(c.color and c.color != r.color for c in listed):
        return thing
    return None


def _attribute_corrections(
    c: ObjectClaim, r: ObjectClaim, where: Callable[[str], str]
) -> list[Correction]:
    """Differences between the matched true object `c` and the rejected claim `r`."""
    out = []
    # Each question names the object by attributes other than the one it asks about.
    if r.color and c.color and r.color != c.color:
        ref = f"{c.object} {where(c.position)}" if c.position else _phrase(c.size, c.object)
        out.append(Correction("attribute", "color", {"ref": ref, "color": c.color}))
    if r.size and c.size and r.size != c.size:
        if c.color:
            ref = _phrase(c.color, c.object)
        else:
            ref = f"{c.object} {where(c.position)}" if c.position else c.object
        out.append(Correction("attribute", "size", {"ref": ref, "size": c.size}))
    if r.position and c.position and r.position != c.position:
        ref = _phrase(c.color, c.object) if c.color else _phrase(c.size, c.object)
        out.append(Correction("spatial", "position", {"ref": ref, "where": where(c.position)}))
    return out


def _object_corrections(
    chosen: Claims, r: ObjectClaim, where: Callable[[str], str]
) -> list[Correction]:
    listed = _present(chosen, r.object)
    if not r.present:
        # The rejected text denies an object; wrong if the chosen text has one that fits.
        fits = [
            c for c in listed
            if all(getattr(r, a) in (None, getattr(c, a)) for a in ("color", "size", "position"))
        ]
        thing = _phrase(r.size, r.color, r.object)
        return [Correction("existence", "present", {"thing": thing})] if fits else []
    for attr in ("position", "color"):
        same = [c for c in listed if getattr(r, attr) and getattr(c, attr) == getattr(r, attr)]
        if same:
            return _attribute_corrections(same[0], r, where)
    thing = _absent_thing(chosen, r)
    if thing is not None:
        return [Correction("existence", "absent", {"thing": thing})]
    if len(listed) == 1 and _true_count(chosen, r.object) in (None, 1):
        return _attribute_corrections(listed[0], r, where)
    return []


def find_corrections(
    chosen: Claims, rejected: Claims, where: Callable[[str], str]
) -> list[Correction]:
    """The rejected text's errors that the chosen text can correct: counts, objects, then scene.

    `where` turns a position into a phrase ("top left" -> "at the top left"), see Codebook.where.
    """
    out = []
    for obj, n in rejected.counts.items():
        truth = _true_count(chosen, obj)
        if truth is not None and truth != n:
            out.append(_count_correction(obj, truth))
    for r in rejected.objects:
        out.extend(_object_corrections(chosen, r, where))
    if rejected.scene and chosen.scene and rejected.scene != chosen.scene:
        out.append(Correction("scene", "background", {"scene": chosen.scene}))
    unique = []
    for c in out:
        if c not in unique:  # the same error stated twice gets one correction
            unique.append(c)
    return unique
