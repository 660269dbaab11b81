"""PPO maths (hand-built tensors) and mechanics on a tiny VLM, without Ray."""

import json
import shutil

import pyarrow.parquet as pq
import pytest
import torch

import nsft_ray.world as world
from nsft_ray.algorithms.ppo import (
    Experience,
    actor_loss,
    build_sequences,
    critic_loss,
    image_token_ids,
    last_token_mask,
    make_experience,
    ppo_update,
    prompt_indices,
    response_logprobs,
    response_values,
    sample_responses,
    sequence_scores,
    state_digest,
    token_rewards,
)
from nsft_ray.algorithms.reward_rules import meta_problem, rule_reward, rule_rewards
from nsft_ray.collate import decode_image
from nsft_ray.config import OptimConfig, PPOConfig, WorldConfig
from nsft_ray.generation import encode_prompt
from nsft_ray.logprobs import IGNORE_INDEX, token_logprobs
from nsft_ray.loop import TorchEngine, make_optimizer, make_scheduler
from nsft_ray.losses import gae, kl_k3, kl_penalty, masked_mean, ppo_policy_loss, whiten
from nsft_ray.models import VLMWithValueHead, build_tiny_vlm, load_vlm
from nsft_ray.negatives.claims import Vocabulary

# Two sequences: three response tokens, and two (plus one padding position).
MASK = torch.tensor([[True, True, True], [True, True, False]])
LOGPS = torch.tensor([[-1.0, -2.0, -0.5], [-1.5, -0.2, 0.0]])
REF = torch.tensor([[-1.5, -1.0, -0.5], [-1.0, -0.7, 0.0]])
SCORES = torch.tensor([2.0, -1.0])
VALUES = torch.tensor([[0.5, 1.0, 1.5], [0.2, -0.3, 0.0]])


def test_token_rewards_put_the_score_on_the_last_token_and_kl_on_every_token():
    """k1 = logp - ref = [[0.5, -1, 0], [-0.5, 0.5, 0]]; beta = 0.1:
    row 0: [-0.05, 0.1, 0 + 2.0];  row 1: [0.05, -0.05 - 1.0, 0 (padding)]."""
    rewards, kl = token_rewards(SCORES, LOGPS, REF, MASK, kl_coef=0.1, kl_estimator="k1",
                                kl_in_reward=True)
    torch.testing.assert_close(kl, torch.tensor([[0.5, -1.0, 0.0], [-0.5, 0.5, 0.0]]))
    torch.testing.assert_close(rewards, torch.tensor([[-0.05, 0.1, 2.0], [0.05, -1.05, 0.0]]))
    # KL as a loss term instead: the reward is the score alone.
    rewards, _ = token_rewards(SCORES, LOGPS, REF, MASK, kl_coef=0.1, kl_estimator="k1",
                               kl_in_reward=False)
    torch.testing.assert_close(rewards, torch.tensor([[0.0, 0.0, 2.0], [0.0, -1.0, 0.0]]))
    _, kl3 = token_rewards(SCORES, LOGPS, REF, MASK, kl_coef=0.1, kl_estimator="k3",
                           kl_in_reward=True)
    torch.testing.assert_close(kl3, kl_k3(LOGPS, REF) * MASK)
    assert last_token_mask(MASK).tolist() == [[False, False, True], [False, True, False]]


def test_gae_closed_form_with_gamma_and_lambda_one():
    """gamma = lam = 1: R_t = sum of the rewards from t on, A_t = R_t - V_t.
    row 0: R = [2.05, 2.1, 2.0], A = [1.55, 1.1, 0.5]
    row 1: R = [-1.0, -1.05],    A = [-1.2, -0.75]."""
    cfg = PPOConfig(kl_coef=0.1, kl_estimator="k1", gamma=1.0, lam=1.0, whiten_advantages=False)
    seq = build_sequences(_fake_prompt(2), [[1, 2, 3], [4, 5]], pad_id=0)
    exp, metrics = make_experience(seq, LOGPS, REF, VALUES, SCORES, cfg)
    torch.testing.assert_close(exp.returns, torch.tensor([[2.05, 2.1, 2.0], [-1.0, -1.05, 0.0]]))
    torch.testing.assert_close(exp.advantages, torch.tensor([[1.55, 1.1, 0.5], [-1.2, -0.75, 0.0]]))
    assert metrics["score"] == pytest.approx(0.5)
    assert metrics["kl"] == pytest.approx(((0.5 - 1.0) + (-0.5 + 0.5)) / 2)
    assert metrics["response_length"] == pytest.approx(2.5)


def test_experience_matches_the_loss_files_gae_and_whitening():
    cfg = PPOConfig(kl_coef=0.05, kl_estimator="k2", gamma=0.9, lam=0.8, whiten_advantages=True)
    seq = build_sequences(_fake_prompt(2), [[1, 2, 3], [4, 5]], pad_id=0)
    exp, _ = make_experience(seq, LOGPS, REF, VALUES, SCORES, cfg)
    rewards, _ = token_rewards(SCORES, LOGPS, REF, MASK, kl_coef=0.05, kl_estimator="k2",
                               kl_in_reward=True)
    adv, ret = gae(rewards, VALUES * MASK, MASK, 0.9, 0.8)
    torch.testing.assert_close(exp.returns, ret)
    torch.testing.assert_close(exp.advantages, whiten(adv, MASK))
    assert masked_mean(exp.advantages, MASK).abs() < 1e-6


def test_prompt_indices_cover_every_row_once_per_epoch_and_are_pure():
    seen = [i for it in range(5) for i in prompt_indices(10, 4, it, seed=3)]  # 2 epochs
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:20]) == list(range(10))
    assert prompt_indices(10, 4, 3, seed=3) == seen[12:16]
    assert prompt_indices(10, 4, 0, seed=4) != prompt_indices(10, 4, 0, seed=3)


def test_reward_rules_on_shapesworld_pairs(tiny):
    vocab = Vocabulary.from_config(WorldConfig())
    rows = tiny["rows"]
    metas = [r["meta"] for r in rows]
    assert rule_rewards([r["chosen"] for r in rows], metas, vocab) == [1.0] * len(rows)
    assert rule_rewards([r["rejected"] for r in rows], metas, vocab) == [-1.0] * len(rows)
    assert rule_reward("hello there", metas[0], vocab) == 0.0  # nothing checkable
    assert meta_problem(metas[0]) is None and "scene" in meta_problem("{}")
    with pytest.raises(ValueError, match="scene"):
        rule_reward("a red star", {"question": {}}, vocab)


# ------------------------------------------------------------------------- tiny-model mechanics


def _fake_prompt(b: int, p: int = 2) -> dict:
    return {"input_ids": torch.ones(b, p, dtype=torch.long),
            "attention_mask": torch.ones(b, p, dtype=torch.long)}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ppo")
    path = build_tiny_vlm(tmp / "m", world.corpus(WorldConfig(), n=300, seed=0))
    world.write_world(WorldConfig(n_train=40, n_eval=10), tmp / "w", seed=0)
    rows = pq.read_table(tmp / "w" / "pref_train.parquet").to_pylist()[:4]
    for r in rows:
        r["meta"] = json.loads(r["meta"])
    model, processor = load_vlm(path)
    images, prompts = [decode_image(r["image"]) for r in rows], [r["prompt"] for r in rows]
    responses = sample_responses(model, processor, images, prompts, max_new_tokens=6, seed=0)
    responses[1] = responses[1][:2]  # uneven lengths: right padding must not matter
    seq = build_sequences(encode_prompt(processor, images, prompts), responses,
                          processor.tokenizer.pad_token_id)
    return {"path": path, "model": model, "processor": processor, "rows": rows,
            "images": images, "prompts": prompts, "responses": responses, "seq": seq,
            "data": tmp / "w" / "pref_train.parquet"}


def test_build_sequences_appends_responses_after_the_prompt(tiny):
    seq, responses = tiny["seq"], tiny["responses"]
    p = seq.prompt_len
    for i, r in enumerate(responses):
        assert seq.inputs["input_ids"][i, p: p + len(r)].tolist() == r
        assert seq.action_mask[i].sum() == len(r)
        assert seq.inputs["attention_mask"][i, p:].sum() == len(r)
    with pytest.raises(ValueError, match="no token"):
        build_sequences(_fake_prompt(2), [[1], []], pad_id=0)


def test_an_engines_share_of_the_prompts_is_encoded_as_its_rows_alone(tiny):
    """Fails if an engine given some rows of the batch's encoded prompts (tokens and image
    tensors made once by the loop) sees other padding than `encode_prompt` of those rows gives."""
    from nsft_ray.algorithms.ppo import prompt_rows, split_images

    processor, images, prompts = tiny["processor"], tiny["images"], tiny["prompts"]
    tokens, pixels = split_images(encode_prompt(processor, images, prompts))
    for rows in ([1, 3], [2], [0, 1, 2, 3]):
        alone = encode_prompt(processor, [images[i] for i in rows], [prompts[i] for i in rows])
        got = prompt_rows(tokens, pixels, torch.tensor(rows))
        assert got.keys() == alone.keys()
        for k in alone:
            torch.testing.assert_close(got[k], alone[k], rtol=0, atol=0)


def test_sample_responses_greedy_is_deterministic_and_stops_after_eos(tiny):
    args = (tiny["model"], tiny["processor"], tiny["images"][:2], tiny["prompts"][:2])
    a = sample_responses(*args, max_new_tokens=6, greedy=True)
    b = sample_responses(*args, max_new_tokens=6, greedy=True)
    eos = tiny["processor"].tokenizer.eos_token_id
    assert a == b and all(1 <= len(r) <= 6 and eos not in r[:-1] for r in a)


def test_rollouts_never_contain_the_image_token(tiny):
    model, processor = tiny["model"], tiny["processor"]
    (image_id,) = image_token_ids(processor)

    def favour_image(module, args, logits):  # the image token becomes the argmax everywhere
        logits[..., image_id] += 1e4
        return logits

    handle = model.lm_head.register_forward_hook(favour_image)
    try:
        for greedy in (True, False):
            out = sample_responses(model, processor, tiny["images"], tiny["prompts"],
                                   max_new_tokens=4, greedy=greedy, seed=0)
            assert all(r and image_id not in r for r in out)
    finally:
        handle.remove()
    with pytest.raises(ValueError, match="response 1 contains the image token"):
        build_sequences(_fake_prompt(2), [[5], [6, image_id]], 0, image_token_id=image_id)


@torch.no_grad()
def test_response_logprobs_equal_the_full_forward_and_ignore_padding(tiny):
    model, seq = tiny["model"], tiny["seq"]
    logps, _ = response_logprobs(model, seq)
    ids, p = seq.inputs["input_ids"], seq.prompt_len
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[:, p:] = ids[:, p:].masked_fill(~seq.action_mask, IGNORE_INDEX)
    full = token_logprobs(model(**seq.inputs).logits, labels)[:, p - 1:]
    torch.testing.assert_close(logps, full)
    # Row 1 alone (no left padding of its prompt, no right padding of its response).
    alone = build_sequences(encode_prompt(tiny["processor"], tiny["images"][1:2],
                                          tiny["prompts"][1:2]), tiny["responses"][1:2], 0)
    n = len(tiny["responses"][1])
    torch.testing.assert_close(response_logprobs(model, alone)[0][0, :n], logps[1, :n],
                               atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_values_are_taken_before_each_token_and_scores_on_the_last_token(tiny):
    seq = tiny["seq"]
    torch.manual_seed(0)
    critic = VLMWithValueHead(tiny["model"]).eval()
    full = critic(seq.inputs)  # (B, P + R)
    values, scores = response_values(critic, seq), sequence_scores(critic, seq)
    p = seq.prompt_len
    for i, r in enumerate(tiny["responses"]):
        torch.testing.assert_close(values[i, : len(r)], full[i, p - 1: p - 1 + len(r)])
        assert values[i, len(r):].abs().sum() == 0
        torch.testing.assert_close(scores[i], full[i, p + len(r) - 1])


def _experience(tiny, cfg: PPOConfig) -> tuple[Experience, torch.nn.Module]:
    model, _ = load_vlm(tiny["path"])  # a fresh copy to train
    seq = tiny["seq"]
    with torch.no_grad():
        old = response_logprobs(model, seq)[0]
    ref = old - 0.1 * seq.action_mask  # a reference that disagrees a little
    values = torch.zeros_like(old)
    exp, _ = make_experience(seq, old, ref, values, torch.tensor([1.0, -1.0, 0.5, -0.5]), cfg)
    return exp, model


def test_first_update_has_ratio_one_and_the_surrogate_improves(tiny):
    cfg = PPOConfig(ppo_epochs=2, mini_batch_size=2, kl_coef=0.1, entropy_coef=0.01)
    exp, model = _experience(tiny, cfg)
    mask = exp.seq.action_mask
    loss, metrics = actor_loss(model, exp, cfg)
    # Before any step pi == pi_old: ratio 1, nothing clipped, L = -mean(A) - c_H * H.
    assert metrics["ratio"] == pytest.approx(1.0) and metrics["clip_fraction"] == 0.0
    expected = -masked_mean(exp.advantages, mask) - 0.01 * metrics["entropy"]
    assert float(loss.detach()) == pytest.approx(float(expected), abs=1e-6)

    before = state_digest(model)
    optim = OptimConfig(lr=1e-3, schedule="constant", warmup_ratio=0.0)
    optimizer = make_optimizer(model, optim)
    calls = []
    engine = TorchEngine(model, optimizer, make_scheduler(optimizer, optim, 4), 1.0)
    out = ppo_update(engine, exp, lambda m, e: actor_loss(m, e, cfg), epochs=2,
                     mini_batch_size=2, seed=0, reduce_grads=lambda m: calls.append(1))
    assert len(calls) == 4 and state_digest(model) != before  # 2 epochs x 2 mini-batches
    assert {"policy_loss", "clip_fraction", "approx_kl", "entropy", "grad_norm"} <= set(out)
    with torch.no_grad():
        new = response_logprobs(model, exp.seq)[0]
    # PPO ascends the surrogate mean(A * rho): it must beat mean(A * 1) after the update.
    gain = masked_mean(exp.advantages * torch.exp(new - exp.old_logps), mask)
    assert gain > masked_mean(exp.advantages, mask) + 1e-4
    with pytest.raises(ValueError, match="mini-batches of 3"):
        ppo_update(engine, exp, lambda m, e: actor_loss(m, e, cfg), epochs=1,
                   mini_batch_size=3, seed=0)


def test_kl_as_a_loss_term_and_the_critic_loss(tiny):
    cfg = PPOConfig(kl_in_reward=False, kl_coef=0.2, kl_estimator="k3", entropy_coef=0.0)
    exp, model = _experience(tiny, cfg)
    mask = exp.seq.action_mask
    loss, metrics = actor_loss(model, exp, cfg)
    policy, _ = ppo_policy_loss(exp.old_logps, exp.old_logps, exp.advantages, mask, 0.2)
    kl, _ = kl_penalty(exp.old_logps, exp.ref_logps, mask, kl_k3)
    assert float(loss.detach()) == pytest.approx(float(policy + 0.2 * kl), abs=1e-6)
    assert metrics["kl_loss"] == pytest.approx(float(kl), abs=1e-6)

    torch.manual_seed(0)
    critic = VLMWithValueHead(model).eval()
    with torch.no_grad():
        v = response_values(critic, exp.seq)
    exp.values = v  # V == V_old: the clipped and unclipped errors coincide
    loss, metrics = critic_loss(critic, exp, cfg)
    expected = 0.5 * masked_mean((v - exp.returns) ** 2, mask)
    assert float(loss.detach()) == pytest.approx(float(expected), rel=1e-5)
    assert metrics["value_clip_fraction"] == 0.0


def test_prompt_loading_quarantines_bad_rows_and_config_checks_name_the_key(tiny, tmp_path):
    from nsft_ray.algorithms.ppo import check_ppo_config, load_prompts
    from nsft_ray.config import load_config
    from nsft_ray.schema import preference_table

    good = dict(tiny["rows"][0])
    rows = [good, {**good, "id": "empty", "prompt": " "}, {**good, "id": "broken", "image": b"x"},
            {**good, "id": "no-scene", "meta": {"question": good["meta"]["question"]}}]
    pq.write_table(preference_table(rows), tmp_path / "p.parquet")
    base = [f"train.data=[{tmp_path / 'p.parquet'}]", f"model.name_or_path={tiny['path']}"]
    kept, bad = load_prompts(load_config(None, [*base, "ppo.reward=rules"]))
    assert [r["id"] for r in kept] == [good["id"]]
    reasons = {b["id"]: b["reason"] for b in bad}
    assert reasons["empty"] == "empty prompt" and "does not decode" in reasons["broken"]
    assert "scene" in reasons["no-scene"]
    kept, _ = load_prompts(load_config(None, [*base, "ppo.reward=model"]))
    assert len(kept) == 2  # a learned reward model needs no scene graph

    with pytest.raises(ValueError, match="ppo.reward_model"):
        check_ppo_config(load_config(None, base))
    with pytest.raises(ValueError, match="has no value_head.safetensors"):
        check_ppo_config(load_config(None, [*base, f"ppo.reward_model={tiny['path']}"]))
    with pytest.raises(ValueError, match="ppo.roles.critic.num_actors=3"):
        check_ppo_config(load_config(None, [*base, "ppo.reward=rules", "ppo.mini_batch_size=2",
                                            "ppo.roles.critic.num_actors=3"]))


# ------------------------------------------------------------------------- the recipe in-process


def _ppo_overrides(tiny, run_dir, reward_model, *more: str) -> list[str]:
    return [f"run.dir={run_dir}", f"model.name_or_path={tiny['path']}",
            f"train.data=[{tiny['data']}]", f"ppo.reward_model={reward_model}",
            "ppo.rollout_batch_size=4", "ppo.mini_batch_size=2", "ppo.max_new_tokens=6",
            "ppo.kl_estimator=k3", "optim.lr=3e-3", "optim.schedule=constant",
            "optim.warmup_ratio=0.0", *more]


@pytest.fixture(scope="module")
def reward_model(tiny, tmp_path_factory):
    """Stand-in for the reward-model trainer's output: a fresh value head on the tiny backbone."""
    from nsft_ray.models import save_value_model

    torch.manual_seed(0)
    return save_value_model(VLMWithValueHead(load_vlm(tiny["path"])[0]),
                            tmp_path_factory.mktemp("rm") / "rm", tiny["processor"])


def test_ppo_runs_in_one_process_with_ray_blocked(tiny, reward_model, tmp_path):
    """Two iterations of the whole recipe in one process where `import ray` fails.

    Fails if the recipe needs Ray; if the actor does not learn or the reference does (weight
    digests); if the KL term is always zero (k3 is 0 exactly where actor == reference, i.e. at
    iteration 1 only, then > 0 once the actor moved); if the exported model is not the trained
    actor; or if resuming from iteration 1's checkpoint does not end where the uninterrupted run
    ended (the loop.TorchEngine states of actor and critic).
    """
    from conftest import run_with_ray_blocked

    from nsft_ray.algorithms.ppo import train_ppo_in_process
    from nsft_ray.config import load_config

    run = tmp_path / "run"
    overrides = _ppo_overrides(tiny, run, reward_model, "ppo.iterations=2",
                               "ppo.checkpoint_every=1")
    out = run_with_ray_blocked(
        "from nsft_ray.config import load_config\n"
        "from nsft_ray.algorithms.ppo import train_ppo_in_process\n"
        f"train_ppo_in_process(load_config(None, {overrides!r}))\n")
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2] and summary["samples"] == 8
    assert lines[0]["ppo/kl"] == 0.0 and all(m["ppo/kl"] > 0 for m in lines[1:])
    d = summary["digests"]
    initial = state_digest(load_vlm(tiny["path"])[0])
    assert d["reference_start"] == d["reference_end"] == d["actor_start"] == [initial]
    assert d["actor_end"] != [initial]
    assert [state_digest(load_vlm(summary["model"])[0])] == d["actor_end"]
    assert "ppo/sync_greedy_match" not in lines[0]  # no engine copy in-process: nothing to sync
    process = summary["memory"]["measured"]["process"]  # one process holds all four models
    assert 0 < process["runtime_bytes"] < process["peak_bytes"]
    assert process["model_bytes"] == process["peak_bytes"] - process["runtime_bytes"]

    shutil.rmtree(run / "checkpoints" / "iter_000002")  # as if it died during iteration 2
    shutil.rmtree(run / "model")
    resumed = train_ppo_in_process(load_config(None, overrides))
    assert resumed["resumed_from_iteration"] == 1 and resumed["samples"] == 4
    assert resumed["digests"]["actor_end"] == d["actor_end"]
    assert [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()
            ] == [1, 2]


def test_rollout_scores_are_the_reward_models_score_of_each_answer_alone(
        tiny, reward_model, tmp_path):
    """One iteration through InProcessRoles; each rollout's score recomputed on its own
    (prompt encoded alone, no padding at all, the reward model's full forward read at the
    answer's last token). Fails if scores are read at a padding position or rows are mismatched
    between the prompts, the responses and the scores."""
    from nsft_ray.algorithms.ppo import InProcessRoles, load_prompts, ppo_iteration
    from nsft_ray.config import load_config
    from nsft_ray.models import load_value_model

    seen = {}

    class Recording(InProcessRoles):
        def generate(self, prompts, seed):
            seen["rows"] = prompts.rows
            responses = super().generate(prompts, seed)
            responses[1] = responses[1][:2]  # uneven lengths: right padding must not matter
            return responses

        def reward_scores(self, seq, images, texts, metas):
            seen["seq"], seen["scores"] = seq, super().reward_scores(seq, images, texts, metas)
            return seen["scores"]

    cfg = load_config(None, _ppo_overrides(tiny, tmp_path / "run", reward_model))
    roles = Recording(cfg)
    rows, _ = load_prompts(cfg)
    line = ppo_iteration(0, roles, rows, tiny["processor"], cfg.ppo, cfg.run.seed)
    seq, scores = seen["seq"], seen["scores"]
    p = seq.prompt_len
    assert not seq.inputs["attention_mask"].all()  # left- and right-padded rows
    rm, processor = load_value_model(reward_model)
    for i, row in enumerate(seen["rows"]):
        alone = encode_prompt(processor, [decode_image(row["image"])], [row["prompt"]])
        answer = seq.inputs["input_ids"][i, p:][seq.action_mask[i]]
        alone["input_ids"] = torch.cat([alone["input_ids"], answer[None]], dim=1)
        alone["attention_mask"] = torch.ones_like(alone["input_ids"])
        with torch.no_grad():
            expected = rm(alone)[0, -1]
        torch.testing.assert_close(scores[i], expected, atol=1e-5, rtol=1e-5)
    assert line["ppo/score"] == pytest.approx(float(scores.mean()))
