"""Mechanics and invariants of loop.fit on a tiny causal LM (no Ray, no images).

- gradient accumulation is exact: 1 micro-batch of 8 == 8 micro-batches of 1 (token-normalised);
- a run resumed from a saved state ends with the same weights as an uninterrupted one;
- the LR schedule warms up linearly, then follows a cosine.
"""

import math
import time
from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from nsft_ray.algorithms.nsft import nsft_objective
from nsft_ray.algorithms.sft import sft_objective
from nsft_ray.config import NSFTConfig, OptimConfig
from nsft_ray.loop import (
    Hooks,
    TorchEngine,
    TrainState,
    fit,
    lr_lambda,
    make_optimizer,
    make_scheduler,
)


def tiny_lm(seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=1, num_key_value_heads=1, max_position_embeddings=64)
    return LlamaForCausalLM(cfg)


def rows(n=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = 6 + i % 5  # unequal lengths: per-micro-batch means would weight rows differently
        ids = torch.randint(1, 40, (length,), generator=g)
        labels = ids.clone()
        labels[: length // 2] = -100  # "prompt" tokens are not trained
        out.append((ids, labels, i % 2 == 1))
    return out


def collate(chunk):
    T = max(len(ids) for ids, _, _ in chunk)
    ids = torch.zeros(len(chunk), T, dtype=torch.long)
    labels = torch.full((len(chunk), T), -100)
    mask = torch.zeros(len(chunk), T, dtype=torch.long)
    for i, (x, y, _) in enumerate(chunk):
        ids[i, : len(x)], labels[i, : len(y)], mask[i, : len(x)] = x, y, 1
    neg = torch.tensor([n for _, _, n in chunk])
    return {"input_ids": ids, "labels": labels, "attention_mask": mask, "is_negative": neg}


def epochs_of(data, micro):
    return lambda epoch: [collate(data[i: i + micro]) for i in range(0, len(data), micro)]


OPT = OptimConfig(lr=1e-2, warmup_ratio=0.0, schedule="constant", max_grad_norm=0.0)


def run(objective, micro, accum, steps, model=None, state=None, engine=None, sgd=False):
    model = model or tiny_lm()
    if engine is None:
        # SGD for the accumulation check: the update is then linear in the gradient, which Adam's
        # normalisation is not (it magnifies float rounding on near-zero gradients).
        opt = torch.optim.SGD(model.parameters(), lr=0.1) if sgd else make_optimizer(model, OPT)
        engine = TorchEngine(model, opt, make_scheduler(opt, OPT, steps), OPT.max_grad_norm)
    logs = []
    state = fit(objective, engine, epochs_of(rows(), micro), total_steps=steps, grad_accum=accum,
                hooks=Hooks(log=logs.append, log_every=1), state=state)
    return model, engine, state, logs


@pytest.mark.parametrize("objective", [sft_objective(), nsft_objective(NSFTConfig(lam=0.5))],
                         ids=["sft", "nsft"])
def test_grad_accumulation_is_exact(objective):
    big, _, _, logs_big = run(objective, micro=8, accum=1, steps=1, sgd=True)
    small, _, _, logs_small = run(objective, micro=1, accum=8, steps=1, sgd=True)
    assert logs_big[0]["train/loss"] == pytest.approx(logs_small[0]["train/loss"], rel=1e-5)
    for a, b in zip(big.parameters(), small.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def _hf_token_mean_loss(model, data):
    """Oracle: Hugging Face's own causal-LM loss (token mean over shifted labels) on `data`,
    one padded batch, computed without any of nsft_ray's code."""
    ids = torch.nn.utils.rnn.pad_sequence([x for x, _, _ in data], batch_first=True)
    labels = torch.nn.utils.rnn.pad_sequence([y for _, y, _ in data], batch_first=True,
                                             padding_value=-100)
    return model(input_ids=ids, attention_mask=ids != 0, labels=labels).loss  # ids are >= 1


def _trained_positions_by_hand(data):
    """Oracle for the masks: per row, the positions whose next token is labelled, counted in
    plain Python (a label at t is predicted at t - 1; the first token is never a target)."""
    chosen = negative = 0
    for _, y, is_negative in data:
        n = sum(1 for t in range(1, len(y)) if int(y[t]) != -100)
        chosen, negative = (chosen, negative + n) if is_negative else (chosen + n, negative)
    return chosen, negative


@pytest.mark.parametrize("lam, use_chosen", [(0.5, True), (2.0, False)])
def test_nsft_step_equals_hugging_face_losses_of_each_term(lam, use_chosen):
    """One SGD step of fit on the nSFT objective moves the weights exactly as the gradient of
    L = L_hf(chosen rows) + lam * L_hf(corrective rows), the two terms taken from Hugging Face's
    loss on each subset: a trainer that mixed the terms, dropped a mask or normalised over the
    whole batch would move them elsewhere. The objective's token counts match a hand count."""
    data = rows()
    chosen_rows = [r for r in data if not r[2]]
    negative_rows = [r for r in data if r[2]]
    oracle_model = tiny_lm()
    expected = lam * _hf_token_mean_loss(oracle_model, negative_rows)
    if use_chosen:
        expected = expected + _hf_token_mean_loss(oracle_model, chosen_rows)
    expected.backward()
    with torch.no_grad():
        stepped = [p - 0.1 * p.grad for p in oracle_model.parameters()]

    objective = nsft_objective(NSFTConfig(lam=lam, use_chosen=use_chosen))
    counts = objective.count(collate(data))
    hand_chosen, hand_negative = _trained_positions_by_hand(data)
    assert counts["negative"] == hand_negative
    assert counts.get("chosen") == (hand_chosen if use_chosen else None)
    model, _, _, logs = run(objective, micro=8, accum=1, steps=1, sgd=True)
    assert logs[0]["train/loss"] == pytest.approx(float(expected.detach()), rel=1e-5)
    for got, want in zip(model.parameters(), stepped, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_sft_step_equals_hugging_face_loss():
    """sft trains every labelled token of every row, chosen or not: one SGD step equals the
    gradient of Hugging Face's token-mean loss over all rows."""
    data = rows()
    oracle_model = tiny_lm()
    _hf_token_mean_loss(oracle_model, data).backward()
    with torch.no_grad():
        stepped = [p - 0.1 * p.grad for p in oracle_model.parameters()]
    assert sft_objective().count(collate(data))["sft"] == sum(_trained_positions_by_hand(data))
    model, _, _, _ = run(sft_objective(), micro=8, accum=1, steps=1, sgd=True)
    for got, want in zip(model.parameters(), stepped, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


class _UniformLM(torch.nn.Module):
    """Logits all 0 over a vocabulary of 2 (p = 1/2 for every token), at the positions asked."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))

    def forward(self, input_ids, logits_to_keep, **_):
        logits = torch.zeros(input_ids.shape[0], len(logits_to_keep), 2) * self.scale
        return SimpleNamespace(logits=logits)


def test_sft_objective_by_hand():
    """V = 2, uniform logits: every labelled token costs log 2, and only labelled tokens count
    (row 0 has 2 of them, row 1 has 3; the first position is never a target)."""
    labels = torch.tensor([[-100, 1, 0, -100], [0, 1, 1, 1]])
    batch = {"input_ids": labels.clamp(min=0), "labels": labels}
    sums, _ = sft_objective().forward(_UniformLM(), batch)
    assert sft_objective().count(batch) == {"sft": 5.0}
    assert float(sums["sft"].detach()) == pytest.approx(5 * math.log(2.0), rel=1e-6)


def test_step_without_labelled_tokens_is_zero_not_nan():
    """A step whose rows have no labelled token (every answer cut by max_length) logs loss 0,
    not NaN, and leaves the weights where they were."""
    model = tiny_lm()
    before = [p.detach().clone() for p in model.parameters()]
    data = [(ids, torch.full_like(labels, -100), neg) for ids, labels, neg in rows(4)]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = TorchEngine(model, opt, make_scheduler(opt, OPT, 1), OPT.max_grad_norm)
    logs = []
    fit(sft_objective(), engine, epochs_of(data, 4), total_steps=1, grad_accum=1,
        hooks=Hooks(log=logs.append, log_every=1))
    assert logs[0]["train/loss"] == 0.0
    for a, b in zip(model.parameters(), before, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_resume_equals_uninterrupted(tmp_path):
    full, _, _, _ = run(sft_objective(), micro=2, accum=2, steps=4)
    # 2 steps, save, rebuild everything from the saved state, 2 more steps.
    _, engine, state, _ = run(sft_objective(), micro=2, accum=2, steps=2)
    engine.save(tmp_path, {"train_state": state.to_dict()})
    model = tiny_lm(seed=123)  # different init: everything must come from the checkpoint
    opt = make_optimizer(model, OPT)
    engine2 = TorchEngine(model, opt, make_scheduler(opt, OPT, 4), OPT.max_grad_norm)
    restored = TrainState(**engine2.load(tmp_path)["train_state"])
    assert restored.step == 2 and restored.micro_in_epoch == 4
    resumed, _, final, _ = run(sft_objective(), micro=2, accum=2, steps=4, model=model,
                               state=restored, engine=engine2)
    assert final.step == 4
    for a, b in zip(full.parameters(), resumed.parameters(), strict=True):
        torch.testing.assert_close(a, b)


def test_kl_term_is_k3_against_the_reference_on_trained_tokens():
    """Zero against an identical copy; against a different reference it equals k3 summed over the
    trained tokens, computed here from the two models' log-softmax (so a KL term that is always
    zero, or taken over the wrong tokens, fails)."""
    import copy

    with pytest.raises(ValueError, match="reference"):
        nsft_objective(NSFTConfig(kl_coef=0.1))
    model, batch = tiny_lm(), collate(rows())
    same = nsft_objective(NSFTConfig(kl_coef=0.1), copy.deepcopy(model).eval())
    assert float(same.forward(model, batch)[0]["kl"].detach()) == pytest.approx(0.0, abs=1e-6)

    reference = tiny_lm(seed=7).eval()
    sums, _ = nsft_objective(NSFTConfig(kl_coef=0.1), reference).forward(model, batch)
    with torch.no_grad():
        expected = 0.0
        for b in range(batch["input_ids"].shape[0]):
            ids = batch["input_ids"][b: b + 1]
            lp = torch.log_softmax(model(input_ids=ids, attention_mask=batch["attention_mask"][
                b: b + 1]).logits[0], -1)
            lq = torch.log_softmax(reference(input_ids=ids, attention_mask=batch[
                "attention_mask"][b: b + 1]).logits[0], -1)
            for t in range(1, ids.shape[1]):
                y = int(batch["labels"][b, t])
                if y == -100:
                    continue
                log_r = float(lq[t - 1, y] - lp[t - 1, y])  # log pi_ref / pi at the sampled token
                expected += math.exp(log_r) - 1 - log_r
    assert expected > 1e-3  # the two models differ: a zero KL term cannot pass
    assert float(sums["kl"].detach()) == pytest.approx(expected, rel=1e-4)
    kl_objective = nsft_objective(NSFTConfig(kl_coef=0.1), reference)
    assert kl_objective.count(batch)["kl"] == sum(_trained_positions_by_hand(rows()))


def test_lr_schedule_warmup_then_cosine():
    f = lr_lambda(OptimConfig(warmup_ratio=0.2, schedule="cosine"), total_steps=10)
    assert [round(f(s), 4) for s in (0, 1)] == [0.3333, 0.6667]  # (s+1)/(warmup+1), warmup=2
    assert f(2) == pytest.approx(1.0)
    assert f(6) == pytest.approx(0.5 * (1 + math.cos(math.pi * 4 / 8)))
    assert f(10) == pytest.approx(0.0)


def test_empty_data_is_an_error():
    model = tiny_lm()
    opt = make_optimizer(model, OPT)
    engine = TorchEngine(model, opt, make_scheduler(opt, OPT, 1), 0.0)
    with pytest.raises(ValueError, match="no batch"):
        fit(sft_objective(), engine, lambda e: [], total_steps=1, grad_accum=1, hooks=Hooks())


def test_data_wait_is_reported_and_large_for_a_slow_stream():
    """Each log window reports the seconds spent in next(stream) and their share of the window;
    a stream that sleeps 1 s per micro-batch, feeding a step of a few ms (~0.15 s on a machine
    loaded 8x over), is mostly waiting."""
    batches = [collate(rows()[i: i + 2]) for i in range(0, 8, 2)]

    def slow(epoch):
        for b in batches:
            time.sleep(1.0)  # a starved input pipeline
            yield b

    def logs_of(epochs):
        model = tiny_lm()
        opt = make_optimizer(model, OPT)
        engine = TorchEngine(model, opt, make_scheduler(opt, OPT, 2), OPT.max_grad_norm)
        logs = []
        fit(sft_objective(), engine, epochs, total_steps=2, grad_accum=1,
            hooks=Hooks(log=logs.append, log_every=1))
        return logs

    fast, starved = logs_of(lambda epoch: batches), logs_of(slow)
    assert len(fast) == len(starved) == 2  # one window per step
    for m in fast + starved:
        window_s = 2 / m["train/samples_per_s"]  # a window is 1 step x 2 samples
        assert 0.0 <= m["train/data_wait_s"] <= window_s * (1 + 1e-6)
        assert m["train/data_wait_fraction"] == pytest.approx(m["train/data_wait_s"] / window_s)
    for m in starved:
        assert m["train/data_wait_s"] >= 1.0  # sleep() never returns early
        assert m["train/data_wait_fraction"] > 0.5
    assert min(m["train/data_wait_fraction"] for m in starved) > \
        max(m["train/data_wait_fraction"] for m in fast)
