"""nsft_ray.losses: closed-form values worked out by hand, then oracles (HF, TRL), invariants."""

import math

import pytest
import torch

from nsft_ray.logprobs import (
    IGNORE_INDEX,
    sequence_logprobs,
    target_mask,
    token_logprobs,
)
from nsft_ray.losses import (
    KL_ESTIMATORS,
    bradley_terry_loss,
    dpo_conservative_loss,
    dpo_robust_loss,
    dpo_sigmoid_loss,
    entropy_bonus,
    gae,
    hinge_loss,
    ipo_loss,
    kl_k1,
    kl_k2,
    kl_k3,
    kl_penalty,
    masked_mean,
    masked_sum,
    ppo_policy_loss,
    ppo_value_loss,
    whiten,
)

LOG2 = math.log(2.0)


def close(actual, expected, tol=1e-6):
    torch.testing.assert_close(
        torch.as_tensor(actual, dtype=torch.float32),
        torch.as_tensor(expected, dtype=torch.float32),
        atol=tol,
        rtol=tol,
    )


def tiny_llama(seed: int):
    """1-layer Llama, hidden 32, vocab 50, built from a config offline."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=50,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=None,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


# --------------------------------------------------------------------------- masked helpers


def test_masked_sum_and_mean_by_hand():
    """x = [[1, 2, 3], [4, 5, 6]], mask keeps 1, 3, 5: sum 9, mean 3; row means 2 and 5."""
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[1, 0, 1], [0, 1, 0]])
    close(masked_sum(x, mask), 9.0)
    close(masked_mean(x, mask), 3.0)
    close(masked_mean(x, mask.bool(), dim=1), [2.0, 5.0])
    close(masked_mean(x, torch.zeros_like(mask)), 0.0)  # empty mask: 0, not NaN
    with pytest.raises(ValueError, match="mask shape"):
        masked_mean(x, mask[:, :2])


def test_whiten_gives_mean_zero_std_one_over_mask():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 9, generator=g) * 5 + 3
    mask = torch.rand(4, 9, generator=g) > 0.3
    w = whiten(x, mask)
    kept = w[mask]
    close(kept.mean(), 0.0, tol=1e-5)
    close(kept.std(), 1.0, tol=1e-5)  # unbiased, as whiten documents
    assert (w[~mask] == 0).all()
    # shift_mean=False only rescales: the mean is kept.
    w_keep = whiten(x, mask, shift_mean=False)
    close(w_keep[mask].mean(), x[mask].mean(), tol=1e-5)
    close(w_keep[mask].std(), 1.0, tol=1e-5)
    with pytest.raises(ValueError, match="at least 2"):
        whiten(x, torch.zeros_like(mask))


# --------------------------------------------------------------------------- KL estimators


def test_kl_estimators_by_hand():
    """log pi = log 0.5, log pi_ref = log 0.25, so r = 1/2, log r = -log 2:
    k1 = log 2, k2 = (log 2)^2 / 2, k3 = (1/2 - 1) + log 2 = log 2 - 1/2."""
    lp, ref = torch.tensor(math.log(0.5)), torch.tensor(math.log(0.25))
    close(kl_k1(lp, ref), LOG2)
    close(kl_k2(lp, ref), LOG2**2 / 2)
    close(kl_k3(lp, ref), LOG2 - 0.5)
    assert KL_ESTIMATORS == {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}


@pytest.mark.parametrize("spread", [0.1, 1.0])
def test_kl_estimator_expectations_by_exact_enumeration(spread):
    """E_{y~p}[k(y)] = sum_y p(y) k(y). k1 and k3 are unbiased: E = KL(p || q) exactly.
    k2 matches KL to second order: close for nearby p, q (spread 0.1), biased for far ones."""
    g = torch.Generator().manual_seed(7)
    logp = torch.log_softmax(torch.randn(6, generator=g, dtype=torch.float64), 0)
    logq = torch.log_softmax(logp + spread * torch.randn(6, generator=g, dtype=torch.float64), 0)
    p = logp.exp()
    exact = (p * (logp - logq)).sum()
    assert exact > 0
    torch.testing.assert_close((p * kl_k1(logp, logq)).sum(), exact)
    torch.testing.assert_close((p * kl_k3(logp, logq)).sum(), exact)
    k2_mean = (p * kl_k2(logp, logq)).sum()
    if spread < 0.5:
        torch.testing.assert_close(k2_mean, exact, rtol=0.05, atol=0)
    else:
        assert abs(k2_mean - exact) / exact > 0.05
    assert (kl_k2(logp, logq) >= 0).all() and (kl_k3(logp, logq) >= 0).all()
    assert (kl_k1(logp, logq) < 0).any()  # k1 is unbiased but single samples can be negative


def test_kl_k3_monte_carlo_has_lower_variance_than_k1():
    g = torch.Generator().manual_seed(3)
    logp = torch.log_softmax(torch.randn(5, generator=g, dtype=torch.float64), 0)
    logq = torch.log_softmax(logp + 0.3 * torch.randn(5, generator=g, dtype=torch.float64), 0)
    samples = torch.multinomial(logp.exp(), 200_000, replacement=True, generator=g)
    k1, k3 = kl_k1(logp[samples], logq[samples]), kl_k3(logp[samples], logq[samples])
    exact = (logp.exp() * (logp - logq)).sum()
    for k in (k1, k3):
        assert abs(k.mean() - exact) < 4 * k.std() / math.sqrt(len(k))
    assert k3.var() < k1.var()


def test_kl_penalty_is_a_masked_token_mean_and_ref_gets_no_grad():
    """Per-token k1 = [1, 2, 100] with the third token masked: mean 1.5."""
    logps = torch.tensor([[1.0, 2.0, 100.0]], requires_grad=True)
    ref = torch.zeros(1, 3, requires_grad=True)
    loss, metrics = kl_penalty(logps, ref, torch.tensor([[True, True, False]]), estimator=kl_k1)
    close(loss, 1.5)
    close(metrics["kl"], 1.5)
    loss.backward()
    close(logps.grad, [[0.5, 0.5, 0.0]])
    assert ref.grad is None


# --------------------------------------------------------------------------- DPO family


def _pairs(policy_chosen, policy_rejected, ref_chosen, ref_rejected):
    return tuple(
        torch.tensor(x, dtype=torch.float32)
        for x in (policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    )


def test_dpo_variants_at_policy_equal_reference():
    """policy == reference gives h = 0, so beta*h = 0 and sigmoid(0) = 1/2:
    sigmoid DPO: -log(1/2) = log 2;  cDPO: -(1-e) log(1/2) - e log(1/2) = log 2;
    rDPO: [(1-e) log 2 - e log 2] / (1-2e) = log 2;  IPO: (0 - 1/(2b))^2 = 1/(4b^2);
    hinge: relu(1 - 0) = 1. All implicit rewards are 0, accuracy 0 (ties are not wins)."""
    beta = 0.1
    inputs = _pairs([-3.0, -7.0], [-5.0, -2.0], [-3.0, -7.0], [-5.0, -2.0])
    close(dpo_sigmoid_loss(*inputs, beta)[0], LOG2)
    close(dpo_conservative_loss(*inputs, beta, label_smoothing=0.1)[0], LOG2)
    close(dpo_robust_loss(*inputs, beta, label_smoothing=0.1)[0], LOG2)
    close(ipo_loss(*inputs, beta)[0], 1 / (4 * beta**2), tol=1e-5)
    close(hinge_loss(*inputs, beta)[0], 1.0)
    metrics = dpo_sigmoid_loss(*inputs, beta)[1]
    for key in ("rewards_chosen", "rewards_rejected", "reward_margin", "reward_accuracy"):
        close(metrics[key], 0.0)


def test_dpo_variants_at_margin_two():
    """Chosen log-ratio -3 - (-4) = +1, rejected -5 - (-4) = -1, so h = 2; beta = 0.5, beta*h = 1.
    sigmoid: log(1 + e^-1) = 0.3132617;  log(1 + e) = 1.3132617.
    cDPO e=0.1: 0.9 * 0.3132617 + 0.1 * 1.3132617 = 0.4132617.
    rDPO e=0.1: (0.9 * 0.3132617 - 0.1 * 1.3132617) / 0.8 = 0.1882617.
    IPO: (2 - 1/(2*0.5))^2 = 1.   hinge: relu(1 - 1) = 0.
    rewards: chosen 0.5 * 1 = 0.5, rejected -0.5, margin 1, accuracy 1."""
    inputs = _pairs([-3.0], [-5.0], [-4.0], [-4.0])
    loss, metrics = dpo_sigmoid_loss(*inputs, 0.5)
    close(loss, 0.3132617)
    close(dpo_conservative_loss(*inputs, 0.5, label_smoothing=0.1)[0], 0.4132617)
    close(dpo_robust_loss(*inputs, 0.5, label_smoothing=0.1)[0], 0.1882617)
    close(ipo_loss(*inputs, 0.5)[0], 1.0)
    close(hinge_loss(*inputs, 0.5)[0], 0.0)
    close(metrics["rewards_chosen"], 0.5)
    close(metrics["rewards_rejected"], -0.5)
    close(metrics["reward_margin"], 1.0)
    close(metrics["reward_accuracy"], 1.0)
    # With e = 0 both smoothed variants reduce to plain DPO.
    close(dpo_conservative_loss(*inputs, 0.5, label_smoothing=0.0)[0], loss)
    close(dpo_robust_loss(*inputs, 0.5, label_smoothing=0.0)[0], loss)


def test_dpo_sigmoid_gradient_matches_paper():
    """d/d(log pi(y_w)) of -log sigmoid(beta h) = -beta * sigmoid(-beta h) (Rafailov et al., Eq. 7
    gradient); at h = 0 with beta = 0.5 that is -0.25 for chosen, +0.25 for rejected."""
    pc = torch.tensor([-3.0], requires_grad=True)
    pr = torch.tensor([-5.0], requires_grad=True)
    dpo_sigmoid_loss(pc, pr, torch.tensor([-3.0]), torch.tensor([-5.0]), 0.5)[0].backward()
    close(pc.grad, [-0.25])
    close(pr.grad, [0.25])


def test_dpo_input_errors():
    inputs = _pairs([-3.0], [-5.0], [-4.0], [-4.0])
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_robust_loss(*inputs, 0.1, label_smoothing=0.5)
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_conservative_loss(*inputs, 0.1, label_smoothing=0.7)
    with pytest.raises(ValueError, match=r"must all be \(B,\)"):
        dpo_sigmoid_loss(inputs[0], inputs[1], inputs[2], torch.zeros(2), 0.1)


def _trl_dpo_setup(tmp_dir, loss_type: str, beta: float, label_smoothing: float = 0.0):
    """TRL 1.16 DPOTrainer on a 2-row text dataset with a tiny Llama policy and reference."""
    from datasets import Dataset
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from trl import DPOConfig, DPOTrainer

    words = "<pad> <eos> <unk> the cat dog sat on mat is a red blue there no yes".split()
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    hf_tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )
    rows = [
        {"prompt": "is there a cat", "chosen": " yes there is a cat", "rejected": " no"},
        {"prompt": "the dog sat on", "chosen": " the mat", "rejected": " a red blue cat dog"},
    ]
    args = DPOConfig(
        output_dir=str(tmp_dir),
        use_cpu=True,
        report_to=[],
        loss_type=[loss_type],
        beta=beta,
        label_smoothing=label_smoothing,
        per_device_train_batch_size=2,
        bf16=False,
        fp16=False,
    )
    policy, ref = tiny_llama(seed=0), tiny_llama(seed=1)
    trainer = DPOTrainer(
        model=policy,
        ref_model=ref,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=hf_tokenizer,
    )
    return trainer, policy, ref


@pytest.mark.parametrize(
    ("loss_type", "ours", "average"),
    [
        ("sigmoid", lambda *x: dpo_sigmoid_loss(*x, 0.3), False),
        ("robust", lambda *x: dpo_robust_loss(*x, 0.3, label_smoothing=0.2), False),
        ("hinge", lambda *x: hinge_loss(*x, 0.3), False),
        ("ipo", lambda *x: ipo_loss(*x, 0.3), True),  # TRL length-averages for IPO
    ],
)
def test_dpo_family_matches_trl_dpo_trainer(tmp_path, loss_type, ours, average):
    """TRL's DPOTrainer.compute_loss on one batch (rows [chosen..., rejected...]) as the oracle;
    ours: labels = input_ids with non-completion positions -100 -> token_logprobs -> sums."""
    smoothing = 0.2 if loss_type == "robust" else 0.0
    trainer, policy, ref = _trl_dpo_setup(tmp_path, loss_type, 0.3, smoothing)
    batch = next(iter(trainer.get_train_dataloader()))
    expected = trainer.compute_loss(trainer.model, batch)

    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, IGNORE_INDEX)
    mask = target_mask(labels)

    def logps(model):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return sequence_logprobs(token_logprobs(logits, labels), mask, average=average).chunk(2)

    with torch.no_grad():
        ref_chosen, ref_rejected = logps(ref)
    policy_chosen, policy_rejected = logps(policy)
    loss, _ = ours(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    torch.testing.assert_close(loss, expected.detach(), atol=1e-6, rtol=1e-6)


# --------------------------------------------------------------------------- reward model


def test_bradley_terry_by_hand():
    """Equal rewards: -log sigmoid(0) = log 2, accuracy 0 (ties are wrong).
    r_c - r_r = 2: log(1 + e^-2) = 0.1269280; with margin 2 the loss is back to log 2."""
    loss, metrics = bradley_terry_loss(torch.tensor([1.0, -3.0]), torch.tensor([1.0, -3.0]))
    close(loss, LOG2)
    close(metrics["accuracy"], 0.0)
    chosen, rejected = torch.tensor([2.0]), torch.tensor([0.0])
    loss, metrics = bradley_terry_loss(chosen, rejected)
    close(loss, 0.1269280)
    close(metrics["accuracy"], 1.0)
    close(metrics["reward_margin"], 2.0)
    close(bradley_terry_loss(chosen, rejected, margin=torch.tensor([2.0]))[0], LOG2)
    with pytest.raises(ValueError, match="same shape"):
        bradley_terry_loss(chosen, torch.zeros(2))


# --------------------------------------------------------------------------- PPO


def test_ppo_policy_loss_by_hand():
    """eps = 0.2, the fourth token masked.
    t0: A=+1, rho=1.5: max(-1.5, -1.2) = -1.2 (clipped, no gradient)
    t1: A=-1, rho=1.5: max(+1.5, +1.2) = +1.5 (unclipped; d/dlogp = -A rho / 3 = 0.5)
    t2: A=+1, rho=0.5: max(-0.5, -0.8) = -0.5 (unclipped; d/dlogp = -0.5 / 3)
    loss = (-1.2 + 1.5 - 0.5) / 3 = -0.0666667, clip fraction 1/3,
    approx_kl = mean(0.5 * log(rho)^2) = (2 * 0.5 * log(1.5)^2 + 0.5 * log(0.5)^2) / 3."""
    old = torch.zeros(1, 4)
    logps = torch.log(torch.tensor([[1.5, 1.5, 0.5, 9.0]])).requires_grad_(True)
    advantages = torch.tensor([[1.0, -1.0, 1.0, 5.0]])
    mask = torch.tensor([[True, True, True, False]])
    loss, metrics = ppo_policy_loss(logps, old, advantages, mask, clip_eps=0.2)
    close(loss, -0.2 / 3)
    close(metrics["clip_fraction"], 1 / 3)
    close(metrics["approx_kl"], (math.log(1.5) ** 2 + 0.5 * math.log(0.5) ** 2) / 3)
    loss.backward()
    close(logps.grad, [[0.0, 0.5, -0.5 / 3, 0.0]])


def test_ppo_policy_loss_on_policy_is_minus_mean_advantage():
    """At logps == old_logps every ratio is 1: loss = -mean(A), nothing clipped, approx_kl 0."""
    advantages = torch.tensor([[0.3, -1.2, 2.0]])
    logps = torch.tensor([[-1.0, -2.0, -0.5]])
    loss, metrics = ppo_policy_loss(logps, logps, advantages, torch.ones(1, 3), clip_eps=0.2)
    close(loss, -advantages.mean())
    close(metrics["clip_fraction"], 0.0)
    close(metrics["approx_kl"], 0.0)


def test_ppo_value_loss_by_hand():
    """eps = 0.5, old values 0.
    t0: V=1, R=0.9: V_clip=0.5; max((0.1)^2, (0.4)^2) = 0.16 (clipped term active)
    t1: V=2, R=0:   V_clip=0.5; max(4, 0.25) = 4
    t2: masked.  loss = 0.5 * (0.16 + 4) / 2 = 1.04, clip fraction 1/2."""
    values = torch.tensor([[1.0, 2.0, 7.0]])
    returns = torch.tensor([[0.9, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 0]])
    loss, metrics = ppo_value_loss(values, torch.zeros(1, 3), returns, mask, clip_eps=0.5)
    close(loss, 1.04)
    close(metrics["value_clip_fraction"], 0.5)


def test_entropy_bonus_by_hand():
    """Entropies 1 and 2 kept, 9 masked, coef 0.1: -0.1 * 1.5 = -0.15."""
    loss, metrics = entropy_bonus(torch.tensor([[1.0, 2.0, 9.0]]), torch.tensor([[1, 1, 0]]), 0.1)
    close(loss, -0.15)
    close(metrics["entropy"], 1.5)


def test_gae_by_hand():
    """rewards (0, 0, 1), values 0.5 each, terminal value 0.
    gamma = lam = 1: A_t = (sum of future rewards) - V_t = 0.5 for all t; returns 1.
    lam = 0: A_t = r_t + V_{t+1} - V_t = (0, 0, 1 - 0.5) = (0, 0, 0.5); returns (0.5, 0.5, 1)."""
    rewards = torch.tensor([[0.0, 0.0, 1.0]])
    values = torch.full((1, 3), 0.5)
    mask = torch.ones(1, 3, dtype=torch.bool)
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    close(adv, [[0.5, 0.5, 0.5]])
    close(ret, [[1.0, 1.0, 1.0]])
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=0.0)
    close(adv, [[0.0, 0.0, 0.5]])
    close(ret, [[0.5, 0.5, 1.0]])


def _gae_reference(rewards, values, mask, gamma, lam):
    """Plain Python double loop: per row, run textbook GAE over the valid positions only."""
    advantages = torch.zeros_like(rewards)
    for b in range(rewards.shape[0]):
        idx = [t for t in range(rewards.shape[1]) if mask[b, t]]
        running = 0.0
        for k in reversed(range(len(idx))):
            t = idx[k]
            next_value = float(values[b, idx[k + 1]]) if k + 1 < len(idx) else 0.0
            delta = float(rewards[b, t]) + gamma * next_value - float(values[b, t])
            running = delta + gamma * lam * running
            advantages[b, t] = running
    return advantages, (advantages + values) * mask


def test_gae_matches_python_reference_with_padding():
    g = torch.Generator().manual_seed(0)
    B, T = 5, 12
    mask = torch.zeros(B, T, dtype=torch.bool)
    mask[0, :] = True  # full row
    mask[1, 3:9] = True  # prompt on the left, padding on the right
    mask[2, :4] = True  # short response, long padding
    mask[3, 2:5] = True  # two response segments separated by masked (e.g. user) tokens
    mask[3, 7:11] = True
    # row 4: nothing valid at all
    values = torch.randn(B, T, generator=g)
    rewards = torch.randn(B, T, generator=g) * mask
    adv, ret = gae(rewards, values, mask, gamma=0.99, lam=0.95)
    ref_adv, ref_ret = _gae_reference(rewards, values, mask, 0.99, 0.95)
    torch.testing.assert_close(adv, ref_adv)
    torch.testing.assert_close(ret, ref_ret)
    assert (adv[~mask] == 0).all() and (ret[~mask] == 0).all()


def test_gae_refuses_rewards_on_masked_positions():
    mask = torch.tensor([[True, True, False]])
    rewards = torch.tensor([[0.0, 0.0, 1.0]])  # reward on the padding token would be lost
    with pytest.raises(ValueError, match="mask is False"):
        gae(rewards, torch.zeros(1, 3), mask, gamma=1.0, lam=1.0)
    with pytest.raises(ValueError, match=r"\(B, T\)"):
        gae(rewards[0], torch.zeros(3), mask[0], gamma=1.0, lam=1.0)
