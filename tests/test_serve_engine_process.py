"""serve/engine_process.py: the hf backend in a child process answers exactly as in-process, carries
per-request errors and load errors back to the replica, and a dead child fails health checks
instead of hanging the replica. No Ray: ModelEngine is the class the Serve deployments wrap."""

from __future__ import annotations

import asyncio
import os
import random
import sys
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # serve/ from a source checkout
    sys.path.insert(0, str(ROOT))

from nsft_ray.config import WorldConfig  # noqa: E402
from nsft_ray.models import build_tiny_vlm  # noqa: E402
from nsft_ray.world import corpus, render, sample_scene  # noqa: E402
from serve.app import ModelEngine  # noqa: E402
from serve.backends import GenRequest, HFBackend, Sampling  # noqa: E402
from serve.config import LimitsConfig  # noqa: E402
from serve.engine_process import EngineProcess  # noqa: E402

LIMITS = LimitsConfig(max_context=64)


def _request(seed: int, question: str) -> GenRequest:
    image = render(sample_scene(random.Random(seed), WorldConfig()))
    return GenRequest([{"role": "user", "content": [{"type": "image"},
                                                   {"type": "text", "text": question}]}],
                      [image], Sampling(max_new_tokens=8))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("engine_process") / "tiny"
    return str(build_tiny_vlm(path, corpus(WorldConfig(), n=300, seed=0)))


def test_child_answers_as_the_in_process_backend(model_dir):
    """Fails if the child builds another backend or limits, loses a request's order, or turns a
    per-request 400 into a failed batch."""
    requests = [_request(0, "Describe the picture."), _request(1, "How many stars are there?"),
                _request(2, "word " * 80)]  # the last is over max_context: a 400 for it alone
    here = HFBackend(model_dir, LIMITS)
    engine = EngineProcess("hf", model_dir, LIMITS)
    try:
        assert engine.context_length == here.context_length == 64
        there, expected = engine.generate(requests), here.generate(requests)
        assert [r.choices for r in there[:2]] == [r.choices for r in expected[:2]]
        assert [r.prompt_tokens for r in there[:2]] == [r.prompt_tokens for r in expected[:2]]
        assert there[2].status == 400 and there[2].code == "context_length_exceeded"
        assert engine.generate(requests[1:2])[0].choices == expected[1].choices  # it goes on
    finally:
        engine.close()
    assert not engine.alive()  # close() ends the child: the pipe's EOF is its signal


def _recorder(into: list):
    def on_text(request: int, choice: int, piece: str) -> None:
        if piece:  # "" only asks whether the caller is still there
            into.append((request, choice, piece))
    return on_text


def test_streamed_pieces_cross_the_pipe_as_in_process(model_dir):
    """A batch with one streaming request: the child hands the replica the same pieces, for the
    same request, as the in-process backend. Fails if pieces are dropped, sent for a request that
    did not ask, or mistaken for the batch's results."""
    requests = [_request(0, "Describe the picture."), _request(1, "How many stars are there?")]
    requests[1].stream = True
    requests[1].sampling = Sampling(max_new_tokens=32)
    here, there = [], []
    expected = HFBackend(model_dir, LIMITS).generate(requests, _recorder(here))
    engine = EngineProcess("hf", model_dir, LIMITS)
    try:
        got = engine.generate(requests, _recorder(there))
    finally:
        engine.close()
    assert [r.choices for r in got] == [r.choices for r in expected]
    assert there == here and {i for i, _, _ in here} == {1}
    assert "".join(p for _, _, p in here) == expected[1].choices[0][0]


def test_load_error_is_raised_in_the_replica():
    """Fails if the child's error is lost (the replica would hang or report a bare EOF)."""
    with pytest.raises(FileNotFoundError, match="/nonexistent/model"):
        EngineProcess("hf", "/nonexistent/model", LIMITS)


def test_dead_child_fails_requests_and_health_check(model_dir):
    """Fails if a killed engine hangs its callers, or if the replica still reports healthy (Ray
    Serve would keep routing to a replica that cannot generate)."""
    engine = ModelEngine("hf", model_dir, LIMITS, max_batch_size=2, batch_wait_timeout_s=0.0)
    assert isinstance(engine.backend, EngineProcess)
    engine.check_health()
    engine.backend._proc.kill()
    engine.backend._proc.join(timeout=10)
    with pytest.raises(RuntimeError, match="engine process exited"):
        asyncio.run(engine.generate(_request(0, "Describe the picture.")))
    with pytest.raises(RuntimeError, match="engine process exited"):
        engine.check_health()


def test_vllm_and_opt_out_keep_the_backend_in_the_replica(model_dir):
    """engine_process=false (and the vllm backend, whose engine core has a process of its own)
    generate in the replica's process."""
    engine = ModelEngine("hf", model_dir, LIMITS, 2, 0.0, engine_process=False)
    assert isinstance(engine.backend, HFBackend)
    engine.check_health()  # nothing to watch


def _long(seed: int, question: str, max_new_tokens: int = 150) -> GenRequest:
    request = _request(seed, question)
    request.stream, request.sampling = True, Sampling(max_new_tokens=max_new_tokens)
    return request


LONG = LimitsConfig(max_context=256)


def test_a_gone_caller_stops_its_request_in_the_child(model_dir):
    """150-token streamed requests (the random model never ends one early). A caller gone at its
    first piece, and one gone before any text (found by the replica's probe, every PROBE_S):
    the child stops generating them; the batch's other request is untouched; a late cancel, for
    a batch already answered, is not taken for a batch. Fails if a cancel never reaches the child
    (the requests would run their 150 tokens), or reaches the wrong request, or if the child
    takes a late cancel for its next batch."""
    engine = EngineProcess("hf", model_dir, LONG)
    try:
        plain = _request(0, "Describe the picture.")
        expected = engine.generate([plain])[0]

        def gone_at_first_piece(request: int, choice: int, piece: str) -> bool | None:
            return False if piece else None

        first = engine.generate([plain, _long(1, "Describe the picture.")], gone_at_first_piece)
        before_text = engine.generate([_long(1, "How many stars are there?")],
                                      lambda *_: False)[0]
        engine._send(("cancel", 0))  # late: its batch was answered
        whole = engine.generate([_long(1, "Describe the picture.")], lambda *_: None)[0]
    finally:
        engine.close()
    assert first[0].choices == expected.choices
    assert first[1].completion_tokens < 100 and before_text.completion_tokens < 100
    assert whole.completion_tokens == 150


def test_a_closed_stream_stops_its_request_end_to_end(model_dir):
    """ModelEngine as a replica runs it: stream, read the first piece, close (a client that
    disconnected). The batch function's result shows the request stopped; the next one runs
    whole. Fails if closing the stream leaves the request generating (the batcher's submit not
    cancelled, or emit not reporting it)."""
    engine = ModelEngine("hf", model_dir, LONG, 4, 0.0)
    results: list = []
    generate = engine.batcher.fn

    def recording(*args):
        results.append(generate(*args))
        return results[-1]

    engine.batcher.fn = recording

    async def main():
        items = engine.stream(_long(1, "Describe the picture."))
        assert isinstance(await anext(items), tuple)  # a (choice, piece)
        await items.aclose()
        while not results:
            await asyncio.sleep(0.05)
        return [x async for x in engine.stream(_long(1, "Describe the picture."))][-1]

    try:
        whole = asyncio.run(main())
    finally:
        engine.backend.close()
    assert results[0][0].completion_tokens < 100 and whole.completion_tokens == 150
