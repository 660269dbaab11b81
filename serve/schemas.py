"""The OpenAI chat-completions wire format: request models, response and chunk bodies, errors.

Requests are validated strictly (no "5" for 5, no true for 1) and unknown fields are refused, so
a parameter this server does not implement (e.g. presence_penalty) is an explicit 400 instead of
silently doing nothing. Every error leaves as `{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

__all__ = [
    "ApiError",
    "ImageURL",
    "ContentPart",
    "Message",
    "StreamOptions",
    "ChatRequest",
    "error_body",
    "from_validation_error",
    "completion_body",
    "chunk_body",
]

MAX_SEED = 2**63 - 1


class ApiError(Exception):
    """A request the server refuses: HTTP status + OpenAI error fields. Picklable (crosses Ray)."""

    def __init__(
        self, status: int, message: str, param: str | None = None, code: str | None = None,
        type: str = "invalid_request_error",
    ) -> None:
        super().__init__(status, message, param, code, type)
        self.status, self.message, self.param, self.code, self.type = (
            status, message, param, code, type)

    def __str__(self) -> str:
        return f"{self.status} {self.code}: {self.message}"


def error_body(err: ApiError) -> dict[str, Any]:
    return {"error": {"message": err.message, "type": err.type, "param": err.param,
                      "code": err.code}}


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class ImageURL(_Strict):
    url: str  # data:image/...;base64,... (remote URLs are refused: the server has no network)
    detail: Literal["auto", "low", "high"] = "auto"  # accepted for compatibility; no effect


class ContentPart(_Strict):
    type: Literal["text", "image_url"]
    text: str | None = None
    image_url: ImageURL | None = None

    @model_validator(mode="after")
    def _field_for_type(self) -> ContentPart:
        if self.type == "text" and self.text is None:
            raise ValueError("a part of type 'text' needs a 'text' string")
        if self.type == "image_url" and self.image_url is None:
            raise ValueError("a part of type 'image_url' needs an 'image_url' object with a url")
        return self


class Message(_Strict):
    role: Literal["system", "user", "assistant"]
    content: list[ContentPart]
    name: str | None = None  # accepted for compatibility; not shown to the model

    @field_validator("content", mode="before")
    @classmethod
    def _string_is_one_text_part(cls, v: Any) -> Any:
        # OpenAI allows a plain string; one field type keeps error locations readable.
        return [{"type": "text", "text": v}] if isinstance(v, str) else v


class StreamOptions(_Strict):
    include_usage: bool = False


class ChatRequest(_Strict):
    model: str = Field(min_length=1)
    messages: list[Message] = Field(min_length=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)  # 0: greedy
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # the newer name; wins when both given
    n: int = Field(1, ge=1)
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # accepted for compatibility; not used

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, v: str | list[str] | None) -> list[str] | None:
        stops = [v] if isinstance(v, str) else v
        if stops is not None and (len(stops) > 4 or any(not s for s in stops)):
            raise ValueError("expected at most 4 non-empty strings")
        return stops


_CODES = {"missing": "missing_required_parameter", "extra_forbidden": "unknown_parameter"}


def _param(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def from_validation_error(e: ValidationError) -> ApiError:
    """The first pydantic error as a 400 naming the parameter, e.g. messages[0].content[1]."""
    first = e.errors(include_url=False)[0]
    param = _param(first["loc"])
    kind = first["type"]
    code = _CODES.get(kind, "invalid_type" if kind.endswith("_type") else "invalid_value")
    msg = first["msg"].removeprefix("Value error, ")
    return ApiError(400, f"{param or 'body'}: {msg}", param or None, code)


def completion_body(
    rid: str, created: int, model: str, choices: list[tuple[str, str]], prompt_tokens: int,
    completion_tokens: int,
) -> dict[str, Any]:
    """A chat.completion object; `choices` are (text, finish_reason) in index order."""
    return {
        "id": rid, "object": "chat.completion", "created": created, "model": model,
        "choices": [
            {"index": i, "message": {"role": "assistant", "content": text},
             "finish_reason": reason, "logprobs": None}
            for i, (text, reason) in enumerate(choices)
        ],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens},
    }


def chunk_body(
    rid: str, created: int, model: str, index: int | None, delta: dict[str, str] | None = None,
    finish_reason: str | None = None, usage: dict[str, int] | None = None,
) -> dict[str, Any]:
    """A chat.completion.chunk; index None gives the final usage chunk (choices: [])."""
    body: dict[str, Any] = {"id": rid, "object": "chat.completion.chunk", "created": created,
                            "model": model, "choices": []}
    if index is not None:
        body["choices"] = [{"index": index, "delta": delta or {}, "finish_reason": finish_reason,
                            "logprobs": None}]
    if usage is not None:
        body["usage"] = usage
    return body
