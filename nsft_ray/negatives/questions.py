"""Short ShapesWorld answers read back as content questions, for the template constructor.

    parse_question("Is there a red circle in the picture? Answer with one word.", vocab)
    # Question(kind="existence", shape="circle", color="red", short=True)
    short_values(question, "yes", "no", vocab)  # (True, False)

The prompt is looked up among every question the ShapesWorld grammar can ask with the vocabulary
(world.language.question_text, short and long), so the negatives follow the grammar the model is
evaluated with and drift with it; anything else (a user's own question) reads as None.
"""

from __future__ import annotations

import functools
from typing import Any

from nsft_ray.negatives.claims import Vocabulary
from nsft_ray.world.language import Question, parse_short, question_text

__all__ = ["parse_question", "short_values"]


@functools.lru_cache(maxsize=16)
def _questions(vocab: Vocabulary) -> dict[str, Question]:
    """Every grammar question over `vocab`, by its normalised text (about 230 for ShapesWorld)."""
    qs = [Question("count", s) for s in vocab.objects] + [Question("scene")]
    for s in vocab.objects:
        qs += [Question("color", s, position=p) for p in vocab.positions]
        for c in vocab.colors:
            qs += [Question(k, s, c) for k in ("existence", "size", "position")]
    out = {}
    for q in qs:
        for short in (False, True):
            variant = Question(q.kind, q.shape, q.color, q.position, short)
            out[_normalise(question_text(variant))] = variant
    return out


def _normalise(text: str) -> str:
    return " ".join(text.lower().split())


def parse_question(prompt: str, vocab: Vocabulary) -> Question | None:
    """The ShapesWorld question `prompt` asks, or None if it is not one."""
    return _questions(vocab).get(_normalise(prompt))


def short_values(
    q: Question, chosen: str, rejected: str, vocab: Vocabulary
) -> tuple[Any, Any] | None:
    """The values the two answers give to `q` (True/False, a count, a colour...), or None when
    either names none or both name the same (the answers differ only in wording)."""
    values = parse_short(q, chosen, vocab), parse_short(q, rejected, vocab)
    if None in values or values[0] == values[1]:
        return None
    return values
