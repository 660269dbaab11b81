"""Evaluate a VLM on the ShapesWorld eval split: POPE, CHAIR, attribute/count/position/scene.

    result = evaluate("runs/nsft/model", "data/world", EvalConfig(max_images=100))
    result["pope"]["adversarial"]["f1"], result["chair"]["chair_i"], result["count_accuracy"]

Walk: read the eval split (scene graphs from `meta`) -> plan the probes of every image (POPE
existence questions, one caption, one question per kind of shapes.KINDS) -> answer them in batches
(`generate_fn`, by default HF greedy generate; or a Ray Data pass, EvalConfig.engine="ray") ->
score. Probes are a pure function of (images, cfg, seed), so two models see the same questions.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
from PIL import Image

from nsft_ray.config import EvalConfig, WorldConfig, from_dict
from nsft_ray.eval.chair import chair_metrics, score_caption
from nsft_ray.eval.pope import SETTINGS, object_stats, parse_yes_no, pope_items, yes_no_metrics
from nsft_ray.eval.shapes import group_accuracies, judge, shape_questions
from nsft_ray.negatives.claims import Vocabulary
from nsft_ray.schema import loads_meta
from nsft_ray.world.language import Question, answer, question_text
from nsft_ray.world.scene import Scene

__all__ = ["GenerateFn", "Probe", "Plan", "load_eval_images", "plan_eval", "answer_probes",
           "score", "hf_generate_fn", "evaluate"]

# generate_fn(images, prompts) -> one answer per prompt (greedy, for evaluation).
GenerateFn = Callable[[list[Image.Image], list[str]], list[str]]
EVAL_FILES = ("sft_eval.parquet", "pref_eval.parquet")  # same images; the first one found is read


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


def _eval_file(data: str | Path) -> Path:
    path = Path(data)
    if path.is_file():
        return path
    for name in EVAL_FILES:
        if (path / name).is_file():
            return path / name
    raise FileNotFoundError(f"eval data {path}: expected a Parquet file or a ShapesWorld folder "
                            f"holding one of {', '.join(EVAL_FILES)}")


def _world_config(eval_file: Path) -> WorldConfig:
    """The world's config from world.json beside the data (its vocabulary), else the defaults."""
    summary = eval_file.parent / "world.json"
    if not summary.is_file():
        return WorldConfig()
    return from_dict(WorldConfig, json.loads(summary.read_text()).get("config", {}), "world.")


def load_eval_images(
    data: str | Path, max_images: int
) -> tuple[list[str], list[bytes], list[Scene], dict[str, Any]]:
    """The first `max_images` distinct images of the eval split with their scene graphs.

    Rows repeating an image are counted in data["duplicate_rows"]; rows without a valid scene
    in `meta` are listed in data["skipped"] with the reason.
    """
    path = _eval_file(data)
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
    report = {"file": str(path), "rows_read": len(images) + duplicates + len(skipped),
              "duplicate_rows": duplicates, "skipped": skipped}
    return ids, images, scenes, report


def plan_eval(data: str | Path, cfg: EvalConfig, seed: int = 0) -> Plan:
    """Read the eval images and build every probe (deterministic in `seed`)."""
    ids, images, scenes, report = load_eval_images(data, cfg.max_images)
    world = _world_config(_eval_file(data))
    combos = [(c, s) for s in world.shapes for c in world.colors]
    freq, cooc = object_stats(scenes)
    probes: list[Probe] = []
    for i, (image_id, scene) in enumerate(zip(ids, scenes, strict=True)):
        # Per image, so an image's draws do not depend on max_images (the popular and
        # adversarial rankings do: they count the evaluated images, as POPE's do).
        rng = random.Random(f"eval/{seed}/{image_id}")
        for item in pope_items(scene, combos, cfg.pope_per_image, rng, freq, cooc):
            q = Question("existence", item.shape, item.color, short=cfg.short_answers)
            probes.append(Probe(i, "pope", q, question_text(q), item.label, item.settings))
        q = Question("caption")
        probes.append(Probe(i, "caption", q, question_text(q)))
        for q in shape_questions(scene, rng, world, cfg.short_answers):
            probes.append(Probe(i, q.kind, q, question_text(q)))
    return Plan(ids, images, scenes, probes, Vocabulary.from_config(world), report)


def answer_probes(plan: Plan, generate_fn: GenerateFn, batch_size: int) -> list[str]:
    """Answer every probe with `generate_fn`, `batch_size` prompts per call."""
    if batch_size < 1:
        raise ValueError(f"eval.batch_size={batch_size}: expected >= 1")
    decoded = [Image.open(io.BytesIO(b)).convert("RGB") for b in plan.images]
    answers: list[str] = []
    for start in range(0, len(plan.probes), batch_size):
        batch = plan.probes[start:start + batch_size]
        out = generate_fn([decoded[p.image] for p in batch], [p.prompt for p in batch])
        if len(out) != len(batch):
            raise ValueError(f"generate_fn returned {len(out)} answers for {len(batch)} prompts")
        answers += [str(a) for a in out]
    return answers


def score(plan: Plan, answers: list[str], cfg: EvalConfig) -> dict[str, Any]:
    """Metrics of `answers` (one per probe, in plan order) and a few example rows."""
    if len(answers) != len(plan.probes):
        raise ValueError(f"{len(answers)} answers for {len(plan.probes)} probes")
    pope = [(p, parse_yes_no(a)) for p, a in zip(plan.probes, answers, strict=True)
            if p.kind == "pope"]
    captions, judged, rows = [], [], []
    for p, a in zip(plan.probes, answers, strict=True):
        scene = plan.scenes[p.image]
        if p.kind == "pope":
            ok = parse_yes_no(a) == p.label
        elif p.kind == "caption":
            captions.append(score_caption(a, scene, plan.vocab))
            ok = captions[-1].hallucinated == 0 and captions[-1].mentions > 0
        else:
            ok = judge(p.question, a, scene, plan.vocab)
            judged.append((p.kind, ok))
        rows.append({"id": plan.ids[p.image], "kind": p.kind, "question": p.prompt, "answer": a,
                     "expected": answer(p.question, scene), "correct": ok})
    result: dict[str, Any] = {
        "pope": {s: yes_no_metrics([p.label for p, _ in pope if s in p.settings],
                                   [y for p, y in pope if s in p.settings]) for s in SETTINGS},
        "chair": chair_metrics(captions),
        "yes_no_accuracy": yes_no_metrics([p.label for p, _ in pope],
                                          [y for _, y in pope])["accuracy"],
        **group_accuracies(judged),
        "n_images": len(plan.images),
        "n_probes": len(plan.probes),
        "data": plan.data,
    }
    by_kind: dict[str, list[dict]] = {}
    for r in rows:
        by_kind.setdefault(r["kind"], []).append(r)
    # Round-robin over kinds, so the examples show every kind of probe.
    examples = [r for group in itertools.zip_longest(*by_kind.values()) for r in group if r]
    result["examples"] = examples[:cfg.examples]
    return result


def hf_generate_fn(model_dir: str | Path, cfg: EvalConfig) -> GenerateFn:
    """Load the model once; greedy `models.generate` with cfg.max_new_tokens."""
    from nsft_ray.models import generate, load_vlm  # torch/transformers only when used

    model, processor = load_vlm(model_dir)

    def generate_fn(images: list[Image.Image], prompts: list[str]) -> list[str]:
        out = generate(model, processor, images, prompts, max_new_tokens=cfg.max_new_tokens)
        return [a[0] for a in out]

    return generate_fn


def evaluate(
    model_dir: str, data_dir: str, cfg: EvalConfig, seed: int = 0,
    generate_fn: GenerateFn | None = None,
) -> dict[str, Any]:
    """Evaluate the model in `model_dir` (or `generate_fn`) on the eval split in `data_dir`.

    Returns {"pope": {setting: metrics}, "chair": {...}, "yes_no_accuracy", "attribute_accuracy",
    "count_accuracy", "position_accuracy", "scene_accuracy", "n_images", "n_probes", "seconds",
    "engine", "data", "examples"}. cfg.engine="ray" (without generate_fn) runs the Ray Data pass.
    """
    if cfg.engine not in ("local", "ray"):
        raise ValueError(f"eval.engine={cfg.engine!r}: expected 'local' or 'ray'")
    if generate_fn is None and cfg.engine == "ray":
        # Imported here: the core must import without Ray; only this engine needs it.
        from nsft_ray.ray_glue.eval import evaluate_ray

        return evaluate_ray(model_dir, data_dir, cfg, seed)
    start = time.perf_counter()
    plan = plan_eval(data_dir, cfg, seed)
    fn = generate_fn or hf_generate_fn(model_dir, cfg)
    result = score(plan, answer_probes(plan, fn, cfg.batch_size), cfg)
    result.update(engine="local", seconds=round(time.perf_counter() - start, 3))
    return result
