"""The vision error codebook: error kinds with descriptions, examples and corrective templates.

The codebook is data (codebook.yaml, bundled with the package). The LLM constructor shows the
descriptions and examples (each a confirming and a refuting turn) to the model; the text-diff and
template constructors fill the templates. A user codebook may add kinds (the LLM may then use
them); the five kinds below and their templates are required because those constructors write them.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "KINDS", "ROLES", "CodebookError", "QA", "Example", "ErrorKind", "Codebook", "load_codebook",
]

KINDS = ("existence", "attribute", "count", "scene", "spatial")
ROLES = ("confirm", "refute")  # what a corrective turn does: confirms the truth, refutes the error
# Required templates per kind, with the placeholders each may use (the fields the constructors
# fill: a confirming and a refuting template of one error get the same fields).
_COUNT = frozenset({"object", "objects", "number", "wrong", "truth"})
_THING = frozenset({"thing"})
TEMPLATE_FIELDS: dict[str, dict[str, frozenset[str]]] = {
    "existence": {"present": _THING, "absent": _THING, "denied": _THING, "claimed": _THING},
    "attribute": {
        "color_affirm": frozenset({"ref", "color", "wrong"}),
        "color_deny": frozenset({"ref", "color", "wrong"}),
        **{t: frozenset({"ref", "size", "wrong"}) for t in ("size", "size_affirm", "size_deny")},
    },
    "count": {"ask": _COUNT, "affirm": _COUNT, "deny": _COUNT},
    "scene": {t: frozenset({"scene", "wrong"}) for t in ("ask", "affirm", "deny")},
    "spatial": {t: frozenset({"ref", "where", "wrong"}) for t in ("ask", "affirm", "deny")},
}
SHORT_ANSWER_FIELDS = {
    "confirm": frozenset({"prompt", "chosen", "rejected"}),
    "refute": frozenset({"prompt", "chosen", "rejected"}),
}


class CodebookError(ValueError):
    """The codebook file is malformed; the message names the file and the key."""


@dataclass(frozen=True)
class QA:
    """A question/answer template pair."""

    question: str
    answer: str

    def render(self, fields: dict[str, str]) -> tuple[str, str]:
        return _fill(self.question, fields), _fill(self.answer, fields)


_A_BEFORE_VOWEL = re.compile(r"\b([Aa]) (?=[aeiouAEIOU])")


def _fill(template: str, fields: dict[str, str]) -> str:
    """Fill a template; "a orange circle" -> "an orange circle", and a sentence that opens with a
    placeholder ("{truth}.") starts with a capital."""
    text = _A_BEFORE_VOWEL.sub(lambda m: m.group(1) + "n ", template.format(**fields))
    return text[:1].upper() + text[1:]


@dataclass(frozen=True)
class Example:
    """A correct and a wrong answer, and the confirming and refuting turns they call for."""

    correct: str
    rejected: str
    confirm: QA
    refute: QA


@dataclass(frozen=True)
class ErrorKind:
    name: str
    description: str
    examples: tuple[Example, ...]
    templates: dict[str, QA]


@dataclass(frozen=True)
class Codebook:
    kinds: dict[str, ErrorKind]
    # "confirm" and "refute" turns of the template constructor for answers it cannot read
    short_answer: dict[str, QA]
    positions: dict[str, str]  # cell -> phrase; "default" holds "{position}"

    def render(self, template: str, fields: dict[str, str]) -> tuple[str, str]:
        """The corrective (question, answer) of `template` ("existence.absent") filled in."""
        kind, _, name = template.partition(".")
        return self.kinds[kind].templates[name].render(fields)

    def where(self, position: str) -> str:
        """How a position is said: "center" -> "in the center", "top" -> "at the top"."""
        return self.positions.get(position) or self.positions["default"].format(position=position)

    def describe(self) -> str:
        """The kinds, descriptions and examples as plain text for an LLM prompt."""
        lines = []
        for kind in self.kinds.values():
            lines.append(f"- {kind.name}: {kind.description}")
            for ex in kind.examples:
                lines.append(f'    e.g. correct: "{ex.correct}" wrong: "{ex.rejected}"')
                for role, qa in (("confirm", ex.confirm), ("refute", ex.refute)):
                    lines.append(f'      {role}: "{qa.question}" -> "{qa.answer}"')
        return "\n".join(lines)


def default_codebook_path() -> Path:
    return Path(str(resources.files("nsft_ray.negatives") / "codebook.yaml"))


def load_codebook(path: str = "") -> Codebook:
    """Load and check a codebook YAML file; empty `path` loads the bundled one."""
    file = Path(path) if path else default_codebook_path()
    if not file.is_file():
        raise CodebookError(f"codebook file {file} does not exist")
    try:
        data = yaml.safe_load(file.read_text())
    except yaml.YAMLError as e:
        raise CodebookError(f"{file}: not valid YAML: {e}") from e
    return _parse(data, where=str(file))


def _mapping(value: Any, key: str) -> dict:
    if not isinstance(value, dict) or not value:
        raise CodebookError(f"{key}: expected a non-empty mapping, got {value!r}")
    return value


def _text(value: Any, key: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise CodebookError(f"{key}: expected a non-empty string, got {value!r}")
    return value


def _template(value: Any, key: str, allowed: frozenset[str]) -> QA:
    value = _mapping(value, key)
    qa = QA(
        _text(value.get("question"), f"{key}.question"),
        _text(value.get("answer"), f"{key}.answer"),
    )
    for part, text in (("question", qa.question), ("answer", qa.answer)):
        try:
            used = {name for _, name, _, _ in string.Formatter().parse(text) if name is not None}
        except ValueError as e:
            raise CodebookError(f"{key}.{part}: bad template {text!r}: {e}") from e
        unknown = used - allowed
        if unknown:
            raise CodebookError(
                f"{key}.{part}: unknown placeholder {{{sorted(unknown)[0]}}}; "
                f"allowed: {', '.join('{' + a + '}' for a in sorted(allowed))}"
            )
    return qa


def _parse(data: Any, where: str) -> Codebook:
    root = _mapping(data, where)
    kinds_data = _mapping(root.get("kinds"), f"{where}: kinds")
    missing = [k for k in KINDS if k not in kinds_data]
    if missing:
        raise CodebookError(f"{where}: kinds.{missing[0]} is missing; required: {', '.join(KINDS)}")
    kinds = {}
    for name, body in kinds_data.items():
        key = f"{where}: kinds.{name}"
        body = _mapping(body, key)
        examples = body.get("examples")
        if not isinstance(examples, list) or not examples:
            raise CodebookError(f"{key}.examples: expected a non-empty list, got {examples!r}")
        parsed_examples = []
        for i, ex in enumerate(examples):
            where_ex = f"{key}.examples[{i}]"
            ex = _mapping(ex, where_ex)
            turns = [_template(ex.get(r), f"{where_ex}.{r}", frozenset()) for r in ROLES]
            texts = [_text(ex.get(f), f"{where_ex}.{f}") for f in ("correct", "rejected")]
            parsed_examples.append(Example(*texts, *turns))
        required = TEMPLATE_FIELDS.get(name, {})
        templates_data = body.get("templates") or {}
        if not isinstance(templates_data, dict):
            raise CodebookError(f"{key}.templates: expected a mapping, got {templates_data!r}")
        for template_name in required:
            if template_name not in templates_data:
                raise CodebookError(
                    f"{key}.templates.{template_name} is missing; "
                    f"required: {', '.join(required)}"
                )
        templates = {
            t: _template(v, f"{key}.templates.{t}", required.get(t, frozenset()))
            for t, v in templates_data.items()
        }
        description = _text(body.get("description"), f"{key}.description")
        kinds[name] = ErrorKind(name, description.strip(), tuple(parsed_examples), templates)

    short_data = _mapping(root.get("short_answer"), f"{where}: short_answer")
    short = {}
    for name, allowed in SHORT_ANSWER_FIELDS.items():
        if name not in short_data:
            raise CodebookError(f"{where}: short_answer.{name} is missing")
        short[name] = _template(short_data[name], f"{where}: short_answer.{name}", allowed)

    positions_data = _mapping(root.get("positions"), f"{where}: positions")
    positions = {str(k): _text(v, f"{where}: positions.{k}") for k, v in positions_data.items()}
    if "{position}" not in positions.get("default", ""):
        raise CodebookError(f"{where}: positions.default must contain {{position}}")
    return Codebook(kinds=kinds, short_answer=short, positions=positions)
