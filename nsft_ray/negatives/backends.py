"""LLM backends for the LLM constructor, behind one method: `complete(prompts) -> replies`.

Each prompt is sent as one user message of a chat; each reply is the generated text, or the
ConstructionError that kept this prompt from getting one (a timeout, an HTTP error), so one bad
request costs one row, not the batch.

- openai: any OpenAI-compatible server (vLLM serve, Ray Serve, a hosted API), chat completions
  over plain urllib with a per-request timeout; requests of a batch run in parallel threads.
- transformers: a local causal LM folder; batched generate() with the tokenizer's chat template.
- vllm: `vllm.LLM` on a local folder; on CPU with the settings proven in ENVIRONMENT.md.
Both local backends are nsft_ray/generation.py's (prompt, sampling, stopping and padding live
there); torch, transformers and vllm are imported only when their backend is built.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Protocol

from nsft_ray.config import LLMConfig
from nsft_ray.negatives.constructors import ConstructionError

if TYPE_CHECKING:
    from nsft_ray.generation import Sampling

__all__ = [
    "Reply",
    "LLMBackend",
    "OpenAIBackend",
    "TransformersBackend",
    "VLLMBackend",
    "BACKENDS",
    "make_backend",
]

Reply = str | ConstructionError


class LLMBackend(Protocol):
    def complete(self, prompts: list[str]) -> list[Reply]: ...


def _chat(prompt: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}]


class OpenAIBackend:
    """Chat completions from an OpenAI-compatible URL (cfg.base_url, cfg.model)."""

    def __init__(self, cfg: LLMConfig) -> None:
        self.cfg = cfg
        self.url = cfg.base_url.rstrip("/") + "/chat/completions"
        self.headers = {"Content-Type": "application/json"}
        key = os.environ.get(cfg.api_key_env, "") if cfg.api_key_env else ""
        if key:
            self.headers["Authorization"] = f"Bearer {key}"

    def complete(self, prompts: list[str]) -> list[Reply]:
        if not prompts:
            return []
        workers = max(1, min(self.cfg.max_parallel_requests, len(prompts)))
        with ThreadPoolExecutor(max_workers=workers) as pool:
            return list(pool.map(self._one, prompts))

    def _one(self, prompt: str) -> Reply:
        body = {
            "model": self.cfg.model,
            "messages": _chat(prompt),
            "temperature": self.cfg.temperature,
            "max_tokens": self.cfg.max_tokens,
        }
        request = urllib.request.Request(
            self.url, data=json.dumps(body).encode(), headers=self.headers, method="POST"
        )
        timeout = self.cfg.timeout_s
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                data = json.loads(response.read())
        except TimeoutError:
            return ConstructionError("llm_timeout", f"no reply from {self.url} in {timeout} s")
        except urllib.error.HTTPError as e:
            return ConstructionError("llm_http_error", f"{self.url}: HTTP {e.code} {e.reason}")
        except urllib.error.URLError as e:
            if isinstance(e.reason, TimeoutError):
                return ConstructionError("llm_timeout", f"no reply from {self.url} in {timeout} s")
            return ConstructionError("llm_unreachable", f"{self.url}: {e.reason}")
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            return ConstructionError("llm_bad_response", f"{self.url}: reply is not JSON: {e}")
        try:
            content = data["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            detail = f"{self.url}: no choices[0].message.content in {str(data)[:200]}"
            return ConstructionError("llm_bad_response", detail)
        return content or ""


def _sampling(cfg: LLMConfig) -> Sampling:
    from nsft_ray.generation import Sampling  # torch only when a local backend is built

    return Sampling(max_new_tokens=cfg.max_tokens, temperature=cfg.temperature)


class TransformersBackend:
    """A local causal LM (cfg.model: a folder) with batched generation (generation.HFGenerator)."""

    def __init__(self, cfg: LLMConfig) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from nsft_ray.generation import HFGenerator

        self.cfg = cfg
        device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = torch.float32 if device == "cpu" else "auto"
        model = AutoModelForCausalLM.from_pretrained(cfg.model, dtype=dtype).to(device).eval()
        self.gen = HFGenerator(model, AutoTokenizer.from_pretrained(cfg.model))

    def complete(self, prompts: list[str]) -> list[Reply]:
        replies: list[Reply] = []
        size = max(1, self.cfg.generation_batch_size)
        for start in range(0, len(prompts), size):
            batch = [_chat(p) for p in prompts[start : start + size]]
            replies += [row[0].text for row in self.gen.complete(batch, None, _sampling(self.cfg))]
        return replies


class VLLMBackend:
    """`vllm.LLM` on a local folder (cfg.model), through generation.VLLMGenerator."""

    def __init__(self, cfg: LLMConfig) -> None:
        from nsft_ray.generation import VLLMGenerator

        self.cfg = cfg
        self.gen = VLLMGenerator(cfg.model)

    def complete(self, prompts: list[str]) -> list[Reply]:
        if not prompts:
            return []
        out = self.gen.complete([_chat(p) for p in prompts], None, _sampling(self.cfg))
        return [row[0].text for row in out]


BACKENDS: dict[str, Any] = {
    "openai": OpenAIBackend,
    "transformers": TransformersBackend,
    "vllm": VLLMBackend,
}


def make_backend(cfg: LLMConfig) -> LLMBackend:
    """Build the backend named by cfg.backend."""
    if cfg.backend not in BACKENDS:
        raise ValueError(f"llm.backend: {cfg.backend!r} is not one of {', '.join(BACKENDS)}")
    if cfg.backend != "openai" and not cfg.model:
        raise ValueError(f"llm.model: backend {cfg.backend!r} needs a local model folder")
    return BACKENDS[cfg.backend](cfg)
