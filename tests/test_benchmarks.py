"""POPE and AMBER read from their published files; answers written for their official scorers.

The fixtures copy the published layouts (POPE: JSON Lines in a .json file; AMBER: query arrays
plus annotations.json indexed by id). The official scorers' rules are re-implemented here from
their published code as oracles: POPE's evaluate.py reads `answer` line by line against the label
file's order (first sentence, "no"/"not"/"No" means no); AMBER's inference.py compares
`response` with "Yes"/"No" exactly.
"""

import io
import json

import pytest
from PIL import Image

from nsft_ray.cli import main
from nsft_ray.config import EvalConfig
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

    monkeypatch.setattr(runner, "hf_answer_fns", lambda model, n: (generate_fn, score_fn))
    pope, images = write_pope(tmp_path)
    out = tmp_path / "out"
    assert main(["eval", "--model", "unused", "--out", str(out), f"eval.pope={pope}",
                 f"eval.pope_images={images}"]) == 0
    result = json.loads((out / "eval.json").read_text())
    assert result["benchmarks"]["pope"]["all"]["n"] == 6
    assert (out / "pope" / "coco_pope_random.jsonl").is_file()
    assert main(["eval", "--model", "unused"]) == 2  # neither --data nor a benchmark
    assert "give --data" in capsys.readouterr().err
