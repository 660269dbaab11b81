"""ppo: PPO-RLHF for VLMs (Ouyang et al. 2022; Sun et al. 2023, LLaVA-RLHF), as OpenRLHF runs it.

For prompts x (image + question) and responses y ~ pi_old(. | x) from the rollout engine, with
action a_t = y_t and state s_t = (x, y_<t) for the response tokens t = 1..T (eos included):

Experience (no gradients):
    old_logp_t = log pi_old(y_t | s_t)           actor, before this iteration's update
    ref_logp_t = log pi_ref(y_t | s_t)           reference (the frozen SFT policy)
    V_t        = V(s_t)                          critic
    s          = r_phi(x, y)                     reward model: its value head on the last token
    r_t        = -beta * KL_t + [t = T] * s      KL_t = k(old_logp_t, ref_logp_t), k = k1 | k2 | k3
    (kl_in_reward=False: r_t = [t = T] * s, and beta * KL moves into the actor's loss instead)
    delta_t = r_t + gamma * V_{t+1} - V_t,  A_t = sum_l (gamma lam)^l delta_{t+l},  R_t = A_t + V_t
    A is whitened over all response tokens of the batch.
Update, `ppo_epochs` passes over the experience in shuffled mini-batches:
    actor   L_pi = mean_t max(-A_t rho_t, -A_t clip(rho_t, 1 - eps, 1 + eps)) - c_H * H_t
                   [+ beta * KL_t],   rho_t = pi(y_t | s_t) / pi_old(y_t | s_t)
    critic  L_V  = 0.5 * mean_t max((V_t - R_t)^2, (V_old,t + clip(V_t - V_old,t, +-eps_V) - R_t)^2)

Models resident: four (actor, critic, reward, reference); under Ray the rollout engine holds one
more copy of the actor. Simplifications: one image per prompt; token means over a mini-batch (not
per sequence); dropout stays off (models in eval mode) so that rho = 1 exactly before the first
update.

The whole recipe, top to bottom:
    data         Sequences (prompt | response), Experience (one iteration's tensors)
    rollouts     build_sequences, HF sampling (sample_responses; generation.py), prompt_indices
    forwards     response_logprobs, response_values, sequence_scores
    experience   token_rewards, make_experience
    update       actor_loss, critic_loss, ppo_update (one loop.TorchEngine step per mini-batch)
    models       Actor, Critic, Reward, Reference: what each role holds and does; a Ray actor
                 (ray_glue/ppo.py) holds the same objects
    prompts      check_ppo_config, load_prompts
    roles        Roles, the interface the loop drives; InProcessRoles, every model in this process
    loop         ppo_iteration (generation -> experience -> train -> sync), run_ppo (resume,
                 checkpoints, export, summary); train_ppo_in_process(cfg) runs it without Ray,
                 ray_glue/ppo.train_ppo(cfg) with each role on its own placement group
Tensors: B sequences, P prompt tokens (left-padded), R response tokens (right-padded).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import pyarrow.parquet as pq
import torch
from PIL import Image
from torch import Tensor, nn
from transformers import AutoProcessor, PreTrainedModel, ProcessorMixin

from nsft_ray.algorithms import frozen, frozen_copy, save_policy
from nsft_ray.algorithms.reward_rules import meta_problem, rule_rewards
from nsft_ray.collate import decode_image
from nsft_ray.config import Config, OptimConfig, PPOConfig, WorldConfig, save_config
from nsft_ray.generation import HFGenerator, Sampling, encode_prompt, pad_token_id
from nsft_ray.logprobs import IGNORE_INDEX, entropy_from_logits, token_logprobs
from nsft_ray.loop import (
    Engine,
    MetricsWriter,
    TorchEngine,
    TrainState,
    current_memory_bytes,
    make_optimizer,
    make_scheduler,
    peak_memory_bytes,
    read_metrics,
)
from nsft_ray.losses import (
    KL_ESTIMATORS,
    entropy_bonus,
    gae,
    kl_penalty,
    masked_mean,
    ppo_policy_loss,
    ppo_value_loss,
    whiten,
)
from nsft_ray.models import (
    VALUE_HEAD_FILE,
    VLMWithValueHead,
    freeze,
    load_value_model,
    load_vlm,
    save_value_model,
)
from nsft_ray.negatives.claims import Vocabulary
from nsft_ray.plan import memory_split
from nsft_ray.schema import quarantine_table

__all__ = [
    "MODELS_RESIDENT", "PHASES", "Actor", "Critic", "Experience", "InProcessRoles", "Prompts",
    "Reference", "Reward", "Roles", "Sequences", "Starts", "actor_loss", "build_sequences",
    "check_ppo_config", "critic_loss", "engine_seed",
    "image_token_ids", "last_token_mask", "load_actor", "load_critic", "load_prompts",
    "load_reference", "load_reward", "make_experience", "optimizer_steps", "ppo_iteration",
    "rollout_sampling",
    "ppo_update", "prompt_indices", "prompt_rows", "response_logprobs", "response_values",
    "run_ppo", "sample_responses", "select_rows", "sequence_scores", "split_images",
    "state_digest", "token_rewards", "train_ppo_in_process",
]

MODELS_RESIDENT = 4
PHASES = ("generation", "experience", "train", "sync")  # of an iteration, timed in its metrics
Metrics = dict[str, float]
Images = dict[str, Tensor]  # the processor's image tensors (pixel_values, ...), batch-first
TOKEN_KEYS = ("input_ids", "attention_mask")  # encode_prompt's other outputs are image tensors


# --------------------------------------------------------------------------------- data


def split_images(inputs: dict[str, Tensor]) -> tuple[dict[str, Tensor], Images]:
    """encode_prompt's output -> (input_ids and attention_mask, the image tensors)."""
    return ({k: v for k, v in inputs.items() if k in TOKEN_KEYS},
            {k: v for k, v in inputs.items() if k not in TOKEN_KEYS})


def select_rows(tensors: dict[str, Tensor], rows: Tensor) -> dict[str, Tensor]:
    return {k: v[rows] for k, v in tensors.items()}


@dataclass
class Sequences:
    """(left-padded prompt | right-padded response) sequences: the VLM's forward inputs.

    The image tensors travel apart from the tokens (once per rollout batch, see `Roles.share`)
    and are attached where a model reads them (`with_images`).
    """

    inputs: dict[str, Tensor]  # input_ids, attention_mask (B, P+R) [+ image tensors]
    prompt_len: int  # P
    action_mask: Tensor  # (B, R) bool: True on response tokens (eos included), False on padding

    def __len__(self) -> int:
        return self.action_mask.shape[0]

    def select(self, rows: Tensor) -> Sequences:
        return Sequences(select_rows(self.inputs, rows), self.prompt_len, self.action_mask[rows])

    def to(self, device: torch.device | str) -> Sequences:
        return Sequences({k: v.to(device) for k, v in self.inputs.items()}, self.prompt_len,
                         self.action_mask.to(device))

    def with_images(self, images: Images) -> Sequences:
        return Sequences(self.inputs | images, self.prompt_len, self.action_mask)


@dataclass
class Experience:
    """One iteration's experience; every tensor (B, R), aligned to `seq.action_mask`."""

    seq: Sequences
    old_logps: Tensor
    ref_logps: Tensor
    values: Tensor
    rewards: Tensor
    advantages: Tensor
    returns: Tensor

    def __len__(self) -> int:
        return len(self.seq)

    def select(self, rows: Tensor) -> Experience:
        return Experience(self.seq.select(rows), *(t[rows] for t in self._tensors()))

    def to(self, device: torch.device | str) -> Experience:
        return Experience(self.seq.to(device), *(t.to(device) for t in self._tensors()))

    def with_images(self, images: Images) -> Experience:
        return Experience(self.seq.with_images(images), *self._tensors())

    def _tensors(self) -> tuple[Tensor, ...]:
        return (self.old_logps, self.ref_logps, self.values, self.rewards, self.advantages,
                self.returns)


# --------------------------------------------------------------------------------- rollouts


def build_sequences(
    prompt_inputs: dict[str, Tensor], responses: list[list[int]], pad_id: int,
    image_token_id: int | None = None,
) -> Sequences:
    """Append right-padded response token ids to left-padded prompt inputs (`encode_prompt`).

    A response must not contain the image placeholder token: the VLM would look for image
    features that do not exist (engines suppress it, see `image_token_ids`).
    """
    input_ids, attention = prompt_inputs["input_ids"], prompt_inputs["attention_mask"]
    if len(responses) != input_ids.shape[0]:
        raise ValueError(f"got {len(responses)} responses for {input_ids.shape[0]} prompts")
    empty = [i for i, r in enumerate(responses) if not r]
    if empty:
        raise ValueError(f"response {empty[0]} has no token: expected at least the eos token")
    with_image = [i for i, r in enumerate(responses) if image_token_id in r]
    if image_token_id is not None and with_image:
        raise ValueError(f"response {with_image[0]} contains the image token {image_token_id}")
    width = max(len(r) for r in responses)
    resp = torch.full((len(responses), width), pad_id, dtype=input_ids.dtype)
    action_mask = torch.zeros(len(responses), width, dtype=torch.bool)
    for i, r in enumerate(responses):
        resp[i, : len(r)] = torch.tensor(r, dtype=input_ids.dtype)
        action_mask[i, : len(r)] = True
    inputs = dict(prompt_inputs)
    inputs["input_ids"] = torch.cat([input_ids, resp], dim=1)
    inputs["attention_mask"] = torch.cat([attention, action_mask.to(attention.dtype)], dim=1)
    return Sequences(inputs, input_ids.shape[1], action_mask)


def image_token_ids(processor: ProcessorMixin) -> list[int]:
    """Token ids a response must never contain: the image placeholder the processor expands.

    Rollout engines suppress them. A trained VLM practically never samples them; a random tiny
    one does (1 in |V| per token), and the training forward would then fail.
    """
    token_id = getattr(processor, "image_token_id", None)
    return [int(token_id)] if token_id is not None else []


def rollout_sampling(processor: ProcessorMixin, *, max_new_tokens: int, greedy: bool = False,
                     temperature: float = 1.0, top_p: float = 1.0,
                     seed: int | None = None) -> Sampling:
    """The rollout engines' sampling: the image token is never generated (`image_token_ids`)."""
    return Sampling(max_new_tokens=max_new_tokens, temperature=0.0 if greedy else temperature,
                    top_p=top_p, seed=seed, banned_ids=tuple(image_token_ids(processor)))


def sample_responses(
    model: PreTrainedModel,
    processor: ProcessorMixin,
    images: list[Image.Image],
    prompts: list[str],
    *,
    max_new_tokens: int,
    greedy: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int | None = None,
) -> list[list[int]]:
    """Response token ids per (image, prompt) with HF generate, each cut after its first eos.

    Greedy decoding runs one prompt at a time: with no padding, the argmax cannot differ from an
    unpadded engine's (vLLM) because of padding round-off, which is what the sync check compares.
    """
    gen = HFGenerator(model, processor)
    s = rollout_sampling(processor, max_new_tokens=max_new_tokens, greedy=greedy,
                         temperature=temperature, top_p=top_p, seed=seed)
    if not greedy:
        return gen.token_ids(encode_prompt(processor, images, prompts), s)
    return [r for image, prompt in zip(images, prompts, strict=True)
            for r in gen.token_ids(encode_prompt(processor, [image], [prompt]), s)]


def prompt_rows(tokens: dict[str, Tensor], images: Images, rows: Tensor) -> dict[str, Tensor]:
    """Some rows of a batch's encoded prompts, as `encode_prompt` of those rows alone gives them:
    the left-padding columns no selected row needs are dropped."""
    out = select_rows(tokens, rows)
    first = int(out["attention_mask"].bool().any(dim=0).nonzero()[0])
    return {k: v[:, first:] for k, v in out.items()} | select_rows(images, rows)


def engine_seed(seed: int, rank: int) -> int:
    """The sampling seed of rollout engine `rank` in the iteration seeded `seed`."""
    return seed * 7 + rank


def prompt_indices(n_rows: int, batch: int, iteration: int, seed: int) -> list[int]:
    """Rows of iteration `iteration`: consecutive slices of a reshuffled-every-epoch stream.

    A pure function of its arguments, so a resumed run sees the same prompts as an
    uninterrupted one.
    """
    if n_rows < 1:
        raise ValueError("no prompt rows to sample from")
    out: list[int] = []
    pos = iteration * batch
    while len(out) < batch:
        epoch, offset = divmod(pos, n_rows)
        perm = torch.randperm(n_rows, generator=torch.Generator().manual_seed(seed * 7919 + epoch))
        take = perm[offset: offset + batch - len(out)].tolist()
        out += take
        pos += len(take)
    return out


# --------------------------------------------------------------------------------- forwards


def response_logprobs(
    model: nn.Module, seq: Sequences, with_entropy: bool = False, entropy_grad: bool = False
) -> tuple[Tensor, Tensor | None]:
    """log pi(y_t | s_t) (B, R), and the entropy of pi(. | s_t) (B, R) if `with_entropy`."""
    r = seq.action_mask.shape[1]
    # Only the R + 1 last positions' logits matter: position P - 1 predicts the first response
    # token. logits_to_keep spares a (B, P, V) tensor (P includes hundreds of image tokens).
    # No KV cache: nothing decodes after this pass, and without gradients (old and reference
    # log-probs) the cache would hold every layer's keys and values (benchmarks/bench_plan.py).
    logits = model(**seq.inputs, logits_to_keep=r + 1, use_cache=False).logits  # (B, R + 1, V)
    ids = seq.inputs["input_ids"]
    labels = torch.cat([ids[:, seq.prompt_len - 1: seq.prompt_len],
                        ids[:, seq.prompt_len:].masked_fill(~seq.action_mask, IGNORE_INDEX)], 1)
    logps = token_logprobs(logits, labels)
    entropy = None
    if with_entropy:
        entropy = entropy_from_logits(logits if entropy_grad else logits.detach(), seq.action_mask)
    return logps, entropy


def response_values(value_model: nn.Module, seq: Sequences) -> Tensor:
    """V(s_t) (B, R): the value head on the token *before* each response token; 0 on padding."""
    values = value_model(seq.inputs)  # (B, P + R)
    return values[:, seq.prompt_len - 1: -1] * seq.action_mask


def sequence_scores(reward_model: nn.Module, seq: Sequences) -> Tensor:
    """r_phi(x, y) (B,): the reward model's value head on each sequence's last response token."""
    values = reward_model(seq.inputs)  # (B, P + R)
    last = seq.prompt_len + seq.action_mask.sum(dim=1) - 1
    return values.gather(1, last.unsqueeze(1)).squeeze(1)


# --------------------------------------------------------------------------------- experience


def last_token_mask(action_mask: Tensor) -> Tensor:
    """(B, R) bool, True on each row's last response token (masks are right-padded)."""
    lengths = action_mask.sum(dim=1)
    if bool((lengths == 0).any()):
        raise ValueError("a response has no token; every row needs at least one")
    last = torch.zeros_like(action_mask, dtype=torch.bool)
    return last.scatter(1, (lengths - 1).unsqueeze(1), True)


def token_rewards(
    scores: Tensor, logps: Tensor, ref_logps: Tensor, action_mask: Tensor, *,
    kl_coef: float, kl_estimator: str, kl_in_reward: bool,
) -> tuple[Tensor, Tensor]:
    """Per-token rewards r_t = -kl_coef * KL_t + [t = last] * score, and KL_t; both (B, R).

    With kl_in_reward=False the KL is left out of r_t (the actor's loss carries it).
    """
    if kl_estimator not in KL_ESTIMATORS:
        raise ValueError(
            f"kl_estimator={kl_estimator!r}: expected one of {', '.join(KL_ESTIMATORS)}")
    mask = action_mask.to(logps.dtype)
    kl = KL_ESTIMATORS[kl_estimator](logps, ref_logps) * mask
    rewards = scores.to(logps.dtype).unsqueeze(1) * last_token_mask(action_mask)
    if kl_in_reward:
        rewards = rewards - kl_coef * kl
    return rewards, kl


@torch.no_grad()
def make_experience(
    seq: Sequences, old_logps: Tensor, ref_logps: Tensor, values: Tensor, scores: Tensor,
    cfg: PPOConfig,
) -> tuple[Experience, Metrics]:
    """Rewards with the KL penalty, GAE advantages and returns, whitened advantages."""
    mask = seq.action_mask
    rewards, kl = token_rewards(scores, old_logps, ref_logps, mask, kl_coef=cfg.kl_coef,
                                kl_estimator=cfg.kl_estimator, kl_in_reward=cfg.kl_in_reward)
    values = values * mask
    advantages, returns = gae(rewards, values, mask, cfg.gamma, cfg.lam)
    if cfg.whiten_advantages:
        advantages = whiten(advantages, mask)
    exp = Experience(seq, old_logps, ref_logps, values, rewards, advantages, returns)
    lengths = mask.sum(dim=1).float()
    metrics = {
        "score": scores.float().mean(),
        "kl": kl.sum(dim=1).mean(),  # per sequence: sum over its tokens
        "reward": rewards.sum(dim=1).mean(),
        "response_length": lengths.mean(),
        "value": masked_mean(values, mask),
        "return": masked_mean(returns, mask),
    }
    return exp, {k: float(v) for k, v in metrics.items()}


# --------------------------------------------------------------------------------- update


def actor_loss(model: nn.Module, exp: Experience, cfg: PPOConfig) -> tuple[Tensor, Metrics]:
    """Clipped surrogate - entropy bonus (+ kl_coef * KL when the KL is not in the reward)."""
    mask = exp.seq.action_mask
    logps, entropy = response_logprobs(model, exp.seq, with_entropy=True,
                                       entropy_grad=cfg.entropy_coef != 0)
    loss, metrics = ppo_policy_loss(logps, exp.old_logps, exp.advantages, mask, cfg.clip_eps)
    ent_loss, ent_metrics = entropy_bonus(entropy, mask, cfg.entropy_coef)
    loss = loss + ent_loss
    metrics.update(ent_metrics)
    if not cfg.kl_in_reward:
        kl_loss, kl_metrics = kl_penalty(logps, exp.ref_logps, mask,
                                         KL_ESTIMATORS[cfg.kl_estimator])
        loss = loss + cfg.kl_coef * kl_loss
        metrics["kl_loss"] = kl_metrics["kl"]
    metrics["actor_loss"] = loss.detach()
    return loss, {k: float(v) for k, v in metrics.items()}


def critic_loss(value_model: nn.Module, exp: Experience, cfg: PPOConfig) -> tuple[Tensor, Metrics]:
    """Clipped value loss against the GAE returns."""
    values = response_values(value_model, exp.seq)
    loss, metrics = ppo_value_loss(values, exp.values, exp.returns, exp.seq.action_mask,
                                   cfg.value_clip_eps)
    return loss, {k: float(v) for k, v in metrics.items()}


def ppo_update(
    engine: Engine,
    exp: Experience,
    loss_fn: Callable[[nn.Module, Experience], tuple[Tensor, Metrics]],
    *,
    epochs: int,
    mini_batch_size: int,
    seed: int,
    reduce_grads: Callable[[nn.Module], None] | None = None,
) -> Metrics:
    """`epochs` passes over `exp` in shuffled mini-batches, one optimizer step each.

    `engine` steps the optimizer (loop.TorchEngine: gradient clipping, AdamW, LR schedule).
    `reduce_grads` averages gradients over data-parallel replicas between backward and step
    (every replica must take the same number of steps: len(exp) % mini_batch_size == 0).
    Returns the metrics averaged over the steps, plus lr and grad_norm.
    """
    if len(exp) % mini_batch_size:
        raise ValueError(f"{len(exp)} sequences do not split into mini-batches of "
                         f"{mini_batch_size}; make the batch a multiple of mini_batch_size")
    generator = torch.Generator().manual_seed(seed)
    totals: dict[str, float] = {}
    steps = 0
    for _ in range(epochs):
        for rows in torch.randperm(len(exp), generator=generator).split(mini_batch_size):
            loss, metrics = loss_fn(engine.model, exp.select(rows))
            engine.backward(loss)
            if reduce_grads is not None:
                reduce_grads(engine.model)
            lr = engine.lr()  # the rate this step uses (the scheduler moves on in step)
            grad_norm = engine.step()
            if grad_norm is not None:
                metrics["grad_norm"] = grad_norm
            metrics["lr"] = lr
            for k, v in metrics.items():
                totals[k] = totals.get(k, 0.0) + v
            steps += 1
    return {k: v / steps for k, v in totals.items()}


def state_digest(model: nn.Module) -> str:
    """sha256 of every parameter and buffer (by name): equal digests, equal weights."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------------- models
# What each role holds and does. In-process the loop calls these objects directly; under Ray each
# lives in its own Ray actor (ray_glue/ppo.py), which adds only placement and data parallelism.


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


class _Trained:
    """A trained role: its model, a loop.TorchEngine (AdamW, clipping, LR schedule), its loss."""

    def __init__(self, model: nn.Module, processor: ProcessorMixin, ppo: PPOConfig,
                 optim: OptimConfig, total_steps: int,
                 loss: Callable[[nn.Module, Experience, PPOConfig], tuple[Tensor, Metrics]]):
        self.model, self.processor, self.ppo, self.loss = model, processor, ppo, loss
        optimizer = make_optimizer(model, optim)
        self.engine = TorchEngine(model, optimizer, make_scheduler(optimizer, optim, total_steps),
                                  optim.max_grad_norm)

    def update(self, exp: Experience, seed: int,
               reduce_grads: Callable[[nn.Module], None] | None = None) -> Metrics:
        # Models stay in eval mode: dropout off, so ratio = 1 before the first step.
        return ppo_update(self.engine, exp.to(_device_of(self.model)),
                          lambda model, mb: self.loss(model, mb, self.ppo),
                          epochs=self.ppo.ppo_epochs, mini_batch_size=self.ppo.mini_batch_size,
                          seed=seed, reduce_grads=reduce_grads)

    def save(self, folder: Path) -> None:
        self.engine.save(folder, {})

    def load(self, folder: Path) -> None:
        self.engine.load(folder)


class Actor(_Trained):
    """The policy pi: old log-probs and PPO updates; exported as a Hugging Face folder."""

    def __init__(self, model: PreTrainedModel, processor: ProcessorMixin, ppo: PPOConfig,
                 optim: OptimConfig, total_steps: int):
        super().__init__(model, processor, ppo, optim, total_steps, actor_loss)

    @torch.no_grad()
    def logprobs(self, seq: Sequences) -> Tensor:
        return response_logprobs(self.model, seq.to(_device_of(self.model)))[0].cpu()

    def export(self, out_dir: Path) -> None:
        save_policy(self.model, self.processor, out_dir, None)  # a folder load_vlm and vLLM load


class Critic(_Trained):
    """The value model V (VLMWithValueHead): values and clipped value-loss updates."""

    def __init__(self, model: VLMWithValueHead, processor: ProcessorMixin, ppo: PPOConfig,
                 optim: OptimConfig, total_steps: int):
        super().__init__(model, processor, ppo, optim, total_steps, critic_loss)

    @torch.no_grad()
    def values(self, seq: Sequences) -> Tensor:
        return response_values(self.model, seq.to(_device_of(self.model))).cpu()

    def export(self, out_dir: Path) -> None:
        save_value_model(self.model, out_dir, self.processor)


class Reward:
    """r_phi: a frozen value model's score on the last token, or (no model) ShapesWorld rules."""

    def __init__(self, model: nn.Module | None, processor: ProcessorMixin | None,
                 vocabulary: Vocabulary | None = None):
        self.model, self.processor, self.vocabulary = model, processor, vocabulary

    @torch.no_grad()
    def scores(self, seq: Sequences, texts: list[str], metas: list[str]) -> Tensor:
        if self.model is None:
            return torch.tensor(rule_rewards(texts, metas, self.vocabulary))
        return sequence_scores(self.model, seq.to(_device_of(self.model))).float().cpu()


class Reference:
    """pi_ref: the frozen starting policy, for the KL penalty."""

    def __init__(self, model: PreTrainedModel, processor: ProcessorMixin):
        self.model, self.processor = frozen(model), processor

    @torch.no_grad()
    def logprobs(self, seq: Sequences) -> Tensor:
        return response_logprobs(self.model, seq.to(_device_of(self.model)))[0].cpu()


@dataclass(frozen=True)
class Starts:
    """The folder each role's model starts from."""

    actor: str
    critic: str
    critic_from_actor: bool  # no critic or reward model: the actor's backbone + a fresh head
    reward: str  # empty for the rule reward
    reference: str

    @classmethod
    def of(cls, model_path: str, ppo: PPOConfig) -> Starts:
        """model.name_or_path and the ppo.*_model keys -> where each role starts."""
        return cls(
            actor=model_path,
            critic=ppo.critic_model or (ppo.reward_model if ppo.reward == "model" else model_path),
            critic_from_actor=not ppo.critic_model and ppo.reward != "model",
            reward=ppo.reward_model if ppo.reward == "model" else "",
            reference=ppo.reference_model or model_path,
        )


def optimizer_steps(ppo: PPOConfig, num_actors: int) -> int:
    """Optimizer steps of the whole run for each of a trained role's `num_actors` replicas."""
    sequences = ppo.rollout_batch_size * ppo.samples_per_prompt
    return ppo.iterations * ppo.ppo_epochs * sequences // (num_actors * ppo.mini_batch_size)


def load_actor(path: str, *, dtype: str, device: str, freeze_parts: tuple[str, ...],
               ppo: PPOConfig, optim: OptimConfig, total_steps: int, seed: int) -> Actor:
    torch.manual_seed(seed)
    model, processor = load_vlm(path, dtype=dtype, device=device)
    freeze(model, freeze_parts)  # model.freeze: as for sft, nsft and dpo
    return Actor(model, processor, ppo, optim, total_steps)


def load_critic(path: str, *, from_actor: bool, dtype: str, device: str, ppo: PPOConfig,
                optim: OptimConfig, total_steps: int, seed: int) -> Critic:
    torch.manual_seed(seed)  # the fresh value head's init
    if from_actor:  # no reward model to start from: the actor's backbone + a new head
        base, processor = load_vlm(path, dtype=dtype)
        model = VLMWithValueHead(base).to(device).eval()
    else:  # LLaVA-RLHF: the critic starts as a copy of the reward model
        model, processor = load_value_model(path, dtype=dtype, device=device)
    return Critic(model, processor, ppo, replace(optim, lr=ppo.critic_lr or optim.lr),
                  total_steps)


def load_reward(kind: str, path: str, *, dtype: str, device: str, world: WorldConfig) -> Reward:
    if kind == "rules":
        return Reward(None, None, Vocabulary.from_config(world))
    model, processor = load_value_model(path, dtype=dtype, device=device)
    return Reward(frozen(model), processor)


def load_reference(path: str, *, dtype: str, device: str) -> Reference:
    return Reference(*load_vlm(path, dtype=dtype, device=device))


# --------------------------------------------------------------------------------- prompts


def check_ppo_config(cfg: Config) -> None:
    """Raise ValueError naming the key when the PPO settings cannot work together."""
    ppo = cfg.ppo
    if not cfg.model.name_or_path:
        raise ValueError("model.name_or_path: the actor's starting checkpoint is required")
    if not cfg.train.data:
        raise ValueError("train.data: give the preference Parquet file(s) holding the prompts")
    if ppo.reward == "model" and not ppo.reward_model:
        raise ValueError("ppo.reward_model: a reward-model folder (save_value_model) is needed "
                         "for ppo.reward=model; or set ppo.reward=rules (rule-based ablation)")
    for key in ("reward_model", "critic_model"):
        path = getattr(ppo, key)
        if path and not (ppo.reward == "rules" and key == "reward_model") and not Path(
                path, VALUE_HEAD_FILE).is_file():
            raise ValueError(f"ppo.{key}: {path} has no {VALUE_HEAD_FILE}; expected a folder "
                             "written by save_value_model (the reward-model trainer's output)")
    if ppo.iterations < 1 or ppo.rollout_batch_size < 1 or ppo.samples_per_prompt < 1:
        raise ValueError("ppo.iterations, ppo.rollout_batch_size, ppo.samples_per_prompt: "
                         "expected >= 1")
    n = ppo.rollout_batch_size * ppo.samples_per_prompt
    for role in ("actor", "critic"):
        k = getattr(ppo.roles, role).num_actors
        if n % (k * ppo.mini_batch_size):
            raise ValueError(
                f"ppo.rollout_batch_size * ppo.samples_per_prompt = {n} sequences must split "
                f"evenly over ppo.roles.{role}.num_actors={k} actors in mini-batches of "
                f"ppo.mini_batch_size={ppo.mini_batch_size}")
    if ppo.engine == "vllm" and ppo.roles.rollout.num_gpus > 0 and ppo.roles.actor.num_gpus == 0:
        raise ValueError("ppo.roles.actor.num_gpus: vLLM's GPU weight transfer (NCCL) needs the "
                         "actor on a GPU too")


def load_prompts(cfg: Config) -> tuple[list[dict], list[dict]]:
    """Preference rows -> prompt rows {id, image (bytes), prompt, meta}, and quarantined rows.

    A row is quarantined (with the reason) when its prompt is empty, its image does not decode,
    or, for the rule reward, its meta lacks the scene graph and question. Files in another
    data.format than parquet (JSONL, a published layout) are read onto the contract first; only
    their prompt and image are used (a VLFeedback rating tie is still a good prompt).
    """
    # Here, not at the top: Ray's role processes import this module and never read data files
    # (nsft_ray.data's readers add ~50 MiB to each of them).
    from nsft_ray.data import READ_ERROR, read_preference_file

    keys = {"id": cfg.data.id_key, "image": cfg.data.image_key, "prompt": cfg.data.prompt_key}
    if cfg.data.format != "parquet":  # read_preference_file has mapped the columns already
        keys = {k: k for k in keys}
    rows, bad = [], []
    for path in cfg.train.data:
        if not Path(path).exists():
            raise FileNotFoundError(f"train.data: {path} does not exist")
        table = (pq.read_table(path) if cfg.data.format == "parquet"
                 else read_preference_file(path, cfg.data))
        missing = [c for c in keys.values() if c not in table.column_names]
        if missing:
            raise ValueError(f"train.data: {path} has no column {missing[0]!r} "
                             f"(columns: {', '.join(table.column_names)})")
        for r in table.to_pylist():
            row = {k: r[c] for k, c in keys.items()} | {"meta": r.get("meta") or "{}"}
            reason = None
            if not isinstance(row["prompt"], str) or not row["prompt"].strip():
                reason = "empty prompt"
            else:
                try:
                    decode_image(row["image"])
                except Exception as e:  # PIL raises many types for broken bytes
                    reason = f"image does not decode: {e!r}"
            # Our readers (not a user's Parquet) leave JSON meta, with what they could not read.
            read_error = (json.loads(row["meta"]).get(READ_ERROR)
                          if reason and cfg.data.format != "parquet" else None)
            if read_error:  # the reader knows why the prompt or image is missing: say that
                reason = f"{read_error['reason']}: {read_error['detail']}"
            if reason is None and cfg.ppo.reward == "rules":
                reason = meta_problem(row["meta"])
            if reason is None:
                rows.append(row)
            else:
                bad.append({"id": row["id"], "stage": "ppo_prompts", "reason": reason,
                            "detail": path, "row": r})
    return rows, bad


def _usable_prompts(cfg: Config, run_dir: Path) -> tuple[list[dict], int]:
    """The prompt rows to sample from, and how many were quarantined (RUN/quarantine.parquet)."""
    rows, bad = load_prompts(cfg)
    if bad:
        pq.write_table(quarantine_table(bad), run_dir / "quarantine.parquet")
    if not rows:
        raise ValueError(f"train.data: no usable prompt row ({len(bad)} quarantined, see "
                         f"{run_dir / 'quarantine.parquet'})")
    return rows, len(bad)


# --------------------------------------------------------------------------------- roles


@dataclass
class Prompts:
    """One iteration's prompts, encoded once by the loop."""

    rows: list[dict]  # {id, image (bytes), prompt, meta}: for engines with their own processor
    tokens: dict[str, Tensor]  # input_ids, attention_mask (B, P): the left-padded chat prompts
    images: Any  # the image tensors as `Roles.share` placed them (Ray: one object-store copy)


class Roles(Protocol):
    """PPO's models as the loop sees them, wherever they live.

    `InProcessRoles` (below) holds every model in this process; ray_glue/ppo.py's `RayRoles`
    puts each role on its own placement group. The calls documented as "starts" return work in
    flight: Ray's roles work at the same time until `wait` collects the results (in-process the
    work is done when the call returns). `images` is what `share` returned.
    """

    def share(self, images: Images) -> Any:
        """Place a rollout batch's image tensors where every role reads them, once."""

    def generate(self, prompts: Prompts, seed: int) -> Any:
        """Starts sampling response token ids (cut after eos) for every prompt; engine r of k
        samples its share of the rows with engine_seed(seed, r)."""

    def actor_logprobs(self, seq: Sequences, images: Any) -> Any:
        """Starts log pi_old(y_t | s_t) (B, R) under the actor."""

    def reference_logprobs(self, seq: Sequences, images: Any) -> Any:
        """Starts log pi_ref(y_t | s_t) (B, R) under the reference."""

    def critic_values(self, seq: Sequences, images: Any) -> Any:
        """Starts V(s_t) (B, R) under the critic."""

    def reward_scores(self, seq: Sequences, images: Any, texts: list[str],
                      metas: list[str]) -> Any:
        """Starts r_phi(x, y) (B,)."""

    def update_actor(self, exp: Experience, images: Any, seed: int) -> Any:
        """Starts the actor's PPO update; its result is the update's metrics."""

    def update_critic(self, exp: Experience, images: Any, seed: int) -> Any:
        """Starts the critic's update; its result is the update's metrics."""

    def wait(self, *started: Any) -> list:
        """The results of calls that were started, in order."""

    def sync_weights(self) -> Metrics:
        """Actor weights -> the rollout engines; the metrics of the check that they arrived."""

    def save(self, folder: Path) -> None:
        """Actor and critic (model, optimizer, scheduler) -> folder/actor, folder/critic."""

    def load(self, folder: Path) -> None:
        """What `save` wrote -> actor and critic (every replica)."""

    def export(self, run_dir: Path) -> None:
        """The actor -> RUN/model (a Hugging Face folder); the critic -> RUN/critic."""

    def digests(self) -> dict[str, list[str]]:
        """state_digest of the actor's and of the reference's weights, per replica."""

    def peak_memory(self) -> dict[str, int]:
        """Peak memory in bytes, per process group that holds models."""

    def runtime_memory(self) -> dict[str, int]:
        """Per process group, the bytes it held before loading any model (the runtime)."""

    def placement(self) -> dict:
        """Where the roles run: placement_groups, role_group and roles (summary.json keys)."""


class InProcessRoles:
    """Every model in this one process, on the GPU if there is one: tests, laptops, debugging.

    Rollouts are sampled from the actor itself with HF generate: there is no engine copy, so the
    weight sync has nothing to do and nothing to check (no ppo/sync_greedy_match metric). The
    reference is a frozen copy of the starting actor unless ppo.reference_model names another.
    """

    def __init__(self, cfg: Config):
        ppo, dtype, seed = cfg.ppo, cfg.model.dtype, cfg.run.seed
        if ppo.engine != "hf":
            raise ValueError(f"ppo.engine={ppo.engine!r}: in-process rollouts are sampled from "
                             "the actor with HF generate; set ppo.engine=hf, or run vLLM engines "
                             "with ray_glue.ppo.train_ppo")
        self.ppo, self.device = ppo, "cuda" if torch.cuda.is_available() else "cpu"
        self.runtime_bytes = current_memory_bytes(self.device)  # before any model loads
        at, steps = Starts.of(cfg.model.name_or_path, ppo), optimizer_steps(ppo, 1)
        self.actor = load_actor(at.actor, dtype=dtype, device=self.device,
                                freeze_parts=cfg.model.freeze, ppo=ppo, optim=cfg.optim,
                                total_steps=steps, seed=seed)
        self.critic = load_critic(at.critic, from_actor=at.critic_from_actor, dtype=dtype,
                                  device=self.device, ppo=ppo, optim=cfg.optim, total_steps=steps,
                                  seed=seed)
        self.reward = load_reward(ppo.reward, at.reward, dtype=dtype, device=self.device,
                                  world=cfg.world)
        self.reference = (Reference(frozen_copy(self.actor.model), self.actor.processor)
                          if at.reference == at.actor
                          else load_reference(at.reference, dtype=dtype, device=self.device))

    def share(self, images: Images) -> Images:
        return images  # every model reads these very tensors

    def generate(self, prompts: Prompts, seed: int) -> list[list[int]]:
        s = rollout_sampling(self.actor.processor, max_new_tokens=self.ppo.max_new_tokens,
                             temperature=self.ppo.temperature, top_p=self.ppo.top_p,
                             seed=engine_seed(seed, 0))
        return HFGenerator(self.actor.model, self.actor.processor).token_ids(
            prompts.tokens | prompts.images, s)

    def actor_logprobs(self, seq: Sequences, images: Images) -> Tensor:
        return self.actor.logprobs(seq.with_images(images))

    def reference_logprobs(self, seq: Sequences, images: Images) -> Tensor:
        return self.reference.logprobs(seq.with_images(images))

    def critic_values(self, seq: Sequences, images: Images) -> Tensor:
        return self.critic.values(seq.with_images(images))

    def reward_scores(self, seq: Sequences, images: Images, texts: list[str],
                      metas: list[str]) -> Tensor:
        return self.reward.scores(seq.with_images(images), texts, metas)

    def update_actor(self, exp: Experience, images: Images, seed: int) -> Metrics:
        return self.actor.update(exp.with_images(images), seed)

    def update_critic(self, exp: Experience, images: Images, seed: int) -> Metrics:
        return self.critic.update(exp.with_images(images), seed)

    def wait(self, *started: Any) -> list:
        return list(started)

    def sync_weights(self) -> Metrics:
        return {}

    def save(self, folder: Path) -> None:
        self.actor.save(folder / "actor")
        self.critic.save(folder / "critic")

    def load(self, folder: Path) -> None:
        self.actor.load(folder / "actor")
        self.critic.load(folder / "critic")

    def export(self, run_dir: Path) -> None:
        self.actor.export(run_dir / "model")
        self.critic.export(run_dir / "critic")

    def digests(self) -> dict[str, list[str]]:
        return {"actor": [state_digest(self.actor.model)],
                "reference": [state_digest(self.reference.model)]}

    def peak_memory(self) -> dict[str, int]:
        return {"process": peak_memory_bytes(self.device)}

    def runtime_memory(self) -> dict[str, int]:
        return {"process": self.runtime_bytes}

    def placement(self) -> dict:
        here = [{"pid": os.getpid()}]
        return {"placement_groups": {}, "role_group": {}, "roles": {
            r: here for r in ("actor", "critic", "reward", "reference", "rollout")}}


# --------------------------------------------------------------------------------- loop


def ppo_iteration(it: int, roles: Roles, rows: list[dict], processor: ProcessorMixin,
                  ppo: PPOConfig, run_seed: int) -> dict:
    """Iteration `it`: generation -> experience -> train -> sync; returns its metrics line."""
    seed, tok = run_seed * 100_000 + it, processor.tokenizer
    clock = [time.perf_counter()]
    batch = [rows[i] for i in prompt_indices(len(rows), ppo.rollout_batch_size, it, run_seed)
             for _ in range(ppo.samples_per_prompt)]
    # The pixels are made once per rollout batch and placed once; every role reads that copy.
    tokens, images = split_images(encode_prompt(
        processor, [decode_image(r["image"]) for r in batch], [r["prompt"] for r in batch]))
    prompts = Prompts(batch, tokens, roles.share(images))
    [responses] = roles.wait(roles.generate(prompts, seed))
    texts = tok.batch_decode(responses, skip_special_tokens=True)
    clock.append(time.perf_counter())

    seq = build_sequences(tokens, responses, pad_token_id(tok),
                          getattr(processor, "image_token_id", None))
    old_logps, ref_logps, values, scores = roles.wait(  # the four models at the same time
        roles.actor_logprobs(seq, prompts.images), roles.reference_logprobs(seq, prompts.images),
        roles.critic_values(seq, prompts.images),
        roles.reward_scores(seq, prompts.images, texts, [r["meta"] for r in batch]))
    exp, exp_metrics = make_experience(seq, old_logps, ref_logps, values, scores, ppo)
    clock.append(time.perf_counter())

    actor_metrics, critic_metrics = roles.wait(  # actor and critic at the same time
        roles.update_actor(exp, prompts.images, seed),
        roles.update_critic(exp, prompts.images, seed))
    clock.append(time.perf_counter())

    sync_metrics = roles.sync_weights()
    clock.append(time.perf_counter())

    seconds = {p: clock[i + 1] - clock[i] for i, p in enumerate(PHASES)}
    memory = roles.peak_memory()
    return {
        "step": it + 1, "iteration": it + 1, "samples": len(batch),
        **{f"ppo/{k}": v for k, v in exp_metrics.items()},
        **{f"ppo/actor/{k}": v for k, v in actor_metrics.items()},
        **{f"ppo/critic/{k}": v for k, v in critic_metrics.items()},
        **{f"ppo/{k}": v for k, v in sync_metrics.items()},
        **{f"ppo/time/{k}_s": round(v, 4) for k, v in seconds.items()},
        **{f"ppo/memory/{k}_bytes": v for k, v in memory.items()},
        "ppo/samples_per_s": len(batch) / sum(seconds.values()),
        "peak_memory_bytes": sum(memory.values()),
        "example": texts[0],
    }


OpenRoles = Callable[[Config, list[dict]], contextlib.AbstractContextManager[Roles]]


def run_ppo(cfg: Config, open_roles: OpenRoles) -> dict:
    """Run PPO on the roles `open_roles(cfg, sync_check_rows)` holds open; return the summary
    (also written to RUN/summary.json). Re-running with the same run.dir resumes from its
    latest complete checkpoint.

    Run folder: RUN/config.yaml, metrics.jsonl, metrics.csv, tb/, quarantine.parquet (if any bad
    row), checkpoints/iter_000002/{actor/, critic/, state.json}, model/ (the actor, a Hugging
    Face folder), critic/ (value model), summary.json.
    """
    check_ppo_config(cfg)
    ppo, run_dir = cfg.ppo, Path(cfg.run.dir).resolve()
    save_config(cfg, run_dir)
    rows, quarantined = _usable_prompts(cfg, run_dir)
    processor = AutoProcessor.from_pretrained(cfg.model.name_or_path)
    with open_roles(cfg, rows[: ppo.sync_check_prompts]) as roles:
        state = _resume(roles, run_dir)
        start = replace(state)
        digests = {f"{r}_start": d for r, d in roles.digests().items()}
        roles.sync_weights()  # a resumed actor differs from the engine's copy
        writer, last, loop_start = MetricsWriter(run_dir), {}, time.perf_counter()
        while state.step < ppo.iterations:
            last = ppo_iteration(state.step, roles, rows, processor, ppo, cfg.run.seed)
            writer.write(last)
            state.step += 1
            state.samples += last["samples"]
            state.tokens += round(last["samples"] * last["ppo/response_length"])  # response tokens
            if (ppo.checkpoint_every and state.step % ppo.checkpoint_every == 0) or (
                    state.step == ppo.iterations):
                _checkpoint(run_dir, roles, state, cfg.train.num_to_keep)
        train_seconds = time.perf_counter() - loop_start
        writer.close()
        roles.export(run_dir)
        digests |= {f"{r}_end": d for r, d in roles.digests().items()}
        memory, placement = roles.peak_memory(), roles.placement()
        runtime = roles.runtime_memory()
    lines = [m for m in read_metrics(run_dir) if m.get("step", 0) > start.step]
    samples = state.samples - start.samples
    summary = {
        "algo": "ppo",
        "iterations": ppo.iterations,
        "resumed_from_iteration": start.step if start.step else None,
        "rows": len(rows),
        "quarantined": quarantined,
        "samples": samples,
        "train_seconds": round(train_seconds, 2),
        "samples_per_s": round(samples / max(train_seconds, 1e-9), 3),
        "phase_seconds": {p: round(sum(m[f"ppo/time/{p}_s"] for m in lines), 3) for p in PHASES},
        "models_resident": MODELS_RESIDENT if ppo.reward == "model" else MODELS_RESIDENT - 1,
        "peak_memory_bytes": sum(memory.values()),
        "peak_memory_bytes_per_role": memory,
        "memory": memory_split("ppo", cfg, memory, runtime),  # measured vs runtime, and plan
        **placement,
        "digests": digests,
        "engine": ppo.engine,
        "reward": ppo.reward,
        "final_metrics": {k: v for k, v in last.items() if k != "example"},
        "model": str(run_dir / "model"),
        "critic": str(run_dir / "critic"),
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary


def _checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints (state.json is written last), oldest first."""
    return sorted(p for p in (run_dir / "checkpoints").glob("iter_*")
                  if (p / "state.json").is_file())


def _checkpoint(run_dir: Path, roles: Roles, state: TrainState, keep: int) -> None:
    folder = run_dir / "checkpoints" / f"iter_{state.step:06d}"
    roles.save(folder)  # folder/actor, folder/critic: loop.TorchEngine states
    (folder / "state.json").write_text(json.dumps({"iteration": state.step,
                                                   "train_state": state.to_dict()}))
    for old in _checkpoints(run_dir)[: -max(keep, 1)]:
        shutil.rmtree(old)


def _resume(roles: Roles, run_dir: Path) -> TrainState:
    """The latest complete checkpoint -> the roles; its TrainState (step = iterations done).

    A resumed run repeats the iterations after its checkpoint: their old metric lines go.
    """
    done = _checkpoints(run_dir)
    if not done:
        return TrainState()
    roles.load(done[-1])
    state = TrainState(**json.loads((done[-1] / "state.json").read_text())["train_state"])
    kept = [m for m in read_metrics(run_dir) if m.get("step", 0) <= state.step]
    if (run_dir / "metrics.jsonl").exists():
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in kept))
    return state


def train_ppo_in_process(cfg: Config) -> dict:
    """PPO with every model in this Python process (no Ray): the loop, run folder, checkpoints
    and summary of ray_glue/ppo.train_ppo. Returns the summary."""
    return run_ppo(cfg, lambda c, _check_rows: contextlib.nullcontext(InProcessRoles(c)))
