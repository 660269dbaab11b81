"""The serving app without Ray: OpenAI wire format, answers equal to in-process generation,
batching invariance, every bad request a 4xx OpenAI error, bearer auth, config, the playground
page in headless Chromium."""

from __future__ import annotations

import base64
import io
import json
import os
import random
import shutil
import socket
import sys
import threading
import time
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # serve/ and benchmarks/ from a source checkout
    sys.path.insert(0, str(ROOT))

from fastapi.testclient import TestClient  # noqa: E402
from PIL import Image  # noqa: E402

from nsft_ray.config import ConfigError, WorldConfig  # noqa: E402
from nsft_ray.generation import encode_prompt, generate  # noqa: E402
from nsft_ray.models import build_tiny_vlm, load_vlm  # noqa: E402
from nsft_ray.world import corpus, render, sample_scene  # noqa: E402
from serve.api import LocalEngine, create_app, local_app, resolve_token  # noqa: E402
from serve.backends import GenRequest, HFBackend, Sampling, apply_stop  # noqa: E402
from serve.config import LimitsConfig, load_serve_config  # noqa: E402

LIMITS = [
    "limits.max_body_bytes=262144", "limits.max_image_bytes=16384",
    "limits.max_image_pixels=10000", "limits.max_images=1", "limits.max_tokens=64",
    "limits.default_max_tokens=8", "limits.max_n=4", "limits.max_context=128",
]
QUESTION = "Describe the picture."


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def data_uri(raw: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(raw).decode()


def picture(seed: int = 0) -> Image.Image:
    return render(sample_scene(random.Random(seed), WorldConfig()))


def chat(model: str = "base", uri: str | None = None, text: str = QUESTION, **extra) -> dict:
    content = [{"type": "text", "text": text}]
    if uri is not None:
        content.insert(0, {"type": "image_url", "image_url": {"url": uri}})
    return {"model": model, "messages": [{"role": "user", "content": content}],
            "temperature": 0.0, "max_tokens": 12, **extra}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, str]:
    """Two tiny VLMs that differ only in their random init (so their answers differ)."""
    texts = corpus(WorldConfig(), n=300, seed=0)
    root = tmp_path_factory.mktemp("serve_models")
    return {name: str(build_tiny_vlm(root / name, texts, seed=seed))
            for name, seed in (("base", 0), ("nsft", 1))}


@pytest.fixture(scope="module")
def cfg(models):
    return load_serve_config(models=models, overrides=LIMITS)


@pytest.fixture(scope="module")
def client(cfg) -> TestClient:
    # raise_server_exceptions=False: a 5xx must show up as a status, not as a test crash.
    return TestClient(local_app(cfg), raise_server_exceptions=False)


@pytest.fixture(scope="module")
def image_uri() -> str:
    return data_uri(png(picture()))


# --- the happy path ---------------------------------------------------------------------------


def test_answer_equals_in_process_generate(client, models, image_uri):
    """Greedy through HTTP == nsft_ray.generation.generate on the same image and question."""
    model, processor = load_vlm(models["base"])
    expected = generate(model, processor, [picture()], [QUESTION], max_new_tokens=12)[0][0]
    r = client.post("/v1/chat/completions", json=chat(uri=image_uri))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["model"] == "base"
    assert body["id"].startswith("chatcmpl-")
    (choice,) = body["choices"]
    assert choice["index"] == 0 and choice["message"]["role"] == "assistant"
    assert choice["message"]["content"].strip() == expected
    usage = body["usage"]
    prompt_ids = encode_prompt(processor, [picture()], [QUESTION])["input_ids"]  # (1, T)
    assert usage["prompt_tokens"] == prompt_ids.shape[1]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert 1 <= usage["completion_tokens"] <= 12
    assert (choice["finish_reason"] == "length") == (usage["completion_tokens"] == 12)


def test_models_health_and_side_by_side_answers_differ(client, image_uri):
    assert client.get("/health").json() == {"status": "ok", "models": ["base", "nsft"]}
    listing = client.get("/v1/models").json()
    assert listing["object"] == "list"
    assert [m["id"] for m in listing["data"]] == ["base", "nsft"]
    answers = [client.post("/v1/chat/completions", json=chat(name, image_uri)).json()
               ["choices"][0]["message"]["content"] for name in ("base", "nsft")]
    assert answers[0] != answers[1]  # routed by name to two different models


def test_stream_is_openai_chunks_ending_in_done(client, image_uri):
    whole = client.post("/v1/chat/completions", json=chat(uri=image_uri)).json()
    r = client.post("/v1/chat/completions", json=chat(
        uri=image_uri, stream=True, stream_options={"include_usage": True}))
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = [line[len("data: "):] for line in r.text.split("\n\n") if line]
    assert all(line.startswith("data: ") for line in r.text.split("\n\n") if line)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == whole["choices"][0]["message"]["content"]
    assert chunks[-2]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole["usage"]


def _streamed(client, body: dict) -> tuple[list[str], list[str | None], int]:
    """A streamed request's text and finish reason per choice, and its number of text chunks."""
    r = client.post("/v1/chat/completions", json={**body, "stream": True})
    assert r.status_code == 200, r.text
    events = [e[len("data: "):] for e in r.text.split("\n\n") if e]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    n = body.get("n", 1)
    texts, reasons, pieces = [""] * n, [None] * n, 0
    for c in chunks:
        for choice in c["choices"]:
            piece = choice["delta"].get("content")
            texts[choice["index"]] += piece or ""
            pieces += bool(piece)
            reasons[choice["index"]] = choice["finish_reason"] or reasons[choice["index"]]
    return texts, reasons, pieces


def test_streamed_choices_equal_the_whole_answers(client, image_uri):
    """Sampled n=2 with a seed, greedy n=2, a stop string and a longer answer: each choice's
    streamed text equals the non-streamed answer. Fails if pieces go to the wrong choice, a held
    back tail or the rest after a stop string is lost or sent twice, or a stop string leaks."""
    whole = client.post("/v1/chat/completions", json=chat(uri=image_uri, max_tokens=40)).json()
    answer = whole["choices"][0]["message"]["content"]
    stop = answer[len(answer) // 2:][:3]  # found in the answer, so it cuts it
    bodies = [chat(uri=image_uri, n=2, temperature=1.0, seed=7, max_tokens=24),
              chat(uri=image_uri, n=2, max_tokens=24), chat(uri=image_uri, max_tokens=40),
              chat(uri=image_uri, max_tokens=40, stop=[stop])]
    pieces = 0
    for body in bodies:
        expected = client.post("/v1/chat/completions", json=body).json()["choices"]
        texts, reasons, count = _streamed(client, body)
        assert texts == [c["message"]["content"] for c in expected], body
        assert reasons == [c["finish_reason"] for c in expected], body
        pieces += count
    assert stop not in texts[0] and len(texts[0]) < len(answer)
    assert pieces > len(bodies) + 2  # answers came in several pieces, not whole


def test_text_an_engine_did_not_stream_is_sent_at_the_end(image_uri):
    """An engine whose stream holds only the result (nothing handed out in pieces): fails if the
    SSE framing sends only pieces and so loses the answer."""
    from serve.backends import GenResult

    class Whole:
        async def stream(self, request):
            yield GenResult([("A whole answer.", "stop"), ("Another.", "length")], 3, 6)

    client = TestClient(create_app({"w": Whole()}, LimitsConfig()))
    texts, reasons, pieces = _streamed(client, chat("w", image_uri, n=2))
    assert texts == ["A whole answer.", "Another."] and reasons == ["stop", "length"]
    assert pieces == 2


def test_seeded_sampling_is_reproducible_and_n_choices(client, image_uri):
    body = chat(uri=image_uri, temperature=1.0, n=3, seed=7)
    a = client.post("/v1/chat/completions", json=body).json()
    b = client.post("/v1/chat/completions", json=body).json()
    c = client.post("/v1/chat/completions", json={**body, "seed": 8}).json()
    texts = [[ch["message"]["content"] for ch in x["choices"]] for x in (a, b, c)]
    assert [ch["index"] for ch in a["choices"]] == [0, 1, 2]
    assert texts[0] == texts[1] and texts[0] != texts[2]
    greedy = client.post("/v1/chat/completions", json=chat(uri=image_uri, n=2)).json()
    first, second = (ch["message"]["content"] for ch in greedy["choices"])
    assert first == second  # n greedy answers are the same answer


def test_stop_string_cuts_the_answer(client, image_uri):
    full = client.post("/v1/chat/completions", json=chat(uri=image_uri)).json()
    text = full["choices"][0]["message"]["content"]
    stop = text[4:6]
    cut = client.post("/v1/chat/completions", json=chat(uri=image_uri, stop=[stop])).json()
    assert cut["choices"][0]["message"]["content"] == text[: text.find(stop)]
    assert cut["choices"][0]["finish_reason"] == "stop"
    assert apply_stop("a, b. c", ("x", ". ", ",")) == ("a", True)
    assert apply_stop("abc", ()) == ("abc", False)


def test_text_only_and_multi_turn_requests(client, image_uri):
    r = client.post("/v1/chat/completions", json=chat(uri=None))
    assert r.status_code == 200, r.text
    turns = {"model": "base", "max_tokens": 4, "temperature": 0.0, "messages": [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_uri}},
                                     {"type": "text", "text": "Is there a star?"}]},
        {"role": "assistant", "content": "No."},
        {"role": "user", "content": "Is there a circle?"}]}
    r = client.post("/v1/chat/completions", json=turns)
    assert r.status_code == 200, r.text


def test_batched_generation_equals_one_at_a_time(models):
    """Left-padded batches give the same greedy answers as single requests; a too-long request
    in a batch fails alone."""
    backend = HFBackend(models["base"], LimitsConfig(max_context=64))
    questions = ["Describe the picture.", "How many stars are there?", "word " * 80]
    reqs = [GenRequest([{"role": "user", "content": [{"type": "image"},
                                                       {"type": "text", "text": q}]}],
                       [picture(i)], Sampling(max_new_tokens=10)) for i, q in enumerate(questions)]
    batched = backend.generate(reqs)
    singles = [backend.generate([r])[0] for r in reqs[:2]]
    assert [b.choices for b in batched[:2]] == [s.choices for s in singles]
    assert [b.prompt_tokens for b in batched[:2]] == [s.prompt_tokens for s in singles]
    assert batched[0].prompt_tokens != batched[1].prompt_tokens  # padding was needed
    assert batched[2].status == 400 and batched[2].code == "context_length_exceeded"
    # A template that refuses a chat fails that request only (as hub templates do for "system").
    backend.processor.chat_template = (
        "{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
        + backend.processor.chat_template)
    system = GenRequest([{"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
                         *reqs[0].messages], reqs[0].images, reqs[0].sampling)
    refused, again = backend.generate([system, reqs[0]])
    assert refused.status == 400 and "no system role" in refused.message
    assert again.choices == singles[0].choices


# --- bad requests: 4xx OpenAI errors, never a 5xx ---------------------------------------------


def _noise_png(side: int) -> bytes:
    rng = random.Random(0)
    return png(Image.frombytes("RGB", (side, side), bytes(rng.randrange(256)
                                                         for _ in range(side * side * 3))))


def _bad_cases(uri: str) -> list[tuple[str, object, int, str, str | None]]:
    """(case, body (dict -> JSON, bytes -> raw), status, code, param)."""
    ok = chat(uri=uri)
    no_model = {k: v for k, v in ok.items() if k != "model"}
    no_messages = {k: v for k, v in ok.items() if k != "messages"}
    img = "messages[0].content[0].image_url.url"
    assistant_image = {**ok, "messages": [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": [{"type": "image_url", "image_url": {"url": uri}}]}]}
    return [
        ("malformed JSON", b'{"model": "base", ', 400, "invalid_json", None),
        ("JSON array", b"[1, 2]", 400, "invalid_json", None),
        ("NaN", json.dumps(ok).replace('"temperature": 0.0', '"temperature": NaN').encode(),
         400, "invalid_json", None),
        ("deep nesting", b"[" * 100_000, 400, "invalid_json", None),
        ("non-UTF-8", b'{"model": "b\xffase"}', 400, "invalid_encoding", None),
        ("missing model", no_model, 400, "missing_required_parameter", "model"),
        ("missing messages", no_messages, 400, "missing_required_parameter", "messages"),
        ("empty messages", {**ok, "messages": []}, 400, "invalid_value", "messages"),
        ("temperature string", {**ok, "temperature": "hot"}, 400, "invalid_type", "temperature"),
        ("max_tokens string", {**ok, "max_tokens": "5"}, 400, "invalid_type", "max_tokens"),
        ("n boolean", {**ok, "n": True}, 400, "invalid_type", "n"),
        ("messages string", {**ok, "messages": "hi"}, 400, "invalid_type", "messages"),
        ("unknown role", {**ok, "messages": [{"role": "tool", "content": "x"}]}, 400,
         "invalid_value", "messages[0].role"),
        ("text part without text", {**ok, "messages": [{"role": "user", "content": [
            {"type": "text"}]}]}, 400, "invalid_value", "messages[0].content[0]"),
        ("unknown parameter", {**ok, "presence_penalty": 0.5}, 400, "unknown_parameter",
         "presence_penalty"),
        ("unknown model", {**ok, "model": "gpt-9"}, 404, "model_not_found", "model"),
        ("invalid base64", chat(uri="data:image/png;base64,@@@"), 400, "invalid_base64", img),
        ("not an image", chat(uri=data_uri(b"plain text, not pixels")), 400, "invalid_image",
         img),
        ("truncated PNG", chat(uri=data_uri(png(picture())[:200])), 400, "invalid_image", img),
        ("remote URL", chat(uri="https://example.com/cat.png"), 400, "invalid_image_url", img),
        ("not a data URI", chat(uri="cat.png"), 400, "invalid_image_url", img),
        ("too many pixels", chat(uri=data_uri(png(Image.new("RGB", (101, 100))))), 400,
         "image_too_large", img),
        ("too many bytes", chat(uri=data_uri(_noise_png(90))), 400, "image_too_large", img),
        ("too many images", {**ok, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": uri}},
            {"type": "image_url", "image_url": {"url": uri}}]}]}, 400, "too_many_images",
         "messages"),
        ("image from the assistant", assistant_image, 400, "invalid_value",
         "messages[1].content[0]"),
        ("image placeholder in text", chat(uri=uri, text="<image> and <image>?"), 400,
         "invalid_value", "messages"),
        ("prompt over context", chat(uri=uri, text="star " * 200), 400,
         "context_length_exceeded", "messages"),
        ("max_tokens 0", {**ok, "max_tokens": 0}, 400, "invalid_value", "max_tokens"),
        ("max_tokens over limit", {**ok, "max_tokens": 65}, 400, "invalid_value", "max_tokens"),
        ("max_completion_tokens over limit", {**ok, "max_completion_tokens": 1000}, 400,
         "invalid_value", "max_completion_tokens"),
        ("n over limit", {**ok, "n": 5}, 400, "invalid_value", "n"),
        ("temperature over 2", {**ok, "temperature": 2.5}, 400, "invalid_value", "temperature"),
        ("top_p 0", {**ok, "top_p": 0}, 400, "invalid_value", "top_p"),
        ("negative seed", {**ok, "seed": -1}, 400, "invalid_value", "seed"),
        ("five stop strings", {**ok, "stop": list("abcde")}, 400, "invalid_value", "stop"),
        ("body over limit", {**ok, "user": "x" * 300_000}, 413, "request_too_large", None),
    ]


def test_every_bad_request_is_a_4xx_openai_error(client, image_uri):
    for case, body, status, code, param in _bad_cases(image_uri):
        if isinstance(body, bytes):
            r = client.post("/v1/chat/completions", content=body,
                            headers={"Content-Type": "application/json"})
        else:
            r = client.post("/v1/chat/completions", json=body)
        assert r.status_code == status, (case, r.status_code, r.text)
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"}, case
        assert (err["code"], err["param"]) == (code, param), (case, err)
        assert err["type"] == "invalid_request_error" and err["message"], case
    assert client.get("/no/such/route").json()["error"]["code"] == "not_found"
    assert client.get("/v1/chat/completions").status_code == 405
    # The server still answers after all of that.
    assert client.post("/v1/chat/completions", json=chat(uri=image_uri)).status_code == 200


def test_bearer_token_auth(models, monkeypatch, image_uri):
    monkeypatch.setenv("NSFT_TEST_TOKEN", "s3cret")
    cfg = load_serve_config(models={"base": models["base"]},
                            overrides=["auth_token_env=NSFT_TEST_TOKEN"])
    client = TestClient(local_app(cfg))
    body = chat(uri=image_uri, max_tokens=2)
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
        r = client.post("/v1/chat/completions", json=body, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert client.get("/v1/models").status_code == 401
    good = {"Authorization": "Bearer s3cret"}
    assert client.post("/v1/chat/completions", json=body, headers=good).status_code == 200
    assert client.get("/v1/models", headers=good).status_code == 200
    assert client.get("/health").status_code == 200  # probes need no token
    monkeypatch.delenv("NSFT_TEST_TOKEN")
    with pytest.raises(RuntimeError, match="NSFT_TEST_TOKEN is unset"):
        resolve_token("NSFT_TEST_TOKEN")
    assert resolve_token("") is None


def test_engine_errors_become_5xx_json_not_a_crash(image_uri):
    """Fails if an engine's exception crashes the server or, once a stream has begun, cuts it
    without OpenAI's error event."""

    class Broken:
        context_length = 100

        def generate(self, requests, on_text=None):
            if on_text is not None and requests[0].stream:  # fails after its first piece
                on_text(0, 0, "Half")
            raise RuntimeError("boom")

    client = TestClient(create_app({"x": LocalEngine(Broken())}, LimitsConfig()),
                        raise_server_exceptions=False)
    r = client.post("/v1/chat/completions", json=chat("x", image_uri))
    assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
    r = client.post("/v1/chat/completions", json=chat("x", image_uri, stream=True))
    assert r.status_code == 200  # the first piece left before the failure
    events = [e[len("data: "):] for e in r.text.split("\n\n") if e]
    assert json.loads(events[1])["choices"][0]["delta"] == {"content": "Half"}
    assert json.loads(events[2])["error"]["type"] == "server_error"
    assert events[-1] == "[DONE]"


# --- configuration ----------------------------------------------------------------------------


def test_config_loading_and_errors(tmp_path):
    path = tmp_path / "serve.yaml"
    path.write_text("models: {base: /m/base, nsft: /m/nsft}\nreplicas:\n"
                    "  autoscaling: {min_replicas: 1, max_replicas: 3}\n")
    cfg = load_serve_config(path, ["limits.max_images=2"], port=9001)
    assert list(cfg.models) == ["base", "nsft"] and cfg.port == 9001
    assert cfg.replicas.autoscaling.max_replicas == 3 and cfg.limits.max_images == 2
    assert load_serve_config(path, models={"dpo": "/m/dpo"}).models == {"dpo": "/m/dpo"}
    bad = [
        ({}, "at least one"),
        ({"models": {"a b": "/m"}}, "models.a b"),
        ({"models": {"a": "/m"}, "backend": "tgi"}, "backend"),
        ({"models": {"a": "/m"}, "limits": {"default_max_tokens": 900}}, "default_max_tokens"),
        ({"models": {"a": "/m"}, "limits": {"max_tokenz": 1}}, "max_tokenz"),
        ({"models": {"a": "/m"}, "replicas": {"max_ongoing_requests": 2}}, "max_ongoing"),
    ]
    for data, match in bad:
        path.write_text(json.dumps(data))
        with pytest.raises(ConfigError, match=match):
            load_serve_config(path)


def test_main_rejects_bad_arguments(capsys):
    from serve.app import main

    assert main(["--model", "nodir"]) == 2
    assert "expected NAME=DIR" in capsys.readouterr().err
    assert main(["--model", "a=/x", "--model", "a=/y"]) == 2
    assert main([]) == 2  # no models at all
    assert main(["--model", "a=/no/such/folder"]) == 2
    assert "/no/such/folder does not exist" in capsys.readouterr().err


def test_replicas_and_autoscaling_reach_serve_options():
    from ray.serve import Application

    from serve.app import ModelServer, _model_options, build_app

    auto = load_serve_config(models={"a": "/m"}, overrides=[
        "replicas.autoscaling.max_replicas=3", "replicas.num_cpus=2"])
    deployment = ModelServer.options(name="a", **_model_options(auto.replicas))
    assert deployment.ray_actor_options["num_cpus"] == 2
    assert deployment._deployment_config.autoscaling_config.max_replicas == 3
    fixed = load_serve_config(models={"a": "/m"}, overrides=["replicas.num_replicas=2"])
    assert ModelServer.options(**_model_options(fixed.replicas)).num_replicas == 2
    assert isinstance(build_app(auto), Application)


def test_fastapi_app_builds_without_ray():
    """serve.api, backends, config and schemas never import ray (only serve.app does)."""
    from conftest import run_with_ray_blocked

    out = run_with_ray_blocked(
        "from serve.api import create_app\n"
        "from serve.config import LimitsConfig\n"
        "create_app({}, LimitsConfig())\n"
    )
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]


def test_example_yaml_loads():
    cfg = load_serve_config(ROOT / "serve" / "example.yaml")
    assert cfg.backend == "hf" and len(cfg.models) == 3


# --- the playground page in headless Chromium -------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def http_server(cfg):
    """The app on a real socket (uvicorn in a thread), for the browser."""
    import uvicorn

    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(local_app(cfg), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    assert server.started, "uvicorn did not start"
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)


def _chromium():
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not browser or not driver:
        pytest.skip("chromium and chromium-driver are not installed "
                    "(apt-get install -y chromium chromium-driver)")
    return webdriver, browser, driver


def test_playground_shows_every_models_answer(http_server, tmp_path):
    """The page streams each model's answer into its card: fails if the SSE reader loses, repeats
    or garbles a piece (the text would differ from the non-streamed answer) or an error."""
    webdriver, browser, driver_path = _chromium()
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    image_path = tmp_path / "scene.png"
    image_path.write_bytes(png(picture(3)))
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(flag)
    browser_driver = webdriver.Chrome(options=options,
                                      service=webdriver.ChromeService(driver_path))
    try:
        wait = WebDriverWait(browser_driver, 60)
        browser_driver.get(http_server + "/")
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".card")) == 2)
        browser_driver.find_element(By.ID, "image").send_keys(str(image_path))
        wait.until(lambda d: (d.find_element(By.ID, "preview").get_attribute("src") or "")
                   .startswith("data:image/png;base64,"))
        question = browser_driver.find_element(By.ID, "question")
        question.clear()
        question.send_keys("How many circles are there?")
        browser_driver.find_element(By.ID, "ask").click()
        wait.until(lambda d: all(c.get_attribute("data-state") in ("done", "error")
                                 for c in d.find_elements(By.CSS_SELECTOR, ".card")))
        shown = {c.get_attribute("data-model"): (
            c.get_attribute("data-state"),
            c.find_element(By.CSS_SELECTOR, ".answer").get_property("textContent"))
            for c in browser_driver.find_elements(By.CSS_SELECTOR, ".card")}
        chunks = [int(c.get_attribute("data-chunks"))
                  for c in browser_driver.find_elements(By.CSS_SELECTOR, ".card")]
    finally:
        browser_driver.quit()
    import httpx

    uri = data_uri(image_path.read_bytes())
    for name in ("base", "nsft"):
        r = httpx.post(http_server + "/v1/chat/completions", timeout=60, json=chat(
            name, uri, "How many circles are there?", max_tokens=32))
        assert shown[name] == ("done", r.json()["choices"][0]["message"]["content"]), name
    assert shown["base"][1] != shown["nsft"][1]
    assert sum(chunks) > 2, chunks  # the page read the answers as a stream, in pieces


def test_gateway_admits_every_request_its_models_accept():
    """Fails if the gateway keeps Serve's default of 5 ongoing requests: each one stays ongoing
    while its model generates, so batches of 8 never formed behind it (issue 12)."""
    from serve.app import build_app

    cfg = load_serve_config(models={"a": "/m", "b": "/n"}, overrides=[
        "replicas.max_ongoing_requests=16", "replicas.num_replicas=2"])
    assert build_app(cfg)._bound_deployment._deployment_config.max_ongoing_requests == 2 * 16 * 2
    auto = load_serve_config(models={"a": "/m"}, overrides=[
        "replicas.max_ongoing_requests=10", "replicas.autoscaling.max_replicas=3",
        "gateway_replicas=2", "direct=false"])
    assert build_app(auto)._bound_deployment._deployment_config.max_ongoing_requests == 15


def test_one_model_is_its_own_ingress_unless_direct_is_off(monkeypatch):
    """Fails if a single model keeps the gateway -> model hop by default, if its replicas lose
    the model's options (CPUs, autoscaling, admission) or the bearer token, or if several models
    (or direct=false) stop getting a gateway."""
    from serve.app import DirectModel, Gateway, build_app

    monkeypatch.setenv("NSFT_TEST_TOKEN", "s3cret")
    one = load_serve_config(models={"a": "/m"}, overrides=[
        "replicas.autoscaling.max_replicas=3", "replicas.num_cpus=2",
        "replicas.max_ongoing_requests=12", "auth_token_env=NSFT_TEST_TOKEN"])
    deployment = build_app(one)._bound_deployment
    assert deployment.func_or_class is DirectModel.func_or_class and deployment.name == "model-a"
    assert deployment.ray_actor_options["num_cpus"] == 2
    assert deployment.ray_actor_options["runtime_env"] == {
        "env_vars": {"NSFT_TEST_TOKEN": "s3cret"}}
    assert deployment._deployment_config.autoscaling_config.max_replicas == 3
    assert deployment._deployment_config.max_ongoing_requests == 12
    for cfg in (load_serve_config(models={"a": "/m"}, overrides=["direct=false"]),
                load_serve_config(models={"a": "/m", "b": "/n"})):
        assert build_app(cfg)._bound_deployment.func_or_class is Gateway.func_or_class
