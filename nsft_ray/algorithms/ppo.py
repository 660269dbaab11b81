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

Models resident: four (actor, critic, reward, reference), plus the rollout engine's actor copy.
Simplifications: one image per prompt; token means over a mini-batch (not per sequence); dropout
stays off (models in eval mode) so that rho = 1 exactly before the first update.
Tensors: B sequences, P prompt tokens (left-padded), R response tokens (right-padded).
Everything here is plain torch; ray_glue/ppo.py spreads it over Ray actors.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from PIL import Image
from torch import Tensor, nn
from transformers import GenerationConfig, PreTrainedModel, ProcessorMixin

from nsft_ray.collate import encode_prompt
from nsft_ray.config import PPOConfig
from nsft_ray.logprobs import IGNORE_INDEX, entropy_from_logits, token_logprobs
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
from nsft_ray.models import to_model_inputs

__all__ = [
    "MODELS_RESIDENT", "Experience", "Sequences", "actor_loss", "build_sequences", "critic_loss",
    "image_token_ids", "last_token_mask", "make_experience", "ppo_update", "prompt_indices",
    "response_logprobs", "response_values", "sample_responses", "sequence_scores", "state_digest",
    "token_rewards",
]

MODELS_RESIDENT = 4
Metrics = dict[str, float]


@dataclass
class Sequences:
    """(left-padded prompt | right-padded response) sequences and their image inputs."""

    inputs: dict[str, Tensor]  # the VLM's forward inputs: input_ids, attention_mask (B, P+R), ...
    prompt_len: int  # P
    action_mask: Tensor  # (B, R) bool: True on response tokens (eos included), False on padding

    def __len__(self) -> int:
        return self.action_mask.shape[0]

    def select(self, rows: Tensor) -> Sequences:
        return Sequences({k: v[rows] for k, v in self.inputs.items()}, self.prompt_len,
                         self.action_mask[rows])

    def to(self, device: torch.device | str) -> Sequences:
        return Sequences({k: v.to(device) for k, v in self.inputs.items()}, self.prompt_len,
                         self.action_mask.to(device))


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


def _cut_after_eos(ids: list[int], eos_id: int) -> list[int]:
    return ids[: ids.index(eos_id) + 1] if eos_id in ids else ids


def image_token_ids(processor: ProcessorMixin) -> list[int]:
    """Token ids a response must never contain: the image placeholder the processor expands.

    Rollout engines suppress them. A trained VLM practically never samples them; a random tiny
    one does (1 in |V| per token), and the training forward would then fail.
    """
    token_id = getattr(processor, "image_token_id", None)
    return [int(token_id)] if token_id is not None else []


@torch.no_grad()
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
    """Response token ids per prompt with HF generate, cut after the first eos (kept).

    Greedy decoding runs one prompt at a time: with no padding, the argmax cannot differ from an
    unpadded engine's (vLLM) because of padding round-off, which is what the sync check compares.
    """
    tok = processor.tokenizer
    config = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=not greedy,
        temperature=None if greedy else temperature, top_p=None if greedy else top_p,
        top_k=None if greedy else 0, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
        suppress_tokens=image_token_ids(processor) or None,
    )
    groups = [[i] for i in range(len(prompts))] if greedy else [list(range(len(prompts)))]
    if seed is not None:
        torch.manual_seed(seed)
    out: list[list[int]] = []
    for rows in groups:
        enc = to_model_inputs(
            encode_prompt(processor, [images[i] for i in rows], [prompts[i] for i in rows]), model)
        ids = model.generate(**enc, generation_config=config)[:, enc["input_ids"].shape[1]:]
        out += [_cut_after_eos(r, tok.eos_token_id) for r in ids.tolist()]
    return out


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
    logits = model(**seq.inputs, logits_to_keep=r + 1).logits  # (B, R + 1, V)
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
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    exp: Experience,
    loss_fn: Callable[[nn.Module, Experience], tuple[Tensor, Metrics]],
    *,
    epochs: int,
    mini_batch_size: int,
    max_grad_norm: float,
    seed: int,
    reduce_grads: Callable[[nn.Module], None] | None = None,
) -> Metrics:
    """`epochs` passes over `exp` in shuffled mini-batches, one optimizer step each.

    `reduce_grads` averages gradients over data-parallel replicas between backward and step
    (every replica must take the same number of steps: len(exp) % mini_batch_size == 0).
    Returns the metrics averaged over the steps, plus lr and grad_norm.
    """
    if len(exp) % mini_batch_size:
        raise ValueError(f"{len(exp)} sequences do not split into mini-batches of "
                         f"{mini_batch_size}; make the batch a multiple of mini_batch_size")
    generator = torch.Generator().manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    totals: dict[str, float] = {}
    steps = 0
    for _ in range(epochs):
        for rows in torch.randperm(len(exp), generator=generator).split(mini_batch_size):
            loss, metrics = loss_fn(model, exp.select(rows))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if reduce_grads is not None:
                reduce_grads(model)
            if max_grad_norm > 0:
                metrics["grad_norm"] = float(nn.utils.clip_grad_norm_(params, max_grad_norm))
            metrics["lr"] = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            for k, v in metrics.items():
                totals[k] = totals.get(k, 0.0) + v
            steps += 1
    optimizer.zero_grad(set_to_none=True)
    return {k: v / steps for k, v in totals.items()}


def state_digest(model: nn.Module) -> str:
    """sha256 of every parameter and buffer (by name): equal digests, equal weights."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]
