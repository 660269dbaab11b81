"""Readers for the real benchmarks on small fixture files; MMHal judged by a fake local server."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image

from nsft_ray.config import LLMConfig
from nsft_ray.eval.adapters import (
    chair_coco,
    coco_mentions,
    judge_mmhal,
    parse_rating,
    read_captions,
    read_mmhal,
    read_pope,
    run_pope,
)


def _write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_pope_file_round_trip(tmp_path):
    images = tmp_path / "val2014"
    images.mkdir()
    for name, color in (("a.jpg", "red"), ("b.jpg", "blue")):
        Image.new("RGB", (8, 8), color).save(images / name)
    rows = [{"question_id": n, "image": image, "text": f"Is there a {thing} in the image?",
             "label": label}
            for n, image, thing, label in ((1, "a.jpg", "dog", "yes"), (2, "a.jpg", "cat", "no"),
                                           (3, "b.jpg", "car", "yes"), (4, "b.jpg", "bus", "No"))]
    questions = read_pope(_write_jsonl(tmp_path / "coco_pope_random.json", rows), images)
    assert [q.label for q in questions] == [True, False, True, False]
    seen = []

    def generate_fn(imgs, prompts):  # says yes to everything red: TP 1, FP 1, FN 1, TN 1
        seen.append(len(prompts))
        return ["Yes, there is." if im.getpixel((0, 0))[0] > 200 else "No." for im in imgs]

    r = run_pope(questions, generate_fn, batch_size=3)
    assert seen == [3, 1]
    assert (r["accuracy"], r["precision"], r["recall"], r["yes_ratio"]) == (0.5, 0.5, 0.5, 0.5)
    assert r["answers"][0] == {"question_id": "1", "text": "Yes, there is."}
    with pytest.raises(FileNotFoundError, match="question_id 9"):
        read_pope(_write_jsonl(tmp_path / "q.jsonl", [{**rows[0], "question_id": 9,
                                                       "image": "zzz.jpg"}]), images)
    with pytest.raises(ValueError, match="label 'maybe'"):
        read_pope(_write_jsonl(tmp_path / "q.jsonl", [{**rows[0], "label": "maybe"}]), images)
    with pytest.raises(ValueError, match="missing key 'text'"):
        read_pope(_write_jsonl(tmp_path / "q.jsonl", [{"question_id": 1, "image": "a.jpg",
                                                       "label": "yes"}]), images)


def test_chair_on_coco_annotations(tmp_path):
    """Caption 1 mentions person (men), dog and hot dog; hot dog is absent (and its "dog" is not
    a second dog). Caption 2 (by file name) mentions car. 4 mentions, 1 hallucinated:
    CHAIR_i = 1/4, CHAIR_s = 1/2, recall = 3/3. Caption 3's image is unknown: skipped."""
    instances = {
        "images": [{"id": 1, "file_name": "COCO_val2014_000000000001.jpg"},
                   {"id": 2, "file_name": "COCO_val2014_000000000002.jpg"}],
        "categories": [{"id": 1, "name": "person"}, {"id": 18, "name": "dog"},
                       {"id": 17, "name": "cat"}, {"id": 3, "name": "car"},
                       {"id": 58, "name": "hot dog"}],
        "annotations": [{"id": 10, "image_id": 1, "category_id": 1},
                        {"id": 11, "image_id": 1, "category_id": 1},
                        {"id": 12, "image_id": 1, "category_id": 18},
                        {"id": 13, "image_id": 2, "category_id": 3}],
    }
    (tmp_path / "instances.json").write_text(json.dumps(instances))
    caps = [{"image_id": 1, "caption": "Two men and a dog next to a hot dog cart."},
            {"image_id": "COCO_val2014_000000000002.jpg", "caption": "Cars parked by a road."},
            {"image_id": 99, "caption": "A cat."}]
    (tmp_path / "caps.jsonl").write_text("\n".join(json.dumps(c) for c in caps))
    rows = read_captions(tmp_path / "caps.jsonl")
    m = chair_coco(rows, tmp_path / "instances.json")
    assert m["chair_i"] == 0.25 and m["chair_s"] == 0.5 and m["object_recall"] == 1.0
    assert m["n_captions"] == 2 and m["skipped"] == [{"image_id": 99,
                                                      "reason": "not in the annotations"}]
    assert coco_mentions("A woman with kittens and puppies on a sofa.",
                         ["person", "cat", "dog", "couch"]) == ["person", "cat", "dog", "couch"]
    (tmp_path / "caps.json").write_text(json.dumps(caps[:1]))
    assert read_captions(tmp_path / "caps.json") == caps[:1]


@pytest.mark.parametrize("text, expected", [
    ("The answer is accurate. Rating: 5", 5), ("Rating: 2\nwait, Rating: 4", 4),
    ("**Rating:** 0", 0), ("3", 3), ("rating 7", None), ("no idea", None), ("", None),
])
def test_parse_rating(text, expected):
    assert parse_rating(text) == expected


class _FakeJudge(BaseHTTPRequestHandler):
    """An OpenAI-compatible /v1/chat/completions that rates by a marker in the model answer."""

    replies = {"ANSWER_A": "Accurate and detailed. Rating: 5", "ANSWER_B": "Made up. Rating: 1",
               "ANSWER_C": "Rating: 3", "ANSWER_D": "I cannot rate this."}
    seen: list = []

    def do_POST(self):  # noqa: N802 (http.server's name)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        prompt = body["messages"][0]["content"]
        type(self).seen.append((self.path, body["model"], prompt))
        if "ANSWER_E" in prompt:
            self.send_response(500)
            self.end_headers()
            return
        text = next(v for k, v in self.replies.items() if k in prompt)
        payload = json.dumps({
            "id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": text}}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        }).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


@pytest.fixture
def judge_url():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeJudge)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


def test_mmhal_with_a_fake_judge(tmp_path, judge_url):
    """Ratings 5, 1, 3 (judged), then an unparsable reply and a failed request (unjudged):
    mean (5 + 1 + 3) / 3 = 3; hallucination rate = #(rating < 3) / 3 = 1/3."""
    rows = [{"image_src": f"{k}.jpg", "question_type": t, "question": "What is on the table?",
             "gt_answer": "A red cup.", "model_answer": f"ANSWER_{k}",
             "image_content": ["cup", "table"]}
            for k, t in zip("ABCDE", ("attribute", "attribute", "counting", "counting", "other"),
                            strict=True)]
    (tmp_path / "mmhal.json").write_text(json.dumps(rows))
    _FakeJudge.seen = []
    cfg = LLMConfig(base_url=judge_url, model="judge-1", max_retries=0, timeout_s=10)
    r = judge_mmhal(read_mmhal(tmp_path / "mmhal.json"), cfg)
    assert r["ratings"] == [5, 1, 3, None, None] and r["n"] == 5 and r["n_judged"] == 3
    assert r["average_score"] == 3.0 and r["hallucination_rate"] == 1 / 3
    assert r["by_type"] == {"attribute": 3.0, "counting": 3.0}
    assert [u["row"] for u in r["unjudged"]] == [3, 4]
    assert "no 0-6 rating" in r["unjudged"][0]["reason"]
    assert "request failed" in r["unjudged"][1]["reason"]
    path, model, prompt = _FakeJudge.seen[0]
    assert path == "/v1/chat/completions" and model == "judge-1"
    assert "What is on the table?" in prompt and "A red cup." in prompt and "cup, table" in prompt
    (tmp_path / "bad.json").write_text(json.dumps([{"question": "q", "gt_answer": "a"}]))
    with pytest.raises(ValueError, match="row 0: missing key 'model_answer'"):
        read_mmhal(tmp_path / "bad.json")
