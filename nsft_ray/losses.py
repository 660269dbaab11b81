"""Loss functions for SFT, DPO, reward modelling and PPO: pure functions of tensors.

nSFT is two SFT terms (chosen, corrective), each a token mean over the step, weighted by the
objective in algorithms/nsft.py; tests/test_loop.py checks a whole step of it against Hugging
Face's loss on each subset.

Every loss returns `(loss, metrics)`: `loss` is a scalar tensor to minimise and `metrics` maps
unprefixed names to detached scalar tensors (the algorithm adds its prefix, e.g. `dpo/`).
Shapes: B batch, T tokens (aligned to `labels[:, 1:]`, see `nsft_ray.logprobs`), V vocabulary.
One function per variant; `KL_ESTIMATORS` maps config names to the KL estimator functions.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

Metrics = dict[str, Tensor]

__all__ = [
    "KL_ESTIMATORS",
    "bradley_terry_loss",
    "dpo_conservative_loss",
    "dpo_robust_loss",
    "dpo_sigmoid_loss",
    "entropy_bonus",
    "gae",
    "hinge_loss",
    "ipo_loss",
    "kl_k1",
    "kl_k2",
    "kl_k3",
    "kl_penalty",
    "masked_mean",
    "masked_sum",
    "ppo_policy_loss",
    "ppo_value_loss",
    "whiten",
]


# --------------------------------------------------------------------------- masked reductions


def masked_sum(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Sum of `x` where `mask` (bool or 0/1, same shape) is set; over `dim`, or everything."""
    if mask.shape != x.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} must equal x shape {tuple(x.shape)}")
    kept = x * mask.to(x.dtype)
    return kept.sum() if dim is None else kept.sum(dim=dim)


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of `x` over the positions `mask` keeps; 0 (not NaN) where nothing is kept."""
    count = masked_sum(torch.ones_like(x), mask, dim)
    return masked_sum(x, mask, dim) / count.clamp(min=1.0)


def whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """Standardise `x` to mean 0, std 1 over `mask` (unbiased std); masked-out entries become 0.

    With `shift_mean=False` the mean is added back (only the scale changes), as PPO implementations
    do for rewards.
    """
    count = mask.sum()
    if count < 2:
        raise ValueError(f"whiten needs at least 2 masked entries, mask keeps {int(count)}")
    mean = masked_mean(x, mask)
    var = masked_sum((x - mean) ** 2, mask) / (count - 1)  # Bessel's correction
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask.to(x.dtype)


# --------------------------------------------------------------------------- KL to a reference
# Per-token estimators of KL(pi || pi_ref) from tokens sampled from pi (Schulman, "Approximating
# KL divergence", 2020), with r = pi_ref(y) / pi(y), log r = ref_logps - logps:
#   k1 = -log r                unbiased, high variance, can be negative
#   k2 = (log r)^2 / 2         biased (exact to second order), low variance, >= 0
#   k3 = (r - 1) - log r       unbiased, low variance, >= 0


def kl_k1(logps: Tensor, ref_logps: Tensor) -> Tensor:
    """k1 = -log r = log pi - log pi_ref, elementwise (Schulman 2020)."""
    return logps - ref_logps


def kl_k2(logps: Tensor, ref_logps: Tensor) -> Tensor:
    """k2 = (log r)^2 / 2, elementwise (Schulman 2020)."""
    return 0.5 * (ref_logps - logps) ** 2


def kl_k3(logps: Tensor, ref_logps: Tensor) -> Tensor:
    """k3 = (r - 1) - log r, elementwise (Schulman 2020; GRPO's KL term)."""
    log_r = ref_logps - logps
    return torch.expm1(log_r) - log_r  # expm1 keeps precision when r is close to 1


KL_ESTIMATORS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "k1": kl_k1,
    "k2": kl_k2,
    "k3": kl_k3,
}


def kl_penalty(
    logps: Tensor,
    ref_logps: Tensor,
    mask: Tensor,
    estimator: Callable[[Tensor, Tensor], Tensor] = kl_k3,
) -> tuple[Tensor, Metrics]:
    """Token-mean KL(pi || pi_ref) estimate over `mask`; (B, T) log-probs of the sampled tokens.

    `ref_logps` come from a frozen reference and carry no gradient; `estimator` is one of
    `kl_k1`, `kl_k2`, `kl_k3` (look names up in `KL_ESTIMATORS`).
    """
    per_token = estimator(logps, ref_logps.detach())
    loss = masked_mean(per_token, mask)
    return loss, {"kl": loss.detach()}


# --------------------------------------------------------------------------- DPO family
# Inputs: summed (or, for IPO, averaged) log-probs of the chosen / rejected responses, shape (B,),
# under the policy and the frozen reference. h is the difference of log-ratios:
#   h = (log pi(y_w) - log pi_ref(y_w)) - (log pi(y_l) - log pi_ref(y_l)).


def _preference_margin(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float,
) -> tuple[Tensor, Metrics]:
    """h (B,) and the implicit-reward metrics beta * (log pi - log pi_ref) of every variant."""
    shape = policy_chosen_logps.shape
    others = (policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    if len(shape) != 1 or any(t.shape != shape for t in others):
        raise ValueError(
            "policy/ref chosen/rejected logps must all be (B,), got "
            f"{[tuple(t.shape) for t in (policy_chosen_logps, *others)]}"
        )
    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    chosen_rewards = beta * chosen_logratios.detach()
    rejected_rewards = beta * rejected_logratios.detach()
    metrics = {
        "rewards_chosen": chosen_rewards.mean(),
        "rewards_rejected": rejected_rewards.mean(),
        "reward_margin": (chosen_rewards - rejected_rewards).mean(),
        "reward_accuracy": (chosen_rewards > rejected_rewards).float().mean(),
    }
    return chosen_logratios - rejected_logratios, metrics


def dpo_sigmoid_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float,
) -> tuple[Tensor, Metrics]:
    """DPO (Rafailov et al., NeurIPS 2023, Eq. 7): mean of -log sigmoid(beta * h)."""
    h, metrics = _preference_margin(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta
    )
    loss = -F.logsigmoid(beta * h).mean()
    return loss, {"loss": loss.detach(), **metrics}


def dpo_conservative_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float,
    label_smoothing: float,
) -> tuple[Tensor, Metrics]:
    """Conservative DPO, cDPO (Mitchell, 2023 note): -(1-e) log s(beta h) - e log s(-beta h).

    DPO with labels assumed flipped with probability e = `label_smoothing` in [0, 0.5]; the loss
    is minimised at a finite h, so it stops pushing the margin once sigmoid(beta h) = 1 - e.
    """
    if not 0.0 <= label_smoothing <= 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5] for cDPO, got {label_smoothing}")
    h, metrics = _preference_margin(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta
    )
    eps = label_smoothing
    per_pair = -(1 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)
    loss = per_pair.mean()
    return loss, {"loss": loss.detach(), **metrics}


def dpo_robust_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float,
    label_smoothing: float,
) -> tuple[Tensor, Metrics]:
    """Robust DPO, rDPO (Chowdhury et al., ICML 2024, Eq. 8), unbiased under label noise e:

        L = [(1 - e) * l(h) - e * l(-h)] / (1 - 2e),   l(h) = -log sigmoid(beta * h),

    with e = `label_smoothing` in [0, 0.5). Same formula as TRL's loss_type="robust".
    """
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5) for rDPO, got {label_smoothing}")
    h, metrics = _preference_margin(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta
    )
    eps = label_smoothing
    clean = -F.logsigmoid(beta * h)
    flipped = -F.logsigmoid(-beta * h)
    loss = (((1 - eps) * clean - eps * flipped) / (1 - 2 * eps)).mean()
    return loss, {"loss": loss.detach(), **metrics}


def ipo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float,
) -> tuple[Tensor, Metrics]:
    """IPO (Azar et al., AISTATS 2024, Eq. 17): mean of (h - 1/(2 beta))^2, beta is the paper's tau.

    Expects *length-averaged* log-probs (`sequence_logprobs(..., average=True)`), as TRL does and
    as the IPO authors used: with summed log-probs h grows with response length and the fixed
    target 1/(2 beta) would mean different things for short and long answers.
    """
    h, metrics = _preference_margin(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta
    )
    loss = ((h - 1.0 / (2.0 * beta)) ** 2).mean()
    return loss, {"loss": loss.detach(), **metrics}


def hinge_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float,
) -> tuple[Tensor, Metrics]:
    """SLiC-HF hinge (Zhao et al., 2023, Eq. 2, with the reference log-ratio): relu(1 - beta h)."""
    h, metrics = _preference_margin(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta
    )
    loss = torch.relu(1.0 - beta * h).mean()
    return loss, {"loss": loss.detach(), **metrics}


# --------------------------------------------------------------------------- reward model


def bradley_terry_loss(
    chosen_rewards: Tensor, rejected_rewards: Tensor, margin: Tensor | None = None
) -> tuple[Tensor, Metrics]:
    """Bradley-Terry reward-model loss: mean of -log sigmoid(r_c - r_r - m); rewards (B,).

    Ouyang et al. 2022 (InstructGPT, Eq. 1); the optional per-pair `margin` m (B,) is Llama 2's
    (Touvron et al. 2023, Eq. 2). Accuracy counts ties as wrong.
    """
    if chosen_rewards.shape != rejected_rewards.shape:
        raise ValueError(
            f"chosen_rewards {tuple(chosen_rewards.shape)} and rejected_rewards "
            f"{tuple(rejected_rewards.shape)} must have the same shape"
        )
    diff = chosen_rewards - rejected_rewards
    if margin is not None:
        diff = diff - margin
    loss = -F.logsigmoid(diff).mean()
    with torch.no_grad():
        metrics = {
            "loss": loss.detach(),
            "accuracy": (chosen_rewards > rejected_rewards).float().mean(),
            "reward_margin": (chosen_rewards - rejected_rewards).mean(),
            "rewards_chosen": chosen_rewards.mean(),
            "rewards_rejected": rejected_rewards.mean(),
        }
    return loss, metrics


# --------------------------------------------------------------------------- PPO


def ppo_policy_loss(
    logps: Tensor, old_logps: Tensor, advantages: Tensor, mask: Tensor, clip_eps: float
) -> tuple[Tensor, Metrics]:
    """PPO clipped surrogate (Schulman et al. 2017, Eq. 7), negated and token-mean over `mask`.

    L = mean_t max(-A_t * rho_t, -A_t * clip(rho_t, 1 - eps, 1 + eps)),  rho_t = exp(logp - old).
    All inputs (B, T). `approx_kl` is k2 of the old and new log-probs; `clip_fraction` is the
    share of tokens where the clipped term is the active one.
    """
    log_ratio = logps - old_logps.detach()
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        metrics = {
            "policy_loss": loss.detach(),
            "clip_fraction": masked_mean((clipped > unclipped).float(), mask),
            "approx_kl": masked_mean(kl_k2(logps, old_logps), mask),
            "ratio": masked_mean(ratio, mask),
        }
    return loss, metrics


def ppo_value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip_eps: float
) -> tuple[Tensor, Metrics]:
    """Clipped value loss (as in OpenAI baselines' PPO2): 0.5 * mean max((V - R)^2, (V_clip - R)^2).

    V_clip = old_V + clip(V - old_V, -eps, eps); token-mean over `mask`; all inputs (B, T).
    """
    clipped_values = old_values + torch.clamp(values - old_values, -clip_eps, clip_eps)
    err = (values - returns) ** 2
    err_clipped = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(err, err_clipped), mask)
    with torch.no_grad():
        metrics = {
            "value_loss": loss.detach(),
            "value_clip_fraction": masked_mean((err_clipped > err).float(), mask),
        }
    return loss, metrics


def entropy_bonus(entropy: Tensor, mask: Tensor, coef: float) -> tuple[Tensor, Metrics]:
    """-coef * token-mean entropy over `mask` (B, T): adding it to the loss rewards exploration."""
    mean_entropy = masked_mean(entropy, mask)
    return -coef * mean_entropy, {"entropy": mean_entropy.detach()}


@torch.no_grad()
def gae(
    rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016, Eq. 16): (advantages, returns).

    delta_t = r_t + gamma * V_{t+1} - V_t;  A_t = delta_t + gamma * lam * A_{t+1};  R_t = A_t + V_t.
    rewards, values, mask (B, T). Only positions in `mask` form the episode: masked positions
    (prompt, padding) are skipped by the recursion and get A = R = 0, and the value after the last
    valid token is 0 (terminal). A nonzero reward on a masked position raises, since it would be
    silently dropped. The loop runs backwards over T, vectorised over B.
    """
    if not rewards.shape == values.shape == mask.shape or rewards.ndim != 2:
        raise ValueError(
            f"rewards, values, mask must all be (B, T), got {tuple(rewards.shape)}, "
            f"{tuple(values.shape)}, {tuple(mask.shape)}"
        )
    keep = mask.bool()
    if bool((rewards[~keep] != 0).any()):
        raise ValueError("rewards are nonzero on positions where mask is False; they would be lost")
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros_like(rewards[:, 0])  # terminal: V = 0 after the last valid token
    next_adv = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        adv_t = delta + gamma * lam * next_adv
        valid = keep[:, t]
        advantages[:, t] = torch.where(valid, adv_t, 0.0)
        # A masked position passes the next valid token's value and advantage through unchanged.
        next_value = torch.where(valid, values[:, t], next_value)
        next_adv = torch.where(valid, adv_t, next_adv)
    returns = (advantages + values) * keep.to(values.dtype)
    return advantages, returns
