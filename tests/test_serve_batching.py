"""serve/batching.py: batches are cut when the model is free, results reach their own callers,
errors reach every caller of the batch, and a lone caller never waits for company. No Ray."""

from __future__ import annotations

import asyncio
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # serve/ from a source checkout
    sys.path.insert(0, str(ROOT))

from serve.batching import Batcher, stream  # noqa: E402


def _slow_double(seconds: float):
    def fn(items: list[int]) -> list[int]:
        time.sleep(seconds)
        return [2 * i for i in items]
    return fn


def test_arrivals_while_busy_form_one_batch():
    """Fails if requests arriving one by one while a batch runs are cut into small batches
    (Ray Serve's @serve.batch cut them every batch_wait_timeout_s: batches of 1-2)."""
    batcher = Batcher(_slow_double(0.3), max_batch_size=8, wait_s=0.01)

    async def main() -> list[int]:
        first = asyncio.ensure_future(batcher.submit(100))
        rest = []
        for i in range(8):  # 20 ms apart, all within the first batch's 300 ms
            await asyncio.sleep(0.02)
            rest.append(asyncio.ensure_future(batcher.submit(i)))
        return await asyncio.gather(first, *rest)

    assert asyncio.run(main()) == [200] + [2 * i for i in range(8)]
    assert batcher.batch_sizes == [1, 8]


def test_closed_loop_callers_are_batched_together():
    """Fails if the callers just answered are not waited for: 4 callers sending back to back
    would alternate between a batch of 1 and a batch of 3."""
    batcher = Batcher(_slow_double(0.05), max_batch_size=8, wait_s=2.0)

    async def caller(k: int) -> list[int]:
        return [await batcher.submit(10 * k + j) for j in range(5)]

    async def main() -> list[list[int]]:
        return await asyncio.gather(*(caller(k) for k in range(4)))

    assert asyncio.run(main()) == [[2 * (10 * k + j) for j in range(5)] for k in range(4)]
    assert batcher.batch_sizes[2:] == [4] * (len(batcher.batch_sizes) - 2)
    assert sum(batcher.batch_sizes) == 20


def test_lone_caller_does_not_wait_for_company():
    """Fails if a single caller waits wait_s (60 s here) for a batch that cannot fill."""
    batcher = Batcher(_slow_double(0.0), max_batch_size=8, wait_s=60.0)

    async def main() -> list[int]:
        return [await asyncio.wait_for(batcher.submit(i), timeout=20) for i in range(3)]

    assert asyncio.run(main()) == [0, 2, 4]
    assert batcher.batch_sizes == [1, 1, 1]


def test_an_error_reaches_every_caller_of_its_batch_and_the_next_batch_runs():
    calls = []

    def fn(items: list[int]) -> list[int]:
        calls.append(list(items))
        if -1 in items:
            raise ValueError("bad item")
        return items

    batcher = Batcher(fn, max_batch_size=4, wait_s=0.0)

    async def main():
        bad = await asyncio.gather(batcher.submit(-1), batcher.submit(5), return_exceptions=True)
        return bad, await batcher.submit(7)

    bad, good = asyncio.run(main())
    assert [type(e) for e in bad] == [ValueError, ValueError]
    assert good == 7 and calls[-1] == [7]


def test_wrong_result_count_is_an_error_not_a_silent_mismatch():
    batcher = Batcher(lambda items: items[:-1], max_batch_size=4, wait_s=0.0)

    async def main():
        return await asyncio.gather(batcher.submit(1), batcher.submit(2), return_exceptions=True)

    assert all(isinstance(e, RuntimeError) for e in asyncio.run(main()))


def test_text_pieces_reach_their_own_caller_before_its_result():
    """Three callers in one batch, two listening: fails if a piece goes to another caller, arrives
    after the result or out of order, or if the batch function is asked to stream for a batch
    in which no caller listens."""
    calls = []

    def fn(items: list[int], emit=None) -> list[int]:
        calls.append(emit is not None)
        if emit is not None:
            for k in range(3):
                for index, item in enumerate(items):
                    emit(index, k % 2, f"{item}.{k} ")
                time.sleep(0.01)
        return [10 * i for i in items]

    batcher = Batcher(fn, max_batch_size=8, wait_s=1.0)

    async def listen(item: int) -> list:
        return [x async for x in stream(lambda on_text: batcher.submit(item, on_text))]

    async def main():
        # Three callers answered: the batcher then waits (wait_s) for three again.
        await asyncio.gather(*(batcher.submit(0) for _ in range(3)))
        return await asyncio.gather(listen(1), batcher.submit(2), listen(3))

    one, two, three = asyncio.run(main())
    assert one == [(0, "1.0 "), (1, "1.1 "), (0, "1.2 "), 10]
    assert two == 20 and three == [(0, "3.0 "), (1, "3.1 "), (0, "3.2 "), 30]
    assert batcher.batch_sizes == [3, 3] and calls == [False, True]


def test_a_caller_that_stops_reading_is_reported_gone_to_the_batch_function():
    """Two streaming callers in one batch; one closes its stream after its first piece (a client
    that disconnected). Fails if `emit` keeps reporting it present (its rows would generate on),
    reports the other one gone, or hands a caller the "" that only asks."""
    answers: dict[int, list[bool]] = {0: [], 1: []}
    closed = threading.Event()

    def fn(items: list[int], emit=None) -> list[int]:
        for k in range(4 if emit else 0):
            for index in range(len(items)):
                answers[index].append(emit(index, 0, f"{k} " if k % 2 == 0 else ""))
            if k == 0:
                closed.wait(5)
                time.sleep(0.05)  # the cancel reaches the future on the loop
        return list(items)

    batcher = Batcher(fn, max_batch_size=8, wait_s=1.0)

    async def leave_after_one(item: int) -> list:
        items = stream(lambda on_text: batcher.submit(item, on_text))
        first = await anext(items)
        await items.aclose()
        closed.set()
        return [first]

    async def stay(item: int) -> list:
        return [x async for x in stream(lambda on_text: batcher.submit(item, on_text))]

    async def main():
        await asyncio.gather(*(batcher.submit(0) for _ in range(2)))  # then batches of 2
        return await asyncio.gather(leave_after_one(5), stay(6))

    left, stayed = asyncio.run(main())
    assert left == [(0, "0 ")] and stayed == [(0, "0 "), (0, "2 "), 6]
    assert answers == {0: [True, False, False, False], 1: [True, True, True, True]}


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="max_batch_size=0"):
        Batcher(lambda items: items, max_batch_size=0, wait_s=0.0)
