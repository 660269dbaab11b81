"""Evaluation suite: metric formulas by hand, POPE sampling invariants, the runner end to end."""

import io
import json
import random
from dataclasses import replace

import pyarrow.parquet as pq
import pytest
from PIL import Image

from nsft_ray.config import EvalConfig, WorldConfig
from nsft_ray.eval import evaluate, parse_yes_no, plan_eval, score_caption, yes_no_metrics
from nsft_ray.eval.chair import Mention, chair_metrics, object_mentions
from nsft_ray.eval.pope import SETTINGS, object_stats, pope_items
from nsft_ray.eval.shapes import judge
from nsft_ray.negatives.claims import Vocabulary
from nsft_ray.schema import preference_table
from nsft_ray.world import Obj, Question, Scene, answer, corpus, question_text, write_world
from nsft_ray.world.scene import sample_scene

WORLD = WorldConfig(n_train=4, n_eval=12)
VOCAB = Vocabulary.from_config(WORLD)
COMBOS = [(c, s) for s in WORLD.shapes for c in WORLD.colors]
SCENE = Scene("plain", (Obj("circle", "red", "small", "top left"),
                        Obj("square", "blue", "large", "center"),
                        Obj("triangle", "green", "small", "bottom")))


# --- POPE metrics and parsing -------------------------------------------------------------------


def test_yes_no_metrics_by_hand():
    """TP = 3 (0, 2, 6), FP = 1 (3), FN = 2 (1, 7: "no" and unparsed on positives), TN = 1 (4);
    5 is an unparsed negative: wrong for accuracy, "not yes" elsewhere.
    accuracy = 4/8; precision = 3/4; recall = 3/5; F1 = 2 * .75 * .6 / 1.35 = 2/3; yes = 4/8."""
    labels = [True, True, True, False, False, False, True, True]
    preds = [True, False, True, True, False, None, True, None]
    m = yes_no_metrics(labels, preds)
    assert m["accuracy"] == 0.5 and m["precision"] == 0.75 and m["recall"] == pytest.approx(0.6)
    assert m["f1"] == pytest.approx(2 / 3) and m["yes_ratio"] == 0.5
    assert m["n"] == 8 and m["unparsed"] == 2
    assert yes_no_metrics([], [])["accuracy"] == 0.0
    with pytest.raises(ValueError, match="2 labels but 1"):
        yes_no_metrics([True, False], [True])


@pytest.mark.parametrize("text, expected", [
    ("Yes, there is a red circle.", True), ("yes", True), ("No, there is no red circle.", False),
    ("NO.", False), ("There isn't a red circle.", False), ("There is not.", False),
    ("There is a red circle at the top.", True), ("purple square", None), ("", None),
    ("I think yes, but no", True),
])
def test_parse_yes_no(text, expected):
    assert parse_yes_no(text) is expected


# --- POPE negative sampling ---------------------------------------------------------------------


def _similar(combo, scene):
    return sum(combo[0] == o.color or combo[1] == o.shape for o in scene.objects)


def test_pope_never_samples_a_present_object_and_settings_differ():
    rng = random.Random(0)
    scenes = [sample_scene(rng, replace(WORLD, max_objects=9)) for _ in range(300)]
    freq, cooc = object_stats(scenes)
    mean = {s: [] for s in SETTINGS}  # (similarity, frequency) of each negative per setting
    for i, scene in enumerate(scenes):
        present = {(o.color, o.shape) for o in scene.objects}
        absent = [c for c in COMBOS if c not in present]
        items = pope_items(scene, COMBOS, 3, random.Random(i), freq, cooc)
        k = min(3, len(present))
        positives = [(it.color, it.shape) for it in items if it.label]
        assert len(positives) == k and set(positives) <= present
        for setting in SETTINGS:
            neg = [(it.color, it.shape) for it in items if not it.label and setting in it.settings]
            assert len(neg) == k and len(set(neg)) == k, setting
            assert not set(neg) & present, f"{setting} sampled a present object in {scene}"
            rest = [c for c in absent if c not in neg]
            if setting == "popular":  # the most frequent absent combinations
                assert min(freq[c] for c in neg) >= max(freq[c] for c in rest)
            if setting == "adversarial":  # the most similar to what is present
                assert min(_similar(c, scene) for c in neg) >= max(_similar(c, scene) for c in rest)
            mean[setting] += [(_similar(c, scene), freq[c]) for c in neg]
        again = pope_items(scene, COMBOS, 3, random.Random(i), freq, cooc)
        assert again == items  # deterministic in the seed
    avg = {s: [sum(v[j] for v in mean[s]) / len(mean[s]) for j in (0, 1)] for s in SETTINGS}
    assert avg["adversarial"][0] > avg["random"][0] + 0.5
    assert avg["popular"][1] > avg["random"][1]


def test_pope_popular_follows_the_dataset():
    """red circle is in 3 of 4 scenes, blue star in 2: red circle is the popular negative of the
    scene without them; its adversarial negative shares green or square with its green square."""
    red, star = Obj("circle", "red", "small", "left"), Obj("star", "blue", "small", "top")
    scenes = [Scene("plain", (red, star)), Scene("dotted", (red, star)), Scene("plain", (red,)),
              Scene("plain", (Obj("square", "green", "small", "left"),))]
    freq, cooc = object_stats(scenes)
    assert freq[("red", "circle")] == 3 and cooc[(("red", "circle"), ("blue", "star"))] == 2
    items = pope_items(scenes[3], COMBOS, 2, random.Random(0), freq, cooc)
    assert [(i.color, i.shape) for i in items if i.label] == [("green", "square")]  # k = 1
    negatives = {s: [(i.color, i.shape) for i in items if not i.label and s in i.settings]
                 for s in SETTINGS}
    assert negatives["popular"] == [("red", "circle")]
    assert _similar(negatives["adversarial"][0], scenes[3]) == 1


# --- CHAIR --------------------------------------------------------------------------------------


def test_chair_i_is_one_quarter_for_one_absent_object_of_four():
    text = ("A plain picture with one circle, one square, one triangle and one star. "
            "There is a small red circle at the top left. There is a large blue square in the "
            "center. There is a small green triangle at the bottom. There is a small yellow star "
            "at the right.")
    s = score_caption(text, SCENE, VOCAB)
    assert (s.mentions, s.hallucinated, s.covered, s.objects) == (4, 1, 3, 3)
    m = chair_metrics([s])
    assert m["chair_i"] == 0.25 and m["chair_s"] == 1.0
    assert m["object_recall"] == 1.0 and m["object_precision"] == 0.75
    truthful = score_caption(answer(Question("caption"), SCENE), SCENE, VOCAB)
    assert (truthful.mentions, truthful.hallucinated, truthful.covered) == (3, 0, 3)
    both = chair_metrics([s, truthful])
    assert both["chair_i"] == 1 / 7 and both["chair_s"] == 0.5 and both["n_captions"] == 2


def test_object_mentions_rules():
    # Colour counts: a blue circle is hallucinated although there is a (red) circle.
    assert score_caption("There is a blue circle.", SCENE, VOCAB).hallucinated == 1
    # A bare shape is checked by shape only and covers one object; negations are not mentions.
    s = score_caption("There is a circle. There is no star.", SCENE, VOCAB)
    assert (s.mentions, s.hallucinated, s.covered) == (1, 0, 1)
    # Count claims of shapes no object sentence names are bare mentions.
    assert object_mentions("A plain picture with two circles and one star.", VOCAB) == [
        Mention("circle", None), Mention("star", None)]
    s = score_caption("A plain picture with two circles and one star.", SCENE, VOCAB)
    assert (s.mentions, s.hallucinated, s.covered) == (2, 1, 1)
    assert score_caption("qwerty", SCENE, VOCAB).mentions == 0
    assert chair_metrics([])["chair_i"] == 0.0


# --- attribute / count / position judging -------------------------------------------------------


def test_judge_reads_the_value_and_checks_the_whole_text():
    color = Question("color", "circle", position="top left")
    assert judge(color, "The circle at the top left is red.", SCENE, VOCAB)
    assert judge(color, "red", SCENE, VOCAB)
    assert not judge(color, "The circle at the top left is blue.", SCENE, VOCAB)
    assert not judge(color, "It is red. There is a purple star.", SCENE, VOCAB)  # extra false claim
    assert not judge(color, "I don't know.", SCENE, VOCAB)
    count = Question("count", "star")
    assert judge(count, "There are no stars.", SCENE, VOCAB) and judge(count, "zero", SCENE, VOCAB)
    assert not judge(count, "There is one star.", SCENE, VOCAB)
    position = Question("position", "square", "blue")
    assert judge(position, "The blue square is in the center.", SCENE, VOCAB)
    assert not judge(position, "The blue square is at the top.", SCENE, VOCAB)


# --- the runner end to end ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def world_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    write_world(WORLD, out, seed=0)
    return out


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    import torch

    from nsft_ray.models import build_tiny_vlm

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 shared cores: more threads only oversubscribe them
    yield build_tiny_vlm(tmp_path_factory.mktemp("m"), corpus(WorldConfig(), n=300, seed=0))
    torch.set_num_threads(threads)


def _oracle(world_dir):
    """generate_fn answering every world question about the image with its true answer."""
    scenes = {}
    for row in pq.read_table(world_dir / "sft_eval.parquet").to_pylist():
        image = Image.open(io.BytesIO(row["image"])).convert("RGB")
        scenes[image.tobytes()] = Scene.from_dict(json.loads(row["meta"])["scene"])

    def truth(scene, prompt):
        qs = [Question("caption"), Question("scene")]
        qs += [Question(k, s, c) for k in ("existence", "size", "position")
               for s in WORLD.shapes for c in WORLD.colors if k == "existence" or scene.find(s, c)]
        qs += [Question("count", s) for s in WORLD.shapes]
        qs += [Question("color", o.shape, position=o.position) for o in scene.objects]
        table = {question_text(q): answer(q, scene) for q in qs}
        return table[prompt]

    return lambda images, prompts: [truth(scenes[i.tobytes()], p)
                                    for i, p in zip(images, prompts, strict=True)]


def test_oracle_scores_perfectly_and_always_yes_says_yes(world_dir):
    cfg = EvalConfig(max_images=8, batch_size=5)
    r = evaluate("", str(world_dir), cfg, generate_fn=_oracle(world_dir))
    assert r["n_images"] == 8 and r["engine"] == "local" and r["seconds"] >= 0
    for setting in SETTINGS:
        m = r["pope"][setting]
        assert (m["accuracy"], m["precision"], m["recall"], m["f1"]) == (1.0, 1.0, 1.0, 1.0)
        assert m["yes_ratio"] == 0.5 and m["unparsed"] == 0  # balanced by construction
    assert r["chair"]["chair_i"] == 0.0 and r["chair"]["chair_s"] == 0.0
    assert r["chair"]["object_recall"] == 1.0 and r["chair"]["n_captions"] == 8
    for key in ("yes_no_accuracy", "attribute_accuracy", "count_accuracy", "position_accuracy",
                "scene_accuracy"):
        assert r[key] == 1.0, key
    assert len(r["examples"]) == cfg.examples and all(e["correct"] for e in r["examples"])
    assert {e["kind"] for e in r["examples"]} == {"pope", "caption", "color", "size", "count",
                                                  "position", "scene"}
    json.dumps(r)  # the CLI writes it as eval.json

    yes = evaluate("", str(world_dir), cfg, generate_fn=lambda im, p: ["Yes."] * len(p))
    for setting in SETTINGS:
        m = yes["pope"][setting]
        assert m["yes_ratio"] == 1.0 and m["recall"] == 1.0 and m["precision"] == 0.5
        assert m["accuracy"] == 0.5
    assert yes["attribute_accuracy"] == 0.0 and yes["chair"]["mentions"] == 0


def test_probes_are_deterministic_and_bad_rows_are_reported(world_dir, tmp_path):
    a, b = plan_eval(world_dir, EvalConfig(max_images=4), 7), plan_eval(world_dir, EvalConfig(), 7)
    # Per-image seeds: more images change only the popular/adversarial rankings (dataset counts).
    def stable(plan):
        return [(p.image, p.prompt, p.label) for p in plan.probes
                if p.image < 4 and (p.kind != "pope" or p.label or "random" in p.settings)]

    assert stable(a) == stable(b)
    assert plan_eval(world_dir, EvalConfig(max_images=4), 8).probes != a.probes
    rows = pq.read_table(world_dir / "pref_eval.parquet").to_pylist()[:4]
    rows[1] = {**rows[1], "meta": json.dumps({"scene": {"objects": []}}), "image": b"x"}
    pq.write_table(preference_table(rows), tmp_path / "pref.parquet")
    plan = plan_eval(tmp_path / "pref.parquet", EvalConfig(), 0)
    assert plan.data["rows_read"] == 4 and len(plan.data["skipped"]) == 1
    assert plan.data["skipped"][0]["id"] == rows[1]["id"]
    assert "background" in plan.data["skipped"][0]["reason"]
    assert len(plan.images) + plan.data["duplicate_rows"] == 3
    with pytest.raises(FileNotFoundError, match="sft_eval.parquet"):
        plan_eval(tmp_path / "nothing", EvalConfig(), 0)


def test_tiny_model_end_to_end(world_dir, tiny_model):
    cfg = EvalConfig(max_images=3, max_new_tokens=8, batch_size=16)
    r = evaluate(str(tiny_model), str(world_dir), cfg)
    assert r["n_images"] == 3 and r["n_probes"] > 3 * 7
    for m in r["pope"].values():
        assert m["n"] > 0 and 0 <= m["unparsed"] <= m["n"]
        assert all(0.0 <= m[k] <= 1.0 for k in ("accuracy", "precision", "recall", "f1",
                                                  "yes_ratio"))
    assert all(0.0 <= r["chair"][k] <= 1.0 for k in ("chair_i", "chair_s", "object_recall"))
    for key in ("yes_no_accuracy", "attribute_accuracy", "count_accuracy", "position_accuracy"):
        assert 0.0 <= r[key] <= 1.0
    assert all(isinstance(e["answer"], str) for e in r["examples"])


@pytest.mark.ray
def test_ray_data_pass_matches_local(world_dir, tiny_model):
    import ray

    cfg = EvalConfig(max_images=3, max_new_tokens=8, batch_size=8, examples=1000)
    local = evaluate(str(tiny_model), str(world_dir), cfg)
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        remote = evaluate(str(tiny_model), str(world_dir), replace(cfg, engine="ray"))
    finally:
        if started:
            ray.shutdown()
    assert remote["engine"] == "ray/hf"
    assert [e["answer"] for e in remote["examples"]] == [e["answer"] for e in local["examples"]]
    assert len(remote["examples"]) == remote["n_probes"]
    for key in ("pope", "chair", "yes_no_accuracy", "count_accuracy", "n_images"):
        assert remote[key] == local[key], key
