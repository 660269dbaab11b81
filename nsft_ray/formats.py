"""Published VLM preference layouts, each read as it is published and mapped onto the contract.

    mapper = record_mapper("vlfeedback", aspect="Visual Faithfulness")
    mapped = mapper(record)   # {"id", "image", "prompt", "chosen", "rejected", "source", "meta"}

One small function per layout maps ONE raw record (a Parquet row as a dict, or one JSON record)
onto the preference contract. It never raises on bad data: a record it cannot map comes back with
``"error": (reason, detail)`` and the fields it could not fill left as None, so the reader in
:mod:`nsft_ray.data` turns it into a quarantined row (read == valid + quarantined). ``image`` is
an image reference (bytes, a path under ``data.root``, or a ``datasets`` Image struct
``{bytes, path}``); ``image_candidates`` lists relative paths to try in order when the layout
names no single file.

Layouts (``data.format``)::

    rlaif-v     RLAIF-V-Dataset Parquet: idx, image{bytes,path}, question, chosen, rejected, ...
    rlhf-v      RLHF-V-Dataset Parquet: idx, image{bytes,path}, text = JSON {question, chosen,
                rejected}
    trl         TRL conversational preference Parquet: images[], prompt/chosen/rejected messages
    vlfeedback  VLFeedback JSON Lines: id, prompt, img_path, completions[{annotations, model,
                response}]
    povid       POVID JSON list: id, image, conversations, rejected_conversations (LLaVA turns)
    llava-rlhf  LLaVA-Human-Preference-10K JSON list: conversations, output_1, output_2,
                preference
    hadpo       HA-DPO pope_data.json (list) and desc_data.json (dict by image id, or list)

This module only maps records; it reads no files, so it imports nothing from the readers.
"""

from __future__ import annotations

import hashlib
import json
import math
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

__all__ = [
    "LAYOUT_REASONS",
    "VLFEEDBACK_ASPECTS",
    "DESCRIBE_PROMPTS",
    "Layout",
    "LAYOUTS",
    "record_mapper",
    "document_records",
    "detect_layout",
    "rlaif_v",
    "rlhf_v",
    "trl",
    "vlfeedback",
    "povid",
    "llava_rlhf",
    "hadpo",
]

# Quarantine reasons only the published layouts produce (the validator lists them with its own).
LAYOUT_REASONS = {
    "rating_tie": "VLFeedback: every rated answer has the same rating on data.vlfeedback_aspect",
    "no_preference": "the record states no preference (VLFeedback: fewer than two rated answers; "
                     "HA-DPO: correct is true, which HA-DPO's trainers skip)",
    "bad_preference": "LLaVA-RLHF: preference is not 1 or 2",
    "multi_turn": "a conversation asks more than one question; a preference row holds one",
    "prompt_mismatch": "the chosen and rejected conversations ask different questions",
}
VLFEEDBACK_ASPECTS = ("Visual Faithfulness", "Helpfulness", "Ethical Considerations")
# HA-DPO's description prompts: its trainers draw one at random per description pair.
DESCRIBE_PROMPTS = (
    "Describe this image in detail.",
    "Take a look at this image and describe what you notice.",
    "Please provide a detailed description of the picture.",
    "Could you describe the contents of this image for me?",
)
IMAGE_PLACEHOLDER = "<image>"
HUMAN, GPT = ("human", "user"), ("gpt", "assistant")  # LLaVA speaker names (and chat roles)

Mapped = dict[str, Any]


# ------------------------------------------------------------------------------------ helpers


def _fail(out: Mapped, reason: str, detail: str) -> Mapped:
    return {**out, "error": (reason, detail)}


def _extras(rec: dict, used: set[str]) -> dict:
    """Every key the layout does not map: kept in meta (the reader JSON-encodes it)."""
    return {k: v for k, v in rec.items() if k not in used}


def _content_id(*parts: Any) -> str:
    """A stable id for layouts without one: the same record gets the same id on every read."""
    h = hashlib.sha1()
    for part in parts:
        h.update(json.dumps(part, default=_digest).encode())
    return h.hexdigest()[:16]


def _digest(value: Any) -> str:
    # Image bytes enter the id through their hash: two rows asking the same about two images
    # are two rows.
    return hashlib.sha1(value).hexdigest() if isinstance(value, bytes) else str(value)


def _image_ref(rec: dict, key: str = "image", path_key: str = "image_path") -> Any:
    """The image column (bytes, path or {bytes, path} struct); `path_key` when it holds nothing."""
    ref = rec.get(key)
    empty = ref is None or (isinstance(ref, dict) and ref.get("bytes") is None
                            and not ref.get("path"))
    return rec.get(path_key) if empty else ref


def _clean_prompt(text: Any) -> Any:
    # LLaVA marks the image's place with <image>; the contract keeps the image apart from text.
    return text.replace(IMAGE_PLACEHOLDER, "").strip() if isinstance(text, str) else text


def _single_turn(turns: Any, key: str) -> tuple[str | None, str | None, tuple[str, str] | None]:
    """LLaVA turns [{from: human, value}, {from: gpt, value}] -> (question, answer, error)."""
    if not isinstance(turns, list) or not all(isinstance(t, dict) for t in turns):
        what = "null" if turns is None else type(turns).__name__
        return None, None, ("missing_field" if turns is None else "wrong_type",
                            f"{key}: expected a list of {{'from', 'value'}} turns, got {what}")
    if len(turns) > 2:
        return None, None, ("multi_turn", f"{key}: {len(turns)} turns; a preference row holds "
                                          "one question (human) and its answer (gpt)")
    roles = [t.get("from") for t in turns]
    if len(turns) != 2 or roles[0] not in HUMAN or roles[1] not in GPT:
        return None, None, ("wrong_type", f"{key}: speakers {roles}; expected ['human', 'gpt']")
    return _clean_prompt(turns[0].get("value")), turns[1].get("value"), None


# ------------------------------------------------------------------------------------ Parquet


def rlaif_v(rec: dict) -> Mapped:
    """RLAIF-V-Dataset: question, chosen, rejected are plain strings; idx is the id."""
    ds = rec.get("ds_name")
    return {"id": rec.get("idx"), "image": _image_ref(rec), "prompt": rec.get("question"),
            "chosen": rec.get("chosen"), "rejected": rec.get("rejected"),
            "source": f"rlaif-v/{ds}" if isinstance(ds, str) and ds else "rlaif-v",
            "meta": _extras(rec, {"idx", "image", "question", "chosen", "rejected"})}


RLHF_V_TEXT_KEYS = ("question", "chosen", "rejected")


def rlhf_v(rec: dict) -> Mapped:
    """RLHF-V-Dataset: `text` is a JSON string {"question", "chosen", "rejected"}."""
    ds = rec.get("ds_name")
    out = {"id": rec.get("idx"), "image": _image_ref(rec),
           "source": f"rlhf-v/{ds}" if isinstance(ds, str) and ds else "rlhf-v",
           "meta": _extras(rec, {"idx", "image", "text"})}
    text = rec.get("text")
    if not isinstance(text, str):
        return _fail(out, "missing_field" if text is None else "wrong_type",
                     f"text: expected a JSON string {{question, chosen, rejected}}, "
                     f"got {type(text).__name__}")
    try:
        fields = json.loads(text)
    except json.JSONDecodeError as e:
        return _fail(out, "malformed_json", f"text: not valid JSON ({e}); expected an object "
                                            f"with keys {', '.join(RLHF_V_TEXT_KEYS)}: "
                                            f"{text[:80]!r}")
    if not isinstance(fields, dict):
        return _fail(out, "wrong_type", f"text: expected a JSON object, got JSON "
                                        f"{type(fields).__name__}")
    missing = [k for k in RLHF_V_TEXT_KEYS if k not in fields]
    if missing:
        return _fail(out, "missing_field", f"text: JSON object lacks {missing[0]!r} (expected "
                                           f"keys {', '.join(RLHF_V_TEXT_KEYS)})")
    return {**out, "prompt": fields["question"], "chosen": fields["chosen"],
            "rejected": fields["rejected"]}


def _message_text(msg: Any, where: str) -> tuple[str | None, tuple[str, str] | None]:
    """A chat message's content (a string or typed parts) -> its text parts joined."""
    content = msg.get("content") if isinstance(msg, dict) else None
    if isinstance(content, str):
        return _clean_prompt(content), None
    if not isinstance(content, list) or not all(isinstance(p, dict) for p in content):
        return None, ("wrong_type", f"{where}.content: expected a string or a list of "
                                    f"{{'type', 'text'}} parts, got {type(content).__name__}")
    texts = [p.get("text") for p in content if p.get("type") == "text"]
    if not all(isinstance(t, str) for t in texts):
        return None, ("wrong_type", f"{where}.content: a text part has no string 'text'")
    return _clean_prompt(" ".join(texts)), None


def _trl_turn(value: Any, key: str, role: str) -> tuple[str | None, list, tuple | None]:
    """TRL's prompt (role user) or answer (role assistant): a string or a list of messages.

    Returns (text, system texts, error); a system message is kept in meta, not in the prompt.
    """
    if value is None or isinstance(value, str):
        return _clean_prompt(value), [], None
    if not isinstance(value, list):
        return None, [], ("wrong_type", f"{key}: expected a string or a list of messages, got "
                                        f"{type(value).__name__}")
    system, mine = [], []
    for i, msg in enumerate(value):
        text, err = _message_text(msg, f"{key}[{i}]")
        if err:
            return None, [], err
        r = msg.get("role")
        if r == "system" and role == "user":
            system.append(text)
        elif r == role:
            mine.append(text)
        else:
            return None, [], ("multi_turn", f"{key}[{i}]: role {r!r}; expected one {role!r} "
                                            "message (one question and its answer per row)")
    if len(mine) != 1:
        return None, [], ("multi_turn", f"{key}: {len(mine)} {role!r} messages; expected one")
    return mine[0], system, None


def trl(rec: dict) -> Mapped:
    """TRL's vision preference layout: `images` (one Image struct), prompt/chosen/rejected."""
    images = rec.get("images")
    rid = rec.get("id")
    if rid is None:  # TRL rows carry no id, and Parquet batches no row number: hash the texts
        rid = _content_id(images, rec.get("prompt"), rec.get("chosen"), rec.get("rejected"))
    out: Mapped = {"id": rid, "image": None, "source": "trl",
                   "meta": _extras(rec, {"id", "images", "prompt", "chosen", "rejected"})}
    texts, system = {}, []
    for key, role in (("prompt", "user"), ("chosen", "assistant"), ("rejected", "assistant")):
        texts[key], sys_texts, err = _trl_turn(rec.get(key), key, role)
        system += sys_texts
        if err:
            return _fail(out, *err)
    out = {**out, **texts}
    if system:
        out["meta"] = {**out["meta"], "system": system}
    if not isinstance(images, list) or len(images) != 1:
        n = f"{len(images)} images" if isinstance(images, list) else type(images).__name__
        return _fail(out, "missing_field" if images is None else "wrong_type",
                     f"images: expected a list of one image (a row holds one), got {n}")
    return {**out, "image": images[0]}


# ------------------------------------------------------------------------------------ JSON


def _rating(completion: dict, aspect: str) -> float | None:
    """The completion's numeric rating on `aspect`; None when absent or not a number ("N/A")."""
    ann = completion.get("annotations")
    entry = ann.get(aspect) if isinstance(ann, dict) else None
    rating = entry.get("Rating") if isinstance(entry, dict) else None
    try:
        value = float(rating)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def vlfeedback(rec: dict, aspect: str = "Visual Faithfulness") -> Mapped:
    """VLFeedback: chosen = the best-rated completion on `aspect`, rejected = the worst-rated.

    Ties at the top or bottom go to the earliest completion; a record whose rated answers all
    tie, or with fewer than two rated answers, states no preference and is quarantined.
    """
    out: Mapped = {"id": rec.get("id"), "image": _image_ref(rec, "image", "img_path"),
                   "prompt": _clean_prompt(rec.get("prompt")), "source": "vlfeedback",
                   "meta": _extras(rec, {"id", "image", "prompt", "completions"})}
    comps = rec.get("completions")
    if not isinstance(comps, list) or not all(isinstance(c, dict) for c in comps):
        return _fail(out, "missing_field" if comps is None else "wrong_type",
                     "completions: expected a list of {annotations, model, response} objects, "
                     f"got {type(comps).__name__}")
    bad = [i for i, c in enumerate(comps) if not isinstance(c.get("annotations", {}), dict)]
    if bad:
        return _fail(out, "wrong_type", f"completions[{bad[0]}].annotations: expected an object "
                                        f"keyed by aspect ({', '.join(VLFEEDBACK_ASPECTS)})")
    rated = [(r, i) for i, c in enumerate(comps) if (r := _rating(c, aspect)) is not None]
    out["meta"]["aspect"] = aspect
    out["meta"]["ratings"] = [[c.get("model"), _rating(c, aspect)] for c in comps]
    if len(rated) < 2:
        return _fail(out, "no_preference", f"completions: {len(rated)} of {len(comps)} answers "
                                           f"carry a numeric {aspect!r} rating; a pair needs two")
    best = max(rated, key=lambda ri: (ri[0], -ri[1]))  # highest rating, earliest on ties
    worst = min(rated, key=lambda ri: (ri[0], ri[1]))
    if best[0] == worst[0]:
        return _fail(out, "rating_tie", f"completions: all {len(rated)} rated answers have "
                                        f"{aspect!r} rating {best[0]:g}; no strict preference")
    chosen, rejected = comps[best[1]], comps[worst[1]]
    out["meta"].update(chosen_model=chosen.get("model"), rejected_model=rejected.get("model"),
                       chosen_rating=best[0], rejected_rating=worst[0])
    return {**out, "chosen": chosen.get("response"), "rejected": rejected.get("response")}


def povid(rec: dict) -> Mapped:
    """POVID: one question answered in `conversations` (chosen), `rejected_conversations`."""
    out: Mapped = {"id": rec.get("id"), "image": rec.get("image"), "source": "povid",
                   "meta": _extras(rec, {"id", "image", "conversations",
                                         "rejected_conversations"})}
    q_chosen, chosen, err = _single_turn(rec.get("conversations"), "conversations")
    if err:
        return _fail(out, *err)
    q_rejected, rejected, err = _single_turn(rec.get("rejected_conversations"),
                                             "rejected_conversations")
    if err:
        return _fail(out, *err)
    if q_chosen != q_rejected:
        return _fail(out, "prompt_mismatch", f"conversations asks {str(q_chosen)[:60]!r} but "
                                             f"rejected_conversations asks "
                                             f"{str(q_rejected)[:60]!r}; expected one question")
    return {**out, "prompt": q_chosen, "chosen": chosen, "rejected": rejected}


def _output_value(rec: dict, key: str) -> Any:
    out = rec.get(key)
    return out.get("value") if isinstance(out, dict) else out


def llava_rlhf(rec: dict) -> Mapped:
    """LLaVA-Human-Preference-10K: `preference` 1 or 2 names the better of output_1, output_2.

    `conversations` is the prompt; LLaVA-RLHF's reward-model loader replaces the value of its
    final gpt turn with each output, so that turn (when present) is a placeholder, not an answer.
    """
    out: Mapped = {"id": rec.get("id"), "image": rec.get("image"), "source": "llava-rlhf",
                   "meta": _extras(rec, {"id", "image", "conversations", "output_1", "output_2",
                                         "preference"})}
    turns = rec.get("conversations")
    if isinstance(turns, list) and len(turns) == 1:
        turns = [*turns, {"from": "gpt", "value": ""}]  # the prompt alone, without placeholder
    prompt, _placeholder, err = _single_turn(turns, "conversations")
    if err:
        return _fail(out, *err)
    pref = rec.get("preference")
    if isinstance(pref, bool) or pref not in (1, 2):
        return _fail({**out, "prompt": prompt}, "bad_preference",
                     f"preference: {pref!r}; expected 1 (output_1 preferred) or 2 (output_2)")
    first, second = _output_value(rec, "output_1"), _output_value(rec, "output_2")
    chosen, rejected = (first, second) if pref == 1 else (second, first)
    return {**out, "prompt": prompt, "chosen": chosen, "rejected": rejected}


def _vg_candidates(image_id: Any) -> list[str]:
    # Visual Genome v2 keeps images in VG_100K/ and VG_100K_2/ under the data root.
    return [f"{d}{image_id}{ext}" for d in ("", "VG_100K/", "VG_100K_2/") for ext in (".jpg",
                                                                                        ".png")]


def hadpo(rec: dict) -> Mapped:
    """HA-DPO: a pope_data.json question record, or one description pair from desc_data.json."""
    image_id = rec.get("image_id")
    out: Mapped = {"id": None, "image": None, "image_candidates": _vg_candidates(image_id),
                   "meta": _extras(rec, {"image_id", "question", "chosen", "reject", "rejected",
                                         "pair"})}
    out["meta"]["image_id"] = image_id
    if image_id is None:
        return _fail(out, "missing_field", "image_id: absent; expected the Visual Genome id")
    if "question" in rec:  # pope_data.json
        rejected = rec["reject"] if "reject" in rec else rec.get("rejected")
        out.update(source="hadpo/pope", prompt=rec.get("question"), chosen=rec.get("chosen"),
                   rejected=rejected)
        if rec.get("correct") is True:
            return _fail(out, "no_preference", "correct: true: the model answered right, so "
                                               "there is no hallucination to prefer against "
                                               "(HA-DPO's trainers skip these records)")
        return out
    chosen, rejected = rec.get("chosen"), rec.get("rejected")
    out.update(source="hadpo/desc", id=f"{image_id}-desc{rec.get('pair', 0)}",
               prompt=DESCRIBE_PROMPTS[zlib.crc32(str(image_id).encode()) % 4])
    if not isinstance(chosen, str) or not isinstance(rejected, str):
        return _fail(out, "missing_field" if chosen in (None, []) or rejected in (None, [])
                     else "wrong_type", f"image {image_id}: expected lists of chosen and "
                                        "rejected description strings")
    return {**out, "chosen": chosen, "rejected": rejected}


def _hadpo_desc(image_id: Any, entry: Any) -> list[dict]:
    """One desc entry -> a record per (i-th chosen, i-th rejected) description pair."""
    chosen = entry.get("chosen") if isinstance(entry, dict) else None
    rejected = entry.get("rejected") if isinstance(entry, dict) else None
    if not isinstance(chosen, list) or not isinstance(rejected, list) or not chosen or not rejected:
        return [{"image_id": image_id, "chosen": chosen, "rejected": rejected}]  # quarantined
    return [{"image_id": image_id, "chosen": c, "rejected": r, "pair": k,
             "pairs_of": [len(chosen), len(rejected)]}
            for k, (c, r) in enumerate(zip(chosen, rejected, strict=False))]


def _hadpo_records(doc: Any) -> list[dict]:
    if isinstance(doc, dict):  # LLaVA-1.5's desc_data.json: {image_id: {chosen, rejected}}
        return [r for image_id, entry in doc.items() for r in _hadpo_desc(image_id, entry)]
    if not isinstance(doc, list):
        raise ValueError(f"expected a JSON list (pope_data.json, desc_data.json) or an object "
                         f"keyed by image id (desc_data.json), got JSON {type(doc).__name__}")
    out = []
    for rec in doc:  # MiniGPT-4/InstructBLIP desc_data.json is a list of {image_id, chosen[]}
        if isinstance(rec, dict) and "question" not in rec and isinstance(rec.get("chosen"), list):
            out += _hadpo_desc(rec.get("image_id"), rec)
        else:
            out.append(rec)
    return out


def _json_list(doc: Any) -> list:
    if not isinstance(doc, list):
        raise ValueError(f"expected a JSON list of records, got JSON {type(doc).__name__}")
    return doc


# ------------------------------------------------------------------------------------ registry


@dataclass(frozen=True)
class Layout:
    """How one published layout is stored, recognised and mapped."""

    name: str
    storage: str  # "parquet" (streamed by batch) | "json" (a document per file) | "jsonl"
    mapper: Callable[..., Mapped]
    signature: tuple[str, ...]  # columns or keys that identify it (data.format=auto)
    mapping: dict[str, str] = field(default_factory=dict)  # contract field -> its source
    records: Callable[[Any], list] = _json_list  # a parsed JSON document -> its records


LAYOUTS: dict[str, Layout] = {layout.name: layout for layout in (
    Layout("rlhf-v", "parquet", rlhf_v, ("idx", "image", "text"), {
        "id": "idx", "image": "image.bytes ({bytes, path} struct), else image_path",
        "prompt": "text (JSON) .question", "chosen": "text (JSON) .chosen",
        "rejected": "text (JSON) .rejected", "source": "'rlhf-v/' + ds_name",
        "meta": "every other column"}),
    Layout("rlaif-v", "parquet", rlaif_v, ("idx", "question", "chosen", "rejected", "image"), {
        "id": "idx", "image": "image.bytes ({bytes, path} struct), else image_path",
        "prompt": "question", "chosen": "chosen", "rejected": "rejected",
        "source": "'rlaif-v/' + ds_name", "meta": "every other column"}),
    Layout("trl", "parquet", trl, ("images", "prompt", "chosen", "rejected"), {
        "id": "id, else a hash of images, prompt, chosen, rejected", "image": "images[0]",
        "prompt": "prompt: the user message's text parts",
        "chosen": "chosen: the assistant message's text", "rejected": "rejected: likewise",
        "source": "'trl'", "meta": "system messages, every other column"}),
    Layout("vlfeedback", "jsonl", vlfeedback, ("prompt", "completions"), {
        "id": "id", "image": "img_path (or image)", "prompt": "prompt",
        "chosen": "completions[best <aspect> Rating].response",
        "rejected": "completions[worst <aspect> Rating].response", "source": "'vlfeedback'",
        "meta": "aspect, ratings per model, chosen/rejected model and rating"}),
    Layout("llava-rlhf", "json", llava_rlhf,
           ("conversations", "output_1", "output_2", "preference"), {
        "id": "id", "image": "image", "prompt": "conversations: the human turn",
        "chosen": "output_<preference>.value", "rejected": "the other output's value",
        "source": "'llava-rlhf'", "meta": "every other key (hallucination, flip, ...)"}),
    Layout("povid", "json", povid, ("conversations", "rejected_conversations"), {
        "id": "id", "image": "image", "prompt": "conversations[0].value (<image> removed)",
        "chosen": "conversations[1].value", "rejected": "rejected_conversations[1].value",
        "source": "'povid'", "meta": "every other key"}),
    Layout("hadpo", "json", hadpo, ("image_id", "chosen"), {
        "id": "pope: file-record number; desc: <image_id>-desc<k>",
        "image": "<image_id>.jpg under the root (or VG_100K/, VG_100K_2/)",
        "prompt": "pope: question; desc: one of HA-DPO's 4 description prompts",
        "chosen": "chosen (desc: the k-th chosen description)",
        "rejected": "reject | rejected (desc: the k-th rejected description)",
        "source": "'hadpo/pope' | 'hadpo/desc'", "meta": "answer, correct, image_id, ..."},
           records=_hadpo_records),
)}


def record_mapper(name: str, aspect: str = "Visual Faithfulness") -> Callable[[dict], Mapped]:
    """The mapping function of layout `name` (VLFeedback's bound to its rating `aspect`)."""
    if name not in LAYOUTS:
        raise ValueError(f"layout {name!r}: expected one of {', '.join(LAYOUTS)}")
    if name == "vlfeedback":
        if aspect not in VLFEEDBACK_ASPECTS:
            raise ValueError(f"data.vlfeedback_aspect={aspect!r}: expected one of "
                             f"{', '.join(VLFEEDBACK_ASPECTS)}")
        return partial(vlfeedback, aspect=aspect)
    return LAYOUTS[name].mapper


def document_records(name: str, doc: Any) -> list:
    """A parsed JSON document of layout `name` -> its records (ValueError: not that layout)."""
    return LAYOUTS[name].records(doc)


# Our own readers' signatures, after the layouts (theirs are more specific).
OWN_SIGNATURES = {
    "parquet": ("parquet", ("prompt", "chosen", "rejected")),
    "jsonl": ("json", ("prompt", "chosen", "rejected")),
    "llava": ("json", ("conversations",)),
}


def detect_layout(keys: list[str] | set[str], storage: str) -> tuple[str | None, str]:
    """The data.format whose signature `keys` (columns or a first record's keys) carry.

    `storage` is "parquet" or "json" (JSON and JSON Lines both). Returns (format, explanation);
    format None when nothing matches, and the explanation then lists what was looked for.
    """
    have = set(keys)
    candidates = [(n, "parquet" if lay.storage == "parquet" else "json", lay.signature)
                  for n, lay in LAYOUTS.items()]
    candidates += [(n, s, sig) for n, (s, sig) in OWN_SIGNATURES.items()]
    for name, where, sig in candidates:
        if where == storage and set(sig) <= have:
            if name == "hadpo" and not have & {"reject", "rejected"}:
                continue
            what = "Parquet columns" if storage == "parquet" else "JSON keys"
            return name, f"{what} {', '.join(sig)} present"
    looked = "; ".join(f"{n}: {', '.join(sig)}" for n, w, sig in candidates if w == storage)
    return None, (f"no known layout has {storage} keys {', '.join(sorted(have))} "
                  f"(looked for {looked})")
