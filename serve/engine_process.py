"""A generation backend in a child process of its own, behind the same `generate` method.

    backend = EngineProcess("hf", path, limits)    # spawns the child, which loads the model
    results = backend.generate(requests)           # blocks this thread, not the GIL

Why: the HTTP side of a replica (uvicorn, FastAPI, Ray Serve's request wrappers, JSON) is Python,
and so is much of a small model's decode step, so in one process the two take turns on the GIL:
each request handled during a batch lengthens that batch. With the model in a child process, the
parent's thread waits on a pipe (GIL released) and handles requests on another core while the
child generates. vLLM's API server splits off its engine core for the same reason. Requests and
results cross the pipe pickled (a decoded PIL image, a few strings); the child exits when the
pipe closes, so it cannot outlive a replica that is killed. A streaming request's text pieces
cross the pipe as they are generated, ahead of the batch's results; when its caller has gone, a
cancel crosses back and the child stops generating that request.
"""

from __future__ import annotations

import multiprocessing
import threading
from multiprocessing.connection import Connection

from serve.backends import GenRequest, GenResult, OnText, make_backend
from serve.config import LimitsConfig
from serve.schemas import ApiError

__all__ = ["EngineProcess"]

PROBE_S = 0.05  # how often a waiting replica asks whether a streaming request's caller has gone


def _child(conn: Connection, kind: str, path: str, limits: LimitsConfig) -> None:
    """The child's loop: build the backend, report ("ready", context_length) or ("error", e),
    then answer each ("batch", requests) with ("text", (request, choice, piece)) messages for
    the streaming ones and ("ok", results) or ("error", e), until EOF. A ("cancel", request)
    from the parent during that batch stops that request."""
    try:
        backend = make_backend(kind, path, limits)
    except Exception as e:  # noqa: BLE001 - sent to the parent, which raises it
        conn.send(("error", e))
        return
    conn.send(("ready", backend.context_length))
    gone: set[int] = set()

    def send_text(request: int, choice: int, piece: str) -> bool:
        while conn.poll():  # the parent's cancels, sent while this batch generates
            gone.add(conn.recv()[1])
        if request in gone:
            return False
        if piece:  # "" only asks whether the caller is there: the cancels above answer it
            conn.send(("text", (request, choice, piece)))
        return True

    while True:
        try:
            message = conn.recv()
        except EOFError:  # the parent closed the pipe or died
            return
        # A cancel sent as its batch ended: the pipe keeps order, so it comes before the next batch.
        if message[0] != "batch":
            continue
        requests = message[1]
        gone.clear()
        try:
            on_text = send_text if any(r.stream for r in requests) else None
            conn.send(("ok", backend.generate(requests, on_text)))
        except Exception as e:  # noqa: BLE001 - one failed batch fails its callers, not the child
            conn.send(("error", e))


class EngineProcess:
    """`make_backend(kind, path, limits)` run in a spawned child process; one batch at a time."""

    def __init__(self, kind: str, path: str, limits: LimitsConfig) -> None:
        # spawn, not fork: the parent runs Ray's and uvicorn's threads, which a fork would copy
        # in whatever state they hold.
        ctx = multiprocessing.get_context("spawn")
        self._conn, child_end = ctx.Pipe()
        self._proc = ctx.Process(target=_child, args=(child_end, kind, path, limits),
                                 name=f"engine-{kind}", daemon=True)
        self._proc.start()
        child_end.close()  # the child's end lives in the child only: its exit gives us EOF
        self._lock = threading.Lock()
        self.context_length: int = self._receive()

    def _exited(self) -> RuntimeError:
        self._proc.join(timeout=5)
        return RuntimeError(f"the engine process exited (exit code {self._proc.exitcode}); its "
                            "error, if it printed one, is in this replica's log")

    def _receive(self, on_text: OnText | None = None, streaming: tuple[int, ...] = ()):
        """The child's answer to the batch it runs, handing its text to `on_text`. While it waits,
        it asks `on_text` every PROBE_S whether each streaming request's caller is still there
        (a piece ""); for one that has gone, a cancel goes to the child."""
        cancelled: set[int] = set()

        def deliver(request: int, choice: int = 0, piece: str = "") -> None:
            """Hand `on_text` the piece; cancel the request in the child if its caller left."""
            if on_text(request, choice, piece) is False and request not in cancelled:
                cancelled.add(request)
                self._send(("cancel", request))

        while True:
            while streaming and not self._conn.poll(PROBE_S):
                for request in set(streaming) - cancelled:
                    deliver(request)
            try:
                status, payload = self._conn.recv()
            except EOFError:
                raise self._exited() from None
            if status == "error":
                raise payload
            if status != "text":
                return payload
            if on_text is not None:
                deliver(*payload)

    def _send(self, message: tuple) -> None:
        try:
            self._conn.send(message)
        except (BrokenPipeError, ConnectionResetError):
            raise self._exited() from None

    def generate(self, requests: list[GenRequest],
                 on_text: OnText | None = None) -> list[GenResult | ApiError]:
        with self._lock:  # one batch in flight: the pipe carries one batch and its answer
            self._send(("batch", requests))
            streaming = (tuple(i for i, r in enumerate(requests) if r.stream)
                         if on_text is not None else ())
            return self._receive(on_text, streaming)

    def alive(self) -> bool:
        return self._proc.is_alive()

    def close(self) -> None:
        self._conn.close()
        self._proc.join(timeout=10)
        if self._proc.is_alive():
            self._proc.kill()
