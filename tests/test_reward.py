"""Reward model on a tiny Idefics3 VLM, without Ray: scores, the Bradley-Terry objective,
saving (also from a gathered state_dict) and held-out evaluation.
"""

import math

import pyarrow.parquet as pq
import pytest
import torch

from nsft_ray.algorithms import ALGORITHMS
from nsft_ray.algorithms.reward import (
    evaluate_reward_model,
    last_token_scores,
    load_reward_model,
    pair_scores,
    reward_objective,
    save_reward_model,
)
from nsft_ray.config import Config, ModelConfig, RunConfig, WorldConfig
from nsft_ray.losses import bradley_terry_loss
from nsft_ray.models import load_value_model
from nsft_ray.preference_collate import PreferenceCollator
from nsft_ray.world import corpus, write_world


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from nsft_ray.models import build_tiny_vlm

    root = tmp_path_factory.mktemp("reward")
    write_world(WorldConfig(n_train=4, n_eval=3), root / "w", seed=0)
    build_tiny_vlm(root / "m", corpus(WorldConfig(), n=300, seed=0))
    cfg = Config(model=ModelConfig(name_or_path=str(root / "m")), run=RunConfig(seed=3))
    model, processor = load_reward_model(cfg)
    rows = pq.read_table(root / "w" / "pref_train.parquet").slice(0, 4).to_pylist()
    return root, cfg, model, processor, PreferenceCollator(processor, 256)(rows)


def test_last_token_scores_right_and_left_padding():
    values = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0], [9.0, 10.0, 11.0, 12.0]])
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 1, 1]])  # right, none, left padded
    assert last_token_scores(values, mask).tolist() == [2.0, 8.0, 12.0]
    with pytest.raises(ValueError, match="same shape"):
        last_token_scores(values, mask[:, :3])


def test_objective_is_bradley_terry_on_last_token_scores(tiny):
    _, _, model, _, batch = tiny
    objective = reward_objective()
    sums, extra = objective.forward(model, batch)
    assert objective.count(batch) == {"reward": 4}
    values = model({k: batch[k] for k in batch if k != "labels"})  # (8, T)
    last = batch["attention_mask"].sum(-1) - 1  # right padding: last real token
    scores = values[torch.arange(8), last]
    expected = -torch.nn.functional.logsigmoid(scores[:4] - scores[4:]).mean()
    assert float(sums["reward"].detach()) / 4 == pytest.approx(float(expected.detach()), rel=1e-5)
    assert extra["accuracy"] == float((scores[:4] > scores[4:]).float().mean())
    sums["reward"].backward()  # the head and the backbone learn, the LM head is frozen
    assert model.value_head.proj.weight.grad is not None
    assert model.base.get_output_embeddings().weight.requires_grad is False


def test_fresh_head_is_seeded_and_saved_model_reloads(tiny, tmp_path):
    root, cfg, model, processor, batch = tiny
    again, _ = load_reward_model(cfg)
    assert torch.equal(again.value_head.proj.weight, model.value_head.proj.weight)
    model.eval()
    with torch.no_grad():
        model.value_head.proj.bias.fill_(0.5)  # something the fresh head does not have
        expected = pair_scores(model, batch)
    # From the module itself, and from a gathered state_dict (what ZeRO-3 export passes).
    save_reward_model(model, processor, tmp_path / "a", None)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    save_reward_model(model, processor, tmp_path / "b", state)
    for folder in ("a", "b"):
        loaded, _ = load_value_model(tmp_path / folder)
        with torch.no_grad():
            for got, want in zip(pair_scores(loaded, batch), expected, strict=True):
                torch.testing.assert_close(got, want)
    # A saved value model is also a starting point: its head comes back, not a fresh one.
    resumed, _ = load_reward_model(Config(model=ModelConfig(name_or_path=str(tmp_path / "a"))))
    assert float(resumed.value_head.proj.bias.detach()) == 0.5
    with pytest.raises(KeyError, match="expected base"):
        save_reward_model(model, processor, tmp_path / "c", {"head.w": torch.zeros(1)})


def test_evaluate_scores_every_held_out_pair(tiny, tmp_path):
    root, _, model, processor, _ = tiny
    save_reward_model(model, processor, tmp_path / "rm", None)
    data = root / "w" / "pref_eval.parquet"
    result = evaluate_reward_model(tmp_path / "rm", data, max_length=256, batch_size=4)
    rows = pq.read_table(data).to_pylist()
    assert result["pairs"] == len(rows) == 6
    loaded, _ = load_value_model(tmp_path / "rm")
    with torch.no_grad():
        chosen, rejected = pair_scores(loaded, PreferenceCollator(processor, 256)(rows))
    loss, metrics = bradley_terry_loss(chosen, rejected)
    assert result["loss"] == pytest.approx(float(loss), rel=1e-5)
    assert result["accuracy"] == pytest.approx(float(metrics["accuracy"]))
    assert 0 < result["loss"] and math.isfinite(result["reward_margin"])


def test_registered_with_custom_load_and_save():
    spec = ALGORITHMS["reward"]
    assert spec.load is load_reward_model and spec.save is save_reward_model
    assert spec.origins(Config()) is None and spec.models_resident(Config()) == 1
