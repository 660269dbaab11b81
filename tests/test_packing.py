"""train.pack_tokens: padding-free rows of several conversations give the padded batch's losses.

Oracle: the same conversations right-padded one per row (the default collation), through the
model's forward with an attention mask. Each term's token sum and count, the loss and the
trainable gradients must agree to 1e-5.
"""

from __future__ import annotations

import os

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"

import torch  # noqa: E402

from nsft_ray.algorithms import conversation_collate  # noqa: E402
from nsft_ray.algorithms.nsft import nsft_objective  # noqa: E402
from nsft_ray.algorithms.sft import sft_objective  # noqa: E402
from nsft_ray.config import (  # noqa: E402
    Config,
    ConfigError,
    ModelConfig,
    NSFTConfig,
    TrainConfig,
    load_config,
)
from nsft_ray.image_features import ImageFeatureCache, with_cached_image_features  # noqa: E402
from nsft_ray.loop import samples_in  # noqa: E402
from nsft_ray.models import build_tiny_vlm, freeze, load_vlm  # noqa: E402
from tests.test_image_features import CORPUS, NO, QA, png  # noqa: E402

TWO_TURNS = [*QA, {"role": "user", "content": "How many squares are there?"},
             {"role": "assistant", "content": "There are two squares."}]
CONVERSATIONS = [QA, TWO_TURNS, NO, QA, TWO_TURNS]  # unequal lengths: padding would matter
ORIGINS = ["chosen", "negative", "negative", "chosen", "negative"]


def rows() -> dict:
    colors = ["red", "blue", "green", "red", "yellow"]
    return {"id": [f"r{i}" for i in range(5)], "image": [png(c) for c in colors],
            "messages": CONVERSATIONS, "origin": ORIGINS}


@pytest.fixture(scope="module", params=["idefics3", "llava"])
def tiny(request, tmp_path_factory):
    path = build_tiny_vlm(tmp_path_factory.mktemp(request.param) / "m", CORPUS, arch=request.param)
    model, processor = load_vlm(path)
    return model.train(), processor


def terms(model, objective, batch):
    """(per-term sums, per-term counts, loss, trainable grads) of one micro-batch."""
    model.zero_grad(set_to_none=True)
    counts = objective.count(batch)
    sums, _ = objective.forward(model, batch)
    loss = sum(objective.weights[k] * sums[k] / max(counts[k], 1.0) for k in sums)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return ({k: float(v.detach()) for k, v in sums.items()}, counts, float(loss.detach()), grads)


def assert_same(a, b):
    assert a[1] == b[1]  # the token counts of each term
    # Each term's token mean (a sum of ~60 float32 terms differs in its last bits).
    means = [{k: s[k] / s_counts[k] for k in s} for s, s_counts in (a[:2], b[:2])]
    assert means[0] == pytest.approx(means[1], abs=1e-5)
    assert a[2] == pytest.approx(b[2], abs=1e-5)
    assert set(a[3]) == set(b[3])
    for name in a[3]:
        torch.testing.assert_close(a[3][name], b[3][name], atol=1e-5, rtol=1e-5, msg=name)


def collate(processor, pack_tokens: int):
    cfg = Config(train=TrainConfig(max_length=128, pack_tokens=pack_tokens))
    return conversation_collate(processor, cfg)(rows())


@pytest.mark.parametrize("objective", [sft_objective(), nsft_objective(NSFTConfig(lam=0.7))],
                         ids=["sft", "nsft"])
def test_packed_rows_give_the_padded_losses_and_gradients(tiny, objective):
    """Fails if attention crosses conversations in a row, if images land in another
    conversation's image tokens, or if nSFT's chosen/negative token masks are not packed with
    their tokens (each term's sum and count are compared, not only the total)."""
    model, processor = tiny
    padded = collate(processor, 0)
    lengths = padded["attention_mask"].sum(1).tolist()
    budget = 128 + 64
    packed = collate(processor, budget)
    assert packed["input_ids"].shape[0] < len(CONVERSATIONS)  # it did pack
    assert packed["input_ids"].shape[1] <= budget
    first = packed["position_ids"][0].tolist()  # restarts where conversation 1 begins
    assert first[:lengths[0] + 1] == [*range(lengths[0]), 0]
    assert samples_in(packed) == len(CONVERSATIONS) and samples_in(padded) == len(CONVERSATIONS)
    assert int(packed["attention_mask"].sum()) == int(padded["attention_mask"].sum())
    expected = terms(model, objective, padded)
    assert_same(terms(model, objective, packed), expected)
    # The oracle can tell: without the restart, attention crosses conversations.
    leaky = {**packed, "position_ids": torch.arange(packed["input_ids"].shape[1]).expand_as(
        packed["position_ids"]).contiguous()}
    assert abs(terms(model, objective, leaky)[2] - expected[2]) > 1e-4


def test_packing_with_cached_image_features_gives_the_padded_uncached_loss(tiny):
    """The demo's combination (frozen tower, cached features, packed rows) against the plain
    padded forward: fails if the cache's image order differs from packed image-token order."""
    model, processor = tiny
    freeze(model, ("vision", "connector"))
    try:
        objective = nsft_objective(NSFTConfig(lam=0.7))
        cached = with_cached_image_features(objective, ImageFeatureCache(model))
        expected = terms(model, objective, collate(processor, 0))
        assert_same(terms(model, cached, collate(processor, 128 + 64)), expected)
    finally:
        for p in model.parameters():
            p.requires_grad_(True)


@pytest.mark.parametrize("pack_tokens", [0, 256], ids=["padded", "packed"])
def test_answer_logprobs_keep_only_scoring_logits_with_the_full_forwards_values(tiny,
                                                                                pack_tokens):
    """The objectives' log-probs (sft, nsft and dpo call `answer_logprobs`): oracle, the full
    forward's logits through `token_logprobs`. Values and gradients agree; the output layer saw
    only the positions that score an answer token. Fails if the kept positions are off by one
    (another token's logits), miss a row's answer, or if logits_to_keep is ignored (the output
    layer would run over every image and prompt position)."""
    from nsft_ray.algorithms.sft import answer_logprobs, model_inputs
    from nsft_ray.logprobs import target_mask, token_logprobs

    model, processor = tiny
    batch = collate(processor, pack_tokens)
    positions: list[int] = []
    hook = model.get_output_embeddings().register_forward_hook(
        lambda _m, _i, out: positions.append(out.shape[1]))

    def grads(values):
        model.zero_grad(set_to_none=True)
        (values * torch.linspace(0.5, 1.5, values.numel()).view_as(values)).sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    try:
        kept = answer_logprobs(model, batch)
        kept_grads = grads(kept)
        full = token_logprobs(model(**model_inputs(batch)).logits, batch["labels"])
        full_grads = grads(full)
    finally:
        hook.remove()
    length = batch["labels"].shape[1]
    assert positions == [int(target_mask(batch["labels"]).any(0).sum()), length]
    assert positions[0] < length / 2  # most positions are image and prompt
    torch.testing.assert_close(kept, full, atol=1e-6, rtol=1e-5)
    assert set(kept_grads) == set(full_grads)
    for name in kept_grads:
        torch.testing.assert_close(kept_grads[name], full_grads[name], atol=1e-6, rtol=1e-5,
                                   msg=name)


def test_pack_tokens_below_max_length_is_refused():
    with pytest.raises(ConfigError, match=r"train.pack_tokens=64: expected 0 .*max_length=128"):
        load_config(None, ["train.max_length=128", "train.pack_tokens=64"])


def test_fit_with_cached_features_and_packing_trains_like_the_plain_loop(tmp_path):
    """loop.fit through ALGORITHMS["nsft"] (as bench_train and the Ray worker build it), 3
    optimizer steps: fails if the fast options change any step's loss or the trained weights,
    e.g. features cached before an update that should have changed them."""
    from nsft_ray.algorithms import ALGORITHMS
    from nsft_ray.config import OptimConfig
    from nsft_ray.loop import Hooks, TorchEngine, fit, make_scheduler

    path = build_tiny_vlm(tmp_path / "m", CORPUS)
    optim = OptimConfig(warmup_ratio=0.0, schedule="constant")
    spec = ALGORITHMS["nsft"]
    batches = [{k: v[i:i + 3] for k, v in rows().items()} for i in (0, 2)]  # two epochs' worth

    def train(fast: bool):
        torch.manual_seed(0)
        cfg = Config(train=TrainConfig(max_length=128, pack_tokens=128 + 64 if fast else 0,
                                       cache_image_features=fast, cache_encoded=fast),
                     model=ModelConfig(freeze=("vision", "connector")))
        model, processor = load_vlm(path)
        freeze(model, cfg.model.freeze)
        collate = spec.collate(processor, cfg)
        # SGD: the update is linear in the gradient; Adam's normalisation would magnify float
        # rounding on near-zero gradients into visible weight differences (as in test_loop).
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        engine = TorchEngine(model, opt, make_scheduler(opt, optim, 3), optim.max_grad_norm)
        logs = []
        fit(spec.objective(cfg, model, "cpu"), engine, lambda e: [collate(b) for b in batches],
            total_steps=3, grad_accum=1, hooks=Hooks(log=logs.append, log_every=1))
        return [m["train/loss"] for m in logs], [m["samples"] for m in logs], model

    plain_losses, plain_samples, plain = train(False)
    fast_losses, fast_samples, fast = train(True)
    assert fast_losses == pytest.approx(plain_losses, abs=1e-5)
    assert fast_samples == plain_samples == [3, 6, 9]  # conversations, not packed rows
    for (name, a), b in zip(plain.named_parameters(), fast.parameters(), strict=True):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4, msg=name)


# ------------------------------------------------------------------ preference pairs (dpo, reward)

PAIRS = {"id": [f"p{i}" for i in range(3)], "image": [png(c) for c in ("red", "blue", "green")],
         "prompt": ["Is there a red square?", "Describe the picture.", "How many squares?"],
         # unequal answer lengths, chosen and rejected alike: padding would matter
         "chosen": ["Yes.", "A blue square on the left and a red circle.", "Two."],
         "rejected": ["No, there is no red square in this picture.", "A cat.", "Three squares."]}


def pair_collate(processor, pack_tokens: int):
    from nsft_ray.algorithms import preference_collate

    cfg = Config(train=TrainConfig(max_length=128, pack_tokens=pack_tokens))
    return preference_collate(processor, cfg)(PAIRS)


def test_sums_and_last_tokens_by_sequence_by_hand():
    """Two packed rows of three sequences (-1: padding). Values at [:, t] score token t + 1."""
    from nsft_ray.algorithms.reward import last_token_scores_packed
    from nsft_ray.logprobs import sums_by_sequence

    ids = torch.tensor([[0, 0, 1, 1, 1], [2, 2, 2, -1, -1]])
    values = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]])
    # seq 0: token 1 -> 1.0; seq 1: tokens 2, 3, 4 -> 2 + 3 + 4; seq 2: tokens 1, 2 -> 5 + 6
    assert sums_by_sequence(values, ids).tolist() == [1.0, 9.0, 11.0]
    per_token = torch.arange(10.0).reshape(2, 5)
    assert last_token_scores_packed(per_token, ids).tolist() == [1.0, 4.0, 7.0]


@pytest.mark.parametrize("loss,sft_weight", [("sigmoid", 0.0), ("ipo", 0.5)])
def test_packed_pairs_give_the_padded_dpo_loss_and_gradients(tiny, loss, sft_weight):
    """DPO with a live reference, padded (shared prefix, the default) against packed: fails if a
    sequence's log-prob takes tokens of another, if the pair count or the answer lengths (ipo,
    sft_weight) are counted per packed row, or if packing drops the chosen/rejected order."""
    from nsft_ray.algorithms import frozen_copy
    from nsft_ray.algorithms.dpo import dpo_objective
    from nsft_ray.config import DPOConfig

    model, processor = tiny
    objective = dpo_objective(DPOConfig(loss=loss, sft_weight=sft_weight, beta=0.5),
                              frozen_copy(model))
    padded, packed = pair_collate(processor, 0), pair_collate(processor, 128 + 64)
    assert packed["input_ids"].shape[0] < padded["input_ids"].shape[0] == 6  # it did pack
    expected = terms(model, objective, padded)
    # The policy equals its reference here, so the DPO term alone would not see a wrong sum:
    # compare the summed log-probs themselves too (the metrics the objective reports).
    got = terms(model, objective, packed)
    assert_same(got, expected)
    _, extra_padded = objective.forward(model, padded)
    _, extra_packed = objective.forward(model, packed)
    for k in ("logps_chosen", "logps_rejected"):
        assert extra_packed[k] == pytest.approx(extra_padded[k], abs=1e-5)
    leaky = {**packed, "position_ids": torch.arange(packed["input_ids"].shape[1]).expand_as(
        packed["position_ids"]).contiguous()}
    assert abs(objective.forward(model, leaky)[1]["logps_chosen"]
               - extra_padded["logps_chosen"]) > 1e-4


def test_packed_pairs_give_the_padded_reward_loss_and_gradients(tiny):
    """Bradley-Terry on a value head: fails if a packed sequence is scored anywhere but at its
    own last token."""
    from nsft_ray.algorithms.reward import reward_objective
    from nsft_ray.models import VLMWithValueHead

    model, processor = tiny
    torch.manual_seed(0)
    scorer = VLMWithValueHead(model).train()
    objective = reward_objective()
    padded, packed = pair_collate(processor, 0), pair_collate(processor, 128 + 64)
    assert packed["input_ids"].shape[0] < 6
    assert_same(terms(scorer, objective, packed), terms(scorer, objective, padded))


def test_packed_rows_under_the_configured_eager_kernel_give_the_padded_sdpa_losses(tmp_path):
    """model.attn_implementation reaches the model (fails if load_policy drops it: the model
    would stay on sdpa), and packing holds under another kernel (fails if the conversations of
    a row attend to each other under eager, whose mask transformers builds separately)."""
    from nsft_ray.algorithms import load_policy
    from nsft_ray.algorithms.reward import load_reward_model

    path = build_tiny_vlm(tmp_path / "m", CORPUS)
    sdpa, processor = load_vlm(path)
    eager, _ = load_policy(Config(model=ModelConfig(name_or_path=str(path),
                                                    attn_implementation="eager")))
    assert sdpa.config.text_config._attn_implementation == "sdpa"
    for config in (eager.config, eager.config.text_config, eager.config.vision_config):
        assert config._attn_implementation == "eager"
    reward, _ = load_reward_model(Config(model=ModelConfig(name_or_path=str(path),
                                                           attn_implementation="eager")))
    assert reward.base.config.text_config._attn_implementation == "eager"
    objective = nsft_objective(NSFTConfig(lam=0.7))
    expected = terms(sdpa.train(), objective, collate(processor, 0))
    assert_same(terms(eager.train(), objective, collate(processor, 128 + 64)), expected)


def test_an_attention_kernel_that_cannot_load_names_the_key(tmp_path):
    path = build_tiny_vlm(tmp_path / "m", CORPUS)
    with pytest.raises(ValueError, match=r"model\.attn_implementation='bogus'"):
        load_vlm(path, attn_implementation="bogus")


def test_under_flash_attention_a_micro_batch_packs_into_one_row(tiny):
    """Flash kernels find packed sequences from position_ids only in a one-row batch; with
    several rows they would attend across conversations, silently, on GPU only. Fails if the
    collators keep packing into several rows under flash_attention_2 (the kernel itself cannot
    run here), or if the one-row batch stops giving the padded losses."""
    from nsft_ray.algorithms import preference_collate

    model, processor = tiny
    cfg = Config(model=ModelConfig(attn_implementation="flash_attention_2"),
                 train=TrainConfig(max_length=128, pack_tokens=128))
    packed = conversation_collate(processor, cfg)(rows())
    assert packed["input_ids"].shape[0] == 1 < collate(processor, 128)["input_ids"].shape[0]
    assert int((packed["position_ids"] == 0).sum()) == len(CONVERSATIONS)  # one start each
    objective = nsft_objective(NSFTConfig(lam=0.7))
    assert_same(terms(model, objective, packed), terms(model, objective, collate(processor, 0)))
    pairs = preference_collate(processor, cfg)(PAIRS)
    assert pairs["input_ids"].shape[0] == 1
    assert int(pairs["sequence_ids"].max()) + 1 == 2 * len(PAIRS["id"])  # chosen + rejected
