"""ShapesWorld texts: captions, questions, true answers and synthetic hallucinations.

Phrasing follows the shared grammar exactly (the claims parser and the evaluator rely on it):
"A striped picture with two circles and one square. There is a small red circle at the top left."
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, replace
from typing import Any

from nsft_ray.config import WorldConfig
from nsft_ray.world.scene import POSITIONS, Obj, Scene, sample_scene

__all__ = [
    "NUMBER_WORDS", "CAPTION_PROMPT", "QA_KINDS", "ERROR_KINDS", "Question", "caption",
    "question_text", "truth", "answer_text", "answer", "sample_question", "absent_objects",
    "similarity", "parse_short",
    "corrupt", "corpus",
]

NUMBER_WORDS = ("no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
CAPTION_PROMPT = "Describe the picture."
SHORT_WORD = " Answer with one word."
SHORT_NUMBER = " Answer with a number."
QA_KINDS = ("existence", "color", "size", "count", "position", "scene")
ERROR_KINDS = ("existence", "attribute", "count", "spatial", "scene")


@dataclass(frozen=True)
class Question:
    """What is asked: kind is "caption" or one of QA_KINDS; the other fields name the referent.

    existence: shape+color; color: shape+position; size, position: shape+color; count: shape.
    """

    kind: str
    shape: str | None = None
    color: str | None = None
    position: str | None = None
    short: bool = False  # one-word (or number) answer

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Question:
        if d.get("kind") not in ("caption",) + QA_KINDS:
            raise ValueError(f"question {d!r}: kind must be caption or one of {QA_KINDS}")
        return cls(d["kind"], d.get("shape"), d.get("color"), d.get("position"),
                   bool(d.get("short", False)))


def _a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def _at(position: str) -> str:
    return "in the center" if position == "center" else f"at the {position}"


def _count_phrase(shape: str, n: int) -> str:
    return f"{NUMBER_WORDS[n]} {shape}" + ("" if n == 1 else "s")


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def caption(scene: Scene, counts: dict[str, int] | None = None) -> str:
    """The caption; `counts` overrides per-shape counts in the first sentence (count errors)."""
    shapes = list(dict.fromkeys(o.shape for o in scene.objects))  # first appearance order
    counts = {s: scene.count(s) for s in shapes} | (counts or {})
    head = f"{_a(scene.background).capitalize()} picture"
    if counts:
        head += " with " + _join([_count_phrase(s, n) for s, n in counts.items()])
    body = [f"There is {_a(o.size)} {o.color} {o.shape} {_at(o.position)}." for o in scene.objects]
    return " ".join([head + "."] + body)


def question_text(q: Question) -> str:
    texts = {
        "caption": CAPTION_PROMPT,
        "existence": f"Is there {_a(f'{q.color} {q.shape}')} in the picture?",
        "color": f"What color is the {q.shape} {_at(q.position or '')}?",
        "size": f"What size is the {q.color} {q.shape}?",
        "count": f"How many {q.shape}s are there?",
        "position": f"Where is the {q.color} {q.shape}?",
        "scene": "What is the background of the picture?",
    }
    text = texts[q.kind]
    if q.short and q.kind != "caption":
        text += SHORT_NUMBER if q.kind == "count" else SHORT_WORD
    return text


def _referent(q: Question, scene: Scene) -> Obj:
    obj = scene.at(q.position or "") if q.kind == "color" else scene.find(q.shape, q.color)
    if obj is None or obj.shape != q.shape:
        raise ValueError(f"question {q}: the scene has no such object ({scene.to_dict()})")
    return obj


def truth(q: Question, scene: Scene) -> Any:
    """The true value asked for: bool, color, size, int, position or background."""
    if q.kind == "existence":
        return scene.find(q.shape, q.color) is not None
    if q.kind == "count":
        return scene.count(q.shape)
    if q.kind == "scene":
        return scene.background
    fields = {"color": "color", "size": "size", "position": "position"}
    if q.kind not in fields:
        raise ValueError(f"question kind {q.kind!r} has no single true value")
    return getattr(_referent(q, scene), fields[q.kind])


def answer_text(q: Question, value: Any) -> str:
    """The answer to `q` that states `value` (short: a bare word)."""
    if q.short:
        if q.kind == "existence":
            return "yes" if value else "no"
        return ("zero" if value == 0 else NUMBER_WORDS[value]) if q.kind == "count" else value
    thing = f"{q.color} {q.shape}"
    if q.kind == "existence":
        return f"Yes, there is {_a(thing)}." if value else f"No, there is no {thing}."
    if q.kind == "count":
        verb = "is" if value == 1 else "are"
        return f"There {verb} {_count_phrase(q.shape, value)}."
    if q.kind == "color":
        return f"The {q.shape} {_at(q.position)} is {value}."
    if q.kind == "size":
        return f"The {thing} is {value}."
    if q.kind == "position":
        return f"The {thing} is {_at(value)}."
    if q.kind == "scene":
        return f"The background is {value}."
    raise ValueError(f"question kind {q.kind!r}: expected one of {QA_KINDS}")


def answer(q: Question, scene: Scene) -> str:
    """The true answer (the chosen text)."""
    return caption(scene) if q.kind == "caption" else answer_text(q, truth(q, scene))


def sample_question(
    scene: Scene, rng: random.Random, cfg: WorldConfig, kind: str, short: bool = False,
    present: bool | None = None,
) -> Question:
    """A question of `kind` about `scene`; existence asks about a present object when `present`."""
    if kind == "caption":
        return Question("caption")
    if kind == "existence":
        if present is None:
            present = rng.random() < 0.5
        absent = absent_objects(scene, cfg)
        if present or not absent:
            o = rng.choice(scene.objects)
            return Question(kind, o.shape, o.color, short=short)
        if rng.random() < cfg.adversarial_absent_fraction:
            most = max(similarity(a, scene) for a in absent)
            absent = [a for a in absent if similarity(a, scene) == most]
        c, s = rng.choice(absent)
        return Question(kind, s, c, short=short)
    if kind == "count":
        return Question(kind, rng.choice(cfg.shapes), short=short)
    if kind == "scene":
        return Question(kind, short=short)
    o = rng.choice(scene.objects)
    if kind == "color":
        return Question(kind, o.shape, position=o.position, short=short)
    if kind in ("size", "position"):
        return Question(kind, o.shape, o.color, short=short)
    raise ValueError(f"question kind {kind!r}: expected caption or one of {QA_KINDS}")


def absent_objects(scene: Scene, cfg: WorldConfig) -> list[tuple[str, str]]:
    """Every (color, shape) pair of the vocabulary that is not in the scene."""
    return [(c, s) for s in cfg.shapes for c in cfg.colors if scene.find(s, c) is None]


def similarity(combo: tuple[str, str], scene: Scene) -> int:
    """How many objects of the scene share the colour or the shape of `combo` (POPE's
    adversarial negatives are the absent objects that maximise it)."""
    return sum(combo[0] == o.color or combo[1] == o.shape for o in scene.objects)


def parse_short(q: Question, text: str, vocab: Any) -> Any:
    """The value a (short) answer states for `q`, or None when it names none.

    Only picks the first word of the expected category (a bare word answer), so the
    claims parser can then check answer_text(q, value) against the scene.
    """
    words = {
        "existence": {"yes": True, "no": False},
        "count": {w: n for n, w in enumerate(NUMBER_WORDS)} | {"zero": 0},
        "color": {c: c for c in vocab.colors},
        "size": {s: s for s in vocab.sizes},
        "position": {p: p for p in vocab.positions},
        "scene": {b: b for b in vocab.scenes},
    }[q.kind]
    padded = " " + " ".join(text.lower().replace(",", " ").replace(".", " ").split()) + " "
    hits = [(padded.find(f" {w} "), -len(w), w) for w in words if f" {w} " in padded]
    return words[min(hits)[2]] if hits else None  # earliest, longest ("top left" over "top")


def _other(options: list, rng: random.Random, what: str) -> Any:
    if not options:
        raise ValueError(f"cannot corrupt {what}: the vocabulary offers no alternative")
    return rng.choice(options)


def corrupt(
    scene: Scene, q: Question, rng: random.Random, cfg: WorldConfig = WorldConfig()
) -> tuple[str, str]:
    """A hallucinated answer to `q` and its error kind (one of ERROR_KINDS).

    Edits are chosen so the kind is unambiguous: a wrong color is a (color, shape) pair absent
    from the scene, a wrong position is a cell without an object of that shape.
    """
    if q.kind == "caption":
        return _corrupt_caption(scene, rng, cfg)
    value = truth(q, scene)
    if q.kind == "existence":
        wrong, kind = not value, "existence"
    elif q.kind == "count":
        wrong = _other([n for n in (value - 1, value + 1) if 0 <= n < len(NUMBER_WORDS)], rng,
                       "count")
        kind = "count"
    elif q.kind == "color":
        fresh = [c for c in cfg.colors if c != value and scene.find(q.shape, c) is None]
        wrong = _other(fresh or [c for c in cfg.colors if c != value], rng, "color")
        kind = "attribute"
    elif q.kind == "size":
        wrong, kind = _other([s for s in cfg.sizes if s != value], rng, "size"), "attribute"
    elif q.kind == "position":
        free = [p for p in POSITIONS if (o := scene.at(p)) is None or o.shape != q.shape]
        wrong, kind = _other(free, rng, "position"), "spatial"
    else:
        wrong = _other([b for b in cfg.backgrounds if b != value], rng, "background")
        kind = "scene"
    return answer_text(q, wrong), kind


def _corrupt_caption(scene: Scene, rng: random.Random, cfg: WorldConfig) -> tuple[str, str]:
    objs = list(scene.objects)
    empty = [p for p in POSITIONS if scene.at(p) is None]
    absent = absent_objects(scene, cfg)
    kinds = ["attribute", "count", "scene"] + (["existence", "spatial"] if empty else [])
    kind = rng.choice(kinds)
    if kind == "scene":
        bg = _other([b for b in cfg.backgrounds if b != scene.background], rng, "background")
        return caption(Scene(bg, scene.objects)), kind
    if kind == "count":
        shape = rng.choice(objs).shape
        n = scene.count(shape)
        wrong = _other([m for m in (n - 1, n + 1) if 1 <= m < len(NUMBER_WORDS)], rng, "count")
        return caption(scene, counts={shape: wrong}), kind
    if kind == "existence" and absent:  # a new object; counts follow, as a model's would
        c, s = rng.choice(absent)
        objs.append(Obj(s, c, rng.choice(cfg.sizes), rng.choice(empty)))
        return caption(Scene(scene.background, tuple(objs))), kind
    i = rng.randrange(len(objs))
    o = objs[i]
    if kind == "spatial":
        objs[i] = replace(o, position=rng.choice(empty))
        return caption(Scene(scene.background, tuple(objs))), kind
    edits = [("color", c) for c in cfg.colors if scene.find(o.shape, c) is None]
    edits += [("size", s) for s in cfg.sizes if s != o.size]
    field, value = _other(edits, rng, "object attributes")
    objs[i] = replace(o, **{field: value})
    return caption(Scene(scene.background, tuple(objs))), "attribute"


def corpus(cfg: WorldConfig, n: int, seed: int) -> list[str]:
    """Texts for training a tokenizer: every vocabulary word and template, then n random scenes.

    The first part enumerates every object sentence, count phrase, question and short answer;
    the rest are captions, questions and answers (true and hallucinated) of n sampled scenes.
    """
    lines = [CAPTION_PROMPT]
    for s in cfg.shapes:
        lines += [answer_text(Question("count", s), k) for k in range(len(NUMBER_WORDS))]
        lines.append(question_text(Question("count", s, short=True)))
        for c in cfg.colors:
            q = Question("existence", s, c)
            lines += [question_text(q), answer_text(q, True), answer_text(q, False)]
            lines += [question_text(Question(k, s, c, short=True)) for k in ("size", "position")]
            for z in cfg.sizes:
                lines += [f"There is {_a(z)} {c} {s} {_at(p)}." for p in POSITIONS]
    for p in POSITIONS:
        lines.append(question_text(Question("color", cfg.shapes[0], position=p, short=True)))
    lines.append(question_text(Question("scene", short=True)))
    lines += [f"{_a(b).capitalize()} picture." for b in cfg.backgrounds]
    lines += ["yes", "no", "zero"] + list(NUMBER_WORDS[1:]) + list(POSITIONS)
    rng = random.Random(f"shapesworld-corpus/{seed}")
    for _ in range(n):
        scene = sample_scene(rng, cfg)
        lines.append(caption(scene))
        lines.append(_corrupt_caption(scene, rng, cfg)[0])
        for kind in QA_KINDS:
            q = sample_question(scene, rng, cfg, kind, short=rng.random() < 0.3)
            lines += [question_text(q), answer(q, scene), corrupt(scene, q, rng, cfg)[0]]
    return lines
