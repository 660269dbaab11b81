"""Claims: what a text asserts about a ShapesWorld-like image, read with a fixed vocabulary.

    vocab = Vocabulary.from_config(NegativesConfig())
    extract_claims("There are two circles. The red circle is at the top left.", vocab)
    # Claims(objects=(ObjectClaim('circle', None, None, None, True),
    #                 ObjectClaim('circle', 'red', None, 'top left', True)),
    #        counts={'circle': 2}, scene=None)

Rules (the shared grammar, /tmp/grammar.md): the text is split into sentences; vocabulary words
match case-insensitively on word boundaries, longest phrase first ("top left" before "top"),
objects also in the plural ("circles"). A number word directly before an object word is a count
claim ("a"/"an" is not). A sentence with exactly one object mention gives one ObjectClaim with the
colour/size/position words of that sentence (a value stated twice differently is left None) and
present=False if the sentence is negated; a sentence with several object mentions gives only
count claims. Any scene word gives `scene` (the first one wins; also for counts). Free text never
raises: it just yields fewer claims.
"""

from __future__ import annotations

import functools
import itertools
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from nsft_ray.config import NegativesConfig, WorldConfig

__all__ = [
    "GRID_POSITIONS",
    "NUMBER_WORDS",
    "Vocabulary",
    "ObjectClaim",
    "Claims",
    "extract_claims",
    "number_word",
]

# The 3x3 grid of ShapesWorld, row by row; WorldConfig has no positions field, so they live here.
GRID_POSITIONS = (
    "top left", "top", "top right",
    "left", "center", "right",
    "bottom left", "bottom", "bottom right",
)
# Number words and their values; digits are accepted too (models write "2 circles").
NUMBER_WORDS = {
    "no": 0, "zero": 0, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5,
    "six": 6, "seven": 7, "eight": 8, "nine": 9,
}
_CATEGORIES = ("objects", "colors", "sizes", "positions", "scenes")
# A leading "Yes," / "No," answers a question; it does not negate the sentence after it.
_INTERJECTION = re.compile(r"^\s*(?:yes|no)\s*[,:;!\-]+")
_NEGATION = re.compile(r"\b(?:no|not|none|never|nothing)\b|n't\b")
_SENTENCE_END = re.compile(r"(?<=[.!?;])\s+|\n+")


@dataclass(frozen=True)
class Vocabulary:
    """The words a text is read with; every phrase is lower case and belongs to one category."""

    objects: tuple[str, ...]
    colors: tuple[str, ...]
    sizes: tuple[str, ...]
    positions: tuple[str, ...]
    scenes: tuple[str, ...]

    def __post_init__(self) -> None:
        seen: dict[str, str] = {w: "numbers" for w in NUMBER_WORDS}
        for category in _CATEGORIES:
            words = getattr(self, category)
            if not words:
                raise ValueError(f"Vocabulary.{category} is empty; expected at least one word")
            for word in words:
                if not word.strip() or word != " ".join(word.lower().split()):
                    raise ValueError(
                        f"Vocabulary.{category}: {word!r} must be lower case, single-spaced words"
                    )
                if word in seen:
                    raise ValueError(
                        f"Vocabulary: {word!r} is in both {seen[word]} and {category}; "
                        "a word may belong to one category only"
                    )
                seen[word] = category

    @classmethod
    def from_config(cls, cfg: NegativesConfig | WorldConfig) -> Vocabulary:
        """From NegativesConfig (its own lists) or WorldConfig (shapes, backgrounds, the grid)."""
        if hasattr(cfg, "shapes"):  # WorldConfig
            objects, scenes, positions = cfg.shapes, cfg.backgrounds, GRID_POSITIONS
        else:
            objects, scenes, positions = cfg.objects, cfg.scenes, cfg.positions
        norm = lambda words: tuple(" ".join(w.lower().split()) for w in words)  # noqa: E731
        return cls(
            objects=norm(objects), colors=norm(cfg.colors), sizes=norm(cfg.sizes),
            positions=norm(positions), scenes=norm(scenes),
        )


@dataclass(frozen=True)
class ObjectClaim:
    """One object as a sentence describes it; present=False: "there is no red circle"."""

    object: str
    color: str | None
    size: str | None
    position: str | None
    present: bool


@dataclass(frozen=True)
class Claims:
    objects: tuple[ObjectClaim, ...]
    counts: dict[str, int]  # object -> claimed count ("two circles"; "no circles" -> 0)
    scene: str | None


def number_word(n: int) -> str:
    """0 -> "no", 1..9 -> "one".."nine", larger -> digits (the inverse of NUMBER_WORDS)."""
    if n == 0:
        return "no"
    words = {v: k for k, v in NUMBER_WORDS.items() if v > 0}
    return words.get(n, str(n))


@functools.lru_cache(maxsize=16)
def _matcher(vocab: Vocabulary) -> tuple[re.Pattern, dict[str, tuple[str, str]]]:
    """One regex over every phrase (longest first); normalised phrase -> (category, word)."""
    lookup: dict[str, tuple[str, str]] = {w: ("numbers", w) for w in NUMBER_WORDS}
    for category in _CATEGORIES:
        lookup.update({w: (category, w) for w in getattr(vocab, category)})
    alternatives = []
    for phrase in sorted(lookup, key=len, reverse=True):
        body = r"[\s\-]+".join(re.escape(part) for part in phrase.split())
        alternatives.append(body + ("s?" if lookup[phrase][0] == "objects" else ""))
    alternatives.append(r"\d+")
    return re.compile(r"\b(?:" + "|".join(alternatives) + r")\b"), lookup


def _tokens(sentence: str, vocab: Vocabulary) -> list[tuple[str, str, int, int]]:
    """Vocabulary matches in order: (category, canonical word, start, end)."""
    pattern, lookup = _matcher(vocab)
    out = []
    for m in pattern.finditer(sentence):
        text = " ".join(m.group(0).replace("-", " ").split())
        if text.isdigit():
            out.append(("numbers", text, m.start(), m.end()))
            continue
        hit = lookup.get(text) or lookup.get(text[:-1])  # the second form: a plural object
        if hit is not None:
            out.append((*hit, m.start(), m.end()))
    return out


def _single(values: list[str]) -> str | None:
    """The value if the sentence states exactly one (possibly repeated), else None."""
    distinct = set(values)
    return values[0] if len(distinct) == 1 else None


def extract_claims(text: str, vocab: Vocabulary) -> Claims:
    """Read the object, count and scene claims of `text` (see the module docstring for rules)."""
    objects: list[ObjectClaim] = []
    counts: dict[str, int] = {}
    scene: str | None = None
    normalised = (text or "").lower().replace("\u2019", "'")
    for sentence in _SENTENCE_END.split(normalised):
        tokens = _tokens(sentence, vocab)
        by_category: dict[str, list[str]] = {c: [] for c in (*_CATEGORIES, "numbers")}
        for category, word, _, _ in tokens:
            by_category[category].append(word)
        if scene is None and by_category["scenes"]:
            scene = by_category["scenes"][0]
        for (cat_a, word_a, _, end_a), (cat_b, word_b, start_b, _) in itertools.pairwise(tokens):
            directly_before = not sentence[end_a:start_b].strip()
            if cat_a == "numbers" and cat_b == "objects" and directly_before:
                value = int(word_a) if word_a.isdigit() else NUMBER_WORDS[word_a]
                counts.setdefault(word_b, value)
        if len(by_category["objects"]) == 1:
            negated = _NEGATION.search(_INTERJECTION.sub("", sentence)) is not None
            objects.append(
                ObjectClaim(
                    object=by_category["objects"][0],
                    color=_single(by_category["colors"]),
                    size=_single(by_category["sizes"]),
                    position=_single(by_category["positions"]),
                    present=not negated,
                )
            )
    return Claims(objects=tuple(objects), counts=counts, scene=scene)
