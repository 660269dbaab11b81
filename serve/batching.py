"""Merging concurrent requests into model batches, formed only when the model is free.

    batcher = Batcher(backend.generate, max_batch_size=8, wait_s=0.02)
    result = await batcher.submit(request)   # from many coroutines at once
    async for item in stream(lambda on_text: batcher.submit(request, on_text)):
        ...                                  # (choice, text piece)s, then the result

Why not Ray Serve's @serve.batch: with max_concurrent_batches=1 it keeps forming batches while the
previous one runs (each closes `batch_wait_timeout_s` after its first arrival and then waits for
the model), so 8 concurrent callers reached the model as batches of 1-2 and HTTP ran at 0.16x the
in-process throughput (issue 12). Here a batch is cut when the model is free: everything queued
by then, up to max_batch_size, after waiting at most `wait_s` for the callers just answered, who
under steady load send again at once. No Ray import: the same class runs in a unit test.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Batcher", "stream"]

OnPiece = Callable[[int, str], None]  # (choice index, text piece), called on the event loop


@dataclass
class _Pending:
    item: Any
    future: asyncio.Future
    on_text: OnPiece | None = None
    arrived: float = field(default_factory=time.monotonic)


async def stream(start: Callable[[OnPiece], Awaitable[Any]]) -> AsyncIterator[Any]:
    """The pieces `start(on_text)` hands to `on_text` while it runs, as (choice, piece) tuples,
    then its result (an exception it raises is raised here after the pieces)."""
    pieces: asyncio.Queue = asyncio.Queue()
    task = asyncio.ensure_future(start(lambda choice, piece: pieces.put_nowait((choice, piece))))
    # Pieces are queued (on this loop) before the result is set, so None comes last.
    task.add_done_callback(lambda _: pieces.put_nowait(None))
    try:
        while (piece := await pieces.get()) is not None:
            yield piece
        yield task.result()
    finally:
        # A caller that stopped reading (a client that disconnected): cancelling its submit
        # cancels its future, which tells the batch function that it has gone (`_emitter`).
        task.cancel()


class Batcher:
    """Calls `fn(items) -> results` (one result per item, same order) in a worker thread, one batch
    at a time, on batches of up to `max_batch_size` submitted items.

    When a caller of the batch listens for text (`submit(item, on_text)`), the call is
    `fn(items, emit)` and `fn` calls `emit(item index, choice, piece)` from its thread; each piece
    reaches its caller's `on_text` on the event loop, before the result. `emit` returns False once
    that caller has gone (its submit was cancelled), so `fn` can stop generating for it; `fn` may
    emit "" to ask only that.
    """

    def __init__(self, fn: Callable[[list], list], max_batch_size: int, wait_s: float) -> None:
        if max_batch_size < 1 or wait_s < 0:
            raise ValueError(f"max_batch_size={max_batch_size}, wait_s={wait_s}: expected "
                             ">= 1 and >= 0")
        self.fn = fn
        self.max_batch_size = max_batch_size
        self.wait_s = wait_s
        self._queue: deque[_Pending] = deque()
        self._arrived: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None
        self.batch_sizes: list[int] = []  # every batch's size, for tests and diagnostics

    async def submit(self, item: Any, on_text: OnPiece | None = None) -> Any:
        """`fn`'s result for `item`, computed in some batch; `fn`'s exception if it raised."""
        if self._worker is None or self._worker.done():
            # Created on first use: the event loop is the caller's (a replica's user-code loop).
            self._arrived = asyncio.Event()
            self._worker = asyncio.get_running_loop().create_task(self._run())
        pending = _Pending(item, asyncio.get_running_loop().create_future(), on_text)
        self._queue.append(pending)
        self._arrived.set()
        return await pending.future

    async def _run(self) -> None:
        free_since, want = time.monotonic(), 1
        while True:
            while not self._queue:
                self._arrived.clear()
                await self._arrived.wait()
            # A caller waits for company at most wait_s after it could have run: after the
            # model became free, or after it arrived when that is later.
            await self._fill(want, max(free_since, self._queue[0].arrived) + self.wait_s)
            batch = [self._queue.popleft()
                     for _ in range(min(self.max_batch_size, len(self._queue)))]
            batch = [p for p in batch if not p.future.done()]  # callers that gave up
            if batch:
                await self._call(batch)
            # Expected next batch: the callers waiting now plus those just answered, who under
            # steady load send again within a round trip.
            free_since = time.monotonic()
            want = min(self.max_batch_size, len(self._queue) + len(batch))

    async def _fill(self, want: int, deadline: float) -> None:
        """Wait until `want` callers are queued or until `deadline`; with `want` 1 (a lone caller)
        nothing waits."""
        while len(self._queue) < want:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), left)
            except TimeoutError:
                return

    async def _call(self, batch: list[_Pending]) -> None:
        self.batch_sizes.append(len(batch))
        try:
            # A worker thread keeps the event loop free to queue the next batch meanwhile.
            args: list[Any] = [[p.item for p in batch]]
            if any(p.on_text for p in batch):
                args.append(_emitter(batch, asyncio.get_running_loop()))
            results = await asyncio.to_thread(self.fn, *args)
            if len(results) != len(batch):
                raise RuntimeError(f"batch function returned {len(results)} results for "
                                   f"{len(batch)} items")
        except Exception as e:  # every caller of the batch gets the error, the worker goes on
            for p in batch:
                if not p.future.done():
                    p.future.set_exception(e)
            return
        for p, r in zip(batch, results, strict=True):
            if not p.future.done():
                p.future.set_result(r)


def _emitter(batch: list[_Pending], loop: asyncio.AbstractEventLoop
             ) -> Callable[[int, int, str], bool]:
    """emit(item index, choice, piece) for `fn`'s thread: the piece goes to that item's caller on
    the loop (call_soon_threadsafe keeps the order: pieces, then the batch's results); False when
    the caller has gone."""

    def emit(index: int, choice: int, piece: str) -> bool:
        pending = batch[index]
        # Read from another thread: a future's state is one attribute, and a stale read costs
        # one more piece at most. Only a cancelled caller's future is done during its batch.
        if pending.future.done():
            return False
        if piece and pending.on_text is not None:  # "" only asks whether the caller is there
            loop.call_soon_threadsafe(pending.on_text, choice, piece)
        return True

    return emit
