"""Evaluate a VLM on a ShapesWorld split: POPE, CHAIR, attribute/count/position/scene.

    result = evaluate("runs/nsft/model", "data/world", EvalConfig(max_images=100))
    result["pope"]["adversarial"]["auroc"], result["chair"]["chair_i"], result["count_accuracy"]

Walk: read the split (cfg.split: "eval", or "val" where choices are made; scene graphs from
`meta`) -> plan the probes of every image (POPE existence questions, one caption, one question per
kind of shapes.KINDS) -> build the requests: a greedy answer (`generate_fn`) for captions and
questions, a yes-minus-no logit gap (`score_fn`, one forward pass) for POPE probes, and the same
POPE probes again with another image's pixels (the image-swap control) -> answer them in batches
(in this process, or a Ray Data pass with EvalConfig.engine="ray") -> score.

The plan is a pure function of (images, cfg, seed): two models evaluated with the same seed see
the same probes, and result["items"] (one row per probe, keyed "image id|kind|question") pairs
them item by item for nsft_ray.stats.paired_bootstrap.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
from PIL import Image

from nsft_ray.config import EvalConfig, WorldConfig, from_dict
from nsft_ray.eval.chair import CaptionScore, chair_metrics, score_caption
from nsft_ray.eval.pope import SETTINGS, object_stats, parse_yes_no, pope_items, pope_metrics
from nsft_ray.eval.shapes import group_accuracies, judge, shape_questions
from nsft_ray.negatives.claims import Vocabulary
from nsft_ray.schema import loads_meta
from nsft_ray.world.language import Question, answer, answer_text, question_text
from nsft_ray.world.scene import Scene

__all__ = ["GenerateFn", "ScoreFn", "Probe", "Plan", "Request", "Answers", "eval_files",
           "load_eval_images", "plan_eval", "build_requests", "yes_no_texts", "answer_batch",
           "answer_requests", "collect", "score", "hf_answer_fns", "evaluate"]

# generate_fn(images, prompts) -> one answer per prompt (greedy, for evaluation).
GenerateFn = Callable[[list[Image.Image], list[str]], list[str]]
# score_fn(images, prompts, yes_texts, no_texts) -> logit(first token of the yes answer) minus
# logit(first token of the no answer) at the first answer position (eval/scoring.py).
ScoreFn = Callable[[list[Image.Image], list[str], list[str], list[str]], list[float]]
# Generation batches are grouped by kind, short answers first: a batch runs until its longest
# answer ends, so one caption among yes/no questions would make the whole batch wait for it.
BATCH_ORDER = ("pope", "scene", "color", "size", "position", "count", "caption")


def eval_files(split: str) -> tuple[str, str]:
    """The files of a ShapesWorld split that hold its images (the first one found is read)."""
    return f"sft_{split}.parquet", f"pref_{split}.parquet"


@dataclass(frozen=True)
class Probe:
    image: int  # index into Plan.images
    kind: str  # "pope", "caption" or one of shapes.KINDS
    question: Question
    prompt: str
    label: bool | None = None  # pope: is the object there?
    settings: tuple[str, ...] = ()  # pope: the settings this probe belongs to


@dataclass
class Plan:
    ids: list[str]  # row id of each image's first row
    images: list[bytes]  # encoded image bytes
    scenes: list[Scene]
    probes: list[Probe]
    vocab: Vocabulary
    data: dict[str, Any] = field(default_factory=dict)  # what was read and what was skipped
    swap: list[int] = field(default_factory=list)  # image i's swap control uses image swap[i]

    def key(self, p: Probe) -> str:
        """Stable across models and runs with the same seed: "image id|kind|question"."""
        return f"{self.ids[p.image]}|{p.kind}|{p.prompt}"


def _eval_file(data: str | Path, split: str = "eval") -> Path:
    path = Path(data)
    if path.is_file():
        return path
    for name in eval_files(split):
        if (path / name).is_file():
            return path / name
    raise FileNotFoundError(f"eval data {path}: expected a Parquet file or a ShapesWorld folder "
                            f"holding one of {', '.join(eval_files(split))}")


def _world_config(eval_file: Path) -> WorldConfig:
    """The world's config from world.json beside the data (its vocabulary), else the defaults."""
    summary = eval_file.parent / "world.json"
    if not summary.is_file():
        return WorldConfig()
    return from_dict(WorldConfig, json.loads(summary.read_text()).get("config", {}), "world.")


def load_eval_images(
    data: str | Path, max_images: int, split: str = "eval"
) -> tuple[list[str], list[bytes], list[Scene], dict[str, Any]]:
    """The first `max_images` distinct images of the split with their scene graphs.

    Rows repeating an image are counted in data["duplicate_rows"]; rows without a valid scene
    in `meta` are listed in data["skipped"] with the reason.
    """
    path = _eval_file(data, split)
    table = pq.read_table(path)
    missing = [c for c in ("id", "image", "meta") if c not in table.column_names]
    if missing:
        raise ValueError(f"{path}: missing column {missing[0]!r}; expected id, image, meta")
    ids, images, scenes, seen = [], [], [], set()
    skipped, duplicates = [], 0
    for row in table.select(["id", "image", "meta"]).to_pylist():
        if len(images) >= max_images:
            break
        digest = hashlib.sha256(row["image"] or b"").hexdigest()
        if digest in seen:
            duplicates += 1
            continue
        try:
            scene = Scene.from_dict(loads_meta(row["meta"])["scene"])
        except (KeyError, TypeError, ValueError) as e:  # JSONDecodeError is a ValueError
            skipped.append({"id": row["id"], "reason": f"meta has no valid scene graph: {e!r}"})
            continue
        if not row["image"]:
            skipped.append({"id": row["id"], "reason": "image is empty"})
            continue
        seen.add(digest)
        ids.append(row["id"])
        images.append(row["image"])
        scenes.append(scene)
    report = {"file": str(path), "split": split,
              "rows_read": len(images) + duplicates + len(skipped),
              "duplicate_rows": duplicates, "skipped": skipped}
    return ids, images, scenes, report


def plan_eval(data: str | Path, cfg: EvalConfig, seed: int = 0) -> Plan:
    """Read the split's images and build every probe (deterministic in `seed`)."""
    ids, images, scenes, report = load_eval_images(data, cfg.max_images, cfg.split)
    world = _world_config(_eval_file(data, cfg.split))
    combos = [(c, s) for s in world.shapes for c in world.colors]
    freq, cooc = object_stats(scenes)
    if cfg.generate_images is not None and cfg.generate_images < 0:
        raise ValueError(f"eval.generate_images={cfg.generate_images}: expected >= 0 or None")
    n_generate = len(images) if cfg.generate_images is None else cfg.generate_images
    probes: list[Probe] = []
    for i, (image_id, scene) in enumerate(zip(ids, scenes, strict=True)):
        # Per image, so an image's draws do not depend on max_images (the popular and
        # adversarial rankings do: they count the evaluated images, as POPE's do).
        rng = random.Random(f"eval/{seed}/{image_id}")
        for item in pope_items(scene, combos, cfg.pope_per_image, rng, freq, cooc):
            q = Question("existence", item.shape, item.color, short=cfg.short_answers)
            probes.append(Probe(i, "pope", q, question_text(q), item.label, item.settings))
        if i < n_generate:
            q = Question("caption")
            probes.append(Probe(i, "caption", q, question_text(q)))
            for q in shape_questions(scene, rng, world, cfg.short_answers):
                probes.append(Probe(i, q.kind, q, question_text(q)))
    # A fixed derangement (no image keeps its own pixels); none with a single image.
    swap = [(i + 1) % len(images) for i in range(len(images))] if len(images) > 1 else []
    plan = Plan(ids, images, scenes, probes, Vocabulary.from_config(world), report, swap)
    keys = [plan.key(p) for p in probes]
    if len(set(keys)) != len(keys):  # items pair by key: a repeated one would pair wrongly
        raise ValueError(f"eval plan: {len(keys) - len(set(keys))} repeated probe keys "
                         "(image ids must be unique)")
    return plan


@dataclass(frozen=True)
class Request:
    """One model call's worth of work for one probe."""

    probe: int  # index into Plan.probes
    image: int  # index into Plan.images: the pixels fed (another image's for the swap control)
    swapped: bool
    generate: bool  # a greedy answer is wanted
    score: bool  # the yes-minus-no logit gap is wanted (POPE probes)


def build_requests(plan: Plan, cfg: EvalConfig) -> list[Request]:
    """Every request of `plan`, in batching order (generation grouped by kind, then scoring)."""
    generate_pope = cfg.pope_decision == "generate"
    reqs = [Request(j, p.image, False, p.kind != "pope" or generate_pope, p.kind == "pope")
            for j, p in enumerate(plan.probes)]
    if cfg.image_swap and plan.swap:
        reqs += [Request(j, plan.swap[p.image], True, generate_pope, True)
                 for j, p in enumerate(plan.probes) if p.kind == "pope"]
    kind = {k: i for i, k in enumerate(BATCH_ORDER)}
    return sorted(reqs, key=lambda r: (not r.generate, kind[plan.probes[r.probe].kind]))


def yes_no_texts(q: Question) -> tuple[str, str]:
    """The world's "yes" and "no" answers to an existence question (their first tokens are
    scored: "yes"/"no" for short answers, "Yes, there is ..."/"No, there is no ..." otherwise)."""
    return answer_text(q, True), answer_text(q, False)


def answer_batch(
    images: Sequence[Image.Image], prompts: Sequence[str], generate: Sequence[bool],
    yes_no: Sequence[tuple[str, str] | None], generate_fn: GenerateFn, score_fn: ScoreFn | None,
) -> tuple[list[str | None], list[float | None]]:
    """Greedy answers where `generate[i]`, yes-minus-no scores where `yes_no[i]` is given (None
    elsewhere). Shared by the local loop and the Ray Data actors, so both compute alike."""
    n = len(prompts)
    texts: list[str | None] = [None] * n
    scores: list[float | None] = [None] * n
    g = [i for i in range(n) if generate[i]]
    if g:
        out = generate_fn([images[i] for i in g], [prompts[i] for i in g])
        if len(out) != len(g):
            raise ValueError(f"generate_fn returned {len(out)} answers for {len(g)} prompts")
        for i, a in zip(g, out, strict=True):
            texts[i] = str(a)
    s = [i for i in range(n) if yes_no[i] is not None]
    if s and score_fn is not None:
        out = score_fn([images[i] for i in s], [prompts[i] for i in s],
                       [yes_no[i][0] for i in s], [yes_no[i][1] for i in s])
        if len(out) != len(s):
            raise ValueError(f"score_fn returned {len(out)} scores for {len(s)} prompts")
        for i, v in zip(s, out, strict=True):
            scores[i] = None if v is None else float(v)  # None: this engine could not score
    return texts, scores


def answer_requests(
    plan: Plan, reqs: list[Request], generate_fn: GenerateFn, score_fn: ScoreFn | None,
    batch_size: int,
) -> tuple[list[str | None], list[float | None]]:
    """Answer `reqs` in order, `batch_size` per model call; each image is decoded once."""
    if batch_size < 1:
        raise ValueError(f"eval.batch_size={batch_size}: expected >= 1")
    decoded = [Image.open(io.BytesIO(b)).convert("RGB") for b in plan.images]
    texts: list[str | None] = []
    scores: list[float | None] = []
    for start in range(0, len(reqs), batch_size):
        batch = reqs[start:start + batch_size]
        probes = [plan.probes[r.probe] for r in batch]
        t, s = answer_batch([decoded[r.image] for r in batch], [p.prompt for p in probes],
                            [r.generate for r in batch],
                            [yes_no_texts(p.question) if r.score else None
                             for r, p in zip(batch, probes, strict=True)],
                            generate_fn, score_fn)
        texts += t
        scores += s
    return texts, scores


@dataclass
class Answers:
    """Per probe, in plan order: the greedy answer and score, with and without the image swap
    (None where not asked: no generation for logit-decided POPE, no score outside POPE)."""

    text: list[str | None]
    score: list[float | None]
    swap_text: list[str | None]
    swap_score: list[float | None]


def collect(plan: Plan, reqs: list[Request], texts: list[str | None],
            scores: list[float | None]) -> Answers:
    """Replies to `reqs` (any order) -> Answers in plan order."""
    if not len(reqs) == len(texts) == len(scores):
        raise ValueError(f"{len(texts)} answers and {len(scores)} scores for {len(reqs)} requests")
    n = len(plan.probes)
    out = Answers([None] * n, [None] * n, [None] * n, [None] * n)
    for r, t, s in zip(reqs, texts, scores, strict=True):
        text, sc = (out.swap_text, out.swap_score) if r.swapped else (out.text, out.score)
        text[r.probe], sc[r.probe] = t, s
    return out


def _decide(text: str | None, score: float | None, rule: str) -> bool | None:
    """The yes (True) / no (False) answer to a POPE probe under eval.pope_decision."""
    if rule == "generate":
        return None if text is None else parse_yes_no(text)
    return None if score is None or score == 0 else score > 0


def _pope(probes: list[Probe], preds: list[bool | None],
          scores: list[float | None]) -> dict[str, dict[str, Any]]:
    """pope_metrics per setting, and "all": every POPE probe once."""
    out = {}
    for s in (*SETTINGS, "all"):
        keep = [i for i, p in enumerate(probes) if s == "all" or s in p.settings]
        out[s] = pope_metrics([bool(probes[i].label) for i in keep], [preds[i] for i in keep],
                              [scores[i] for i in keep])
    return out


def _round(x: float | None) -> float | None:
    return None if x is None else float(f"{x:.6g}")  # 6 digits: ample to rank, small in JSON


def _items(plan: Plan, answers: Answers, correct: list[bool], swap_correct: list[bool | None],
           captions: dict[int, CaptionScore]) -> dict[str, list]:
    """Per-probe results as columns (compact in JSON), keyed for pairing across models."""
    probes = plan.probes
    pope = [p.kind == "pope" for p in probes]
    return {
        "key": [plan.key(p) for p in probes],
        "kind": [p.kind for p in probes],
        "correct": correct,
        "label": [p.label if k else None for p, k in zip(probes, pope, strict=True)],
        "settings": [list(p.settings) if k else None for p, k in zip(probes, pope, strict=True)],
        "score": [_round(s) for s in answers.score],
        "swap_correct": swap_correct,
        "swap_score": [_round(s) for s in answers.swap_score],
        "hallucinated": [captions[j].hallucinated if j in captions else None
                         for j in range(len(probes))],
        "mentions": [captions[j].mentions if j in captions else None for j in range(len(probes))],
    }


def _examples(plan: Plan, answers: Answers, correct: list[bool], preds: dict[int, bool | None],
              n: int) -> list[dict[str, Any]]:
    """`n` (question, answer, expected, correct) rows, round-robin over kinds."""
    by_kind: dict[str, list[dict]] = {}
    for j, p in enumerate(plan.probes):
        text = answers.text[j]
        if text is None:  # a logit-decided POPE probe: show the decision and its score
            word = {True: "yes", False: "no", None: "?"}[preds.get(j)]
            gap = answers.score[j]
            text = word + ("" if gap is None else f" (yes-no logit {gap:+.3f})")
        by_kind.setdefault(p.kind, []).append({
            "id": plan.ids[p.image], "kind": p.kind, "question": p.prompt, "answer": text,
            "expected": answer(p.question, plan.scenes[p.image]), "correct": correct[j]})
    return [r for group in itertools.zip_longest(*by_kind.values()) for r in group if r][:n]


def score(plan: Plan, answers: Answers, cfg: EvalConfig) -> dict[str, Any]:
    """Metrics of `answers` (plan order), the swap control, per-item results and examples."""
    if len(answers.text) != len(plan.probes):
        raise ValueError(f"{len(answers.text)} answers for {len(plan.probes)} probes")
    rule = cfg.pope_decision
    correct: list[bool] = []
    swap_correct: list[bool | None] = []
    preds: dict[int, bool | None] = {}
    swap_preds: dict[int, bool | None] = {}
    captions: dict[int, CaptionScore] = {}
    judged = []
    for j, p in enumerate(plan.probes):
        scene, text = plan.scenes[p.image], answers.text[j]
        swap_correct.append(None)
        if p.kind == "pope":
            preds[j] = _decide(text, answers.score[j], rule)
            correct.append(preds[j] == p.label)
            if answers.swap_text[j] is not None or answers.swap_score[j] is not None:
                swap_preds[j] = _decide(answers.swap_text[j], answers.swap_score[j], rule)
                swap_correct[j] = swap_preds[j] == p.label  # the ORIGINAL image's label
        elif p.kind == "caption":
            captions[j] = score_caption(text or "", scene, plan.vocab)
            correct.append(captions[j].hallucinated == 0 and captions[j].mentions > 0)
        else:
            correct.append(judge(p.question, text or "", scene, plan.vocab))
            judged.append((p.kind, correct[-1]))
    pope = _pope([plan.probes[j] for j in preds], list(preds.values()),
                 [answers.score[j] for j in preds])
    swapped = [plan.probes[j] for j in swap_preds]
    return {
        "pope": pope,
        "pope_swap": _pope(swapped, list(swap_preds.values()),
                           [answers.swap_score[j] for j in swap_preds]) if swapped else None,
        "pope_decision": rule,
        # None without captions (eval.generate_images=0): not a perfect 0.0 CHAIR
        "chair": chair_metrics(list(captions.values())) if captions else None,
        "yes_no_accuracy": pope["all"]["accuracy"],
        "yes_no_accuracy_se": pope["all"]["accuracy_se"],
        **group_accuracies(judged),
        "n_images": len(plan.images),
        "n_probes": len(plan.probes),
        "data": plan.data,
        "items": _items(plan, answers, correct, swap_correct, captions),
        "examples": _examples(plan, answers, correct, preds, cfg.examples),
    }


# Bound on the evaluation's image-feature cache: a 7B LLaVA's image is 576 x 4096 bf16 values
# (4.5 MiB), so about 100 images; requests come grouped by image, so recent ones are what recur.
EVAL_FEATURE_CACHE_BYTES = 512 * 2**20


def hf_answer_fns(model_dir: str | Path, max_new_tokens: int,
                  cache_image_features: bool) -> tuple[GenerateFn, ScoreFn]:
    """Load the model once: greedy `generation.generate` and the yes-minus-no logit gap.

    cache_image_features (eval.cache_image_features): an image's features (vision tower and
    connector) are computed once and reused by its other probes, as training does with a frozen
    tower; models without that path (image_features.SUPPORTED) run the tower every call.
    """
    # torch/transformers only when used
    from nsft_ray.eval.scoring import hf_score_fn
    from nsft_ray.generation import generate
    from nsft_ray.image_features import SUPPORTED, ImageFeatureCache
    from nsft_ray.models import load_vlm

    model, processor = load_vlm(model_dir)
    features = None
    if cache_image_features and model.config.model_type in SUPPORTED:
        features = ImageFeatureCache(model, inference=True, max_bytes=EVAL_FEATURE_CACHE_BYTES)

    def generate_fn(images: list[Image.Image], prompts: list[str]) -> list[str]:
        out = generate(model, processor, images, prompts, max_new_tokens=max_new_tokens,
                       features=features)
        return [a[0] for a in out]

    return generate_fn, hf_score_fn(model, processor, features)


def evaluate(
    model_dir: str, data_dir: str, cfg: EvalConfig, seed: int = 0,
    generate_fn: GenerateFn | None = None, score_fn: ScoreFn | None = None,
) -> dict[str, Any]:
    """Evaluate the model in `model_dir` (or `generate_fn` and `score_fn`) on cfg.split.

    Returns {"pope": {setting or "all": metrics with auroc}, "pope_swap" (the same, image-swap
    control; None without it), "chair", "yes_no_accuracy", "attribute_accuracy", "count_accuracy",
    "position_accuracy", "scene_accuracy" (each rate with a "<name>_se"), "items", "n_images",
    "n_probes", "seconds", "engine", "data", "examples"}. The Ray Data pass (cfg.engine="ray")
    is nsft_ray.ray_glue.eval.run_eval. With eval.pope_decision="logit" a given generate_fn needs a
    score_fn.
    """
    if cfg.engine not in ("local", "ray"):
        raise ValueError(f"eval.engine={cfg.engine!r}: expected 'local' or 'ray'")
    if generate_fn is None and cfg.engine == "ray":
        raise ValueError("eval.engine='ray' is a Ray Data pass: run it with "
                         "nsft_ray.ray_glue.eval.run_eval (as the CLI and compare do); evaluate() "
                         "answers in this process")
    if generate_fn is not None and score_fn is None and cfg.pope_decision == "logit":
        raise ValueError("eval.pope_decision='logit' decides POPE by the score: pass a score_fn "
                         "with generate_fn, or set eval.pope_decision='generate'")
    start = time.perf_counter()
    plan = plan_eval(data_dir, cfg, seed)
    if generate_fn is None:
        generate_fn, score_fn = hf_answer_fns(model_dir, cfg.max_new_tokens,
                                              cfg.cache_image_features)
    reqs = build_requests(plan, cfg)
    texts, scores = answer_requests(plan, reqs, generate_fn, score_fn, cfg.batch_size)
    result = score(plan, collect(plan, reqs, texts, scores), cfg)
    result.update(engine="local", seconds=round(time.perf_counter() - start, 3))
    return result
