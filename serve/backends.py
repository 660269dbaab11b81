"""Generation backends behind one method: `generate(requests) -> one result or ApiError each`.

Both are nsft_ray/generation.py's (chat prompt, sampling, stop strings, end of sequence, padding
and vLLM's CPU/GPU settings live there); this file adds serving's rules:

- hf: generation.HFGenerator on the model loaded by `nsft_ray.models.load_vlm`; requests with the
  same sampling settings run as one left-padded batch (a seeded request alone).
- vllm: generation.VLLMGenerator with multimodal prompts; each request keeps its own sampling.

`generate(requests, on_text)` hands the text of each request that asked to `stream` to
`on_text(request index, choice index, piece)` while it is generated (hf; vllm's whole answers come
at the end, see VLLMBackend), every piece before it returns; the pieces of a choice concatenate
to its final text.

Both count prompt tokens with the model's processor and refuse a request whose prompt + max_tokens
exceeds the context length with a 400 for that request only: one bad request never fails its
batch. torch, transformers and vllm are imported only when a backend is built.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from jinja2 import TemplateError
from PIL import Image

from nsft_ray.generation import Completion, Sampling, apply_stop
from serve.config import LimitsConfig
from serve.schemas import ApiError

__all__ = [
    "Sampling",
    "GenRequest",
    "GenResult",
    "OnText",
    "Backend",
    "HFBackend",
    "VLLMBackend",
    "BACKENDS",
    "make_backend",
    "apply_stop",
]


@dataclass
class GenRequest:
    """One chat: messages in chat-template form, images in the order of their placeholders."""

    messages: list[dict]  # {"role", "content": [{"type": "text", "text"} | {"type": "image"}]}
    images: list[Image.Image]
    sampling: Sampling
    stream: bool = False  # hand the text out while it is generated (`on_text`)


@dataclass
class GenResult:
    choices: list[tuple[str, str]]  # (text, finish_reason "stop" | "length"), n of them
    prompt_tokens: int
    completion_tokens: int  # over all choices, end-of-turn token included


OnText = Callable[[int, int, str], None]  # (request index, choice index, text piece)


class Backend(Protocol):
    context_length: int  # prompt + completion tokens one request may use

    def generate(self, requests: list[GenRequest],
                 on_text: OnText | None = None) -> list[GenResult | ApiError]: ...


def _context_length(config: Any, max_context: int) -> int:
    positions = config.get_text_config().max_position_embeddings
    return min(positions, max_context) if max_context else positions


class _Prompts:
    """Prompt-token counting and the context-length check, shared by both backends."""

    def __init__(self, processor: Any) -> None:
        if not getattr(processor, "chat_template", None):
            raise ValueError("the model's processor has no chat_template; cannot render chats")
        self.processor = processor

    def prepare(
        self, requests: list[GenRequest], context_length: int
    ) -> tuple[list[tuple[int, int]], dict[int, ApiError]]:
        """-> [(index, prompt_tokens)] of requests that fit, {index: error} of the rest."""
        from nsft_ray.generation import encode_chats

        ok, errors = [], {}
        for i, r in enumerate(requests):
            try:
                # One encode per request: a batch encode could not tell which one is too long.
                n_prompt = len(encode_chats(self.processor, [r.messages], [r.images])
                               ["input_ids"][0])
            except (TemplateError, ValueError) as e:
                # E.g. a template without a system role, or a text part holding the image
                # placeholder ("<image>") so that placeholders and images no longer match.
                errors[i] = ApiError(400, f"messages: the model's chat template or processor "
                                     f"refuses this chat: {e}", "messages", "invalid_value")
                continue
            wanted = n_prompt + r.sampling.max_new_tokens
            if wanted > context_length:
                errors[i] = ApiError(
                    400,
                    f"This model's maximum context length is {context_length} tokens; the request "
                    f"asks for {wanted} ({n_prompt} in the messages, "
                    f"{r.sampling.max_new_tokens} in the completion). Shorten the messages or "
                    "lower max_tokens.",
                    "messages", "context_length_exceeded",
                )
            else:
                ok.append((i, n_prompt))
        return ok, errors


def _result(completions: list[Completion], n_prompt: int) -> GenResult:
    return GenResult([(c.text, c.finish_reason) for c in completions], n_prompt,
                     sum(len(c.token_ids) for c in completions))


def _listener(on_text: OnText, request: int) -> Callable[[int, str], None]:
    return lambda choice, piece: on_text(request, choice, piece)


class HFBackend:
    """generation.HFGenerator on one model; same-settings requests share a batch."""

    def __init__(self, path: str, limits: LimitsConfig) -> None:
        from nsft_ray.generation import HFGenerator
        from nsft_ray.models import load_vlm

        model, self.processor = load_vlm(path)
        self.gen = HFGenerator(model, self.processor)
        self.prompts = _Prompts(self.processor)
        self.context_length = _context_length(model.config, limits.max_context)

    def generate(self, requests: list[GenRequest],
                 on_text: OnText | None = None) -> list[GenResult | ApiError]:
        ok, errors = self.prompts.prepare(requests, self.context_length)
        results: list[GenResult | ApiError | None] = [errors.get(i) for i in range(len(requests))]
        groups: dict[tuple, list[tuple[int, int]]] = {}
        for i, n_prompt in ok:
            r = requests[i]
            # The seed reseeds torch's global generator: a seeded request runs alone.
            key = (bool(r.images), r.sampling, i if r.sampling.seed is not None else -1)
            groups.setdefault(key, []).append((i, n_prompt))
        for (_, sampling, _), members in groups.items():
            listeners = {} if on_text is None else {
                k: _listener(on_text, i) for k, (i, _) in enumerate(members)
                if requests[i].stream}
            out = self.gen.complete([requests[i].messages for i, _ in members],
                                    [requests[i].images for i, _ in members], sampling,
                                    listeners)
            for (i, n_prompt), completions in zip(members, out, strict=True):
                results[i] = _result(completions, n_prompt)
        return results  # type: ignore[return-value]


class VLLMBackend:
    """generation.VLLMGenerator on one model folder; every request keeps its own sampling.

    vllm.LLM returns whole answers: a streaming request gets its text in one piece at the end.
    """

    def __init__(self, path: str, limits: LimitsConfig) -> None:
        from transformers import AutoConfig

        from nsft_ray.generation import VLLMGenerator

        context_length = _context_length(AutoConfig.from_pretrained(path), limits.max_context)
        self.gen = VLLMGenerator(path, max_model_len=context_length,
                                 max_images=max(1, limits.max_images))
        self.prompts = _Prompts(self.gen.processor)
        self.context_length = context_length

    def generate(self, requests: list[GenRequest],
                 on_text: OnText | None = None) -> list[GenResult | ApiError]:
        # on_text is not called: the caller sends a streaming request's text at the end.
        ok, errors = self.prompts.prepare(requests, self.context_length)
        results: list[GenResult | ApiError | None] = [errors.get(i) for i in range(len(requests))]
        if not ok:
            return results  # type: ignore[return-value]
        out = self.gen.complete([requests[i].messages for i, _ in ok],
                                [requests[i].images for i, _ in ok],
                                [requests[i].sampling for i, _ in ok])
        for (i, n_prompt), completions in zip(ok, out, strict=True):
            results[i] = _result(completions, n_prompt)
        return results  # type: ignore[return-value]


BACKENDS: dict[str, type] = {"hf": HFBackend, "vllm": VLLMBackend}


def make_backend(kind: str, path: str, limits: LimitsConfig) -> Backend:
    """Build the backend named `kind` ("hf" or "vllm") on the model folder `path`."""
    if kind not in BACKENDS:
        raise ValueError(f"backend={kind!r}: expected one of {', '.join(BACKENDS)}")
    return BACKENDS[kind](path, limits)
