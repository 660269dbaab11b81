"""The published hallucination benchmarks, read from their own files; answers written in their
own formats too, so each benchmark's official scorer can be run on them beside our scores.

    result = run_benchmarks(generate_fn, score_fn, EvalConfig(pope="POPE/output/coco",
                            pope_images="val2014", amber="AMBER/data", amber_images="image"), out)

- POPE: ``coco_pope_{random,popular,adversarial}.json`` (JSON Lines despite the name:
  ``question_id, image, text, label``), a file or their folder, images in ``eval.pope_images``.
  Written: ``OUT/pope/<file stem>.jsonl``, one line per question in the file's order with
  ``answer`` (RUCAIBox/POPE evaluate.py) and ``question_id``/``text`` (LLaVA's eval_pope.py).
- AMBER, discriminative part: ``query/query_discriminative*.json`` (arrays of ``{id, image,
  query}``) and ``annotations.json`` (``[{id, type, truth}]``, entry id-1 for query id),
  images in ``eval.amber_images``. Written: ``OUT/amber/responses.json`` ``[{id, response}]``
  for AMBER's inference.py ``--evaluation_type d``; it compares ``response`` with "Yes"/"No"
  exactly, so the parsed answer is written that way (the raw text beside it, as ``raw``).
- MMHal-Bench: ``response_template.json`` (a JSON list of ``{question_type, question_topic,
  image_id, image_src, image_content, question, gt_answer, model_answer}``), images in
  ``eval.mmhal_images`` named as the end of ``image_src`` (or ``<image_id>.jpg``). Written:
  ``OUT/mmhal/response.json``, the template in its order with ``model_answer`` filled, for
  MMHal-Bench's eval_gpt4.py (``--response``); then rated 0-6 by ``eval.judge`` (judge_mmhal).

Our scores: yes_no_metrics from the generated answers (parse_yes_no), plus the AUROC of the
yes-minus-no logit gap when a `score_fn` is given (as on ShapesWorld), per POPE file and AMBER
dimension (existence, attribute, relation) and overall; for MMHal-Bench the judge's mean rating
and hallucination rate (share of ratings < 3), every row accounted for: judged, unjudged (the
judge failed) or missing its image.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from nsft_ray.config import EvalConfig
from nsft_ray.eval.adapters import judge_mmhal, read_mmhal, read_pope
from nsft_ray.eval.pope import parse_yes_no, pope_metrics

__all__ = ["BenchQuestion", "pope_files", "read_pope_files", "read_amber", "answer_questions",
           "write_pope_answers", "write_amber_responses", "mmhal_image", "run_mmhal",
           "run_benchmarks"]

GenerateFn = Callable[[list[Image.Image], list[str]], list[str]]
ScoreFn = Callable[[list[Image.Image], list[str], list[str], list[str]], list[float]]
# AMBER's annotation types -> its three discriminative dimensions (inference.py's grouping).
AMBER_DIMENSIONS = {"discriminative-hallucination": "existence",
                    "discriminative-attribute-state": "attribute",
                    "discriminative-attribute-number": "attribute",
                    "discriminative-attribute-action": "attribute",
                    "discriminative-relation": "relation"}


@dataclass(frozen=True)
class BenchQuestion:
    qid: str | int  # the benchmark's own id, written back unchanged
    image: Path
    text: str
    label: bool | None  # True: the answer is yes; None: an open question (MMHal-Bench)
    group: str  # POPE file stem, AMBER dimension, or MMHal question_type


def pope_files(path: str | Path) -> list[Path]:
    """A POPE question file, or every .json/.jsonl question file of a folder (sorted)."""
    p = Path(path)
    files = sorted(f for f in p.iterdir() if f.suffix in (".json", ".jsonl")) if p.is_dir() else [p]
    if not files or not all(f.is_file() for f in files):
        raise FileNotFoundError(f"eval.pope={p}: expected a POPE question file or a folder of "
                                "them (coco_pope_random.json, ...)")
    return files


def read_pope_files(path: str | Path, image_dir: str | Path) -> list[BenchQuestion]:
    """Every question of every POPE file (grouped by file stem), in file order."""
    return [BenchQuestion(q.question_id, q.image, q.text, q.label, f.stem)
            for f in pope_files(path) for q in read_pope(f, image_dir)]


def _amber_query_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    folder = path / "query" if (path / "query").is_dir() else path
    merged = folder / "query_discriminative.json"
    if merged.is_file():
        return [merged]
    files = sorted(folder.glob("query_discriminative-*.json"))
    if not files:
        raise FileNotFoundError(f"eval.amber={path}: no query_discriminative*.json in {folder}")
    return files


def read_amber(path: str | Path, image_dir: str | Path,
               annotations: str | Path | None = None) -> tuple[list[BenchQuestion], int]:
    """AMBER's discriminative queries with their truth; (questions, generative queries skipped).

    `path` is AMBER's data folder (query/ and annotations.json) or one query file; the
    annotations default to annotations.json beside query/.
    """
    p = Path(path)
    ann_path = Path(annotations) if annotations else (
        (p if p.is_dir() else p.parent.parent) / "annotations.json")
    truth = {a["id"]: a for a in json.loads(ann_path.read_text())}
    out, skipped = [], 0
    for f in _amber_query_files(p):
        for n, q in enumerate(json.loads(f.read_text())):
            where = f"{f.name}[{n}] (id {q.get('id')})"
            ann = truth.get(q.get("id"))
            if ann is None:
                raise ValueError(f"{where}: no entry with this id in {ann_path}")
            if ann.get("type") == "generative":
                skipped += 1  # captions are scored by AMBER's own CHAIR (spaCy, nltk)
                continue
            dim = AMBER_DIMENSIONS.get(ann.get("type"), "relation")
            if ann.get("truth") not in ("yes", "no"):
                raise ValueError(f"{where}: truth {ann.get('truth')!r}; expected 'yes' or 'no'")
            image = Path(image_dir) / q["image"]
            if not image.is_file():
                raise FileNotFoundError(f"{where}: no image {image}")
            out.append(BenchQuestion(q["id"], image, q["query"], ann["truth"] == "yes", dim))
    return out, skipped


def answer_questions(questions: list[BenchQuestion], generate_fn: GenerateFn,
                     score_fn: ScoreFn | None, batch_size: int) -> tuple[list[str], list | None]:
    """Greedy answers (and yes-minus-no logit gaps with a score_fn), in batches."""
    texts: list[str] = []
    scores: list[float] | None = [] if score_fn is not None else None
    for start in range(0, len(questions), batch_size):
        batch = questions[start:start + batch_size]
        images = [Image.open(q.image).convert("RGB") for q in batch]
        prompts = [q.text for q in batch]
        texts += generate_fn(images, prompts)
        if score_fn is not None:
            scores += score_fn(images, prompts, ["Yes"] * len(batch), ["No"] * len(batch))
    return texts, scores


def _metrics(questions: list[BenchQuestion], texts: list[str],
             scores: list[float] | None) -> dict[str, Any]:
    """pope_metrics per group and over all questions."""
    groups = sorted({q.group for q in questions})
    out = {}
    for g in [*groups, "all"]:
        idx = [i for i, q in enumerate(questions) if g in ("all", q.group)]
        out[g] = pope_metrics([questions[i].label for i in idx],
                              [parse_yes_no(texts[i]) for i in idx],
                              None if scores is None else [scores[i] for i in idx])
        out[g]["n"] = len(idx)
    return out


def write_pope_answers(questions: list[BenchQuestion], texts: list[str], out_dir: Path) -> list:
    """OUT/<file stem>.jsonl per POPE file, a line per question in the file's order."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for group in sorted({q.group for q in questions}):
        lines = [json.dumps({"question_id": q.qid, "question": q.text, "answer": t, "text": t})
                 for q, t in zip(questions, texts, strict=True) if q.group == group]
        path = out_dir / f"{group}.jsonl"
        path.write_text("\n".join(lines) + "\n")
        paths.append(str(path))
    return paths


def write_amber_responses(questions: list[BenchQuestion], texts: list[str], path: Path) -> str:
    """[{id, response, raw}]: response "Yes"/"No" as AMBER's scorer compares, else the text."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    for q, t in zip(questions, texts, strict=True):
        yes = parse_yes_no(t)
        rows.append({"id": q.qid, "response": t if yes is None else ("Yes" if yes else "No"),
                     "raw": t})
    path.write_text(json.dumps(rows, indent=1))
    return str(path)


def mmhal_image(row: dict, image_dir: str | Path) -> tuple[Path | None, str]:
    """(the row's image under `image_dir`, "") or (None, why not): the file named as the end of
    image_src's URL path (MMHal-Bench's images/), else <image_id>.jpg/.jpeg/.png."""
    # the template's image_src is a Flickr URL; nothing is downloaded, only its file name used
    src = str(row.get("image_src") or "").split("?")[0].rstrip("/")
    names = [src.rsplit("/", 1)[-1]] if src else []
    if row.get("image_id"):
        names += [f"{row['image_id']}{ext}" for ext in (".jpg", ".jpeg", ".png")]
    if not names:
        return None, "no image_src or image_id in the row"
    for name in names:
        if (Path(image_dir) / name).is_file():
            return Path(image_dir) / name, ""
    return None, f"no image in {image_dir}: tried {', '.join(names)}"


def run_mmhal(generate_fn: GenerateFn, cfg: EvalConfig, out: Path | None) -> dict[str, Any]:
    """Answer MMHal-Bench's questions, write the filled template (OUT/mmhal/response.json) and
    have eval.judge rate the answers; rows without an image are listed in "missing_images"."""
    rows = read_mmhal(cfg.mmhal)
    qs, where, missing = [], [], []
    for n, row in enumerate(rows):
        image, reason = mmhal_image(row, cfg.mmhal_images)
        if image is None:
            missing.append({"row": n, "image_src": row.get("image_src"), "reason": reason})
            continue
        qs.append(BenchQuestion(n, image, str(row["question"]), None,
                                str(row.get("question_type", "all"))))
        where.append(n)
    texts, _ = answer_questions(qs, generate_fn, None, cfg.batch_size)
    # every template row is written, in order (eval_gpt4.py groups question types by position);
    # a row without its image keeps an empty answer and is reported in missing_images
    filled = [dict(row) for row in rows]
    for n, text in zip(where, texts, strict=True):
        filled[n]["model_answer"] = text
    result: dict[str, Any] = {}
    if out:
        path = out / "mmhal" / "response.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(filled, indent=2))  # written before judging: kept if it fails
        result["answer_file"] = str(path)
    judged = judge_mmhal([filled[n] for n in where], cfg.judge)
    ratings: list[int | None] = [None] * len(rows)
    for n, rating in zip(where, judged["ratings"], strict=True):
        ratings[n] = rating
    return {**result, **{k: judged[k] for k in ("average_score", "hallucination_rate", "by_type",
                                                 "n_judged")},
            "n": len(rows), "n_answered": len(where), "ratings": ratings,
            # judge_mmhal numbers the rows it was given; reported as template rows
            "unjudged": [{**u, "row": where[u["row"]]} for u in judged["unjudged"]],
            "missing_images": missing}


def run_benchmarks(generate_fn: GenerateFn, score_fn: ScoreFn | None, cfg: EvalConfig,
                   out_dir: str | Path | None) -> dict[str, Any]:
    """POPE, AMBER and/or MMHal-Bench as configured (eval.pope, eval.amber, eval.mmhal): our
    scores, and the answer files for the official scorers under OUT/pope/, OUT/amber/ and
    OUT/mmhal/ (when out_dir is given)."""
    result: dict[str, Any] = {}
    out = Path(out_dir) if out_dir else None
    if cfg.pope:
        qs = read_pope_files(cfg.pope, cfg.pope_images)
        texts, scores = answer_questions(qs, generate_fn, score_fn, cfg.batch_size)
        result["pope"] = _metrics(qs, texts, scores)
        if out:
            result["pope"]["answer_files"] = write_pope_answers(qs, texts, out / "pope")
    if cfg.amber:
        qs, skipped = read_amber(cfg.amber, cfg.amber_images)
        texts, scores = answer_questions(qs, generate_fn, score_fn, cfg.batch_size)
        result["amber"] = {**_metrics(qs, texts, scores), "generative_skipped": skipped}
        if out:
            result["amber"]["answer_file"] = write_amber_responses(
                qs, texts, out / "amber" / "responses.json")
    if cfg.mmhal:
        result["mmhal"] = run_mmhal(generate_fn, cfg, out)
    return result
