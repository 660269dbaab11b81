"""The serving app end to end on a local Ray: Ray Serve deployments behind real HTTP, the official
`openai` client with an image, concurrent requests batched in a replica, the load test and the
serving benchmark, and the vLLM backend through the same route."""

from __future__ import annotations

import base64
import json
import os
import random
import socket
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # serve/ and benchmarks/ from a source checkout
    sys.path.insert(0, str(ROOT))

from nsft_ray.config import WorldConfig  # noqa: E402
from nsft_ray.generation import generate  # noqa: E402
from nsft_ray.models import build_tiny_vlm, load_vlm  # noqa: E402
from nsft_ray.world import corpus, render, render_png, sample_scene  # noqa: E402

pytestmark = pytest.mark.ray
QUESTION = "Describe the picture."


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _image(seed: int = 0) -> tuple[str, object]:
    scene = sample_scene(random.Random(seed), WorldConfig())
    uri = "data:image/png;base64," + base64.b64encode(render_png(scene)).decode()
    return uri, render(scene)


def _messages(uri: str, text: str = QUESTION) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": uri}},
                                         {"type": "text", "text": text}]}]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("serve_ray") / "tiny"
    return str(build_tiny_vlm(path, corpus(WorldConfig(), n=300, seed=0)))


@pytest.fixture(scope="module")
def server(model_dir, ray_session):
    """Ray Serve on the tests' shared Ray, serving the tiny model as 'base'."""
    from ray import serve

    from serve.app import APP_NAME, build_app
    from serve.config import load_serve_config

    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    cfg = load_serve_config(models={"base": model_dir}, port=port,
                            overrides=["replicas.max_batch_size=4", "replicas.num_cpus=1"])
    serve.run(build_app(cfg), name=APP_NAME, route_prefix="/")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


def test_openai_client_through_ray_serve(server, model_dir):
    import openai

    client = openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list().data] == ["base"]
    uri, image = _image()
    reply = client.chat.completions.create(model="base", messages=_messages(uri),
                                           max_tokens=12, temperature=0.0)
    model, processor = load_vlm(model_dir)
    expected = generate(model, processor, [image], [QUESTION], max_new_tokens=12)[0][0]
    assert reply.choices[0].message.content.strip() == expected
    assert reply.usage.completion_tokens <= 12
    stream = client.chat.completions.create(model="base", messages=_messages(uri),
                                            max_tokens=12, temperature=0.0, stream=True)
    pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
    assert "".join(pieces) == reply.choices[0].message.content
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="nope", messages=_messages(uri), max_tokens=2)
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="base", max_tokens=2,
                                       messages=_messages("data:image/png;base64,@@"))
    assert e.value.body["code"] == "invalid_base64"


def test_concurrent_requests_are_batched_without_changing_answers(server):
    import httpx

    images = [_image(seed)[0] for seed in range(8)]

    def ask(uri: str) -> str:
        r = httpx.post(server + "/v1/chat/completions", timeout=120, json={
            "model": "base", "messages": _messages(uri), "max_tokens": 8, "temperature": 0.0})
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["message"]["content"]

    alone = [ask(uri) for uri in images]
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(ask, images))
    assert together == alone


def test_load_test_tiny_has_no_5xx(server, tmp_path):
    from benchmarks.load_test import main, run_load

    result = run_load(server, "base", clients=5, duration=5.0, max_tokens=8, bad_fraction=0.3)
    s = result["status"]
    assert result["requests"] > 5 and s["2xx"] > 0 and result["bad_requests"] > 0
    assert s["5xx"] == 0 and s["transport"] == 0 and s["wrong_class"] == 0
    assert s["4xx"] == result["bad_requests"] and s["2xx"] + s["4xx"] == result["requests"]
    assert result["latency_ms"]["p50"] <= result["latency_ms"]["p99"]
    out = tmp_path / "load.json"
    assert main(["--url", server, "--clients", "2", "--duration", "1", "--out", str(out)]) == 0
    assert out.is_file()


def test_the_replica_answers_on_its_own_port_as_through_the_proxy(server):
    """Direct ingress (serve.app.LATENCY_SETTINGS): `direct_urls` must name the one ingress
    replica's own port, and a request there must get the proxy's answer. Fails if direct
    ingress is off (no address), or the address is wrong (no connection)."""
    import httpx

    from serve.app import direct_urls

    [direct] = direct_urls("127.0.0.1")
    assert direct != server
    uri, _ = _image(3)
    body = {"model": "base", "messages": _messages(uri), "max_tokens": 8, "temperature": 0.0}
    answers = [httpx.post(url + "/v1/chat/completions", json=body, timeout=60).json()
               ["choices"][0]["message"]["content"] for url in (server, direct)]
    assert answers[0] == answers[1]


def test_bench_serve_reports_both_modes(server, model_dir, tmp_path):
    from benchmarks.bench_serve import run_bench

    report = run_bench(model_dir, batch=2, requests=4, max_tokens=4, url=server, model="base")
    modes = [r["mode"] for r in report["results"]]
    assert modes == ["in-process", "http (Ray Serve)"]
    assert all(r["requests"] == 4 and r["requests_per_s"] > 0 for r in report["results"])


def test_bench_serve_quick_reports_ratio_overhead_and_agreement(server, model_dir):
    """Fails if --quick's JSON lacks the issue's keys, or HTTP and in-process answer differently."""
    from benchmarks.bench_serve import run_quick

    report = run_quick(model_dir, batch=2, requests=4, requests_batch1=2, max_tokens=4,
                       repeats=1, url=server, model="base", stream_max_tokens=24)
    assert [(r["mode"], r["batch"], r.get("clients")) for r in report["results"]] == [
        ("in-process", 2, None), ("http (Ray Serve)", 2, 4), ("http (Ray Serve)", 2, 2),
        ("in-process", 1, None), ("http (Ray Serve)", 1, 1)]
    # Saturating clients (2 x batch) by default, the closed loop at exactly the batch beside it.
    assert report["clients"] == 4
    assert set(report["ratios"]) == {"serve_http_vs_in_process",
                                     "serve_http_vs_in_process_closed_loop"}
    assert all(v > 0 for v in report["ratios"].values())
    assert isinstance(report["p50_overhead_ms_batch1"], float)
    assert report["outputs_agree"] is True
    streamed = report["stream"]  # fails if the streamed text differs from the whole answer
    assert streamed["text_equal"] is True and streamed["max_tokens"] == 24
    assert 0 < streamed["first_text_p50_ms"] <= streamed["whole_p50_ms"]


def test_gateway_layout_answers_as_the_direct_one(server, model_dir):
    """`server` serves its one model directly (the replica is the ingress); the layout used for
    several models (Gateway -> ModelServer, direct=false) must give the same greedy answers."""
    import httpx
    from ray import serve

    from serve.app import build_app
    from serve.config import load_serve_config

    cfg = load_serve_config(models={"base": model_dir},
                            overrides=["direct=false", "replicas.num_cpus=1"])
    serve.run(build_app(cfg), name="gateway", route_prefix="/gw")
    try:
        for seed in (0, 1):
            body = {"model": "base", "messages": _messages(_image(seed)[0]), "max_tokens": 8,
                    "temperature": 0.0}
            direct, gateway = (httpx.post(f"{server}{prefix}/v1/chat/completions", json=body,
                                          timeout=120) for prefix in ("", "/gw"))
            assert direct.status_code == gateway.status_code == 200, gateway.text
            answer = direct.json()["choices"][0]["message"]["content"]
            assert gateway.json()["choices"][0]["message"]["content"] == answer
        # Streaming crosses the gateway -> model hop as a streaming handle call.
        streamed = httpx.post(f"{server}/gw/v1/chat/completions", json={**body, "stream": True},
                              timeout=120)
        events = [e[len("data: "):] for e in streamed.text.split("\n\n") if e]
        assert events[-1] == "[DONE]", streamed.text
        assert "".join(choice["delta"].get("content") or ""
                       for e in events[:-1] for choice in json.loads(e)["choices"]) == answer
    finally:
        serve.delete("gateway")


class _CountingModel:
    """A model deployment that streams one piece every 20 ms, up to 500, and writes how many it
    sent, and whether its stream was closed before the end, to `record` when the stream ends."""

    def __init__(self, record: str) -> None:
        self.record = record

    async def stream(self, request):
        import asyncio

        sent, closed = 0, True
        try:
            while sent < 500:
                yield (0, "x")
                sent += 1
                await asyncio.sleep(0.02)
            closed = False
        finally:
            Path(self.record).write_text(json.dumps({"sent": sent, "closed": closed}))


def test_a_client_that_leaves_stops_the_model_behind_the_gateway(server, tmp_path):
    """The gateway layout's hop (HandleEngine): a streaming client that disconnects after its
    first event must close the model replica's stream, so the replica stops generating. Two
    things close it: Ray Serve cancels a cancelled request's handle calls, and HandleEngine
    cancels its call when its stream ends early (removing either alone still passes here).
    Fails if the model's stream outlives the client (it would send all 500 pieces)."""
    import time

    import httpx
    import ray.cloudpickle
    from ray import serve

    from serve.app import Gateway
    from serve.config import LimitsConfig

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the replica lacks tests/
    record = tmp_path / "record.json"
    model = serve.deployment(_CountingModel).bind(str(record))
    serve.run(Gateway.bind({"counting": model}, LimitsConfig(), ""), name="leave",
              route_prefix="/leave")
    try:
        body = {"model": "counting", "messages": _messages(_image(0)[0]), "stream": True,
                "max_tokens": 500}
        with httpx.stream("POST", f"{server}/leave/v1/chat/completions", json=body,
                          timeout=60) as response:
            assert response.status_code == 200
            lines = response.iter_lines()
            assert next(lines).startswith("data: ")  # the first event: the model is streaming
        for _ in range(300):  # the replica writes the record when its stream ends
            if record.exists():
                break
            time.sleep(0.1)
        result = json.loads(record.read_text())
        assert result["closed"] and result["sent"] < 250, result
    finally:
        serve.delete("leave")


@pytest.mark.vllm
@pytest.mark.slow
def test_vllm_backend_through_the_same_route(server, model_dir):
    """A second Serve app with the vLLM backend: greedy answers equal the HF backend's."""
    pytest.importorskip("vllm")
    import openai
    from ray import serve

    from serve.app import build_app
    from serve.config import load_serve_config

    cfg = load_serve_config(models={"base": model_dir}, backend="vllm",
                            overrides=["replicas.num_cpus=1"])
    serve.run(build_app(cfg), name="vllm", route_prefix="/vllm")
    try:
        hf = openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0)
        vl = openai.OpenAI(base_url=server + "/vllm/v1", api_key="unused", max_retries=0)
        for seed in (0, 1):
            uri, _ = _image(seed)
            answers = [c.chat.completions.create(model="base", messages=_messages(uri),
                                                 max_tokens=12, temperature=0.0)
                       for c in (hf, vl)]
            assert answers[1].choices[0].message.content == answers[0].choices[0].message.content
            assert answers[1].usage.prompt_tokens == answers[0].usage.prompt_tokens
            stream = vl.chat.completions.create(model="base", messages=_messages(uri),
                                                max_tokens=12, temperature=0.0, stream=True)
            pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
            assert "".join(pieces) == answers[0].choices[0].message.content
        with pytest.raises(openai.BadRequestError) as e:
            vl.chat.completions.create(model="base", messages=_messages(uri, "star " * 1100),
                                       max_tokens=4)
        assert e.value.body["code"] == "context_length_exceeded"
        # bench_serve's vllm path: an AsyncLLM in this process against the app's, same answers.
        from benchmarks.bench_serve import run_quick

        report = run_quick(model_dir, backend="vllm", batch=2, requests=4, requests_batch1=2,
                           max_tokens=4, repeats=1, url=server + "/vllm", model="base",
                           stream_max_tokens=8)
        assert report["outputs_agree"] is True and report["stream"]["text_equal"] is True
    finally:
        serve.delete("vllm")
