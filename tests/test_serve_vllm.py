"""serve/backends.py's vllm backend (vLLM's AsyncLLM) without Ray: answers equal the hf backend's,
streamed pieces add up to them, a request joins the batch vLLM is running instead of waiting for
it, and a prompt over the context is a 400 for that request. One engine for the module, called
from one event loop (the engine's output task lives on the loop of its first call)."""

from __future__ import annotations

import asyncio
import os
import random
import sys
import threading
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # serve/ from a source checkout
    sys.path.insert(0, str(ROOT))

pytestmark = [pytest.mark.vllm, pytest.mark.slow]
pytest.importorskip("vllm")

from nsft_ray.config import WorldConfig  # noqa: E402
from nsft_ray.models import build_tiny_vlm  # noqa: E402
from nsft_ray.world import corpus, render, sample_scene  # noqa: E402
from serve.backends import GenRequest, GenResult, HFBackend, Sampling, VLLMBackend  # noqa: E402
from serve.config import LimitsConfig  # noqa: E402

LIMITS = LimitsConfig(max_context=256)


def _request(seed: int, question: str = "Describe the picture.", **sampling) -> GenRequest:
    image = render(sample_scene(random.Random(seed), WorldConfig()))
    return GenRequest([{"role": "user", "content": [{"type": "image"},
                                                   {"type": "text", "text": question}]}],
                      [image], Sampling(**{"max_new_tokens": 16, **sampling}), stream=True)


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    path = str(build_tiny_vlm(tmp_path_factory.mktemp("vllm_serve") / "tiny",
                              corpus(WorldConfig(), n=300, seed=0)))
    loop = asyncio.new_event_loop()
    vllm_backend = VLLMBackend(path, LIMITS)
    yield loop, vllm_backend, HFBackend(path, LIMITS)
    vllm_backend.close()
    pending = asyncio.all_tasks(loop)  # the engine's output task
    for task in pending:
        task.cancel()
    loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
    loop.close()


async def _collect(backend: VLLMBackend, request: GenRequest, log: list | None = None):
    """-> (text per choice from the pieces, the final result); `log` gets ("piece"/"done", id)."""
    texts: dict[int, str] = {}
    async for item in backend.stream(request):
        if isinstance(item, tuple):
            texts[item[0]] = texts.get(item[0], "") + item[1]
            if log is not None:
                log.append(("piece", id(request)))
        else:
            if log is not None:
                log.append(("done", id(request)))
            return texts, item


def test_answers_equal_hf_and_pieces_add_up(engines):
    """Greedy, greedy n=2 and a stop string: fails if the AsyncLLM path renders, encodes, stops
    or counts differently from transformers, or a streamed piece is lost, repeated or sent to
    the wrong choice."""
    loop, vllm_backend, hf = engines
    stop = None
    for request in (_request(0), _request(1, n=2), _request(2, max_new_tokens=32)):
        [expected] = hf.generate([request])
        texts, result = loop.run_until_complete(_collect(vllm_backend, request))
        assert result.choices == expected.choices and result.prompt_tokens == expected.prompt_tokens
        assert texts == {i: text for i, (text, _) in enumerate(expected.choices) if text}
        stop = expected.choices[0][0][5:8]
    request = _request(2, max_new_tokens=32, stop=(stop,))
    [expected] = hf.generate([request])
    texts, result = loop.run_until_complete(_collect(vllm_backend, request))
    assert result.choices == expected.choices and stop not in texts.get(0, "")
    assert texts.get(0, "") == expected.choices[0][0]


def test_a_request_joins_the_running_batch(engines):
    """A short request sent while a long one generates ends first, with the answer it gets
    alone. Fails with batches formed per call (vllm.LLM.generate behind a batcher), where it
    waits for the long one to finish."""
    loop, vllm_backend, _ = engines
    long, short = _request(3, max_new_tokens=160), _request(4, max_new_tokens=4)
    alone = loop.run_until_complete(vllm_backend.generate(short))
    log: list = []

    async def both():
        first = asyncio.ensure_future(_collect(vllm_backend, long, log))
        while not log:  # the long one is generating
            await asyncio.sleep(0.005)
        second = await _collect(vllm_backend, short, log)
        return await first, second

    (_, long_result), (_, short_result) = loop.run_until_complete(both())
    assert long_result.choices[0][1] == "length"  # it really ran 160 steps
    assert short_result.choices == alone.choices
    done = [rid for kind, rid in log if kind == "done"]
    assert done == [id(short), id(long)]
    assert ("piece", id(long)) in log[log.index(("done", id(short))):]  # long went on after


def test_prompt_over_the_context_is_a_400_for_that_request(engines, monkeypatch):
    """The check refuses it, and encodes off the event loop's thread (which meanwhile serves
    vLLM's outputs to the other requests). Fails if the check is skipped or runs on the loop."""
    loop, vllm_backend, _ = engines
    threads: list[str] = []
    prepare = vllm_backend.prompts.prepare

    def recording(*args):
        threads.append(threading.current_thread().name)
        return prepare(*args)

    monkeypatch.setattr(vllm_backend.prompts, "prepare", recording)
    result = loop.run_until_complete(vllm_backend.generate(_request(0, "word " * 300)))
    assert not isinstance(result, GenResult)
    assert result.status == 400 and result.code == "context_length_exceeded"
    assert len(threads) == 1 and threads[0].startswith("vllm-context-check")


def test_an_abandoned_stream_leaves_the_engine(engines):
    """A client that goes away mid-answer (the SSE response stops reading): fails if vLLM keeps
    generating the rest of its answer, holding a slot of the running batch and the cores."""
    loop, vllm_backend, _ = engines
    output = vllm_backend.gen.llm.output_processor

    async def abandon() -> int:
        items = vllm_backend.stream(_request(5, max_new_tokens=160))
        assert isinstance(await anext(items), tuple)  # it is generating
        running = output.get_num_unfinished_requests()
        await items.aclose()
        for _ in range(200):
            if output.get_num_unfinished_requests() == 0:
                break
            await asyncio.sleep(0.01)
        return running

    assert loop.run_until_complete(abandon()) == 1
    assert vllm_backend.gen.llm.output_processor.get_num_unfinished_requests() == 0
    assert loop.run_until_complete(vllm_backend.generate(_request(0))).choices  # still serves
