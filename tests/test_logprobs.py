"""nsft_ray.logprobs: alignment, masking, values against hand computations and oracles."""

import math

import pytest
import torch

from nsft_ray.logprobs import (
    IGNORE_INDEX,
    entropy_from_logits,
    num_target_tokens,
    sequence_logprobs,
    target_mask,
    token_logprobs,
)


def _random_batch(seed: int = 0, B: int = 3, T: int = 7, V: int = 11):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g) * 3
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, :3] = IGNORE_INDEX  # a prompt
    labels[1, -2:] = IGNORE_INDEX  # right padding
    return logits, labels


def _naive(logits, labels):
    """Textbook shift + log_softmax + gather, the reference for token_logprobs."""
    shift_logits, shift_labels = logits[:, :-1], labels[:, 1:]
    mask = shift_labels != IGNORE_INDEX
    logp = torch.log_softmax(shift_logits, -1)
    picked = logp.gather(-1, shift_labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return picked * mask


def test_alignment_by_hand():
    """Vocabulary 2, one sequence of 3 tokens; logits[t] predicts labels[t + 1].

    logits[0] = (0, 0)      -> p(label_1 = 1) = 1/2, log = -log 2
    logits[1] = (log 3, 0)  -> p(label_2 = 0) = 3/4, log = log 0.75
    logits[2] is the last step: it predicts nothing and is dropped. Output shape (1, 2).
    """
    logits = torch.tensor([[[0.0, 0.0], [math.log(3.0), 0.0], [100.0, -100.0]]])
    labels = torch.tensor([[IGNORE_INDEX, 1, 0]])
    out = token_logprobs(logits, labels)
    assert out.shape == (1, 2)
    torch.testing.assert_close(out, torch.tensor([[-math.log(2.0), math.log(0.75)]]))
    assert target_mask(labels).tolist() == [[True, True]]
    assert int(num_target_tokens(labels)) == 2


def test_ignored_labels_give_zero_and_first_label_is_never_scored():
    logits, labels = _random_batch()
    out = token_logprobs(logits, labels)
    mask = target_mask(labels)
    assert out.shape == (3, 6)
    assert (out[~mask] == 0).all() and (out[mask] < 0).all()
    # labels[:, 0] has no predicting position: changing it changes nothing.
    changed = labels.clone()
    changed[:, 0] = (changed[:, 0] + 1).clamp(min=0) % 11
    torch.testing.assert_close(token_logprobs(logits, changed), out)


def test_matches_naive_and_trl_selective_log_softmax():
    from trl.trainer.utils import selective_log_softmax  # test oracle only

    logits, labels = _random_batch(seed=1)
    ours = token_logprobs(logits, labels)
    torch.testing.assert_close(ours, _naive(logits, labels))
    shift_labels = labels[:, 1:]
    mask = shift_labels != IGNORE_INDEX
    trl = selective_log_softmax(logits[:, :-1], shift_labels.clamp(min=0)) * mask
    torch.testing.assert_close(ours, trl)


def test_bf16_logits_are_upcast():
    logits, labels = _random_batch(seed=2)
    out = token_logprobs(logits.bfloat16(), labels)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, _naive(logits.bfloat16().float(), labels))


def test_gradient_flows_only_to_predicting_logits():
    logits, labels = _random_batch(seed=3)
    logits.requires_grad_(True)
    token_logprobs(logits, labels).sum().backward()
    assert (logits.grad[:, -1] == 0).all()  # the last step predicts nothing
    assert (logits.grad[0, :2] == 0).all()  # it predicts labels 1..2, which are -100


def test_shape_errors_name_the_argument():
    logits, labels = _random_batch()
    with pytest.raises(ValueError, match="labels must be"):
        token_logprobs(logits, labels[:, :-1])
    with pytest.raises(ValueError, match="logits must be"):
        token_logprobs(logits[0], labels)
    with pytest.raises(ValueError, match="mask must be"):
        entropy_from_logits(logits, torch.ones(3, 7, dtype=torch.bool))


def test_sequence_logprobs_sum_and_average():
    """Row 0: (-1 + -2) with mask (1, 1, 0) -> sum -3, mean -1.5; row 1: empty mask -> 0, 0."""
    token_logps = torch.tensor([[-1.0, -2.0, -9.0], [-4.0, -5.0, -6.0]])
    mask = torch.tensor([[True, True, False], [False, False, False]])
    torch.testing.assert_close(sequence_logprobs(token_logps, mask), torch.tensor([-3.0, 0.0]))
    torch.testing.assert_close(
        sequence_logprobs(token_logps, mask, average=True), torch.tensor([-1.5, 0.0])
    )
    with pytest.raises(ValueError, match="mask must match"):
        sequence_logprobs(token_logps, mask[:, :2])


def test_entropy_by_hand_and_against_naive():
    """Uniform over V=4 has entropy log 4; a one-hot-ish distribution has ~0; masked -> 0."""
    logits = torch.zeros(1, 3, 4)
    logits[0, 1] = torch.tensor([50.0, 0.0, 0.0, 0.0])
    mask = torch.tensor([[True, True]])
    ent = entropy_from_logits(logits, mask)
    torch.testing.assert_close(ent, torch.tensor([[math.log(4.0), 0.0]]), atol=1e-6, rtol=0)
    assert entropy_from_logits(logits, torch.tensor([[False, True]]))[0, 0] == 0

    logits, labels = _random_batch(seed=4)
    mask = target_mask(labels)
    p = torch.softmax(logits[:, :-1], -1)
    naive = -(p * p.log()).sum(-1) * mask
    torch.testing.assert_close(entropy_from_logits(logits, mask), naive)


def test_entropy_with_minus_inf_logits_is_finite():
    """Banned entries (-inf) have p = 0: entropy of logits (0, 0, -inf) is log 2, grads finite."""
    logits = torch.tensor([[[0.0, 0.0, -math.inf], [0.0, 0.0, 0.0]]], requires_grad=True)
    ent = entropy_from_logits(logits, torch.tensor([[True]]))
    torch.testing.assert_close(ent, torch.tensor([[math.log(2.0)]]))
    ent.sum().backward()
    assert torch.isfinite(logits.grad).all()
