"""Readers and scorers for the real hallucination benchmarks, from local files the user provides.

- POPE: question files, JSONL lines {"question_id", "image", "text", "label": "yes"|"no"}, with
  the images (COCO val2014) in a folder; answered by any `generate_fn`, scored as in pope.py.
- CHAIR: generated captions [{"image_id", "caption"}] (JSON list or JSONL) against COCO instance
  annotations (instances_val2014.json: images / annotations / categories). A caption mentions a
  category when it contains the category name or one of COCO_SYNONYMS (plurals "s"/"es"/"ies" too,
  longest phrase first, so "hot dog" is not a dog); each category counts once per caption.
- MMHal-Bench: a JSON list of {"question", "gt_answer", "model_answer", optional "image_content",
  "question_type", "image_src"} rated 0-6 by any OpenAI-compatible judge (LLMConfig: base_url,
  model); hallucination rate = share of ratings < 3, as in MMHal-Bench.
Nothing is downloaded: every path is a local file.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from nsft_ray.config import LLMConfig
from nsft_ray.eval.chair import CaptionScore, chair_metrics
from nsft_ray.eval.pope import parse_yes_no, yes_no_metrics

__all__ = ["PopeQuestion", "read_pope", "run_pope", "COCO_SYNONYMS", "read_coco_objects",
           "coco_mentions", "read_captions", "chair_coco", "JUDGE_PROMPT", "parse_rating",
           "read_mmhal", "judge_mmhal"]

GenerateFn = Callable[[list[Image.Image], list[str]], list[str]]


def _jsonl(path: str | Path) -> list[dict]:
    rows = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not a JSON object ({e})") from e
        if not isinstance(row, dict):
            raise ValueError(f"{path}:{n}: expected a JSON object, got {type(row).__name__}")
        rows.append(row)
    return rows


def _require(row: dict, keys: tuple[str, ...], where: str) -> None:
    missing = [k for k in keys if k not in row]
    if missing:
        raise ValueError(f"{where}: missing key {missing[0]!r}; expected {', '.join(keys)}")


# --- POPE ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PopeQuestion:
    question_id: str
    image: Path
    text: str
    label: bool


def read_pope(path: str | Path, image_dir: str | Path) -> list[PopeQuestion]:
    """POPE question lines; every image must exist under `image_dir`."""
    out = []
    for n, row in enumerate(_jsonl(path), 1):
        where = f"{path} line {n}"
        _require(row, ("question_id", "image", "text", "label"), where)
        label = str(row["label"]).strip().lower()
        if label not in ("yes", "no"):
            raise ValueError(f"{where}: label {row['label']!r}; expected 'yes' or 'no'")
        image = Path(image_dir) / row["image"]
        if not image.is_file():
            raise FileNotFoundError(f"{where} (question_id {row['question_id']}): no image {image}")
        out.append(PopeQuestion(str(row["question_id"]), image, str(row["text"]), label == "yes"))
    return out


def run_pope(
    questions: list[PopeQuestion], generate_fn: GenerateFn, batch_size: int = 32
) -> dict[str, Any]:
    """Answer the questions in batches; POPE metrics plus every (question_id, answer)."""
    answers: list[str] = []
    for start in range(0, len(questions), batch_size):
        batch = questions[start:start + batch_size]
        images = [Image.open(q.image).convert("RGB") for q in batch]
        answers += generate_fn(images, [q.text for q in batch])
    metrics = yes_no_metrics([q.label for q in questions], [parse_yes_no(a) for a in answers])
    return {**metrics, "answers": [{"question_id": q.question_id, "text": a}
                                   for q, a in zip(questions, answers, strict=True)]}


# --- CHAIR on COCO ------------------------------------------------------------------------------

# Extra words per COCO category (the names themselves always count). A small, readable subset of
# the synonym list of Rohrbach et al.; extend it by passing your own dict to chair_coco.
COCO_SYNONYMS: dict[str, tuple[str, ...]] = {
    "person": ("man", "men", "woman", "women", "people", "boy", "girl", "child", "children",
               "kid", "player", "guy", "lady", "persons"),
    "bicycle": ("bike",), "motorcycle": ("motorbike",), "airplane": ("plane", "jet", "aircraft"),
    "car": ("taxi",), "bus": ("buses",), "dog": ("puppy",), "cat": ("kitten",),
    "couch": ("sofa",), "dining table": ("table",), "tv": ("television",),
    "cell phone": ("phone", "cellphone"), "laptop": ("computer",), "sheep": ("lamb",),
    "cow": ("cattle",), "donut": ("doughnut",), "hot dog": ("hotdog",),
    "potted plant": ("houseplant",), "wine glass": ("wineglass",), "knife": ("knives",),
    "mouse": ("mice",), "sports ball": ("ball", "football", "baseball", "soccer ball"),
}


def read_coco_objects(path: str | Path) -> tuple[dict[int, set[str]], dict[str, int], list[str]]:
    """COCO instances JSON -> ({image_id: category names present}, {file_name: id}, categories)."""
    data = json.loads(Path(path).read_text())
    _require(data, ("images", "annotations", "categories"), str(path))
    names = {c["id"]: c["name"].lower() for c in data["categories"]}
    objects: dict[int, set[str]] = {img["id"]: set() for img in data["images"]}
    for a in data["annotations"]:
        if a["image_id"] not in objects or a["category_id"] not in names:
            raise ValueError(f"{path}: annotation {a.get('id')} names an unknown image or category")
        objects[a["image_id"]].add(names[a["category_id"]])
    files = {img["file_name"]: img["id"] for img in data["images"] if "file_name" in img}
    return objects, files, list(names.values())


def _plurals(phrase: str) -> list[str]:
    forms = [phrase, phrase + "s", phrase + "es"]
    return forms + ([phrase[:-1] + "ies"] if phrase.endswith("y") else [])  # puppy -> puppies


def coco_mentions(
    text: str, categories: list[str], synonyms: dict[str, tuple[str, ...]] = COCO_SYNONYMS
) -> list[str]:
    """Categories a caption mentions, each once, in order of first mention."""
    words = {c: c for c in categories}
    words |= {w: c for c, extra in synonyms.items() if c in words for w in extra}
    forms = {f: c for w, c in words.items() for f in _plurals(w)}
    forms |= words  # an exact word wins over another word's plural form
    alts = [r"\s+".join(map(re.escape, f.split())) for f in sorted(forms, key=len, reverse=True)]
    found = [forms[" ".join(m.group(1).split())]
             for m in re.finditer(r"\b(" + "|".join(alts) + r")\b", text.lower())]
    return list(dict.fromkeys(found))


def read_captions(path: str | Path) -> list[dict]:
    """Captions as a JSON list or JSONL of {"image_id", "caption"}."""
    text = Path(path).read_text().lstrip()
    rows = json.loads(text) if text.startswith("[") else _jsonl(path)
    for n, row in enumerate(rows):
        _require(row, ("image_id", "caption"), f"{path} row {n}")
    return rows


def chair_coco(
    captions: list[dict], instances: str | Path,
    synonyms: dict[str, tuple[str, ...]] = COCO_SYNONYMS,
) -> dict[str, Any]:
    """CHAIR_i / CHAIR_s / recall / precision of captions against COCO annotations.

    `image_id` may be the COCO id or the image's file name; captions of unknown images are
    listed in "skipped" with the reason (they are not scored).
    """
    objects, files, categories = read_coco_objects(instances)
    scores, skipped = [], []
    for row in captions:
        image_id = files.get(str(row["image_id"]), row["image_id"])
        if image_id not in objects:
            skipped.append({"image_id": row["image_id"], "reason": "not in the annotations"})
            continue
        said, truth = coco_mentions(str(row["caption"]), categories, synonyms), objects[image_id]
        real = [c for c in said if c in truth]
        scores.append(CaptionScore(len(said), len(said) - len(real), len(real), len(truth)))
    return {**chair_metrics(scores), "skipped": skipped}


# --- MMHal-Bench --------------------------------------------------------------------------------

JUDGE_PROMPT = """Please act as an impartial judge of an AI assistant's answer about an image.
You are given the image contents (if known), a question, a standard human-written answer and
the assistant's answer. Judge whether the assistant's answer is informative and whether it
contains hallucination: claims about the image that are not supported by the image contents or
the standard answer. Rate it on this scale:
Rating: 6, very informative with good analysis or reasoning, no hallucination
Rating: 5, very informative, no hallucination
Rating: 4, somewhat informative, no hallucination
Rating: 3, not informative, no hallucination
Rating: 2, very informative, with hallucination
Rating: 1, somewhat informative, with hallucination
Rating: 0, not informative, with hallucination

Image contents: {image_content}
Question: {question}
Standard human-written answer: {gt_answer}
Assistant's answer: {model_answer}

Explain briefly, then end with a line "Rating: N"."""

_RATING = re.compile(r"rating\s*[:=]?\s*\**\s*([0-6])\b", re.IGNORECASE)


def parse_rating(text: str) -> int | None:
    """The judge's 0-6 rating: the last "Rating: N", else a reply that is one digit 0-6."""
    hits = _RATING.findall(text or "")
    if hits:
        return int(hits[-1])
    bare = (text or "").strip().rstrip(".")
    return int(bare) if bare in {str(k) for k in range(7)} else None


def read_mmhal(path: str | Path) -> list[dict]:
    """MMHal-Bench-style rows (a JSON list); each needs question, gt_answer, model_answer."""
    rows = json.loads(Path(path).read_text())
    if not isinstance(rows, list):
        raise ValueError(f"{path}: expected a JSON list of rows")
    for n, row in enumerate(rows):
        _require(row, ("question", "gt_answer", "model_answer"), f"{path} row {n}")
    return rows


def judge_mmhal(rows: list[dict], judge: LLMConfig) -> dict[str, Any]:
    """Rate every row with the judge at judge.base_url; mean score and hallucination rate.

    A row whose request fails or whose reply has no rating is listed in "unjudged" with the
    reason and left out of the averages.
    """
    import openai

    if not judge.model:
        raise ValueError("eval.judge.model: the judge model name is empty")
    client = openai.OpenAI(base_url=judge.base_url, timeout=judge.timeout_s,
                           max_retries=judge.max_retries,
                           api_key=os.environ.get(judge.api_key_env, "") or "EMPTY")

    def ask(row: dict) -> str | Exception:
        content = row.get("image_content") or "unknown"
        prompt = JUDGE_PROMPT.format(
            image_content=", ".join(content) if isinstance(content, list) else content,
            question=row["question"], gt_answer=row["gt_answer"], model_answer=row["model_answer"])
        try:
            reply = client.chat.completions.create(
                model=judge.model, messages=[{"role": "user", "content": prompt}],
                temperature=judge.temperature, max_tokens=judge.max_tokens)
            return reply.choices[0].message.content or ""
        except openai.OpenAIError as e:  # one failed request costs one row, not the run
            return e

    with ThreadPoolExecutor(max(1, judge.max_parallel_requests)) as pool:
        replies = list(pool.map(ask, rows))
    per_row: list[int | None] = []
    unjudged, by_type = [], {}
    for n, (row, reply) in enumerate(zip(rows, replies, strict=True)):
        rating = None if isinstance(reply, Exception) else parse_rating(reply)
        per_row.append(rating)
        if rating is None:
            reason = f"request failed: {reply!r}" if isinstance(reply, Exception) \
                else f"no 0-6 rating in the reply: {reply[:200]!r}"
            unjudged.append({"row": n, "reason": reason})
            continue
        by_type.setdefault(str(row.get("question_type", "all")), []).append(rating)
    ratings = [r for r in per_row if r is not None]
    return {
        "average_score": sum(ratings) / len(ratings) if ratings else None,
        "hallucination_rate": sum(r < 3 for r in ratings) / len(ratings) if ratings else None,
        "by_type": {t: sum(v) / len(v) for t, v in sorted(by_type.items())},
        "ratings": per_row,  # one per row; None where unjudged
        "n": len(rows),
        "n_judged": len(ratings),
        "unjudged": unjudged,
    }
