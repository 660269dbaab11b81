"""The OpenAI-compatible FastAPI app, independent of Ray Serve.

    app = create_app({"base": LocalEngine(make_backend("hf", path, limits))}, limits)

Routes: POST /v1/chat/completions, GET /v1/models, GET /health, GET / (the playground page).
The app validates and decodes everything (JSON, types, limits, base64 images) before a request
reaches an engine; an engine is anything with `async generate(GenRequest) -> GenResult | ApiError`:
a LocalEngine in-process (tests, benchmarks) or a Ray Serve deployment handle (serve/app.py).
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
import re
import threading
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Protocol

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from PIL import Image
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from serve.backends import Backend, GenRequest, GenResult, Sampling, make_backend
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
    "resolve_token",
    "parse_request",
    "to_gen_request",
    "decode_image_url",
]

log = logging.getLogger(__name__)
PLAYGROUND = Path(__file__).parent / "static" / "index.html"


class Engine(Protocol):
    async def generate(self, request: GenRequest) -> GenResult | ApiError: ...


class LocalEngine:
    """A backend in this process; one generate() at a time (the model is not shared by threads)."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self._lock = threading.Lock()

    async def generate(self, request: GenRequest) -> GenResult | ApiError:
        return await asyncio.to_thread(self._one, request)

    def _one(self, request: GenRequest) -> GenResult | ApiError:
        with self._lock:
            return self.backend.generate([request])[0]


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
    return GenRequest(messages=messages, images=images, sampling=sampling)


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


def _pieces(text: str) -> list[str]:
    """Word-sized stream pieces whose concatenation is exactly `text`."""
    return re.findall(r"\s*\S+|\s+", text)


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
        result = await engines[req.model].generate(to_gen_request(req, limits))
        if isinstance(result, ApiError):
            raise result
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        usage = {"prompt_tokens": result.prompt_tokens,
                 "completion_tokens": result.completion_tokens,
                 "total_tokens": result.prompt_tokens + result.completion_tokens}
        if not req.stream:
            return JSONResponse(completion_body(rid, created, req.model, result.choices,
                                                result.prompt_tokens, result.completion_tokens))
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return StreamingResponse(
            _events(rid, created, req.model, result.choices, usage if include_usage else None),
            media_type="text/event-stream")

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


async def _events(rid: str, created: int, model: str, choices, usage: dict | None
                  ) -> AsyncIterator[str]:
    """OpenAI's SSE framing of finished answers. The answer is complete before the first chunk:
    batching in the model replica and vllm.LLM give whole answers, so this is not token-level
    latency."""
    for i, (text, reason) in enumerate(choices):
        yield _sse(chunk_body(rid, created, model, i, {"role": "assistant", "content": ""}))
        for piece in _pieces(text):
            yield _sse(chunk_body(rid, created, model, i, {"content": piece}))
        yield _sse(chunk_body(rid, created, model, i, {}, reason))
    if usage is not None:
        yield _sse(chunk_body(rid, created, model, None, usage=usage))
    yield "data: [DONE]\n\n"


def local_app(cfg: ServeConfig) -> FastAPI:
    """Every model of `cfg` loaded in this process (no Ray): tests and in-process benchmarks."""
    engines = {name: LocalEngine(make_backend(cfg.backend, path, cfg.limits))
               for name, path in cfg.models.items()}
    return create_app(engines, cfg.limits, resolve_token(cfg.auth_token_env))
