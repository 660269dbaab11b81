"""The OpenAI-compatible FastAPI app, independent of Ray Serve.

    app = create_app({"base": LocalEngine(make_backend("hf", path, limits))}, limits)

Routes: POST /v1/chat/completions, GET /v1/models, GET /health, GET / (the playground page).
The app validates and decodes everything (JSON, types, limits, base64 images) before a request
reaches an engine; an engine is anything with `async generate(GenRequest) -> GenResult | ApiError`
and `stream(GenRequest)`, an async iterator of (choice, text piece)s while the answer is generated,
then the GenResult or ApiError: a LocalEngine in-process (tests, benchmarks), the batching engine
of a Ray Serve replica, or a handle to one (serve/app.py). `"stream": true` sends each piece as an
SSE chunk as it arrives.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import io
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from PIL import Image
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from serve.backends import Backend, GenRequest, GenResult, Sampling, make_backend
from serve.batching import stream
from serve.config import LimitsConfig, ServeConfig
from serve.schemas import (
    ApiError,
    ChatRequest,
    chunk_body,
    completion_body,
    error_body,
    from_validation_error,
)

__all__ = [
    "Engine",
    "LocalEngine",
    "create_app",
    "local_app",
    "local_engine",
    "resolve_token",
    "parse_request",
    "to_gen_request",
    "decode_image_url",
]

log = logging.getLogger(__name__)
PLAYGROUND = Path(__file__).parent / "static" / "index.html"


class Engine(Protocol):
    async def generate(self, request: GenRequest) -> GenResult | ApiError: ...

    def stream(self, request: GenRequest) -> AsyncIterator: ...


class LocalEngine:
    """A backend in this process; one generate() at a time (the model is not shared by threads)."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self._lock = threading.Lock()

    async def generate(self, request: GenRequest) -> GenResult | ApiError:
        return await asyncio.to_thread(self._one, request)

    async def stream(self, request: GenRequest) -> AsyncIterator:
        """(choice, text piece)s while `request` generates, then its result."""
        loop = asyncio.get_running_loop()
        gone = threading.Event()  # the caller stopped reading: generation stops for it

        def start(on_text):
            def emit(_: int, choice: int, piece: str) -> bool:  # on the generating thread
                if gone.is_set():
                    return False
                if piece:  # "" only asks whether the caller is there
                    loop.call_soon_threadsafe(on_text, choice, piece)
                return True

            return asyncio.to_thread(self._one, request, emit)

        try:
            async for item in stream(start):
                yield item
        finally:
            gone.set()

    def _one(self, request: GenRequest, on_text=None) -> GenResult | ApiError:
        with self._lock:
            return self.backend.generate([request], on_text)[0]


def resolve_token(env_name: str) -> str | None:
    """The bearer token from environment variable `env_name` ('' -> no auth)."""
    if not env_name:
        return None
    token = os.environ.get(env_name, "")
    if not token:
        # Refuse to start open when auth was asked for.
        raise RuntimeError(f"auth_token_env={env_name!r}: environment variable {env_name} is unset")
    return token


# ---------------------------------------------------------------------------------------------
# Request parsing and validation (no model needed)
# ---------------------------------------------------------------------------------------------


def _no_constants(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


def parse_request(body: bytes) -> ChatRequest:
    """Raw body -> ChatRequest; bad encoding, bad JSON or bad fields raise a 400 ApiError."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ApiError(400, f"request body is not valid UTF-8 (bad byte at offset {e.start})",
                       None, "invalid_encoding") from None
    try:
        data = json.loads(text, parse_constant=_no_constants)
    except (ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError
        raise ApiError(400, f"request body is not valid JSON: {e}", None, "invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(400, f"request body must be a JSON object, got {type(data).__name__}",
                       None, "invalid_json")
    try:
        return ChatRequest.model_validate(data)
    except ValidationError as e:
        raise from_validation_error(e) from None


def decode_image_url(url: str, limits: LimitsConfig, param: str) -> Image.Image:
    """A base64 data URI -> an RGB image, within the byte and pixel limits."""
    if url.startswith(("http://", "https://")):
        raise ApiError(400, f"{param}: remote image URLs are not fetched (this server has no "
                       "network access); send data:image/png;base64,...", param,
                       "invalid_image_url")
    header, comma, payload = url.partition(",")
    if not url.startswith("data:") or not comma or not header.endswith(";base64"):
        raise ApiError(400, f"{param}: expected a data URI data:image/<type>;base64,<data>, got "
                       f"{url[:40]!r}", param, "invalid_image_url")
    # Refuse before decoding: base64 carries 3 bytes per 4 characters.
    if len(payload) > (limits.max_image_bytes + 2) // 3 * 4 + 4:
        raise ApiError(400, f"{param}: image is over {limits.max_image_bytes} bytes", param,
                       "image_too_large")
    try:
        raw = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ApiError(400, f"{param}: invalid base64 ({e})", param, "invalid_base64") from None
    if len(raw) > limits.max_image_bytes:
        raise ApiError(400, f"{param}: image has {len(raw)} bytes, over the limit of "
                       f"{limits.max_image_bytes}", param, "image_too_large")
    try:
        image = Image.open(io.BytesIO(raw))
        w, h = image.size
        if w * h > limits.max_image_pixels:
            raise ApiError(400, f"{param}: image is {w}x{h} = {w * h} pixels, over the limit of "
                           f"{limits.max_image_pixels}", param, "image_too_large")
        return image.convert("RGB")  # decodes the pixels: truncated data fails here
    except ApiError:
        raise
    except Image.DecompressionBombError as e:
        raise ApiError(400, f"{param}: {e}", param, "image_too_large") from None
    except Exception as e:  # PIL raises many types on hostile bytes; all mean "not an image"
        raise ApiError(400, f"{param}: bytes are not a decodable image ({type(e).__name__}: "
                       f"{e})", param, "invalid_image") from None


def to_gen_request(req: ChatRequest, limits: LimitsConfig) -> GenRequest:
    """Check the request against the limits, decode its images, keep chat-template messages."""
    key = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    max_tokens = req.max_completion_tokens or req.max_tokens or limits.default_max_tokens
    if max_tokens > limits.max_tokens:
        raise ApiError(400, f"{key}={max_tokens}: expected 1..{limits.max_tokens}", key,
                       "invalid_value")
    if req.n > limits.max_n:
        raise ApiError(400, f"n={req.n}: expected 1..{limits.max_n}", "n", "invalid_value")
    n_images = sum(p.type == "image_url" for m in req.messages for p in m.content)
    if n_images > limits.max_images:
        raise ApiError(400, f"messages: {n_images} images, at most {limits.max_images} per "
                       "request", "messages", "too_many_images")
    messages, images = [], []
    for i, m in enumerate(req.messages):
        parts: list[dict] = []
        for j, p in enumerate(m.content):
            where = f"messages[{i}].content[{j}]"
            if p.type == "text":
                parts.append({"type": "text", "text": p.text})
                continue
            if m.role != "user":
                raise ApiError(400, f"{where}: images are allowed in user messages only, not "
                               f"in a {m.role} message", where, "invalid_value")
            images.append(decode_image_url(p.image_url.url, limits, where + ".image_url.url"))
            parts.append({"type": "image"})
        messages.append({"role": m.role, "content": parts})
    sampling = Sampling(max_new_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p,
                        n=req.n, seed=req.seed, stop=tuple(req.stop or ()))
    return GenRequest(messages=messages, images=images, sampling=sampling, stream=req.stream)


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"request body has {declared} bytes, over the limit of {limit}",
                       None, "request_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"request body is over the limit of {limit} bytes", None,
                           "request_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


# ---------------------------------------------------------------------------------------------
# The app
# ---------------------------------------------------------------------------------------------

_HTTP_CODES = {401: "unauthorized", 404: "not_found", 405: "method_not_allowed"}


def _sse(obj: object) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def create_app(
    engines: Mapping[str, Engine], limits: LimitsConfig, token: str | None = None
) -> FastAPI:
    """The FastAPI app serving `engines` by name; `token`: required bearer token (None: open)."""
    app = FastAPI(title="nsft-ray serve", docs_url=None, redoc_url=None, openapi_url=None)
    names = list(engines)
    started = int(time.time())
    _add_error_handlers(app)
    check_auth = _auth_check(token)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "models": names}

    @app.get("/", response_class=HTMLResponse)
    async def playground() -> HTMLResponse:
        return HTMLResponse(PLAYGROUND.read_text())

    @app.get("/v1/models")
    async def models(request: Request) -> dict:
        check_auth(request)
        return {"object": "list", "data": [
            {"id": n, "object": "model", "created": started, "owned_by": "nsft-ray"}
            for n in names]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        check_auth(request)
        req = parse_request(await _read_body(request, limits.max_body_bytes))
        if req.model not in engines:
            raise ApiError(404, f"model {req.model!r} is not served here; available: "
                           f"{', '.join(names)}", "model", "model_not_found")
        gen_request = to_gen_request(req, limits)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if not req.stream:
            result = await engines[req.model].generate(gen_request)
            if isinstance(result, ApiError):
                raise result
            return JSONResponse(completion_body(rid, created, req.model, result.choices,
                                                result.prompt_tokens, result.completion_tokens))
        items = engines[req.model].stream(gen_request)
        # The first piece (or the result) before the headers: a refused request is still a 4xx.
        first = await anext(items)
        if isinstance(first, ApiError):
            raise first
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        events = _events(_Chunks(rid, created, req.model), req.n, first, items, include_usage)
        return StreamingResponse(_closing(events, items), media_type="text/event-stream")

    return app


def _add_error_handlers(app: FastAPI) -> None:
    """Every error leaves as OpenAI's error body."""

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, e: ApiError) -> JSONResponse:
        return JSONResponse(error_body(e), status_code=e.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
        err = ApiError(e.status_code, str(e.detail), None, _HTTP_CODES.get(e.status_code))
        return JSONResponse(error_body(err), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def _server_error(_: Request, e: Exception) -> JSONResponse:
        log.exception("internal error")
        err = ApiError(500, f"internal error: {type(e).__name__}", None, None, "server_error")
        return JSONResponse(error_body(err), status_code=500)


def _auth_check(token: str | None):
    """A request check: the bearer token must equal `token` (None: every request passes)."""

    def check_auth(request: Request) -> None:
        if token is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, value = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(value.encode(), token.encode()):
            raise ApiError(401, "missing or wrong bearer token: send Authorization: Bearer <token>",
                           None, "invalid_api_key")

    return check_auth


async def _closing(events: AsyncIterator[str], items: AsyncIterator) -> AsyncIterator[str]:
    """`events`, then `items` closed however the response ends: a client that disconnects
    mid-answer ends its request in the engine (vLLM aborts it) now, not when collected."""
    try:
        async for event in events:
            yield event
    finally:
        await items.aclose()


@dataclass(frozen=True)
class _Chunks:
    """One response's SSE chunks (OpenAI's chat.completion.chunk)."""

    rid: str
    created: int
    model: str

    def __call__(self, index: int | None, delta: dict | None = None,
                 finish_reason: str | None = None, usage: dict | None = None) -> str:
        return _sse(chunk_body(self.rid, self.created, self.model, index, delta, finish_reason,
                               usage))


async def _events(chunk: _Chunks, n: int, first: object, items: AsyncIterator,
                  include_usage: bool) -> AsyncIterator[str]:
    """OpenAI's SSE framing of an answer as it is generated: a role chunk per choice, a chunk
    per text piece as the engine hands it out, then each choice's finish reason, the usage if
    asked, [DONE]. Final text an engine did not hand out in pieces (an engine that does
    not stream) follows its last piece."""
    for i in range(n):
        yield chunk(i, {"role": "assistant", "content": ""})
    sent = [""] * n
    item = first
    try:
        while isinstance(item, tuple):
            choice, piece = item
            sent[choice] += piece
            yield chunk(choice, {"content": piece})
            item = await anext(items)
    except Exception as e:  # headers are gone: the error travels as an event, OpenAI's way
        log.exception("a streamed request failed")
        item = ApiError(500, f"internal error: {type(e).__name__}", None, None, "server_error")
    if isinstance(item, ApiError):
        yield _sse(error_body(item))
        yield "data: [DONE]\n\n"
        return
    for i, (text, reason) in enumerate(item.choices):
        if text.startswith(sent[i]) and len(text) > len(sent[i]):
            yield chunk(i, {"content": text[len(sent[i]):]})
        yield chunk(i, {}, reason)
    if include_usage:
        yield chunk(None, usage={"prompt_tokens": item.prompt_tokens,
                                 "completion_tokens": item.completion_tokens,
                                 "total_tokens": item.prompt_tokens + item.completion_tokens})
    yield "data: [DONE]\n\n"


def local_engine(kind: str, path: str, limits: LimitsConfig) -> Engine:
    """The model at `path` served in this process: hf behind a LocalEngine; vllm's backend is an
    engine itself (AsyncLLM batches the requests it is given)."""
    backend = make_backend(kind, path, limits)
    return backend if kind == "vllm" else LocalEngine(backend)


def local_app(cfg: ServeConfig) -> FastAPI:
    """Every model of `cfg` loaded in this process (no Ray): tests and in-process benchmarks.
    With the vllm backend, keep one event loop for all requests (`with TestClient(app)`)."""
    engines = {name: local_engine(cfg.backend, path, cfg.limits)
               for name, path in cfg.models.items()}
    return create_app(engines, cfg.limits, resolve_token(cfg.auth_token_env))
