"""Row validation: every row is either valid or quarantined with a snake_case reason and a detail.

    fn = ValidateBatchFn(ValidationConfig(max_tokens=256), "preference")
    checked = fn(table)  # same columns + quarantine_reason, quarantine_detail ("" when valid)

The checks run in the order of :data:`REASONS` and the first failure wins, so a row has exactly one
reason. Readers (nsft_ray.data) report what they could not read through ``meta["read_error"]``;
that reason is passed through first. ``ValidateBatchFn`` is a callable class so Ray Data's
``map_batches`` loads the tokenizer once per actor; ``validate_rows`` is the same without Ray.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any, TypedDict

import pyarrow as pa
from PIL import Image

from nsft_ray.config import ValidationConfig
from nsft_ray.data import READ_ERROR
from nsft_ray.formats import LAYOUT_REASONS
from nsft_ray.schema import ORIGINS, ROLES, quarantine_table

__all__ = [
    "REASONS",
    "QuarantineCounts",
    "ValidateBatchFn",
    "validate_rows",
    "quarantine_rows",
    "check_counts",
    "summarize",
]

REASONS = {
    # from the readers (nsft_ray.data)
    "malformed_json": "a JSON line or record could not be parsed",
    "image_not_found": "the image path does not exist under the data root",
    "image_unreadable": "the image path exists but could not be read",
    # from the readers of the published layouts (nsft_ray.formats)
    **LAYOUT_REASONS,
    # from the validator, in the order they are checked
    "missing_field": "a required field is absent or null",
    "wrong_type": "a field holds a value of the wrong type",
    "empty_field": "a required text field is blank",
    "bad_origin": "a conversation's origin is not one of the contract's origins",
    "bad_messages": "roles do not alternate user/assistant from user, or a content is empty",
    "chosen_equals_rejected": "the two answers are equal after whitespace/case normalisation",
    "empty_image": "the image has zero bytes",
    "undecodable_image": "PIL cannot open, verify or load the image",
    "image_too_large": "width * height exceeds validation.max_pixels",
    "image_too_small": "a side is shorter than validation.min_side",
    "too_many_tokens": "prompt + answer is longer than validation.max_tokens",
    "duplicate_id": "an earlier valid row in the same batch has this id",
}

# Required fields and their Python types (as in a pyarrow batch's to_pylist()).
FIELDS = {
    "preference": {"id": str, "image": bytes, "prompt": str, "chosen": str, "rejected": str},
    "conversation": {"id": str, "image": bytes, "messages": list, "origin": str},
}
OPTIONAL = {
    "preference": {"source": str, "meta": str},
    "conversation": {"parent_id": str, "error_kinds": list, "meta": str},
}
TEXT_FIELDS = {"preference": ("id", "prompt", "chosen", "rejected"), "conversation": ("id",)}
TYPE_NAMES = {str: "string", bytes: "bytes", list: "list"}

Failure = tuple[str, str]  # (reason, detail); ("", "") for a valid row


class QuarantineCounts(TypedDict):
    read: int
    valid: int
    quarantined: int
    by_reason: dict[str, int]


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


class ValidateBatchFn:
    """For ``map_batches(..., batch_format="pyarrow")``: adds the two quarantine columns."""

    def __init__(self, cfg: ValidationConfig, kind: str) -> None:
        if kind not in FIELDS:
            raise ValueError(f"kind={kind!r}: expected one of {', '.join(FIELDS)}")
        self.cfg, self.kind = cfg, kind
        self.tokenizer = None
        if cfg.tokenizer:
            self.tokenizer = _load_tokenizer(cfg.tokenizer)

    def __call__(self, batch: pa.Table) -> pa.Table:
        results = self.check_rows(batch.to_pylist())
        reasons = pa.array([r for r, _ in results], pa.string())
        details = pa.array([d for _, d in results], pa.string())
        return batch.append_column("quarantine_reason", reasons).append_column(
            "quarantine_detail", details)

    def check_rows(self, rows: list[dict[str, Any]]) -> list[Failure]:
        """One (reason, detail) per row; a repeated id is caught within these rows only."""
        seen: dict[str, int] = {}
        out = []
        for i, row in enumerate(rows):
            failure = self.check(row)
            if not failure[0]:
                if row["id"] in seen:
                    failure = ("duplicate_id", f"id {row['id']!r}: already used by row "
                                               f"{seen[row['id']]} of this batch")
                else:
                    seen[row["id"]] = i
            out.append(failure)
        return out

    def check(self, row: dict[str, Any]) -> Failure:
        """The first failing check for one row, or ("", "")."""
        for step in (self._read_error, self._fields, self._content, self._image, self._tokens):
            failure = step(row)
            if failure:
                return failure
        return "", ""

    def _read_error(self, row: dict) -> Failure | None:
        meta = row.get("meta")
        if isinstance(meta, str) and meta:
            try:
                meta = json.loads(meta)
            except json.JSONDecodeError:
                return "wrong_type", "field 'meta': expected a JSON object string"
        err = meta.get(READ_ERROR) if isinstance(meta, dict) else None
        return (err["reason"], err["detail"]) if err else None

    def _fields(self, row: dict) -> Failure | None:
        for name, tp in FIELDS[self.kind].items():
            if row.get(name) is None:
                return "missing_field", f"field {name!r} is missing (expected {TYPE_NAMES[tp]})"
        for name, tp in {**FIELDS[self.kind], **OPTIONAL[self.kind]}.items():
            v = row.get(name)
            if v is not None and not isinstance(v, tp):
                return "wrong_type", (f"field {name!r}: expected {TYPE_NAMES[tp]}, "
                                      f"got {type(v).__name__}")
        for name in TEXT_FIELDS[self.kind]:
            if not row[name].strip():
                return "empty_field", f"field {name!r} is empty (expected non-blank text)"
        return None

    def _content(self, row: dict) -> Failure | None:
        if self.kind == "preference":
            if _norm(row["chosen"]) == _norm(row["rejected"]):
                return "chosen_equals_rejected", ("fields 'chosen' and 'rejected' are equal after "
                                                  "whitespace/case normalisation")
            return None
        if row["origin"] not in ORIGINS:
            return "bad_origin", f"origin {row['origin']!r}: expected one of {', '.join(ORIGINS)}"
        msgs = row["messages"]
        if not msgs or len(msgs) % 2:
            return "bad_messages", (f"messages: {len(msgs)} turns; expected user/assistant pairs "
                                    "(an even number, at least 2)")
        for i, m in enumerate(msgs):
            want = ROLES[i % 2]
            role = m.get("role") if isinstance(m, dict) else None
            if role != want:
                return "bad_messages", f"messages[{i}]: role {role!r}, expected {want!r}"
            if not isinstance(m.get("content"), str) or not m["content"].strip():
                return "bad_messages", f"messages[{i}] ({want}): content is empty"
        return None

    def _image(self, row: dict) -> Failure | None:
        data, cfg = row["image"], self.cfg
        if not data:
            return "empty_image", "field 'image' has 0 bytes"
        try:
            # Size comes from the header, before decoding: a huge image is refused unread.
            with Image.open(io.BytesIO(data)) as im:
                w, h = im.size
        except Image.DecompressionBombError as e:
            return "image_too_large", f"field 'image': {e}"
        except Exception as e:  # PIL raises many types for bad data; all mean "undecodable"
            return "undecodable_image", f"field 'image': {type(e).__name__}: {e}"
        if w * h > cfg.max_pixels:
            return "image_too_large", (f"field 'image': {w}x{h} = {w * h} pixels > max_pixels "
                                       f"{cfg.max_pixels}")
        try:
            with Image.open(io.BytesIO(data)) as im:
                im.verify()  # checksums and structure; the image is unusable afterwards
            with Image.open(io.BytesIO(data)) as im:
                im.load()  # verify() misses truncated pixel data; decoding catches it
        except Exception as e:
            return "undecodable_image", f"field 'image': {type(e).__name__}: {e}"
        if min(w, h) < cfg.min_side:
            return "image_too_small", (f"field 'image': {w}x{h}, a side < min_side "
                                       f"{cfg.min_side}")
        return None

    def count_tokens(self, text: str) -> int:
        """Tokens under the configured tokenizer, else whitespace-separated words."""
        if self.tokenizer is None:
            return len(text.split())
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _tokens(self, row: dict) -> Failure | None:
        if self.kind == "preference":
            answers = {k: self.count_tokens(row[k]) for k in ("chosen", "rejected")}
            longest = max(answers, key=answers.__getitem__)
            n, what = self.count_tokens(row["prompt"]) + answers[longest], f"prompt + {longest}"
        else:
            n, what = sum(self.count_tokens(m["content"]) for m in row["messages"]), "messages"
        if n > self.cfg.max_tokens:
            unit = "tokens" if self.tokenizer is not None else "words"
            return "too_many_tokens", f"{what}: {n} {unit} > max_tokens {self.cfg.max_tokens}"
        return None


def _load_tokenizer(path: str) -> Any:
    """A tokenizer from a local folder (a tokenizer's, or a processor's that holds one)."""
    if not Path(path).is_dir():
        raise FileNotFoundError(f"validation.tokenizer: {path} is not a folder "
                                "(expected a local tokenizer or processor folder)")
    from transformers import AutoProcessor, AutoTokenizer  # heavy; only when asked for

    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError):
        return AutoProcessor.from_pretrained(path, local_files_only=True).tokenizer


def validate_rows(rows: list[dict[str, Any]], cfg: ValidationConfig, kind: str,
                  stage: str = "validate") -> tuple[list[dict], list[dict]]:
    """Split rows into (valid, quarantined); quarantined: {id, stage, reason, detail, row}."""
    fn = ValidateBatchFn(cfg, kind)
    valid, quarantined = [], []
    for row, (reason, detail) in zip(rows, fn.check_rows(rows), strict=True):
        if reason:
            quarantined.append({"id": row.get("id") or "", "stage": stage, "reason": reason,
                                "detail": detail, "row": row})
        else:
            valid.append(row)
    return valid, quarantined


def quarantine_rows(batch: pa.Table, stage: str) -> pa.Table:
    """The rows of `batch` with a quarantine_reason -> QUARANTINE_SCHEMA (image bytes -> length)."""
    rows = []
    for r in batch.to_pylist():
        reason, detail = r.pop("quarantine_reason"), r.pop("quarantine_detail")
        if reason:
            rows.append({"id": r.get("id") or "", "stage": stage, "reason": reason,
                         "detail": detail, "row": r})
    return quarantine_table(rows)


def check_counts(counts: QuarantineCounts, stage: str) -> None:
    """Raise AssertionError unless read == valid + quarantined == valid + sum(by_reason)."""
    read, valid, bad = counts["read"], counts["valid"], counts["quarantined"]
    if read != valid + bad or bad != sum(counts["by_reason"].values()):
        raise AssertionError(
            f"stage {stage}: row accounting broken: read {read} != valid {valid} + quarantined "
            f"{bad} (by reason: {counts['by_reason']}); a step dropped or duplicated rows")


def summarize(counts: QuarantineCounts) -> str:
    """A small text table: read / valid / quarantined, then one line per reason."""
    lines = [f"{'read':<24}{counts['read']:>8}", f"{'valid':<24}{counts['valid']:>8}",
             f"{'quarantined':<24}{counts['quarantined']:>8}"]
    for reason, n in sorted(counts["by_reason"].items(), key=lambda kv: (-kv[1], kv[0])):
        lines.append(f"  {reason:<22}{n:>8}")
    return "\n".join(lines)
