"""Build ShapesWorld datasets: SFT conversations and preference pairs per split, as Parquet.

Every image i of split s draws from its own stream random.Random("shapesworld/{seed}/{s}/{i}"),
so the output is a pure function of (config, seed). Train, val and eval never share an image: a
scene belongs to the split `split_of(scene)` names (by hash), and each split keeps only its own
(redrawing scenes it already holds, so images are also unique within a split). Val is where
designs and hyper-parameters are chosen; eval is only for the reported results.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
from PIL import Image
from tqdm import tqdm

from nsft_ray.config import WorldConfig, to_dict
from nsft_ray.negatives.claims import Vocabulary
from nsft_ray.schema import conversation_table, preference_table
from nsft_ray.world.check import answer_errors
from nsft_ray.world.language import (
    QA_KINDS,
    Question,
    answer,
    corrupt,
    question_text,
    sample_question,
)
from nsft_ray.world.render import render_png
from nsft_ray.world.scene import Scene, sample_scene, split_of

__all__ = ["SPLITS", "Sampler", "build_split", "policy_rejections", "write_world"]

SPLITS = ("train", "val", "eval")
SOURCE_SYNTHETIC = "shapesworld/synthetic"
SOURCE_POLICY = "shapesworld/policy"
MAX_DRAWS = 10_000  # scene draws per image before a too-small vocabulary is reported
# sampler(images, prompts, k) -> k sampled answers per prompt (the lead wires a checkpoint in).
Sampler = Callable[[list[Image.Image], list[str], int], list[list[str]]]


def _scene_for(rng: random.Random, cfg: WorldConfig, split: str, seen: set[Scene]) -> Scene:
    """A scene of `split` not drawn before in it (images are unique within a split)."""
    for _ in range(MAX_DRAWS):
        scene = sample_scene(rng, cfg)
        if split_of(scene) == split and scene not in seen:
            seen.add(scene)
            return scene
    raise ValueError(f"no new {split} scene in {MAX_DRAWS} draws: the world vocabulary is "
                     f"too small for {len(seen)}+ distinct images")


def _qa_plan(rng: random.Random, n: int) -> list[str]:
    """n question kinds for the multi-turn QA conversation: every kind but existence once (in a
    random order), then random ones. Existence questions get conversations of their own."""
    kinds = [k for k in QA_KINDS if k != "existence"]
    plan = rng.sample(kinds, len(kinds))
    plan += [rng.choice(kinds) for _ in range(n - len(plan))]
    return plan[:n]


def _image_rows(
    cfg: WorldConfig, seed: int, split: str, i: int, vocab: Vocabulary, seen: set[Scene]
) -> tuple[list[dict], list[dict]]:
    """The SFT conversations and preference pairs of image i of `split`."""
    rng = random.Random(f"shapesworld/{seed}/{split}/{i}")
    scene = _scene_for(rng, cfg, split, seen)
    png = render_png(scene, cfg.image_size)
    base = f"sw-{split}-{i:06d}"
    meta = {"scene": scene.to_dict(), "split": split, "seed": seed, "image_index": i}

    def conversation(suffix: str, questions: list[Question]) -> dict[str, Any]:
        messages = []
        for q in questions:
            messages += [{"role": "user", "content": question_text(q)},
                         {"role": "assistant", "content": answer(q, scene)}]
        return {"id": f"{base}-{suffix}", "parent_id": None, "image": png, "messages": messages,
                "origin": "sft", "error_kinds": [],
                "meta": {**meta, "questions": [q.to_dict() for q in questions]}}

    def short() -> bool:
        return rng.random() < cfg.short_answer_fraction

    qa = [sample_question(scene, rng, cfg, kind, short())
          for kind in _qa_plan(rng, cfg.questions_per_image)]
    sft = [conversation("caption", [Question("caption")])]
    if qa:
        sft.append(conversation("qa", qa))
    # One question per conversation, answered yes or no by an independent coin: what a POPE
    # probe looks like, and nothing in the conversation gives the answer away.
    for j in range(cfg.existence_per_image):
        q = sample_question(scene, rng, cfg, "existence", short(), rng.random() < 0.5)
        sft.append(conversation(f"exist{j}", [q]))

    pref = []
    for j in range(cfg.pairs_per_image):
        r = rng.random()
        if r < cfg.caption_pair_fraction:
            q = Question("caption")
        else:
            short = r < cfg.caption_pair_fraction + cfg.short_answer_fraction
            q = sample_question(scene, rng, cfg, rng.choice(QA_KINDS), short)
        rejected, kind = corrupt(scene, q, rng, cfg)
        pref.append({
            "id": f"{base}-p{j}", "image": png, "prompt": question_text(q),
            "chosen": answer(q, scene), "rejected": rejected, "source": SOURCE_SYNTHETIC,
            "meta": {**meta, "question": q.to_dict(), "error_kind": kind,
                     "error_kinds": answer_errors(q, rejected, scene, vocab) or [],
                     "rejected_from": "synthetic"},
        })
    return sft, pref


def build_split(cfg: WorldConfig, seed: int, split: str) -> tuple[list[dict], list[dict]]:
    """All SFT conversation rows and synthetic preference rows of one split."""
    if split not in SPLITS:
        raise ValueError(f"split {split!r}: expected one of {SPLITS}")
    if cfg.caption_pair_fraction + cfg.short_answer_fraction > 1:
        raise ValueError(
            f"world.caption_pair_fraction ({cfg.caption_pair_fraction}) + "
            f"world.short_answer_fraction ({cfg.short_answer_fraction}) must not exceed 1"
        )
    vocab = Vocabulary.from_config(cfg)
    n = {"train": cfg.n_train, "val": cfg.n_val, "eval": cfg.n_eval}[split]
    sft, pref, seen = [], [], set()
    for i in tqdm(range(n), desc=f"shapesworld {split}", unit="img"):
        s, p = _image_rows(cfg, seed, split, i, vocab, seen)
        sft += s
        pref += p
    return sft, pref


def policy_rejections(
    rows: list[dict], sampler: Sampler, k: int, vocab: Vocabulary, batch_size: int = 16
) -> tuple[list[dict], list[dict]]:
    """Replace synthetic rejections by policy answers that contradict the scene graph.

    For each row, `sampler` draws k answers; the first one with errors becomes `rejected`
    (source shapesworld/policy, meta.error_kinds = its kinds). Rows whose k answers are all
    correct or uncheckable are returned second, with their synthetic rejection kept,
    meta.rejected_from = "synthetic_fallback" and meta.fallback_reason saying why.
    """
    kept, unused = [], []
    for start in tqdm(range(0, len(rows), batch_size), desc="policy negatives", unit="batch"):
        batch = rows[start:start + batch_size]
        images = [Image.open(io.BytesIO(r["image"])).convert("RGB") for r in batch]
        samples = sampler(images, [r["prompt"] for r in batch], k)
        if len(samples) != len(batch):
            raise ValueError(f"sampler returned {len(samples)} answer lists for "
                             f"{len(batch)} prompts (rows {batch[0]['id']}..)")
        for row, answers in zip(batch, samples, strict=True):
            meta = dict(row["meta"])
            scene, q = Scene.from_dict(meta["scene"]), Question.from_dict(meta["question"])
            errors = [answer_errors(q, a, scene, vocab) for a in answers]
            wrong = [(a, e) for a, e in zip(answers, errors, strict=True) if e]
            meta["policy_samples"] = {"k": len(answers), "wrong": len(wrong),
                                      "uncheckable": sum(e is None for e in errors)}
            if wrong:
                text, kinds = wrong[0]
                meta.update(rejected_from="policy", error_kind=kinds[0], error_kinds=kinds)
                kept.append({**row, "rejected": text.strip(), "source": SOURCE_POLICY,
                             "meta": meta})
            else:
                n_correct = sum(e == [] for e in errors)
                meta.update(rejected_from="synthetic_fallback", fallback_reason=(
                    f"none of {len(answers)} policy samples contradicts the scene "
                    f"({n_correct} correct, {len(answers) - n_correct} uncheckable)"))
                unused.append({**row, "meta": meta})
    return kept, unused


def _histogram(values: Iterable[str]) -> dict[str, int]:
    return dict(sorted(Counter(values).items()))


def write_world(
    cfg: WorldConfig, out: str | Path, seed: int, sampler: Sampler | None = None
) -> dict[str, Any]:
    """Write sft_{split}.parquet and pref_{split}.parquet for train, val and eval, and world.json.

    With cfg.negatives == "policy", the train split's rejections come from `sampler` (with
    synthetic fallbacks, counted in world.json); val and eval keep synthetic ones (only train's
    preference rows are trained on, and sampling the others would cost time for nothing).
    Returns the world.json summary.
    """
    if cfg.negatives == "policy" and sampler is None:
        raise ValueError("world.negatives=policy needs a sampler (a policy checkpoint)")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    vocab = Vocabulary.from_config(cfg)
    summary: dict[str, Any] = {"seed": seed, "config": to_dict(cfg), "splits": {}}
    hashes = {}
    for split in SPLITS:
        sft, pref = build_split(cfg, seed, split)
        if cfg.negatives == "policy" and split == "train":
            order = {r["id"]: n for n, r in enumerate(pref)}
            kept, unused = policy_rejections(pref, sampler, cfg.policy_samples, vocab,
                                             cfg.policy_batch_size)
            pref = sorted(kept + unused, key=lambda r: order[r["id"]])
        pq.write_table(conversation_table(sft), out / f"sft_{split}.parquet")
        pq.write_table(preference_table(pref), out / f"pref_{split}.parquet")
        hashes[split] = {hashlib.sha256(r["image"]).hexdigest() for r in sft}
        summary["splits"][split] = {
            "images": len(hashes[split]),
            "sft_rows": len(sft),
            "pref_rows": len(pref),
            "error_kinds": _histogram(r["meta"]["error_kind"] for r in pref),
            "rejected_from": _histogram(r["meta"]["rejected_from"] for r in pref),
        }
    # Images any two splits have in common: 0 by construction (split_of), checked on the output.
    summary["shared_images"] = sum(len(hashes[a] & hashes[b])
                                   for i, a in enumerate(SPLITS) for b in SPLITS[i + 1:])
    (out / "world.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    return summary
