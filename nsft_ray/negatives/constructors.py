"""Negative constructors: one preference row -> corrective conversations about the same image.

A constructor is a callable `(row: dict) -> list[Conversation]` (row: a preference row with id,
image, prompt, chosen, rejected, source, meta; Conversation: a dict with CONVERSATION_SCHEMA's
fields) with a `batch(rows)` method for the pipeline. It writes ONE multi-turn negative
conversation per rejected answer (all corrections of that answer, user/assistant alternating;
id f"{row_id}/neg0") and, with `include_chosen`, the chosen conversation (f"{row_id}/chosen").
When it cannot, it raises :class:`ConstructionError`; the pipeline quarantines the row.

Each error gets a turn that CONFIRMS what the chosen answer says is true and one that REFUTES
the rejected claim, as the paper's "Is this a travel book? Yes. / Is this a cookbook? No.";
NegativesConfig.corrective="refute_only" keeps the refuting turns alone (the ablation). Answers
are truthful in their first yes/no word: no turn answers "No" about an object that is there.

- TemplateConstructor: short answers; reads the prompt as a ShapesWorld question (questions.py)
  and asks it both ways ("Is the circle at the top left red?" yes / "... blue?" no), else asks
  whether each answer is correct.
- TextDiffConstructor: compares the claims of chosen and rejected (textdiff.py) and writes the
  codebook's confirming and refuting turns for each error.
- AutoConstructor: template when both answers are short, text-diff otherwise.
The LLM constructor lives in llm.py.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from nsft_ray.config import NegativesConfig
from nsft_ray.negatives.claims import NUMBER_WORDS, Vocabulary, extract_claims
from nsft_ray.negatives.codebook import Codebook
from nsft_ray.negatives.questions import parse_question, short_values
from nsft_ray.negatives.textdiff import count_fields, find_corrections
from nsft_ray.schema import dumps_meta
from nsft_ray.world.language import Question

__all__ = [
    "Conversation",
    "ConstructionError",
    "Turn",
    "check_row",
    "select_turns",
    "build_conversations",
    "TemplateConstructor",
    "TextDiffConstructor",
    "AutoConstructor",
    "each_row",
    "short_answer_kind",
]

Conversation = dict[str, Any]


class ConstructionError(Exception):
    """A row yields no negative conversation; `reason` is a short snake_case code."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Turn:
    """One corrective exchange: a question about the image and its correct answer."""

    question: str
    answer: str
    error_kind: str | None  # a codebook kind; None if it cannot be told
    role: str | None = None  # "confirm" | "refute" (codebook.ROLES); None if not told (LLM)


def check_row(row: dict) -> None:
    """Raise ConstructionError unless the row has an id and usable prompt/chosen/rejected text."""
    for key in ("id", "prompt", "chosen", "rejected"):
        if not isinstance(row.get(key), str):
            detail = f"field {key!r} must be a string, got {row.get(key)!r}"
            raise ConstructionError("bad_row", detail)
    for key in ("id", "chosen", "rejected"):
        if not row[key].strip():
            raise ConstructionError(f"empty_{key}", f"field {key!r} is empty")
    if " ".join(row["chosen"].lower().split()) == " ".join(row["rejected"].lower().split()):
        raise ConstructionError("identical_answers", "chosen and rejected say the same thing")


def select_turns(turns: list[Turn], corrective: str) -> list[Turn]:
    """The turns NegativesConfig.corrective keeps: all, or (refute_only) all but the confirming."""
    if corrective not in ("confirm_and_refute", "refute_only"):
        raise ValueError(
            f"negatives.corrective: {corrective!r} is not one of confirm_and_refute, refute_only"
        )
    return [t for t in turns if corrective == "confirm_and_refute" or t.role != "confirm"]


def build_conversations(
    row: dict, turns: list[Turn], constructor: str, include_chosen: bool
) -> list[Conversation]:
    """The negative conversation made of `turns` (and the chosen one) for preference `row`."""
    messages = []
    for t in turns:
        messages.append({"role": "user", "content": t.question})
        messages.append({"role": "assistant", "content": t.answer})
    kinds = [t.error_kind for t in turns]
    negative = {
        "id": f"{row['id']}/neg0",
        "parent_id": row["id"],
        "image": row.get("image"),
        "messages": messages,
        "origin": "negative",
        "error_kinds": list(dict.fromkeys(k for k in kinds if k)),
        "meta": dumps_meta({
            "constructor": constructor, "turn_kinds": kinds, "turn_roles": [t.role for t in turns],
        }),
    }
    if not include_chosen:
        return [negative]
    chosen = {
        "id": f"{row['id']}/chosen",
        "parent_id": row["id"],
        "image": row.get("image"),
        "messages": [
            {"role": "user", "content": row["prompt"]},
            {"role": "assistant", "content": row["chosen"]},
        ],
        "origin": "chosen",
        "error_kinds": [],
        "meta": dumps_meta({"constructor": constructor}),
    }
    return [chosen, negative]


def each_row(constructor: Any, rows: list[dict]) -> list[list[Conversation] | ConstructionError]:
    """Run a per-row constructor over `rows`, keeping each row's ConstructionError as its result."""
    results: list[list[Conversation] | ConstructionError] = []
    for row in rows:
        try:
            results.append(constructor(row))
        except ConstructionError as e:
            results.append(e)
    return results


# Which codebook kind a wrong one-word answer belongs to, by the vocabulary category of the word.
_SHORT_ANSWER_KINDS = {
    "colors": "attribute", "sizes": "attribute", "positions": "spatial",
    "scenes": "scene", "objects": "existence",
}


def short_answer_kind(answer: str, vocab: Vocabulary) -> str | None:
    word = " ".join(answer.lower().strip(" .!?\"'").split())
    if word in ("yes", "no"):
        return "existence"
    if word in NUMBER_WORDS or word.isdigit():
        return "count"
    for category, kind in _SHORT_ANSWER_KINDS.items():
        if word in getattr(vocab, category):
            return kind
    return None


# The codebook kind of a wrong answer to each ShapesWorld question kind.
_QUESTION_KINDS = {
    "existence": "existence", "color": "attribute", "size": "attribute", "count": "count",
    "position": "spatial", "scene": "scene",
}


def _content_templates(
    q: Question, chosen: Any, rejected: Any, where: Callable[[str], str]
) -> tuple[str, str, dict[str, str]]:
    """(confirming template, refuting template, fields) asking `q`'s content both ways.

    `chosen`/`rejected` are the values parse_short reads (True/False, a count, a word); `where`
    is Codebook.where.
    """
    if q.kind == "existence":
        fields = {"thing": f"{q.color} {q.shape}"}
        # A wrong "no" about a present object is refuted without answering "No" (denied).
        if chosen:
            return "existence.present", "existence.denied", fields
        return "existence.absent", "existence.claimed", fields
    if q.kind == "count":
        return "count.affirm", "count.deny", count_fields(q.shape or "", chosen, rejected)
    if q.kind == "scene":
        return "scene.affirm", "scene.deny", {"scene": chosen, "wrong": rejected}
    if q.kind == "position":
        fields = {"ref": f"{q.color} {q.shape}", "where": where(chosen), "wrong": where(rejected)}
        return "spatial.affirm", "spatial.deny", fields
    if q.kind == "color":
        fields = {"ref": f"{q.shape} {where(q.position or '')}", "color": chosen, "wrong": rejected}
        return "attribute.color_affirm", "attribute.color_deny", fields
    if q.kind == "size":
        fields = {"ref": f"{q.color} {q.shape}", "size": chosen, "wrong": rejected}
        return "attribute.size_affirm", "attribute.size_deny", fields
    raise ValueError(f"question kind {q.kind!r} has no short-answer templates")


class TemplateConstructor:
    """Short answers: the content question asked both ways and answered truthfully.

    "Is there a red circle in the picture? Answer with one word." (chosen yes, rejected no) ->
    "Is there a red circle in the picture?" "Yes, there is a red circle." and "Is it true that
    there is no red circle in the picture?" "That is false: there is a red circle.". A prompt that
    is not a ShapesWorld question gets the codebook's short_answer turns ('Is "red" correct?').
    """

    name = "template"

    def __init__(self, cfg: NegativesConfig, codebook: Codebook) -> None:
        self.codebook = codebook
        self.vocab = Vocabulary.from_config(cfg)
        self.include_chosen = cfg.include_chosen
        self.corrective = cfg.corrective

    def turns(self, row: dict) -> list[Turn]:
        q = parse_question(row["prompt"], self.vocab)
        values = None if q is None else short_values(q, row["chosen"], row["rejected"], self.vocab)
        if q is None or values is None:
            return self._generic_turns(row)
        confirm, refute, fields = _content_templates(q, *values, self.codebook.where)
        kind = _QUESTION_KINDS[q.kind]
        return [
            Turn(*self.codebook.render(confirm, fields), kind, "confirm"),
            Turn(*self.codebook.render(refute, fields), kind, "refute"),
        ]

    def _generic_turns(self, row: dict) -> list[Turn]:
        # A final full stop would land inside the quotes of 'Is "red." correct?'.
        fields = {k: row[k].strip().rstrip(".").strip() for k in ("chosen", "rejected")}
        fields["prompt"] = row["prompt"].strip()
        kind = short_answer_kind(fields["rejected"], self.vocab)
        return [
            Turn(*self.codebook.short_answer[role].render(fields), kind, role)
            for role in ("confirm", "refute")
        ]

    def __call__(self, row: dict) -> list[Conversation]:
        check_row(row)
        turns = select_turns(self.turns(row), self.corrective)
        return build_conversations(row, turns, self.name, self.include_chosen)

    def batch(self, rows: list[dict]) -> list[list[Conversation] | ConstructionError]:
        return each_row(self, rows)


class TextDiffConstructor:
    """Long answers: a confirming and a refuting codebook turn per error the chosen text can
    correct."""

    name = "text-diff"

    def __init__(self, cfg: NegativesConfig, codebook: Codebook) -> None:
        self.codebook = codebook
        self.vocab = Vocabulary.from_config(cfg)
        self.include_chosen = cfg.include_chosen
        self.corrective = cfg.corrective

    def turns(self, row: dict) -> list[Turn]:
        chosen = extract_claims(row["chosen"], self.vocab)
        rejected = extract_claims(row["rejected"], self.vocab)
        corrections = find_corrections(chosen, rejected, self.codebook.where)
        if not corrections:
            raise ConstructionError(
                "no_error_found",
                f"the chosen answer contradicts no claim of the rejected {row['rejected']!r}",
            )
        return [
            Turn(*self.codebook.render(c.template, c.fields), c.kind, c.role) for c in corrections
        ]

    def __call__(self, row: dict) -> list[Conversation]:
        check_row(row)
        turns = select_turns(self.turns(row), self.corrective)
        return build_conversations(row, turns, self.name, self.include_chosen)

    def batch(self, rows: list[dict]) -> list[list[Conversation] | ConstructionError]:
        return each_row(self, rows)


class AutoConstructor:
    """Template when both answers have at most `short_answer_words` words, else text-diff."""

    name = "auto"

    def __init__(self, cfg: NegativesConfig, codebook: Codebook) -> None:
        self.short_answer_words = cfg.short_answer_words
        self.template = TemplateConstructor(cfg, codebook)
        self.text_diff = TextDiffConstructor(cfg, codebook)

    def __call__(self, row: dict) -> list[Conversation]:
        check_row(row)
        short = all(len(row[k].split()) <= self.short_answer_words for k in ("chosen", "rejected"))
        return (self.template if short else self.text_diff)(row)

    def batch(self, rows: list[dict]) -> list[list[Conversation] | ConstructionError]:
        return each_row(self, rows)
