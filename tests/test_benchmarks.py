"""POPE, AMBER and MMHal-Bench read from their published files; answers written for their
official scorers (MMHal-Bench's rated by the fake judge of test_eval_adapters).

The fixtures copy the published layouts (POPE: JSON Lines in a .json file; AMBER: query arrays
plus annotations.json indexed by id). The official scorers' rules are re-implemented here from
their published code as oracles: POPE's evaluate.py reads `answer` line by line against the label
file's order (first sentence, "no"/"not"/"No" means no); AMBER's inference.py compares
`response` with "Yes"/"No" exactly.
"""

import io
import json

import pytest
from PIL import Image, ImageColor
from test_eval_adapters import _FakeJudge, judge_url  # noqa: F401 (judge_url is a fixture)

from nsft_ray.cli import main
from nsft_ray.config import ConfigError, EvalConfig, load_config
from nsft_ray.eval.benchmarks import read_amber, run_benchmarks


def png(color: str) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buf, format="PNG")
    return buf.getvalue()


def generate_fn(images, prompts):
    """Says yes exactly when asked about a cat, whatever the image (a fixed, known policy)."""
    return ["Yes, there is a cat." if "cat" in p else "No, there is not." for p in prompts]


def score_fn(images, prompts, yes, no):
    return [2.0 if "cat" in p else -1.0 for p in prompts]


def write_pope(d):
    (d / "val2014").mkdir(parents=True)
    for i in range(3):
        (d / "val2014" / f"COCO_val2014_{i}.jpg").write_bytes(png("red"))
    rows = {"random": [("cat", "yes"), ("dog", "no"), ("cat", "no"), ("car", "yes")],
            "adversarial": [("cat", "yes"), ("bus", "no")]}
    (d / "pope").mkdir()
    for setting, qs in rows.items():
        lines = [json.dumps({"question_id": i + 1, "image": f"COCO_val2014_{i % 3}.jpg",
                             "text": f"Is there a {obj} in the image?", "label": label})
                 for i, (obj, label) in enumerate(qs)]
        (d / "pope" / f"coco_pope_{setting}.json").write_text("\n".join(lines) + "\n")
    return d / "pope", d / "val2014"


def write_amber(d):
    (d / "image").mkdir(parents=True)
    (d / "image" / "AMBER_1.jpg").write_bytes(png("blue"))
    (d / "data" / "query").mkdir(parents=True)
    ann = [{"id": 1, "type": "generative", "truth": ["sky"], "hallu": ["cat"]},
           {"id": 2, "type": "discriminative-hallucination", "truth": "yes"},
           {"id": 3, "type": "discriminative-hallucination", "truth": "yes"},
           {"id": 4, "type": "discriminative-attribute-state", "truth": "no"},
           {"id": 5, "type": "discriminative-relation", "truth": "no"}]
    queries = [{"id": 2, "image": "AMBER_1.jpg", "query": "Is there a cat in this image?"},
               {"id": 3, "image": "AMBER_1.jpg", "query": "Is there a sky in this image?"},
               {"id": 4, "image": "AMBER_1.jpg", "query": "Is the cat sleeping?"},
               {"id": 5, "image": "AMBER_1.jpg", "query": "Is the sky under the sea?"}]
    (d / "data" / "annotations.json").write_text(json.dumps(ann, indent=4))
    (d / "data" / "query" / "query_discriminative.json").write_text(json.dumps(queries))
    (d / "data" / "query" / "query_all.json").write_text(json.dumps(
        [{"id": 1, "image": "AMBER_1.jpg", "query": "Describe this image."}, *queries]))
    return d / "data", d / "image"


def pope_official_accuracy(answer_file, label_file) -> float:
    """RUCAIBox/POPE evaluate.py's rule, line by line."""
    answers = [json.loads(line) for line in open(answer_file)]
    labels = [json.loads(line)["label"] for line in open(label_file)]
    preds = []
    for a in answers:
        words = a["answer"].split(".")[0].replace(",", "").split(" ")
        preds.append("no" if {"No", "not", "no"} & set(words) else "yes")
    return sum(p == t for p, t in zip(preds, labels, strict=True)) / len(labels)


def test_pope_files_scores_and_official_answer_files(tmp_path):
    """Fails if a setting file is missed, or the answer file breaks the official scorer's order."""
    pope, images = write_pope(tmp_path)
    cfg = EvalConfig(pope=str(pope), pope_images=str(images), batch_size=3)
    result = run_benchmarks(generate_fn, score_fn, cfg, tmp_path / "out")["pope"]
    # random: cat/yes ok, dog/no ok, cat/no wrong, car/yes wrong -> 2/4; adversarial: 2/2.
    assert result["coco_pope_random"]["accuracy"] == 0.5
    assert result["coco_pope_adversarial"]["accuracy"] == 1.0
    assert result["all"]["n"] == 6 and result["all"]["accuracy"] == pytest.approx(4 / 6)
    assert result["coco_pope_adversarial"]["auroc"] == 1.0  # the cat gap ranks the yes first
    for setting in ("random", "adversarial"):
        answers = tmp_path / "out" / "pope" / f"coco_pope_{setting}.jsonl"
        official = pope_official_accuracy(answers, pope / f"coco_pope_{setting}.json")
        assert official == result[f"coco_pope_{setting}"]["accuracy"]


def test_amber_discriminative_and_official_responses(tmp_path):
    """Fails if generative queries are asked, a dimension is mislabelled, or responses are
    not the exact "Yes"/"No" AMBER's scorer compares."""
    data, images = write_amber(tmp_path)
    qs, skipped = read_amber(data / "query" / "query_all.json", images,
                             data / "annotations.json")
    assert skipped == 1 and [q.group for q in qs] == [
        "existence", "existence", "attribute", "relation"]
    cfg = EvalConfig(amber=str(data), amber_images=str(images))
    result = run_benchmarks(generate_fn, None, cfg, tmp_path / "out")["amber"]
    # cat? yes (truth yes) ok; sky? no (yes) wrong; cat sleeping? yes (no) wrong; sky? no ok.
    assert result["all"]["accuracy"] == 0.5 and result["existence"]["accuracy"] == 0.5
    assert result["generative_skipped"] == 0 and result["all"]["auroc"] is None
    responses = json.loads((tmp_path / "out" / "amber" / "responses.json").read_text())
    truth = {a["id"]: a["truth"] for a in json.loads((data / "annotations.json").read_text())}
    official = [(r["response"] == "Yes") == (truth[r["id"]] == "yes") for r in responses]
    assert sum(official) / len(official) == result["all"]["accuracy"]
    assert {r["response"] for r in responses} == {"Yes", "No"}


def test_eval_command_runs_the_benchmarks_without_shapesworld(tmp_path, monkeypatch, capsys):
    import nsft_ray.eval.runner as runner

    monkeypatch.setattr(runner, "hf_answer_fns", lambda model, n, *cache: (generate_fn, score_fn))
    pope, images = write_pope(tmp_path)
    out = tmp_path / "out"
    assert main(["eval", "--model", "unused", "--out", str(out), f"eval.pope={pope}",
                 f"eval.pope_images={images}"]) == 0
    result = json.loads((out / "eval.json").read_text())
    assert result["benchmarks"]["pope"]["all"]["n"] == 6
    assert (out / "pope" / "coco_pope_random.jsonl").is_file()
    assert main(["eval", "--model", "unused"]) == 2  # neither --data nor a benchmark
    assert "give --data" in capsys.readouterr().err


# MMHal-Bench's response_template.json rows: (question_type, image colour, how the image file is
# named). The fake policy answers by the image's colour; the fake judge rates ANSWER_A 5,
# ANSWER_B 1, replies without a rating to ANSWER_D and fails (HTTP 500) on ANSWER_E.
MMHAL_ROWS = [("attribute", "red", "src"), ("attribute", "red", None),
              ("attribute", "green", "src"), ("counting", "red", "id"),
              ("counting", "yellow", "src"), ("other", "black", "src")]
MMHAL_ANSWERS = {"red": "ANSWER_A", "green": "ANSWER_B", "yellow": "ANSWER_D", "black": "ANSWER_E"}


def mmhal_generate_fn(images, prompts):
    """Answers by the image's colour: a row given another row's image gets another rating."""
    by_rgb = {ImageColor.getrgb(c): a for c, a in MMHAL_ANSWERS.items()}
    return [by_rgb[img.getpixel((0, 0))] for img in images]


def write_mmhal(d):
    """The published layout: a JSON list with the template's eight fields, model_answer empty;
    images/ holds the files named as the end of image_src (row 3: <image_id>.jpg instead, row 1:
    none)."""
    (d / "images").mkdir(parents=True)
    rows = []
    for n, (qtype, color, named) in enumerate(MMHAL_ROWS):
        name = f"{1000 + n}_ab{n}_o.jpg"
        rows.append({"question_type": qtype, "question_topic": "indoor",
                     "image_id": f"id{n:04d}", "image_src": f"https://c{n}.staticflickr.com/8/{name}",
                     "image_content": ["Table", "Cup"], "question": f"Question {n}?",
                     "gt_answer": f"Standard answer {n}.", "model_answer": ""})
        if named:
            (d / "images" / (name if named == "src" else f"id{n:04d}.jpg")).write_bytes(png(color))
    (d / "response_template.json").write_text(json.dumps(rows, indent=4))
    return d / "response_template.json", d / "images"


def test_eval_command_runs_mmhal_judged_and_writes_the_official_response_file(
        tmp_path, monkeypatch, judge_url):  # noqa: F811 (the fixture imported above)
    """Ratings by template row: 5, no image, 1, 5 (judged), unparsable and failed (unjudged):
    mean (5 + 1 + 5) / 3 = 11/3, hallucination rate #(< 3) / 3 = 1/3. Fails if a row gets
    another row's image or answer, if the judged rows are renumbered, if a row is dropped from
    the response file or a template field is lost, or if unjudged or imageless rows count."""
    import nsft_ray.eval.runner as runner

    monkeypatch.setattr(runner, "hf_answer_fns", lambda model, n, *cache: (mmhal_generate_fn, None))
    template, images = write_mmhal(tmp_path)
    out = tmp_path / "out"
    _FakeJudge.seen = []
    assert main(["eval", "--model", "unused", "--out", str(out), f"eval.mmhal={template}",
                 f"eval.mmhal_images={images}", f"eval.judge.base_url={judge_url}",
                 "eval.judge.model=judge-1", "eval.judge.max_retries=0", "eval.batch_size=4"]) == 0
    r = json.loads((out / "eval.json").read_text())["benchmarks"]["mmhal"]
    assert r["average_score"] == pytest.approx(11 / 3)
    assert r["hallucination_rate"] == pytest.approx(1 / 3)
    assert r["by_type"] == {"attribute": 3.0, "counting": 5.0}
    assert r["ratings"] == [5, None, 1, 5, None, None]
    assert (r["n"], r["n_answered"], r["n_judged"]) == (6, 5, 3)
    assert [u["row"] for u in r["unjudged"]] == [4, 5]
    assert "no 0-6 rating" in r["unjudged"][0]["reason"]
    assert "request failed" in r["unjudged"][1]["reason"]
    assert [m["row"] for m in r["missing_images"]] == [1]
    assert "1001_ab1_o.jpg" in r["missing_images"][0]["reason"]
    # MMHal's eval_gpt4.py reads the template back with model_answer filled, every row in order
    written = json.loads((out / "mmhal" / "response.json").read_text())
    assert r["answer_file"] == str(out / "mmhal" / "response.json")
    for row, tmpl, (_, color, named) in zip(written, json.loads(template.read_text()), MMHAL_ROWS,
                                            strict=True):
        assert list(row) == list(tmpl)
        assert {k: v for k, v in row.items() if k != "model_answer"} == {
            k: v for k, v in tmpl.items() if k != "model_answer"}
        assert row["model_answer"] == (MMHAL_ANSWERS[color] if named else "")
    # the judge saw each answer with its own row's question and standard answer
    seen = {(p.split("Question ")[1][0], p.split("Standard human-written answer: ")[1][16],
             p.split("Assistant's answer: ")[1][:8]) for _, _, p in _FakeJudge.seen}
    assert seen == {("0", "0", "ANSWER_A"), ("2", "2", "ANSWER_B"), ("3", "3", "ANSWER_A"),
                    ("4", "4", "ANSWER_D"), ("5", "5", "ANSWER_E")}


def test_mmhal_without_a_judge_is_a_config_error_before_any_model_loads(
        tmp_path, monkeypatch, capsys):
    """Fails if eval.mmhal runs with no judge model or base_url (it would generate every answer
    and then fail), or if the error does not name the missing key."""
    import nsft_ray.eval.runner as runner

    def no_model(model, n, *cache):
        raise AssertionError("a model was loaded before the judge's config was checked")

    monkeypatch.setattr(runner, "hf_answer_fns", no_model)
    template, images = write_mmhal(tmp_path)
    args = ["eval", "--model", "unused", f"eval.mmhal={template}", f"eval.mmhal_images={images}"]
    assert main(args) == 2
    assert "eval.judge.model: required when eval.mmhal is set" in capsys.readouterr().err
    assert main([*args, "eval.judge.model=judge-1", "eval.judge.base_url="]) == 2
    assert "eval.judge.base_url: required when eval.mmhal is set" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="eval.judge.model"):
        load_config(None, [f"eval.mmhal={template}"])
    assert load_config(None, ["eval.judge.model="]).eval.mmhal == ""  # no MMHal: no judge needed
