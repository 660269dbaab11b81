"""DPO on a tiny Idefics3 VLM, without Ray: the collator, the objective's maths, and the
precomputed-reference path against the live one.

- preference rows become 2B stacked sequences (chosen rows first), labels on the answers only;
- policy == reference gives h = 0, so sigmoid DPO = log 2, IPO = (1 / (2 beta))^2, hinge = 1;
- precomputed reference log-probs (scored one row at a time, other padding) give the same loss
  and gradients as the live reference on the same batch;
- the optional SFT term equals the SFT objective on the chosen conversations; 1 x 4 == 4 x 1;
- the shared-prefix forward (image + prompt + common answer opening once per pair, continuations
  on its KV cache) gives the stacked 2B-row forward's log-probs, losses and gradients.
"""

import math
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from nsft_ray.algorithms import ALGORITHMS, frozen_copy
from nsft_ray.algorithms.dpo import (
    DPO_LOSSES,
    _shared_prefix_answer_logps,
    _shared_prefix_lengths,
    _stacked_answer_logps,
    dpo_objective,
    reference_logps,
)
from nsft_ray.algorithms.sft import sft_objective
from nsft_ray.collate import Collator
from nsft_ray.config import Config, DPOConfig, WorldConfig, load_config
from nsft_ray.image_features import ImageFeatureCache
from nsft_ray.models import build_tiny_vlm, freeze, load_vlm
from nsft_ray.preference_collate import REF_COLUMNS, PreferenceCollator
from nsft_ray.world import corpus, write_world

B = 4


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("dpo")
    write_world(WorldConfig(n_train=4, n_eval=2), root / "w", seed=0)
    build_tiny_vlm(root / "m", corpus(WorldConfig(), n=300, seed=0))
    model, processor = load_vlm(root / "m")
    rows = pq.read_table(root / "w" / "pref_train.parquet").slice(0, B).to_pylist()
    # Unequal answer lengths, so padding and per-row sums are really exercised.
    assert len({len(r["chosen"]) for r in rows}) > 1
    return model.train(), processor, rows


def perturbed(model, seed=1):
    """A policy that differs from its reference (h != 0), as after some training."""
    torch.manual_seed(seed)
    policy = frozen_copy(model).train()
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
            p.requires_grad_(True)
    return policy


def test_collator_stacks_chosen_then_rejected_with_answer_labels(tiny):
    _, processor, rows = tiny
    batch = PreferenceCollator(processor, 256)(rows)
    assert batch["input_ids"].shape[0] == 2 * B and batch["pixel_values"].shape[0] == 2 * B
    tok = processor.tokenizer
    for i, row in enumerate(rows):
        for j, answer in ((i, row["chosen"]), (B + i, row["rejected"])):
            labels = batch["labels"][j]
            assert tok.decode(labels[labels != -100]) == answer + tok.eos_token
            # Everything before the answer (template, image, prompt) is identical in both halves.
            start = int((labels != -100).nonzero()[0])
            assert torch.equal(batch["input_ids"][j, :start], batch["input_ids"][i, :start])
        assert torch.equal(batch["pixel_values"][i], batch["pixel_values"][B + i])  # same image
    assert not any(c in batch for c in REF_COLUMNS)


def test_collator_takes_ray_columns_and_carries_reference_logps(tiny):
    _, processor, rows = tiny
    collate = PreferenceCollator(processor, 256)
    columns = {k: np.array([r[k] for r in rows], dtype=object) for k in rows[0]}
    columns["ref_chosen_logps"] = np.array([-1.0, -2.0, -3.0, -4.0])
    columns["ref_rejected_logps"] = np.array([-5.0, -6.0, -7.0, -8.0])
    batch = collate(columns)
    assert torch.equal(batch["input_ids"], collate(rows)["input_ids"])
    assert batch["ref_chosen_logps"].dtype == torch.float32
    assert batch["ref_rejected_logps"].tolist() == [-5.0, -6.0, -7.0, -8.0]

    del columns["ref_rejected_logps"]
    with pytest.raises(ValueError, match="ref_chosen_logps but not"):
        collate(columns)
    with pytest.raises(ValueError, match=f"preference row {rows[1]['id']!r}"):
        collate([rows[0], {**rows[1], "image": b"not an image"}])


@pytest.mark.parametrize("loss, expected", [
    ("sigmoid", math.log(2)), ("ipo", (1 / (2 * 0.1)) ** 2), ("hinge", 1.0),
    ("cdpo", math.log(2)), ("robust", math.log(2)),
])
def test_policy_equal_to_reference(tiny, loss, expected):
    """h = 0: -log sigmoid(0) = log 2 (cdpo and robust too: both sides are log 2, and
    ((1 - e) - e) / (1 - 2e) = 1); IPO (0 - 1/(2 beta))^2 = 25 for beta 0.1; hinge relu(1 - 0)."""
    model, processor, rows = tiny
    batch = PreferenceCollator(processor, 256)(rows)
    cfg = DPOConfig(beta=0.1, loss=loss, label_smoothing=0.2 if loss in ("cdpo", "robust") else 0)
    objective = dpo_objective(cfg, frozen_copy(model))
    sums, extra = objective.forward(model, batch)
    assert objective.count(batch) == {"dpo": B}
    assert float(sums["dpo"].detach()) / B == pytest.approx(expected, rel=1e-6)
    assert extra["reward_margin"] == 0 and extra["reward_accuracy"] == 0  # ties are not wins
    assert extra["logps_chosen"] < 0 and extra["logps_rejected"] < 0


def _loss_and_grads(objective, policy, batch):
    policy.zero_grad(set_to_none=True)
    sums, _ = objective.forward(policy, batch)
    counts = objective.count(batch)
    loss = sum(objective.weights[k] * sums[k] / counts[k] for k in sums)
    loss.backward()
    return float(loss.detach()), [p.grad.clone() for p in policy.parameters() if p.grad is not None]


def assert_grads_close(actual, expected):
    """Gradient lists equal up to fp32 rounding. The absolute tolerance scales with the largest
    gradient entry: rounding is relative to the terms summed into an entry, and IPO's factor
    (h - 1/(2 beta)) ~ -5 makes every term larger; entries that are zero in exact arithmetic (a
    key bias: softmax ignores a shift) are rounding noise of ~1e-9."""
    assert len(actual) == len(expected) > 0
    scale = max(float(g.abs().max()) for g in expected)
    for a, b in zip(actual, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6 * max(scale, 1.0))


@pytest.mark.parametrize("loss", ["sigmoid", "ipo"])
def test_precomputed_reference_equals_live_reference(tiny, loss):
    model, processor, rows = tiny
    collate = PreferenceCollator(processor, 256)
    policy, reference = perturbed(model), frozen_copy(model)
    batch = collate(rows)
    live_loss, live_grads = _loss_and_grads(dpo_objective(DPOConfig(loss=loss), reference),
                                            policy, batch)
    # As the precompute pass does, but one row per forward: other padding, same numbers.
    scored = [reference_logps(reference, collate([r])) for r in rows]
    pre_rows = [{**r, "ref_chosen_logps": float(c), "ref_rejected_logps": float(j)}
                for r, (c, j) in zip(rows, scored, strict=True)]
    pre_objective = dpo_objective(DPOConfig(loss=loss, precompute_ref=True), None)
    pre_loss, pre_grads = _loss_and_grads(pre_objective, policy, collate(pre_rows))
    assert live_loss != pytest.approx(math.log(2), abs=1e-3)  # the policy really moved
    assert pre_loss == pytest.approx(live_loss, rel=1e-5)
    assert_grads_close(pre_grads, live_grads)


def test_shared_prefix_logps_equal_the_stacked_forward(tiny):
    """Fails if the continuations lose a cache row, take wrong position ids, attend to another
    pair's prefix or its padding, or if a shared answer token is dropped or counted twice.
    Oracle: the full 2B-row forward (the path without a cache)."""
    model, processor, rows = tiny
    batch = PreferenceCollator(processor, 256)(rows)
    prefix, _, answer_start = _shared_prefix_lengths(batch)
    starts = answer_start[:B]
    # The batch holds pairs whose answers differ at their first token and pairs that share an
    # opening (so shared answer tokens are scored from the prefix forward), and prompts of
    # different lengths (so rows continue from different cache positions).
    assert (prefix == starts - 1).any() and (prefix > starts).any()
    assert len(set(starts.tolist())) > 1
    policy = perturbed(model)
    with torch.no_grad():
        oracle = torch.cat(reference_logps(policy, batch, shared_prefix=False))
        assert torch.equal(oracle, _stacked_answer_logps(policy, batch))
        shared = torch.cat(reference_logps(policy, batch, shared_prefix=True))
    # fp32 sums of ~40 token log-probs of up to -260: rounding differs at ~1e-7 relative.
    torch.testing.assert_close(shared, oracle, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("loss, sft_weight", [("sigmoid", 0.5), ("ipo", 0.0)])
def test_shared_prefix_loss_and_gradients_equal_the_stacked_forward(tiny, loss, sft_weight):
    """Fails if gradients do not flow back through the repeated KV cache into the image and
    prompt, or the shared answer tokens' gradient is lost. Sigmoid DPO alone would not see the
    shared tokens (they cancel in h), so it runs with the SFT term; IPO averages by length."""
    model, processor, rows = tiny
    batch = PreferenceCollator(processor, 256)(rows)
    policy, reference = perturbed(model), frozen_copy(model)
    results = [_loss_and_grads(dpo_objective(DPOConfig(loss=loss, sft_weight=sft_weight,
                                                       shared_prefix=flag), reference),
                               policy, batch) for flag in (False, True)]
    (stacked_loss, stacked_grads), (shared_loss, shared_grads) = results
    assert shared_loss == pytest.approx(stacked_loss, rel=1e-5)
    names = [n for n, p in policy.named_parameters() if p.grad is not None]
    assert any("vision" in n for n in names)  # the image encoder is reached through the cache
    assert_grads_close(shared_grads, stacked_grads)


@pytest.mark.parametrize("arch", ["idefics3", "llava"])
def test_shared_prefix_with_cached_image_features(tiny, tmp_path, arch):
    """Fails if the prefix forward takes another pair's cached image features (one entry per
    image, row-major over all 2B rows) or slices LLaVA's inputs wrongly. Oracle: the stacked
    forward on pixels."""
    _, _, rows = tiny
    model, processor = load_vlm(build_tiny_vlm(tmp_path / "m", corpus(WorldConfig(), n=300,
                                                                       seed=0), arch=arch))
    freeze(model, ("vision", "connector"))
    batch = PreferenceCollator(processor, 256)(rows)
    cached = ImageFeatureCache(model).attach(model, batch)
    assert "pixel_values" not in cached and "mm_encoder_outputs" in cached
    with torch.no_grad():
        oracle = _stacked_answer_logps(model, batch)
        for shared in (_shared_prefix_answer_logps(model, batch),
                       _shared_prefix_answer_logps(model, cached)):
            torch.testing.assert_close(shared, oracle, rtol=1e-5, atol=1e-5)


def test_shared_prefix_refuses_pairs_with_different_prompts(tiny, monkeypatch):
    """Fails if a pair whose rows differ before the answer (so not one image + prompt) is scored
    as if it shared them, a model whose position ids are not one per token (Qwen2-VL's 3-D
    RoPE) is given 1-D continuation positions, or a missing cache surfaces as an AttributeError."""
    model, processor, rows = tiny
    batch = PreferenceCollator(processor, 256)(rows)
    with monkeypatch.context() as m:
        m.setattr(model.config, "model_type", "qwen2_vl")
        with pytest.raises(ValueError, match="'qwen2_vl' is not one of .*shared_prefix=false"):
            reference_logps(model, batch)
    checkpointed = perturbed(model)
    checkpointed.gradient_checkpointing_enable()  # transformers then returns no KV cache
    with pytest.raises(ValueError, match="no KV cache .*shared_prefix=false"):
        reference_logps(checkpointed.train(), batch)
    answer = int((batch["labels"][B + 1] != -100).nonzero()[0])
    batch["input_ids"][B + 1, answer - 2] += 1  # a prompt token of pair 1's rejected row
    with pytest.raises(ValueError, match="pair 1 has different prompt tokens"):
        reference_logps(model, batch)


def test_sft_term_equals_sft_on_chosen_conversations(tiny):
    model, processor, rows = tiny
    objective = dpo_objective(DPOConfig(sft_weight=0.5), frozen_copy(model))
    batch = PreferenceCollator(processor, 256)(rows)
    sums, _ = objective.forward(model, batch)
    assert objective.weights == {"dpo": 1.0, "sft": 0.5}

    conversations = [{"image": r["image"], "messages": [
        {"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["chosen"]}]}
        for r in rows]
    sft_batch = Collator(processor, 256)(conversations)
    sft = sft_objective()
    sft_sums, _ = sft.forward(model, sft_batch)
    assert objective.count(batch)["sft"] == sft.count(sft_batch)["sft"]
    assert float(sums["sft"].detach()) == pytest.approx(float(sft_sums["sft"].detach()), rel=1e-5)


def test_gradient_accumulation_counts_pairs(tiny):
    """One micro-batch of 4 pairs == 4 micro-batches of 1, each normalised by the step's 4 pairs."""
    model, processor, rows = tiny
    collate = PreferenceCollator(processor, 256)
    policy = perturbed(model)
    objective = dpo_objective(DPOConfig(), frozen_copy(model))
    _, whole = _loss_and_grads(objective, policy, collate(rows))
    policy.zero_grad(set_to_none=True)
    for r in rows:
        sums, _ = objective.forward(policy, collate([r]))
        (sums["dpo"] / B).backward()
    split = [p.grad for p in policy.parameters() if p.grad is not None]
    assert_grads_close(split, whole)


def test_config_errors_name_the_field(tiny):
    model, processor, rows = tiny
    with pytest.raises(ValueError, match="label_smoothing=0.1 has no effect with dpo.loss='ipo'"):
        dpo_objective(DPOConfig(loss="ipo", label_smoothing=0.1), frozen_copy(model))
    with pytest.raises(ValueError, match="precompute_ref=False"):
        dpo_objective(DPOConfig(), None)
    objective = dpo_objective(DPOConfig(precompute_ref=True), None)
    with pytest.raises(KeyError, match="ref_chosen_logps"):
        objective.forward(model, PreferenceCollator(processor, 256)(rows))
    assert set(DPO_LOSSES) == {"sigmoid", "ipo", "hinge", "cdpo", "robust"}


def test_registered_with_resident_models():
    spec = ALGORITHMS["dpo"]
    assert spec.origins(Config()) is None
    assert spec.models_resident(Config()) == 2
    assert spec.models_resident(Config(dpo=DPOConfig(precompute_ref=True))) == 1


def test_tiny_job_configs_load():
    configs = Path(__file__).resolve().parents[1] / "jobs" / "configs" / "tiny"
    dpo = load_config(configs / "dpo.yaml", ["dpo.precompute_ref=true"])
    assert dpo.dpo.loss == "sigmoid" and dpo.dpo.precompute_ref and dpo.train.data
    reward = load_config(configs / "reward.yaml", [])
    assert reward.reward.eval_data.endswith("pref_eval.parquet")
