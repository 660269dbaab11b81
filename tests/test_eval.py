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
from nsft_ray.eval.pope import SETTINGS, object_stats, pope_items, pope_metrics
from nsft_ray.eval.runner import build_requests
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
    # Recall on no = TN / negatives = 1/3; balanced = (3/5 + 1/3) / 2 = 7/15.
    assert m["balanced_accuracy"] == pytest.approx(7 / 15)
    # Binomial SEs: accuracy sqrt(.5 * .5 / 8); precision over the 4 yes answers; recall over
    # the 5 positives; balanced sqrt(.6 * .4 / 5 + (1/3)(2/3) / 3) / 2.
    assert m["accuracy_se"] == pytest.approx(0.5 / 8**0.5)
    assert m["precision_se"] == pytest.approx((0.75 * 0.25 / 4) ** 0.5)
    assert m["recall_se"] == pytest.approx((0.6 * 0.4 / 5) ** 0.5)
    assert m["balanced_accuracy_se"] == pytest.approx((0.048 + 2 / 27) ** 0.5 / 2)
    # An always-yes answerer: accuracy = yes share (here 5/8) but balanced accuracy = 0.5.
    assert yes_no_metrics(labels, [True] * 8)["balanced_accuracy"] == 0.5
    assert yes_no_metrics([], [])["accuracy"] == 0.0
    with pytest.raises(ValueError, match="2 labels but 1"):
        yes_no_metrics([True, False], [True])


def test_pope_metrics_auroc_by_hand():
    """Positives scored 0.9 and 0.4, negatives 0.4 and 0.1: 3 pairs ordered right and one tie,
    AUROC = 3.5 / 4. Hanley-McNeil with A = 7/8, n = 2 + 2: Q1 = A / (2 - A) = 7/9,
    Q2 = 2A^2 / (1 + A) = 49/60, SE^2 = (A(1 - A) + (Q1 - A^2) + (Q2 - A^2)) / 4."""
    m = pope_metrics([True, True, False, False], [True, False, False, False], [0.9, 0.4, 0.4, 0.1])
    a = 7 / 8
    assert m["auroc"] == 0.875 and m["accuracy"] == 0.75
    assert m["auroc_se"] == pytest.approx(((a * (1 - a) + (7 / 9 - a**2) + (49 / 60 - a**2)) / 4)
                                          ** 0.5)
    assert pope_metrics([True, False], [True, False], [1.0, None])["auroc"] is None
    assert pope_metrics([True, False], [True, False])["auroc"] is None


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
    # Delta method for R = 1/7 over captions (H, M) = (1, 4), (0, 3): residuals H - R M = 3/7
    # and -3/7; SE = sqrt((9/49 + 9/49) / (2 * 1)) / mean(M) = (3/7) / 3.5 = 6/49.
    assert both["chair_i_se"] == pytest.approx(6 / 49)
    assert both["chair_s_se"] == pytest.approx(0.5 / 2**0.5)


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


def _scenes(world_dir):
    """Pixels -> scene graph of every eval image (the fakes below answer from what they see)."""
    scenes = {}
    for row in pq.read_table(world_dir / "sft_eval.parquet").to_pylist():
        image = Image.open(io.BytesIO(row["image"])).convert("RGB")
        scenes[image.tobytes()] = Scene.from_dict(json.loads(row["meta"])["scene"])
    return scenes


def _truth(scene, prompt):
    qs = [Question("caption"), Question("scene")]
    qs += [Question(k, s, c) for k in ("existence", "size", "position")
           for s in WORLD.shapes for c in WORLD.colors if k == "existence" or scene.find(s, c)]
    qs += [Question("count", s) for s in WORLD.shapes]
    qs += [Question("color", o.shape, position=o.position) for o in scene.objects]
    return {question_text(q): answer(q, scene) for q in qs}[prompt]


def _oracle(world_dir, calls=None):
    """(generate_fn, score_fn) answering every question about the image it is GIVEN with that
    image's true answer; score +1 for yes, -1 for no. `calls` collects (prompt, pixels) scored."""
    scenes = _scenes(world_dir)

    def generate_fn(images, prompts):
        return [_truth(scenes[i.tobytes()], p) for i, p in zip(images, prompts, strict=True)]

    def score_fn(images, prompts, yes, no):
        if calls is not None:
            calls.extend((p, i.tobytes()) for i, p in zip(images, prompts, strict=True))
        return [1.0 if a.startswith("Yes") else -1.0 for a in generate_fn(images, prompts)]

    return generate_fn, score_fn


def test_oracle_scores_perfectly_and_always_yes_says_yes(world_dir):
    cfg = EvalConfig(max_images=8, batch_size=5)
    generate_fn, score_fn = _oracle(world_dir)
    r = evaluate("", str(world_dir), cfg, generate_fn=generate_fn, score_fn=score_fn)
    assert r["n_images"] == 8 and r["engine"] == "local" and r["seconds"] >= 0
    for setting in (*SETTINGS, "all"):
        m = r["pope"][setting]
        assert (m["accuracy"], m["precision"], m["recall"], m["f1"]) == (1.0, 1.0, 1.0, 1.0)
        assert m["auroc"] == 1.0 and m["balanced_accuracy"] == 1.0 and m["accuracy_se"] == 0.0
        assert m["unparsed"] == 0
    for setting in SETTINGS:
        assert r["pope"][setting]["yes_ratio"] == 0.5  # balanced by construction
    assert r["chair"]["chair_i"] == 0.0 and r["chair"]["chair_s"] == 0.0
    assert r["chair"]["object_recall"] == 1.0 and r["chair"]["n_captions"] == 8
    for key in ("yes_no_accuracy", "attribute_accuracy", "count_accuracy", "position_accuracy",
                "scene_accuracy"):
        assert r[key] == 1.0, key
    assert len(r["examples"]) == cfg.examples and all(e["correct"] for e in r["examples"])
    assert {e["kind"] for e in r["examples"]} == {"pope", "caption", "color", "size", "count",
                                                  "position", "scene"}
    json.dumps(r)  # the CLI writes it as eval.json

    # Decided by parsing generated answers instead: an always-yes model says yes.
    yes = evaluate("", str(world_dir), replace(cfg, pope_decision="generate"),
                   generate_fn=lambda im, p: ["Yes."] * len(p))
    for setting in SETTINGS:
        m = yes["pope"][setting]
        assert m["yes_ratio"] == 1.0 and m["recall"] == 1.0 and m["precision"] == 0.5
        assert m["accuracy"] == 0.5 and m["balanced_accuracy"] == 0.5 and m["auroc"] is None
    assert yes["attribute_accuracy"] == 0.0 and yes["chair"]["mentions"] == 0
    with pytest.raises(ValueError, match="pass a score_fn"):
        evaluate("", str(world_dir), cfg, generate_fn=generate_fn)


def test_swap_control_feeds_another_image(world_dir):
    """Fails if the swap control re-feeds the probe's own image, or scores against the swapped
    image's labels: the oracle answers from the pixels it receives."""
    cfg = EvalConfig(max_images=8, batch_size=5)
    plan = plan_eval(world_dir, cfg, 0)
    pixels = [Image.open(io.BytesIO(b)).convert("RGB").tobytes() for b in plan.images]
    calls = []
    generate_fn, score_fn = _oracle(world_dir, calls)
    r = evaluate("", str(world_dir), cfg, generate_fn=generate_fn, score_fn=score_fn)
    pope = [p for p in plan.probes if p.kind == "pope"]
    assert all(plan.swap[i] != i for i in range(8)) and sorted(plan.swap) == list(range(8))
    expected = {(p.prompt, pixels[p.image]) for p in pope}
    expected |= {(p.prompt, pixels[plan.swap[p.image]]) for p in pope}
    assert set(calls) == expected and len(calls) == 2 * len(pope)
    # Against the ORIGINAL labels, truthful answers about another image are right only where
    # both images agree on the object.
    for setting in SETTINGS:
        probes = [p for p in pope if setting in p.settings]
        agree = [(plan.scenes[plan.swap[p.image]].find(p.question.shape, p.question.color)
                  is not None) == p.label for p in probes]
        assert r["pope_swap"][setting]["accuracy"] == pytest.approx(sum(agree) / len(agree))
        assert r["pope_swap"][setting]["accuracy"] < 0.9 and r["pope"][setting]["accuracy"] == 1.0
    # A blind model (answers from the prompt alone) scores the same with and without the swap.
    def blind(images, prompts, yes=None, no=None):
        return [float(len(p) % 3) - 1.0 for p in prompts]

    b = evaluate("", str(world_dir), cfg, generate_fn=generate_fn, score_fn=blind)
    assert b["pope_swap"] == b["pope"]
    assert evaluate("", str(world_dir), replace(cfg, image_swap=False), generate_fn=generate_fn,
                    score_fn=score_fn)["pope_swap"] is None


def test_items_pair_across_models_and_sum_to_the_metrics(world_dir):
    """Per-item keys are the same for two models with the same seed (paired statistics rely on
    it) and the items reproduce the aggregate metrics."""
    cfg = EvalConfig(max_images=6, batch_size=7)
    oracle = evaluate("", str(world_dir), cfg, 0, *_oracle(world_dir))
    yes = evaluate("", str(world_dir), cfg, 0, lambda im, p: ["Yes."] * len(p),
                   lambda im, p, y, n: [0.5] * len(p))
    a, b = oracle["items"], yes["items"]
    assert a["key"] == b["key"] and len(set(a["key"])) == len(a["key"]) == oracle["n_probes"]
    plan = plan_eval(world_dir, cfg, 0)
    assert a["key"] == [f"{plan.ids[p.image]}|{p.kind}|{p.prompt}" for p in plan.probes]
    other = evaluate("", str(world_dir), cfg, 1, *_oracle(world_dir))["items"]["key"]
    assert set(other) != set(a["key"])  # another seed asks other questions
    for r in (oracle, yes):
        it = r["items"]
        pope = [i for i, k in enumerate(it["kind"]) if k == "pope"]
        adv = [i for i in pope if "adversarial" in it["settings"][i]]
        acc = sum(it["correct"][i] for i in adv) / len(adv)
        assert acc == pytest.approx(r["pope"]["adversarial"]["accuracy"])
        caps = [i for i, k in enumerate(it["kind"]) if k == "caption"]
        assert sum(it["hallucinated"][i] for i in caps) == r["chair"]["hallucinated"]
        assert sum(it["mentions"][i] for i in caps) == r["chair"]["mentions"]
        assert all(it["label"][i] in (True, False) and it["score"][i] is not None for i in pope)
    assert all(yes["items"]["correct"][i] is False for i, k in enumerate(a["kind"])
               if k == "count")


def test_probes_are_deterministic_and_bad_rows_are_reported(world_dir, tmp_path):
    a, b = plan_eval(world_dir, EvalConfig(max_images=4), 7), plan_eval(world_dir, EvalConfig(), 7)
    # Per-image seeds: more images change only the popular/adversarial rankings (dataset counts).
    def stable(plan):
        return [(p.image, p.prompt, p.label) for p in plan.probes
                if p.image < 4 and (p.kind != "pope" or p.label or "random" in p.settings)]

    assert stable(a) == stable(b)
    assert plan_eval(world_dir, EvalConfig(max_images=4), 8).probes != a.probes
    # generate_images: captions and questions for the first images only; POPE for all.
    few = plan_eval(world_dir, EvalConfig(max_images=4, generate_images=1), 7)
    assert {p.image for p in few.probes if p.kind != "pope"} == {0}
    assert [p for p in few.probes if p.kind == "pope"] == [p for p in a.probes if p.kind == "pope"]
    pope_only = evaluate("", str(world_dir), EvalConfig(max_images=4, generate_images=0), 0,
                         *_oracle(world_dir))
    assert pope_only["chair"] is None and pope_only["count_accuracy"] is None
    assert pope_only["pope"]["all"]["auroc"] == 1.0
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


def test_split_picks_the_val_file(world_dir):
    val = plan_eval(world_dir, EvalConfig(split="val", max_images=3), 0)
    test = plan_eval(world_dir, EvalConfig(max_images=3), 0)
    assert val.data["file"].endswith("sft_val.parquet") and val.data["split"] == "val"
    assert test.data["file"].endswith("sft_eval.parquet")
    assert not set(val.images) & set(test.images)  # val never shares an image with eval


def test_tiny_model_end_to_end(world_dir, tiny_model):
    cfg = EvalConfig(max_images=3, max_new_tokens=8, batch_size=16)
    r = evaluate(str(tiny_model), str(world_dir), cfg)
    assert r["n_images"] == 3 and r["n_probes"] > 3 * 7
    for m in r["pope"].values():
        assert m["n"] > 0 and m["unparsed"] == 0
        assert all(0.0 <= m[k] <= 1.0 for k in ("accuracy", "precision", "recall", "f1",
                                                  "yes_ratio", "auroc", "balanced_accuracy"))
    assert all(0.0 <= r["chair"][k] <= 1.0 for k in ("chair_i", "chair_s", "object_recall"))
    for key in ("yes_no_accuracy", "attribute_accuracy", "count_accuracy", "position_accuracy"):
        assert 0.0 <= r[key] <= 1.0
    assert all(isinstance(e["answer"], str) for e in r["examples"])


def _naive_auroc(labels, scores):
    pos = [s for s, y in zip(scores, labels, strict=True) if y]
    neg = [s for s, y in zip(scores, labels, strict=True) if not y]
    return sum((p > n) + 0.5 * (p == n) for p in pos for n in neg) / (len(pos) * len(neg))


@pytest.mark.parametrize("short", [False, True])
def test_logit_gap_matches_a_naive_per_probe_forward(world_dir, tiny_model, short):
    """Fails if the batched scoring forward reads the wrong position (padding), the wrong
    token ("Yes" vs "yes"), or mixes up probes: the oracle runs model(...) one probe at a time,
    unpadded, on a prompt rendered by hand, and takes the answers' first tokens from the
    tokenizer directly."""
    import torch

    from nsft_ray.eval.scoring import hf_score_fn
    from nsft_ray.models import load_vlm

    cfg = EvalConfig(max_images=3, batch_size=4, short_answers=short)
    r = evaluate(str(tiny_model), str(world_dir), cfg)
    model, processor = load_vlm(tiny_model)
    tok = processor.tokenizer
    plan = plan_eval(world_dir, cfg, 0)
    yes_word, no_word = ("yes", "no") if short else ("Yes", "No")
    yes_id, no_id = tok.convert_tokens_to_ids([yes_word, no_word])
    naive = {}
    for p in (p for p in plan.probes if p.kind == "pope"):
        image = Image.open(io.BytesIO(plan.images[p.image])).convert("RGB")
        text = f"<|im_start|>user\n<image>{p.prompt}<end_of_utterance>\n<|im_start|>assistant\n"
        inputs = processor(text=[text], images=[[image]], return_tensors="pt")
        with torch.no_grad():
            logits = model(**inputs).logits[0, -1]
        naive[plan.key(p)] = (p.label, (logits[yes_id] - logits[no_id]).item())
    items = r["items"]
    got = {k: s for k, s in zip(items["key"], items["score"], strict=True) if k in naive}
    assert got.keys() == naive.keys()
    for k, (_, s) in naive.items():
        assert got[k] == pytest.approx(s, rel=1e-4, abs=1e-4), k
    for setting in SETTINGS:
        keys = [k for k, st in zip(items["key"], items["settings"], strict=True)
                if st and setting in st]
        expected = _naive_auroc([naive[k][0] for k in keys], [naive[k][1] for k in keys])
        assert r["pope"][setting]["auroc"] == pytest.approx(expected)
    # POPE prompts tokenize to equal lengths here; a batch of unequal ones needs padding.
    prompts = ["Is there a red circle in the picture?", "Describe the picture.",
               "Is there a red circle in the picture? Answer with one word. Please, now."]
    image = Image.open(io.BytesIO(plan.images[0])).convert("RGB")
    batch = hf_score_fn(model, processor)([image] * 3, prompts, ["Yes."] * 3, ["No."] * 3)
    for p, got_score in zip(prompts, batch, strict=True):
        text = f"<|im_start|>user\n<image>{p}<end_of_utterance>\n<|im_start|>assistant\n"
        with torch.no_grad():
            logits = model(**processor(text=[text], images=[[image]], return_tensors="pt")).logits
        yes, no = tok.convert_tokens_to_ids(["Yes", "No"])
        assert got_score == pytest.approx((logits[0, -1, yes] - logits[0, -1, no]).item(),
                                          rel=1e-4, abs=1e-4), p


def test_cached_image_features_answer_as_the_vision_tower_does(world_dir, tiny_model,
                                                               monkeypatch):
    """Fails if the evaluation's feature cache hands a probe another image's features (the
    swap control feeds every image under another probe's prompt, so a key mix-up changes
    scores), if generate ignores the cached features, or if the cache recomputes an image:
    with it the vision tower sees each distinct image once, without it once per request."""
    from transformers.models.idefics3 import modeling_idefics3

    images_seen = []
    tower = modeling_idefics3.Idefics3Model.get_image_features

    def counting(self, pixel_values, *args, **kwargs):
        images_seen.append(pixel_values.shape[0] * pixel_values.shape[1])  # (B, N, 3, H, W)
        return tower(self, pixel_values, *args, **kwargs)

    monkeypatch.setattr(modeling_idefics3.Idefics3Model, "get_image_features", counting)
    cfg = EvalConfig(max_images=3, max_new_tokens=8, batch_size=8, examples=1000)
    cached = evaluate(str(tiny_model), str(world_dir), cfg)
    with_cache = sum(images_seen)
    images_seen.clear()
    plain = evaluate(str(tiny_model), str(world_dir), replace(cfg, cache_image_features=False))
    requests = len(build_requests(plan_eval(world_dir, cfg, 0), cfg))
    assert (with_cache, sum(images_seen)) == (3, requests)
    assert [e["answer"] for e in cached["examples"]] == [e["answer"] for e in plain["examples"]]
    for col in ("score", "swap_score"):
        got, want = cached["items"][col], plain["items"][col]
        assert [g is None for g in got] == [w is None for w in want], col
        assert [g for g in got if g is not None] == pytest.approx(
            [w for w in want if w is not None], rel=1e-5, abs=1e-5), col


@pytest.mark.ray
def test_ray_data_pass_matches_local(world_dir, tiny_model, ray_session):
    cfg = EvalConfig(max_images=3, max_new_tokens=8, batch_size=8, examples=1000)
    local = evaluate(str(tiny_model), str(world_dir), cfg)
    from nsft_ray.ray_glue.eval import run_eval

    remote = run_eval(str(tiny_model), str(world_dir), replace(cfg, engine="ray"))
    assert remote["engine"] == "ray/hf"
    answers = [e["answer"] for e in remote["examples"] if e["kind"] != "pope"]
    assert answers == [e["answer"] for e in local["examples"] if e["kind"] != "pope"]
    assert len(remote["examples"]) == remote["n_probes"]
    assert remote["items"]["key"] == local["items"]["key"]
    for col in ("score", "swap_score"):
        got, want = remote["items"][col], local["items"][col]
        assert [g is None for g in got] == [w is None for w in want], col
        assert [g for g in got if g is not None] == pytest.approx(
            [w for w in want if w is not None], rel=1e-4, abs=1e-4)
    for key in ("chair", "count_accuracy", "n_images"):
        assert remote[key] == local[key], key
    for setting in SETTINGS:
        assert remote["pope"][setting]["auroc"] == pytest.approx(local["pope"][setting]["auroc"])
        assert remote["pope_swap"][setting]["auroc"] == pytest.approx(
            local["pope_swap"][setting]["auroc"])


VLLM_SCORE_SCRIPT = """
import json, os, sys
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ["HF_HUB_OFFLINE"] = "1"

def main():
    import numpy as np
    from nsft_ray.ray_glue.eval import VLLMAnswerer
    model_dir, data = sys.argv[1], json.loads(sys.argv[2])
    images = [bytes.fromhex(h) for h in data["images"]]
    batch = {k: np.array(v, dtype=object) for k, v in data["batch"].items()}
    batch["idx"] = np.arange(len(batch["prompt"]))
    out = VLLMAnswerer(model_dir, images, 8)(batch)
    print("RESULT " + json.dumps(out["score"].tolist()))

if __name__ == "__main__":  # vLLM starts workers with spawn
    main()
"""


@pytest.mark.vllm
@pytest.mark.slow
@pytest.mark.heavy
def test_vllm_logit_gap_matches_transformers(world_dir, tiny_model, tmp_path):
    """Fails if the vLLM answerer's score (prompt log-probabilities of the first yes and no
    tokens) is not the logit gap the HF forward computes."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("vllm")
    from nsft_ray.eval.runner import yes_no_texts
    from nsft_ray.eval.scoring import hf_score_fn
    from nsft_ray.models import load_vlm

    plan = plan_eval(world_dir, EvalConfig(max_images=2), 0)
    pope = [p for p in plan.probes if p.kind == "pope"][:6]
    yes_no = [yes_no_texts(p.question) for p in pope]
    batch = {"image": [p.image for p in pope], "prompt": [p.prompt for p in pope],
             "generate": [False] * len(pope), "yes": [y for y, _ in yes_no],
             "no": [n for _, n in yes_no]}
    script = tmp_path / "score_vllm.py"
    script.write_text(VLLM_SCORE_SCRIPT)
    arg = json.dumps({"images": [b.hex() for b in plan.images], "batch": batch})
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run([sys.executable, str(script), str(tiny_model), arg], capture_output=True,
                          text=True, timeout=500, cwd=tmp_path, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert lines, f"vLLM failed (rc={proc.returncode}):\n{proc.stderr[-3000:]}"
    model, processor = load_vlm(tiny_model)
    images = [Image.open(io.BytesIO(plan.images[p.image])).convert("RGB") for p in pope]
    hf = hf_score_fn(model, processor)(images, batch["prompt"], batch["yes"], batch["no"])
    assert json.loads(lines[0][len("RESULT "):]) == pytest.approx(hf, rel=1e-3, abs=1e-4)
