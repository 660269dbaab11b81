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

__all__ = ["Correction", "count_fields", "find_corrections"]


@dataclass(frozen=True)
class Correction:
    """One corrective turn: the error kind it corrects, its role, and the codebook template
    ("existence.absent") with its fields.

    role: "confirm" asks about what the chosen answer says is true; "refute" asks about the
    rejected claim. Each error yields a confirming turn (when the chosen text has a truth to
    confirm) and a refuting one.
    """

    kind: str
    role: str
    template: str
    fields: dict[str, str]


def _phrase(*words: str | None) -> str:
    return " ".join(w for w in words if w)


def _pair(kind: str, kind_templates: tuple[str, str], fields: dict[str, str]) -> list[Correction]:
    """The confirming and the refuting turn of one error, sharing their fields."""
    confirm, refute = kind_templates
    return [
        Correction(kind, "confirm", confirm, fields), Correction(kind, "refute", refute, fields)
    ]


def _value_turns(
    kind: str, templates: tuple[str, str, str], fields: dict[str, str]
) -> list[Correction]:
    """A wrong value (count, size, position, background): the grammar's question with the true
    value ("Where is the red circle?"), then the value asked both ways, yes then no.

    `templates`: (ask, affirm, deny). The grammar has no yes/no question for these values, so the
    refuting turn ("Is the red circle at the bottom?" no) is not one; the yes/no confirming turn
    beside it keeps the negatives from teaching "no" to most yes/no questions (with ask and deny
    alone, 62% of the corrective answers on ShapesWorld pairs began with "no").
    """
    ask, affirm, deny = templates
    return [Correction(kind, "confirm", ask, fields), *_pair(kind, (affirm, deny), fields)]


def count_fields(obj: str, n: int, wrong: int) -> dict[str, str]:
    """Fields of the count templates: `n` the true count of `obj`, `wrong` the rejected one."""
    objects = obj + "s"
    if n == 0:
        truth = f"there are no {objects}"
    else:
        truth = f"there is one {obj}" if n == 1 else f"there are {number_word(n)} {objects}"
    # "zero", not number_word's "no": the word is said alone ("Is the number of circles zero?").
    word = lambda k: "zero" if k == 0 else number_word(k)  # noqa: E731
    return {"object": obj, "objects": objects, "number": word(n), "wrong": word(wrong),
            "truth": truth}


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


def _confirmable(chosen: Claims, r: ObjectClaim) -> str | None:
    """An object the chosen text says is there, to confirm beside refuting the invented `r`: the
    one at r's position, else one of r's shape, else the first; coloured ones first, since the
    grammar's existence question names a colour."""
    present = sorted((c for c in chosen.objects if c.present), key=lambda c: c.color is None)
    for candidates in (
        [c for c in present if r.position and c.position == r.position],
        [c for c in present if c.object == r.object],
        present,
    ):
        if candidates:
            return _phrase(candidates[0].color, candidates[0].object)
    return None


def _color_corrections(
    chosen: Claims, c: ObjectClaim, r: ObjectClaim, ref: str
) -> list[Correction]:
    """Confirm the true colour ("Is there a blue triangle?" yes), refute the wrong one: "Is there
    a green triangle?" no, when the chosen text proves there is none, else "Is the {ref} green?"."""
    confirm = Correction("attribute", "confirm", "existence.present",
                         {"thing": _phrase(c.color, c.object)})
    wrong_thing = _absent_thing(chosen, r)
    if wrong_thing is not None:
        refute = Correction("attribute", "refute", "existence.absent", {"thing": wrong_thing})
    else:
        fields = {"ref": ref, "color": c.color or "", "wrong": r.color or ""}
        refute = Correction("attribute", "refute", "attribute.color_deny", fields)
    return [confirm, refute]


def _attribute_corrections(
    chosen: Claims, c: ObjectClaim, r: ObjectClaim, where: Callable[[str], str]
) -> list[Correction]:
    """Differences between the matched true object `c` and the rejected claim `r`."""
    out = []
    # Each question names the object by attributes other than the one it asks about.
    if r.color and c.color and r.color != c.color:
        ref = f"{c.object} {where(c.position)}" if c.position else _phrase(c.size, c.object)
        out += _color_corrections(chosen, c, r, ref)
    if r.size and c.size and r.size != c.size:
        if c.color:
            ref = _phrase(c.color, c.object)
        else:
            ref = f"{c.object} {where(c.position)}" if c.position else c.object
        fields = {"ref": ref, "size": c.size, "wrong": r.size}
        templates = ("attribute.size", "attribute.size_affirm", "attribute.size_deny")
        out += _value_turns("attribute", templates, fields)
    if r.position and c.position and r.position != c.position:
        ref = _phrase(c.color, c.object) if c.color else _phrase(c.size, c.object)
        fields = {"ref": ref, "where": where(c.position), "wrong": where(r.position)}
        out += _value_turns("spatial", ("spatial.ask", "spatial.affirm", "spatial.deny"), fields)
    return out


def _existence_corrections(chosen: Claims, r: ObjectClaim) -> list[Correction] | None:
    """Turns for a denied object the chosen text has, or an object it proves absent; None if
    `r` is neither (an object that is there, perhaps with wrong attributes)."""
    if not r.present:
        # The rejected text denies an object; wrong if the chosen text has one that fits.
        fits = [
            c for c in _present(chosen, r.object)
            if all(getattr(r, a) in (None, getattr(c, a)) for a in ("color", "size", "position"))
        ]
        fields = {"thing": _phrase(r.color, r.object)}
        return _pair("existence", ("existence.present", "existence.denied"), fields) if fits else []
    thing = _absent_thing(chosen, r)
    if thing is None:
        return None
    other = _confirmable(chosen, r)
    confirm = [] if other is None else [
        Correction("existence", "confirm", "existence.present", {"thing": other})
    ]
    return confirm + [Correction("existence", "refute", "existence.absent", {"thing": thing})]


def _object_corrections(
    chosen: Claims, r: ObjectClaim, where: Callable[[str], str]
) -> list[Correction]:
    listed = _present(chosen, r.object)
    if not r.present:
        return _existence_corrections(chosen, r) or []
    for attr in ("position", "color"):
        same = [c for c in listed if getattr(r, attr) and getattr(c, attr) == getattr(r, attr)]
        if same:
            return _attribute_corrections(chosen, same[0], r, where)
    existence = _existence_corrections(chosen, r)
    if existence is not None:
        return existence
    if len(listed) == 1 and _true_count(chosen, r.object) in (None, 1):
        return _attribute_corrections(chosen, listed[0], r, where)
    return []


def find_corrections(
    chosen: Claims, rejected: Claims, where: Callable[[str], str]
) -> list[Correction]:
    """The rejected text's errors that the chosen text can correct (counts, objects, then scene),
    each as its confirming and refuting turns.

    `where` turns a position into a phrase ("top left" -> "at the top left"), see Codebook.where.
    """
    out = []
    for obj, n in rejected.counts.items():
        truth = _true_count(chosen, obj)
        if truth is not None and truth != n:
            fields = count_fields(obj, truth, n)
            out += _value_turns("count", ("count.ask", "count.affirm", "count.deny"), fields)
    for r in rejected.objects:
        out.extend(_object_corrections(chosen, r, where))
    if rejected.scene and chosen.scene and rejected.scene != chosen.scene:
        fields = {"scene": chosen.scene, "wrong": rejected.scene}
        out += _value_turns("scene", ("scene.ask", "scene.affirm", "scene.deny"), fields)
    unique: list[Correction] = []
    for c in out:
        # The same turn asked twice (one error stated twice, one object confirmed for two
        # errors) is written once.
        if all((c.template, c.fields) != (u.template, u.fields) for u in unique):
            unique.append(c)
    return unique
