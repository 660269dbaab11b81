"""Batch construction of negatives: preference rows -> conversation rows, failures kept.

For Ray Data (the caller imports Ray; this module does not)::

    ds.map_batches(NegativesBatchFn, fn_constructor_kwargs={"cfg": negatives_cfg},
                   batch_format="pyarrow", batch_size=negatives_cfg.batch_size, concurrency=1)

Each output row has CONVERSATION_SCHEMA's columns plus `quarantine_reason` and
`quarantine_detail` (empty for good rows). A preference row that yields nothing becomes one output
row with empty messages, id = the preference id, origin "negative", the reason set, and the
original row (without image) under meta["row"]; `split_output` turns a table into conversations
and QUARANTINE_SCHEMA rows. Without Ray, `construct_rows(rows, cfg)` does the same on dicts.
`corrective_answer_counts(conversations)` is the yes:no balance the negatives teach (summary.json).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from nsft_ray.config import NegativesConfig
from nsft_ray.negatives.backends import LLMBackend
from nsft_ray.negatives.codebook import Codebook, load_codebook
from nsft_ray.negatives.constructors import (
    AutoConstructor,
    ConstructionError,
    Conversation,
    TemplateConstructor,
    TextDiffConstructor,
)
from nsft_ray.negatives.llm import LLMConstructor
from nsft_ray.schema import CONVERSATION_SCHEMA, loads_meta, quarantine_table

__all__ = [
    "OUTPUT_SCHEMA",
    "STAGE",
    "CONSTRUCTORS",
    "make_constructor",
    "construct_rows",
    "NegativesBatchFn",
    "split_output",
    "corrective_answer_counts",
]

STAGE = "negatives"  # the quarantine stage name
OUTPUT_SCHEMA = CONVERSATION_SCHEMA.append(pa.field("quarantine_reason", pa.string())).append(
    pa.field("quarantine_detail", pa.string())
)
CONSTRUCTORS: dict[str, Any] = {
    "template": TemplateConstructor,
    "text-diff": TextDiffConstructor,
    "auto": AutoConstructor,
    "llm": LLMConstructor,
}


def make_constructor(
    cfg: NegativesConfig, codebook: Codebook | None = None, backend: LLMBackend | None = None
) -> Any:
    """The constructor named by cfg.constructor (the llm one builds cfg.llm's backend if none)."""
    if cfg.constructor not in CONSTRUCTORS:
        raise ValueError(
            f"negatives.constructor: {cfg.constructor!r} is not one of {', '.join(CONSTRUCTORS)}"
        )
    codebook = codebook if codebook is not None else load_codebook(cfg.codebook)
    if cfg.constructor == "llm":
        return LLMConstructor(cfg, codebook, backend)
    return CONSTRUCTORS[cfg.constructor](cfg, codebook)


def _without_image(row: dict) -> dict:
    return {k: v for k, v in row.items() if k != "image"}


def construct_rows(
    rows: list[dict],
    cfg: NegativesConfig,
    codebook: Codebook | None = None,
    backend: LLMBackend | None = None,
) -> tuple[list[Conversation], list[dict]]:
    """Preference rows -> (conversations, failures); a failure is a `quarantine_table` row."""
    constructor = make_constructor(cfg, codebook, backend)
    conversations: list[Conversation] = []
    failures: list[dict] = []
    for row, result in zip(rows, constructor.batch(rows), strict=True):
        if isinstance(result, ConstructionError):
            failures.append({
                "id": row.get("id") or "", "stage": STAGE, "reason": result.reason,
                "detail": result.detail, "row": _without_image(row),
            })
        else:
            conversations.extend(result)
    return conversations, failures


class NegativesBatchFn:
    """Ray Data callable class: loads the codebook and the LLM backend once per actor."""

    def __init__(self, cfg: NegativesConfig, backend: LLMBackend | None = None) -> None:
        self.constructor = make_constructor(cfg, load_codebook(cfg.codebook), backend)

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        out: list[dict] = []
        for row, result in zip(rows, self.constructor.batch(rows), strict=True):
            if isinstance(result, ConstructionError):
                out.append(self._failure(row, result))
            else:
                out.extend({**c, "quarantine_reason": "", "quarantine_detail": ""} for c in result)
        return pa.Table.from_pylist(out, schema=OUTPUT_SCHEMA)

    def _failure(self, row: dict, error: ConstructionError) -> dict:
        meta = {"constructor": self.constructor.name, "row": _without_image(row)}
        return {
            "id": row.get("id") or "",
            "parent_id": row.get("id"),
            "image": row.get("image"),
            "messages": [],
            "origin": "negative",
            "error_kinds": [],
            # default=str: a malformed row may hold values JSON cannot write; keep them readable.
            "meta": json.dumps(meta, sort_keys=True, default=str),
            "quarantine_reason": error.reason,
            "quarantine_detail": error.detail,
        }


def split_output(table: pa.Table) -> tuple[pa.Table, pa.Table]:
    """A NegativesBatchFn output -> (CONVERSATION_SCHEMA table, QUARANTINE_SCHEMA table)."""
    failed = pc.not_equal(table["quarantine_reason"], "")
    good = table.filter(pc.invert(failed)).select(CONVERSATION_SCHEMA.names)
    bad = table.filter(failed).to_pylist()
    quarantine = quarantine_table([
        {
            "id": r["id"], "stage": STAGE, "reason": r["quarantine_reason"],
            "detail": r["quarantine_detail"], "row": loads_meta(r["meta"]).get("row", {}),
        }
        for r in bad
    ])
    return good.cast(CONVERSATION_SCHEMA), quarantine


def corrective_answer_counts(conversations: Iterable[Conversation]) -> dict[str, Any]:
    """Yes/no/other of every corrective answer (the assistant turns of the negative
    conversations, read by the POPE parser: the first yes/no word, else a negation or "there is"),
    overall and per error kind ("unknown" where the turn has none). A skew towards "no" here
    becomes a model that answers "no" to existence probes.

        {"yes": 812, "no": 790, "other": 12, "by_kind": {"existence": {"yes": 300, ...}, ...}}
    """
    # Imported here: nsft_ray.eval loads the whole evaluation runner, which building negatives
    # (in every Ray actor) does not otherwise need.
    from nsft_ray.eval.pope import parse_yes_no

    total: Counter[str] = Counter()
    by_kind: dict[str, Counter[str]] = {}
    for conv in conversations:
        if conv["origin"] != "negative":
            continue
        kinds = loads_meta(conv["meta"]).get("turn_kinds") or []
        answers = [m["content"] for m in conv["messages"] if m["role"] == "assistant"]
        for i, text in enumerate(answers):
            word = {True: "yes", False: "no", None: "other"}[parse_yes_no(text)]
            kind = (kinds[i] if i < len(kinds) else None) or "unknown"
            total[word] += 1
            by_kind.setdefault(kind, Counter())[word] += 1
    zero = {"yes": 0, "no": 0, "other": 0}
    return {
        **zero, **total,
        "by_kind": {k: {**zero, **by_kind[k]} for k in sorted(by_kind)},
    }
