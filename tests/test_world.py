"""ShapesWorld: exact texts, rendering, corruption/check agreement, determinism, splits, policy."""

import hashlib
import io
import json
import random
import time
from collections import Counter
from dataclasses import replace

import pyarrow.parquet as pq
import pytest
from PIL import Image

from nsft_ray.config import WorldConfig
from nsft_ray.negatives.claims import GRID_POSITIONS, Vocabulary
from nsft_ray.schema import CONVERSATION_SCHEMA, PREFERENCE_SCHEMA
from nsft_ray.world import (
    ERROR_KINDS,
    POSITIONS,
    QA_KINDS,
    Obj,
    Question,
    Scene,
    answer,
    answer_errors,
    build_split,
    caption,
    contradictions,
    corpus,
    corrupt,
    is_correct,
    policy_rejections,
    question_text,
    render,
    render_png,
    sample_question,
    sample_scene,
    split_of,
    write_world,
)
from nsft_ray.world.render import PALETTE

CFG = WorldConfig()
VOCAB = Vocabulary.from_config(CFG)
SMALL = WorldConfig(n_train=24, n_val=6, n_eval=8, questions_per_image=5, pairs_per_image=3)
SPLIT_NAMES = ("train", "val", "eval")
FILES = (*(f"{k}_{s}.parquet" for k in ("sft", "pref") for s in SPLIT_NAMES), "world.json")
# The grammar's example scene.
EXAMPLE = Scene("striped", (
    Obj("square", "green", "small", "bottom"),
    Obj("circle", "blue", "large", "center"),
    Obj("circle", "red", "small", "top left"),
))


def test_scene_canonical_roundtrip_and_constraints():
    assert POSITIONS == GRID_POSITIONS
    assert [o.position for o in EXAMPLE.objects] == ["top left", "center", "bottom"]
    rng = random.Random(0)
    for _ in range(300):
        s = sample_scene(rng, CFG)
        assert 1 <= len(s.objects) <= CFG.max_objects
        assert len({o.position for o in s.objects}) == len(s.objects)
        assert len({(o.color, o.shape) for o in s.objects}) == len(s.objects)
        assert Scene.from_dict(json.loads(json.dumps(s.to_dict()))) == s
    with pytest.raises(ValueError, match="share a grid cell"):
        Scene("plain", (Obj("circle", "red", "small", "top"), Obj("star", "red", "small", "top")))
    with pytest.raises(ValueError, match="occurs twice"):
        Scene("plain", (Obj("star", "red", "small", "top"), Obj("star", "red", "large", "left")))


def test_texts_follow_the_grammar_exactly():
    assert caption(EXAMPLE) == (
        "A striped picture with two circles and one square. There is a small red circle at the "
        "top left. There is a large blue circle in the center. There is a small green square at "
        "the bottom."
    )
    cases = [
        (Question("existence", "circle", "red"), "Is there a red circle in the picture?",
         "Yes, there is a red circle."),
        (Question("existence", "star", "orange"), "Is there an orange star in the picture?",
         "No, there is no orange star."),
        (Question("color", "circle", position="top left"),
         "What color is the circle at the top left?", "The circle at the top left is red."),
        (Question("size", "circle", "red"), "What size is the red circle?",
         "The red circle is small."),
        (Question("count", "circle"), "How many circles are there?", "There are two circles."),
        (Question("count", "square"), "How many squares are there?", "There is one square."),
        (Question("count", "star"), "How many stars are there?", "There are no stars."),
        (Question("position", "circle", "blue"), "Where is the blue circle?",
         "The blue circle is in the center."),
        (Question("position", "circle", "red"), "Where is the red circle?",
         "The red circle is at the top left."),
        (Question("scene"), "What is the background of the picture?",
         "The background is striped."),
        (Question("caption"), "Describe the picture.", caption(EXAMPLE)),
    ]
    for q, text, ans in cases:
        assert (question_text(q), answer(q, EXAMPLE)) == (text, ans)
    short = ["yes", "no", "red", "small", "two", "one", "zero", "center", "top left", "striped"]
    for (q, text, _), word in zip(cases[:-1], short, strict=True):
        suffix = " Answer with a number." if q.kind == "count" else " Answer with one word."
        assert question_text(replace(q, short=True)) == text + suffix
        assert answer(replace(q, short=True), EXAMPLE) == word
    assert answer(Question("count", "star", short=True), EXAMPLE) == "zero"
    assert answer(Question("position", "circle", "red", short=True), EXAMPLE) == "top left"


def test_render_is_legible_and_fast():
    img = render(EXAMPLE, 64)
    assert img.mode == "RGB" and img.size == (64, 64)
    # Centre pixels of the cells hold the shapes' palette colours.
    assert img.getpixel((10, 10)) == PALETTE["red"]
    assert img.getpixel((32, 32)) == PALETTE["blue"]
    assert img.getpixel((32, 53)) == PALETTE["green"]

    def coloured(scene):  # pixels painted in an object colour
        return sum(p in PALETTE.values() for p in render(scene, 64).getdata())

    small = coloured(Scene("plain", (Obj("circle", "red", "small", "center"),)))
    large = coloured(Scene("plain", (Obj("circle", "red", "large", "center"),)))
    assert large > 3 * small > 0
    backgrounds = {render(Scene(b, ()), 64).tobytes() for b in CFG.backgrounds}
    assert len(backgrounds) == len(CFG.backgrounds)
    rng = random.Random(0)
    scenes = [sample_scene(rng, CFG) for _ in range(500)]
    t = time.perf_counter()
    pngs = [render_png(s, 64) for s in scenes]
    assert time.perf_counter() - t < 5.0  # 10k images in well under a minute
    assert Image.open(io.BytesIO(pngs[0])).size == (64, 64)
    assert render_png(scenes[0]) == render_png(scenes[0])


def test_contradiction_rules():
    s = EXAMPLE
    cases = {
        "There is a small red circle at the top left.": [],
        "There is a yellow star at the top.": ["existence"],
        "There is a small purple circle at the top left.": ["attribute"],  # right place, color
        "There is a large red circle at the top left.": ["attribute"],  # right place, size
        "The red circle is at the bottom right.": ["spatial"],
        "No, there is no blue circle.": ["existence"],
        "There is no star.": [],
        "There are three circles.": ["count"],
        "There are no squares.": ["existence", "count"],
        "The background is dotted.": ["scene"],
        "A dotted picture with two circles and one square.": ["scene"],
        "I am not sure what this is.": [],
    }
    for text, kinds in cases.items():
        assert contradictions(text, s, VOCAB) == kinds, text
    assert is_correct("There are two circles.", s, VOCAB)
    assert not is_correct("I am not sure what this is.", s, VOCAB)  # no claim: not correct
    assert not is_correct("There are two stars.", s, VOCAB)
    q = Question("color", "circle", position="top left", short=True)
    assert answer_errors(q, "red", s, VOCAB) == []
    assert answer_errors(q, "Blue.", s, VOCAB) == ["attribute"]
    assert answer_errors(q, "circle", s, VOCAB) is None
    assert answer_errors(Question("count", "circle", short=True), "three", s, VOCAB) == ["count"]


def test_every_corruption_is_detected_and_truth_never_contradicts():
    rng = random.Random(1)
    made, by_question = Counter(), Counter()
    for _ in range(400):
        scene = sample_scene(rng, CFG)
        for kind in ("caption",) + QA_KINDS:
            q = sample_question(scene, rng, CFG, kind, short=rng.random() < 0.3)
            assert answer_errors(q, answer(q, scene), scene, VOCAB) == [], q
            if not q.short:
                assert is_correct(answer(q, scene), scene, VOCAB), q
            rejected, error_kind = corrupt(scene, q, rng, CFG)
            assert error_kind in ERROR_KINDS
            assert error_kind in (answer_errors(q, rejected, scene, VOCAB) or []), (q, rejected)
            made[error_kind] += 1
            by_question[kind, error_kind] += 1
    assert set(made) == set(ERROR_KINDS)
    assert {k for (q, k) in by_question if q == "caption"} == set(ERROR_KINDS)
    # The default cfg argument and the three-argument call.
    assert corrupt(EXAMPLE, Question("scene"), random.Random(0))[1] == "scene"


def test_corpus_covers_vocabulary_and_templates():
    texts = corpus(CFG, 20, seed=0)
    assert texts == corpus(CFG, 20, seed=0) and texts != corpus(CFG, 20, seed=1)
    joined = " ".join(texts).lower()
    words = [*CFG.shapes, *(s + "s" for s in CFG.shapes), *CFG.colors, *CFG.sizes,
             *CFG.backgrounds, *POSITIONS, "no", "zero", "one", "five", "nine", "yes"]
    assert [w for w in words if f" {w}" not in " " + joined] == []
    for template in ("Describe the picture.", "Is there an orange", "What color is the",
                     "What size is the", "How many", "Where is the", "is in the center.",
                     "What is the background of the picture?", "Answer with one word.",
                     "Answer with a number.", "Yes, there is", "No, there is no",
                     "There is one", "There are no", " picture with "):
        assert template in " ".join(texts), template


def _hash_files(d):
    return {f: hashlib.sha256((d / f).read_bytes()).hexdigest() for f in FILES}


def test_write_world_deterministic_disjoint_and_schema(tmp_path):
    a = write_world(SMALL, tmp_path / "a", seed=7)
    write_world(SMALL, tmp_path / "b", seed=7)
    write_world(SMALL, tmp_path / "c", seed=8)
    ha, hb, hc = (_hash_files(tmp_path / x) for x in "abc")
    assert ha == hb
    assert all(ha[f] != hc[f] for f in FILES)
    assert a == json.loads((tmp_path / "a" / "world.json").read_text())
    assert [a["splits"][s]["images"] for s in SPLIT_NAMES] == [24, 6, 8]
    assert a["shared_images"] == 0

    tables = {f: pq.read_table(tmp_path / "a" / f) for f in FILES[:-1]}
    assert tables["sft_train.parquet"].schema.equals(CONVERSATION_SCHEMA)
    assert tables["pref_eval.parquet"].schema.equals(PREFERENCE_SCHEMA)
    sft = {s: tables[f"sft_{s}.parquet"].to_pylist() for s in SPLIT_NAMES}
    pref = {s: tables[f"pref_{s}.parquet"].to_pylist() for s in SPLIT_NAMES}
    # caption + multi-turn QA + existence_per_image single-turn existence conversations
    assert len(sft["train"]) == (2 + SMALL.existence_per_image) * 24
    assert len(pref["train"]) == 3 * 24
    image_sets = {s: {hashlib.sha256(r["image"]).hexdigest() for r in sft[s]} for s in sft}
    assert [len(image_sets[s]) for s in SPLIT_NAMES] == [24, 6, 8]
    for i, x in enumerate(SPLIT_NAMES):  # no image in two splits
        for y in SPLIT_NAMES[i + 1:]:
            assert not image_sets[x] & image_sets[y]
    assert {hashlib.sha256(r["image"]).hexdigest() for r in pref["eval"]} <= image_sets["eval"]
    ids = [r["id"] for rows in (*sft.values(), *pref.values()) for r in rows]
    assert len(ids) == len(set(ids))

    kinds = Counter()
    for split in SPLIT_NAMES:
        for r in sft[split]:
            meta = json.loads(r["meta"])
            scene = Scene.from_dict(meta["scene"])
            assert split_of(scene) == split and meta["split"] == split
            assert r["origin"] == "sft" and r["parent_id"] is None
            assert [m["role"] for m in r["messages"]] == ["user", "assistant"] * (
                len(r["messages"]) // 2)
            qs = [Question.from_dict(q) for q in meta["questions"]]
            assert len(qs) in (1, SMALL.questions_per_image)
            for q, m in zip(qs, r["messages"][1::2], strict=True):
                assert answer_errors(q, m["content"], scene, VOCAB) == []
            # existence questions stand alone, one per conversation, as a POPE probe does
            kinds_here = [q.kind for q in qs]
            assert ("existence" in kinds_here) == ("-exist" in r["id"])
            assert kinds_here == ["existence"] or "existence" not in kinds_here
        for r in pref[split]:
            meta = json.loads(r["meta"])
            scene, q = Scene.from_dict(meta["scene"]), Question.from_dict(meta["question"])
            assert r["source"] == "shapesworld/synthetic" and meta["split"] == split
            assert r["prompt"] == question_text(q) and r["chosen"] == answer(q, scene)
            assert answer_errors(q, r["chosen"], scene, VOCAB) == []
            assert meta["error_kind"] in meta["error_kinds"]
            assert meta["error_kinds"] == answer_errors(q, r["rejected"], scene, VOCAB)
            kinds[meta["error_kind"]] += 1
    assert sum(kinds.values()) == sum(sum(a["splits"][s]["error_kinds"].values())
                                      for s in SPLIT_NAMES)


def _fake_policy(rows):
    """A sampler that answers from the truth: per prompt all-correct, uncheckable or mixed."""
    truth = {}
    for r in rows:
        key = (Image.open(io.BytesIO(r["image"])).convert("RGB").tobytes(), r["prompt"])
        truth[key] = r
    calls = []

    def sampler(images, prompts, k):
        calls.append((len(images), k))
        out = []
        for img, prompt in zip(images, prompts, strict=True):
            r = truth[(img.tobytes(), prompt)]
            n = int(r["id"].rsplit("-", 2)[1]) + int(r["id"][-1])
            meta = r["meta"] if isinstance(r["meta"], dict) else json.loads(r["meta"])
            q, scene = Question.from_dict(meta["question"]), Scene.from_dict(meta["scene"])
            wrong = corrupt(scene, q, random.Random(n), CFG)[0] + " "
            plans = [[r["chosen"]] * k, ["I cannot tell."] * k,
                     ["I cannot tell.", r["chosen"], wrong] + [r["chosen"]] * (k - 3)]
            out.append(plans[n % 3])
        return out

    return sampler, calls


def test_policy_rejections_with_fake_sampler(tmp_path):
    cfg = replace(SMALL, negatives="policy", policy_samples=4, policy_batch_size=5)
    _, rows = build_split(cfg, 3, "eval")
    sampler, calls = _fake_policy(rows)
    kept, unused = policy_rejections(rows, sampler, 4, VOCAB, batch_size=5)
    assert sorted(r["id"] for r in kept + unused) == sorted(r["id"] for r in rows)
    assert calls and all(k == 4 and n <= 5 for n, k in calls)
    assert kept and unused
    for r in kept:
        m = r["meta"]
        scene, q = Scene.from_dict(m["scene"]), Question.from_dict(m["question"])
        assert r["source"] == "shapesworld/policy" and m["rejected_from"] == "policy"
        assert m["error_kinds"] == answer_errors(q, r["rejected"], scene, VOCAB) != []
        assert m["policy_samples"] == {"k": 4, "wrong": 1, "uncheckable": 1}
    synthetic = {r["id"]: r["rejected"] for r in rows}
    reasons = Counter()
    for r in unused:
        assert r["source"] == "shapesworld/synthetic"
        assert r["meta"]["rejected_from"] == "synthetic_fallback"
        assert r["rejected"] == synthetic[r["id"]]
        reasons[r["meta"]["fallback_reason"]] += 1
    assert set(reasons) == {
        "none of 4 policy samples contradicts the scene (4 correct, 0 uncheckable)",
        "none of 4 policy samples contradicts the scene (0 correct, 4 uncheckable)",
    }

    with pytest.raises(ValueError, match="needs a sampler"):
        write_world(cfg, tmp_path / "none", seed=3)
    _, train_rows = build_split(cfg, 3, "train")
    sampler, _ = _fake_policy(rows + train_rows)
    summary = write_world(cfg, tmp_path / "p", seed=3, sampler=sampler)
    for split, split_rows in (("eval", rows), ("train", train_rows)):
        table = pq.read_table(tmp_path / "p" / f"pref_{split}.parquet").to_pylist()
        assert [r["id"] for r in table] == [r["id"] for r in split_rows]  # none dropped
        origins = Counter(json.loads(r["meta"])["rejected_from"] for r in table)
        assert summary["splits"][split]["rejected_from"] == dict(origins)
        assert sum(origins.values()) == len(split_rows)
        if split == "train":  # only train's preference rows are trained on: only they sample
            assert origins["policy"] > 0 and origins["synthetic_fallback"] > 0
        else:
            assert set(origins) == {"synthetic"}


def test_existence_questions_are_independent_and_partly_adversarial():
    """Fails if an image's existence answers are tied to each other (the old plan: always one
    yes and one no, the second answerable from the first), if yes and no are not balanced, or if
    the "no" questions never (or always) ask about the absent object POPE's adversarial split
    would pick."""
    from nsft_ray.world.language import absent_objects, similarity

    cfg = WorldConfig(n_train=600, existence_per_image=2, adversarial_absent_fraction=0.5)
    sft, _ = build_split(cfg, 0, "train")
    per_image: dict[str, list[bool]] = {}
    no_adversarial = []
    for r in sft:
        if "-exist" not in r["id"]:
            continue
        meta = r["meta"]
        scene, (q,) = Scene.from_dict(meta["scene"]), [Question.from_dict(x)
                                                        for x in meta["questions"]]
        present = scene.find(q.shape, q.color) is not None
        per_image.setdefault(meta["image_index"], []).append(present)
        if not present:
            absent = absent_objects(scene, cfg)
            top = max(similarity(a, scene) for a in absent)
            no_adversarial.append(similarity((q.color, q.shape), scene) == top)
    pairs = list(per_image.values())
    assert all(len(p) == 2 for p in pairs) and len(pairs) == 600
    yes = sum(a for p in pairs for a in p) / 1200
    assert 0.45 < yes < 0.55
    # Independent answers: both-yes, both-no and mixed images all occur, near 1/4, 1/4, 1/2.
    both = Counter(tuple(p) for p in pairs)
    assert both[(True, True)] > 100 and both[(False, False)] > 100
    # Half the "no" questions pick a top-similarity absent object, plus the uniform draws that
    # hit one by chance: clearly above the uniform rate and below 1.
    uniform = WorldConfig(n_train=600, adversarial_absent_fraction=0.0)
    base_rate = []
    for r in build_split(uniform, 0, "train")[0]:
        if "-exist" in r["id"]:
            scene = Scene.from_dict(r["meta"]["scene"])
            q = Question.from_dict(r["meta"]["questions"][0])
            if scene.find(q.shape, q.color) is None:
                top = max(similarity(a, scene) for a in absent_objects(scene, uniform))
                base_rate.append(similarity((q.color, q.shape), scene) == top)
    rate, rate0 = (sum(x) / len(x) for x in (no_adversarial, base_rate))
    assert rate0 + 0.2 < rate < 1.0
