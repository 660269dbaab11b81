"""The LLM constructor (the paper's G): an instruction-tuned LLM reads the prompt, the chosen and
the rejected answer and the error codebook, and writes corrective question/answer turns as JSON:

    {"turns": [{"question": "...", "answer": "...", "error_kind": "existence",
                "role": "confirm"}, ...]}

As the rule-based constructors, G is asked for a turn confirming what the correct answer says
and a turn refuting the wrong claim per error (only refuting ones when NegativesConfig.corrective
is refute_only, whose conversations also drop any turn G marks "confirm"). A reply is valid if it
is such a JSON object (a ```json fence is tolerated), with 1..max_turns turns, non-empty question
and answer strings, an error_kind from the codebook and, if given, a role "confirm" or "refute".
Invalid replies are asked again up to `max_retries` times; then the row fails with the last
reason (llm_empty, llm_invalid_json, llm_bad_format, llm_too_many_turns, llm_bad_turn,
llm_unknown_kind, llm_no_refuting_turn, llm_timeout, ...). All prompts of a batch go to the
backend in one call.
"""

from __future__ import annotations

import json
import re

from nsft_ray.config import NegativesConfig
from nsft_ray.negatives.backends import LLMBackend, make_backend
from nsft_ray.negatives.codebook import ROLES, Codebook
from nsft_ray.negatives.constructors import (
    ConstructionError,
    Conversation,
    Turn,
    build_conversations,
    check_row,
    select_turns,
)

__all__ = ["PROMPT", "INSTRUCTIONS", "build_prompt", "parse_reply", "LLMConstructor"]

PROMPT = """\
You correct wrong answers about an image. A user asked a question about an image. Below are a \
correct answer and a wrong answer. Find the visual errors in the wrong answer. Error kinds, \
each example with a turn that confirms the truth and a turn that refutes the error:
{codebook}

Question: {prompt}
Correct answer: {chosen}
Wrong answer: {rejected}

{instruction} Use only facts from the correct answer and answer truthfully. When the wrong \
answer denies an object that is there, confirm it ("Is there a cat?" "Yes, there is a cat."); \
never answer "No" to a question about whether it is there ("Is it true that there is no cat?" \
"No.") — a "No" reads as denying the object. Reply with JSON only, with 1 to {max_turns} turns:
{{"turns": [{{"question": "...", "answer": "...", "error_kind": "one of: {kinds}", \
"role": "confirm or refute"}}]}}"""
# What to write per error, by NegativesConfig.corrective.
INSTRUCTIONS = {
    "confirm_and_refute": (
        "For each error, write two questions about the image with their correct answers: one "
        'that confirms what the correct answer says (role "confirm", answered "Yes, ..." or '
        'with the true value) and one that asks about the wrong claim and refutes it (role '
        '"refute", answered "No, ..." with the truth).'
    ),
    "refute_only": (
        "For each error, write one question about the image that asks about the wrong claim and "
        'refutes it, with its correct answer (role "refute").'
    ),
}

_FENCE = re.compile(r"```(?:json)?\s*(.*?)```", re.DOTALL | re.IGNORECASE)


def build_prompt(
    row: dict, codebook: Codebook, max_turns: int, corrective: str = "confirm_and_refute"
) -> str:
    if corrective not in INSTRUCTIONS:
        raise ValueError(
            f"negatives.corrective: {corrective!r} is not one of {', '.join(INSTRUCTIONS)}"
        )
    return PROMPT.format(
        instruction=INSTRUCTIONS[corrective],
        codebook=codebook.describe(),
        prompt=row["prompt"].strip(),
        chosen=row["chosen"].strip(),
        rejected=row["rejected"].strip(),
        max_turns=max_turns,
        kinds=", ".join(codebook.kinds),
    )


def parse_reply(text: str, kinds: tuple[str, ...], max_turns: int) -> list[Turn]:
    """Validate an LLM reply and return its turns; raise ConstructionError naming the problem."""
    if not text or not text.strip():
        raise ConstructionError("llm_empty", "the reply is empty")
    fenced = _FENCE.search(text)
    body = fenced.group(1) if fenced else text
    # Models often add a sentence around the object: keep the outermost braces.
    start, end = body.find("{"), body.rfind("}")
    if start < 0 or end < start:
        raise ConstructionError("llm_invalid_json", f"no JSON object in {text[:200]!r}")
    try:
        data = json.loads(body[start : end + 1])
    except json.JSONDecodeError as e:
        raise ConstructionError("llm_invalid_json", f"{e} in {text[:200]!r}") from None
    turns = data.get("turns") if isinstance(data, dict) else None
    if not isinstance(turns, list):
        detail = f'expected {{"turns": [...]}}, got {text[:200]!r}'
        raise ConstructionError("llm_bad_format", detail)
    if not turns:
        raise ConstructionError("llm_empty", "the reply has no turns")
    if len(turns) > max_turns:
        raise ConstructionError("llm_too_many_turns", f"{len(turns)} turns, at most {max_turns}")
    out = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise ConstructionError("llm_bad_turn", f"turns[{i}] is not an object: {turn!r}")
        for key in ("question", "answer"):
            value = turn.get(key)
            if not isinstance(value, str) or not value.strip():
                detail = f"turns[{i}].{key} must be a non-empty string, got {value!r}"
                raise ConstructionError("llm_bad_turn", detail)
        kind = turn.get("error_kind")
        if kind not in kinds:
            detail = f"turns[{i}].error_kind {kind!r} is not one of {', '.join(kinds)}"
            raise ConstructionError("llm_unknown_kind", detail)
        role = turn.get("role")
        if role is not None and role not in ROLES:
            detail = f"turns[{i}].role {role!r} is not one of {', '.join(ROLES)}"
            raise ConstructionError("llm_bad_turn", detail)
        out.append(Turn(turn["question"].strip(), turn["answer"].strip(), kind, role))
    return out


class LLMConstructor:
    """Corrective conversations written by an LLM backend (openai, transformers or vllm)."""

    name = "llm"

    def __init__(
        self, cfg: NegativesConfig, codebook: Codebook, backend: LLMBackend | None = None
    ) -> None:
        self.codebook = codebook
        self.llm = cfg.llm
        self.include_chosen = cfg.include_chosen
        self.corrective = cfg.corrective
        self.backend = backend if backend is not None else make_backend(cfg.llm)

    def __call__(self, row: dict) -> list[Conversation]:
        (result,) = self.batch([row])
        if isinstance(result, ConstructionError):
            raise result
        return result

    def _keep(self, turns: list[Turn]) -> list[Turn]:
        """The turns `corrective` keeps; refute_only needs at least one that is not "confirm"."""
        kept = select_turns(turns, self.corrective)
        if not kept:
            raise ConstructionError("llm_no_refuting_turn", "every turn of the reply confirms")
        return kept

    def batch(self, rows: list[dict]) -> list[list[Conversation] | ConstructionError]:
        """One result per row; each attempt sends every still-unanswered prompt in one call."""
        results: list[list[Conversation] | ConstructionError | None] = [None] * len(rows)
        pending: dict[int, str] = {}
        for i, row in enumerate(rows):
            try:
                check_row(row)
                pending[i] = build_prompt(row, self.codebook, self.llm.max_turns, self.corrective)
            except ConstructionError as e:
                results[i] = e
        kinds = tuple(self.codebook.kinds)
        for _attempt in range(1 + self.llm.max_retries):
            if not pending:
                break
            order = list(pending)
            replies = self.backend.complete([pending[i] for i in order])
            if len(replies) != len(order):
                raise RuntimeError(
                    f"LLM backend returned {len(replies)} replies for {len(order)} prompts"
                )
            for i, reply in zip(order, replies, strict=True):
                try:
                    if isinstance(reply, ConstructionError):
                        raise reply
                    turns = self._keep(parse_reply(reply, kinds, self.llm.max_turns))
                except ConstructionError as e:
                    results[i] = e  # the last failure is what the row is quarantined with
                    continue
                results[i] = build_conversations(rows[i], turns, self.name, self.include_chosen)
                del pending[i]
        attempts = 1 + self.llm.max_retries
        for i in pending:
            last = results[i]
            detail = f"{last.detail} (after {attempts} attempts)"
            results[i] = ConstructionError(last.reason, detail)
        return results  # type: ignore[return-value]  # every slot is filled by now
