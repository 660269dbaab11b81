"""The two generation backends of serving, on nsft_ray/generation.py (chat prompt, sampling, stop
strings, end of sequence, padding and vLLM's CPU/GPU settings live there):

- hf: `HFBackend.generate(requests, on_text) -> one result or ApiError each`, a batch function
  for serve/batching.py: generation.HFGenerator on the model loaded by `nsft_ray.models.load_vlm`;
  requests with the same sampling settings run as one left-padded batch (a seeded request
  alone). The text of each request that asked to `stream` goes to `on_text(request index, choice
  index, piece)` while it is generated, every piece before `generate` returns; a request whose
  `on_text` returns False (its client has gone) stops generating.
- vllm: `VLLMBackend`, generation.AsyncVLLMGenerator with multimodal prompts: an engine itself
  (`generate(request)`, `stream(request)`), each request sent to vLLM as it arrives and batched
  there continuously, each keeping its own sampling.

A choice's pieces concatenate to its final text. Both count prompt tokens with the model's
processor and refuse a request whose prompt + max_tokens exceeds the context length with a 400
for that request only: one bad request never fails its batch. torch, transformers and vllm are
imported only when a backend is built.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import aclosing
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


# (request index, choice index, text piece) -> False once that request's caller has gone, which
# stops its generation (None: still listening). Called with "" too, which only asks that.
OnText = Callable[[int, int, str], "bool | None"]


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


def _listener(on_text: OnText, request: int) -> Callable[[int, str], bool | None]:
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
    """generation.AsyncVLLMGenerator (vLLM's AsyncLLM) on one model folder.

    Not a batch function like HFBackend: every request goes to vLLM on its own, as it arrives,
    and joins the batch the engine is running (continuous batching); vLLM schedules, so no
    Batcher sits in front. It is an engine of serve/api.py itself: `generate(request)` and
    `stream(request)`, called from one event loop (the engine's output task lives there).
    """

    def __init__(self, path: str, limits: LimitsConfig, max_batch_size: int = 0) -> None:
        from transformers import AutoConfig

        from nsft_ray.generation import AsyncVLLMGenerator

        context_length = _context_length(AutoConfig.from_pretrained(path), limits.max_context)
        # max_batch_size: the most requests vLLM runs at once (its max_num_seqs; 0: vLLM's).
        self.gen = AsyncVLLMGenerator(
            path, max_model_len=context_length, max_images=max(1, limits.max_images),
            engine_extra={"max_num_seqs": max_batch_size} if max_batch_size else None)
        self.prompts = _Prompts(self.gen.processor)
        self.context_length = context_length
        self._ids = itertools.count()
        # The context check encodes each prompt and image (milliseconds) off the event loop,
        # which meanwhile hands vLLM's outputs to the other requests. One thread: a fast
        # tokenizer used by two threads at once fails ("Already borrowed").
        self._prompt_thread = ThreadPoolExecutor(max_workers=1,
                                                 thread_name_prefix="vllm-context-check")

    async def stream(self, request: GenRequest) -> AsyncIterator:
        """(choice, text piece)s while `request` is generated, then its GenResult or ApiError."""
        ok, errors = await asyncio.get_running_loop().run_in_executor(
            self._prompt_thread, self.prompts.prepare, [request], self.context_length)
        if errors:
            yield errors[0]
            return
        [(_, n_prompt)] = ok
        # aclosing: a caller that stops reading (a client gone) closes vLLM's request now, which
        # aborts it, rather than whenever the generators are collected.
        async with aclosing(self.gen.stream(request.messages, request.images, request.sampling,
                                            request_id=f"serve-{next(self._ids)}")) as items:
            async for item in items:
                yield item if isinstance(item, tuple) else _result(item, n_prompt)

    async def generate(self, request: GenRequest) -> GenResult | ApiError:
        items = [item async for item in self.stream(request)]
        return items[-1]  # the pieces come first

    def close(self) -> None:
        self.gen.close()
        self._prompt_thread.shutdown(wait=False)


BACKENDS: dict[str, type] = {"hf": HFBackend, "vllm": VLLMBackend}


def make_backend(kind: str, path: str, limits: LimitsConfig,
                 max_batch_size: int = 0) -> Backend | VLLMBackend:
    """Build the backend named `kind` ("hf" or "vllm") on the model folder `path`.
    `max_batch_size` caps vLLM's running batch; hf's batches are formed by serve/batching.py."""
    if kind not in BACKENDS:
        raise ValueError(f"backend={kind!r}: expected one of {', '.join(BACKENDS)}")
    if kind == "vllm":
        return VLLMBackend(path, limits, max_batch_size)
    return BACKENDS[kind](path, limits)
