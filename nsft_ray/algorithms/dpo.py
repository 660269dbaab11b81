"""dpo: Direct Preference Optimization (Rafailov et al., NeurIPS 2023) on (image, prompt) pairs.

    L_dpo = - mean over pairs of log sigmoid(beta * h),
    h = [log pi(y_w | x) - log pi_ref(y_w | x)] - [log pi(y_l | x) - log pi_ref(y_l | x)]

x = (image, prompt); y_w / y_l the chosen / rejected answer; log pi(y | x) sums the answer's token
log-probs (end-of-turn token included). `dpo.loss` picks the per-pair function of h from
`DPO_LOSSES` (pure functions in losses.py): sigmoid (DPO), ipo (on length-averaged log-probs),
hinge (SLiC-HF), cdpo (conservative, label smoothing), robust (rDPO). `sft_weight` > 0 adds
sft_weight * L_sft(y_w), a token mean over the chosen answers. The DPO term is a mean over the
pairs of the whole optimizer step (count = pairs), so gradient accumulation is exact.

log pi(y_w | x) and log pi(y_l | x) share the image, the prompt and the answers' common opening:
with `shared_prefix` (the default) that part runs once per pair and both continuations run on its
KV cache, exactly as one forward over the 2B full rows would score them (tests/test_dpo.py).
With train.pack_tokens the 2B sequences come packed into padding-free rows instead, scored in one
forward and summed per sequence (shared_prefix does not apply: its rows are one pair each).

Models resident: the policy and a frozen reference copy of the starting model (2). With
`precompute_ref`, a Ray Data pass (ray_glue/dpo.py) first writes log pi_ref(y_w | x) and
log pi_ref(y_l | x) into the data with `reference_logps`, and training holds the policy only (1).

What it simplifies against RLHF-PPO: the reward is implicit, r(x, y) = beta log pi / pi_ref (the
partition function cancels in h), so there is no reward model, no critic and no sampling; it
learns from the fixed offline pairs only.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from nsft_ray.algorithms.sft import answer_logprobs, model_inputs
from nsft_ray.config import DPOConfig
from nsft_ray.logprobs import (
    IGNORE_INDEX,
    sequence_logprobs,
    sums_by_sequence,
    target_mask,
    token_logprobs,
)
from nsft_ray.loop import Batch, Objective, samples_in
from nsft_ray.losses import (
    dpo_conservative_loss,
    dpo_robust_loss,
    dpo_sigmoid_loss,
    hinge_loss,
    ipo_loss,
)
from nsft_ray.preference_collate import REF_COLUMNS, split_pairs

__all__ = ["DPO_LOSSES", "dpo_objective", "models_resident", "reference_logps"]

# (policy_chosen, policy_rejected, ref_chosen, ref_rejected: (B,), cfg) -> (mean loss, metrics)
LossFn = Callable[[Tensor, Tensor, Tensor, Tensor, DPOConfig], tuple[Tensor, dict[str, Tensor]]]
DPO_LOSSES: dict[str, LossFn] = {
    "sigmoid": lambda pc, pr, rc, rr, c: dpo_sigmoid_loss(pc, pr, rc, rr, c.beta),
    "ipo": lambda pc, pr, rc, rr, c: ipo_loss(pc, pr, rc, rr, c.beta),
    "hinge": lambda pc, pr, rc, rr, c: hinge_loss(pc, pr, rc, rr, c.beta),
    "cdpo": lambda pc, pr, rc, rr, c: dpo_conservative_loss(pc, pr, rc, rr, c.beta,
                                                            c.label_smoothing),
    "robust": lambda pc, pr, rc, rr, c: dpo_robust_loss(pc, pr, rc, rr, c.beta, c.label_smoothing),
}
AVERAGED = frozenset({"ipo"})  # variants defined on length-averaged log-probs
SMOOTHED = frozenset({"cdpo", "robust"})  # variants that read label_smoothing
# Text models whose positions are one index per token (Llama-style RoPE), so a continuation's
# position ids are its prefix length + offset. Qwen2-VL's 3-D RoPE or PaliGemma's prefix-LM
# attention would need their own rules.
SHARED_PREFIX_MODELS = frozenset({"idefics3", "smolvlm", "llava"})
METRICS = ("rewards_chosen", "rewards_rejected", "reward_margin", "reward_accuracy")


def models_resident(cfg: DPOConfig) -> int:
    return 1 if cfg.precompute_ref else 2


def _per_sequence(values: Tensor, batch: Batch) -> Tensor:
    """Per-target values (R, T - 1), zero where no answer token is scored -> sums (2B,) per
    sequence: per row when padded, by `sequence_ids` when packed."""
    if "sequence_ids" in batch:
        return sums_by_sequence(values, batch["sequence_ids"])
    return values.sum(-1)


def _answer_tokens(batch: Batch) -> Tensor:
    """Answer tokens per sequence (2B,), float."""
    return _per_sequence(target_mask(batch["labels"]).float(), batch)


def _stacked_answer_logps(model: nn.Module, batch: Batch) -> Tensor:
    """Summed answer log-probs (2B,), float32: one forward over the 2B full sequences, padded
    or packed (a packed batch goes without its attention mask: sft.model_inputs)."""
    inputs = {k: v for k, v in model_inputs(batch).items() if k not in REF_COLUMNS}
    # answer_logprobs is 0 off the answer tokens, so a plain sum per sequence is the answer's.
    return _per_sequence(answer_logprobs(model, batch, inputs), batch)


def _shared_prefix_lengths(batch: Batch) -> tuple[Tensor, Tensor, Tensor]:
    """Per pair, the prefix length P (B,) that the chosen and rejected rows share; per row, the
    real length (2B,) and the first answer position (2B,).

    P = (longest common prefix) - 1: the last shared token opens each continuation, so the
    continuation forward has a query at every position whose logits score an unshared token.
    """
    ids, attn, labels = batch["input_ids"], batch["attention_mask"].bool(), batch["labels"]
    cols = torch.arange(ids.shape[1], device=ids.device)
    lengths = attn.sum(-1)  # (2B,)
    if not torch.equal(attn, cols < lengths[:, None]):
        raise ValueError("dpo.shared_prefix: expects right-padded rows (PreferenceCollator's)")
    answered = labels != IGNORE_INDEX
    answer_start = torch.where(answered.any(-1), answered.int().argmax(-1), lengths)  # (2B,)
    (ids_c, ids_r), (len_c, len_r) = split_pairs(ids), split_pairs(lengths)
    shorter = torch.minimum(len_c, len_r)
    differs = (ids_c != ids_r) | (cols >= shorter[:, None])
    common = torch.where(differs.any(-1), differs.int().argmax(-1), shorter)  # (B,)
    # The image sits in the prompt: a pair whose prompts differ cannot share the image forward.
    bad = (common < torch.maximum(*split_pairs(answer_start))).nonzero()
    if len(bad):
        raise ValueError(f"dpo.shared_prefix: pair {int(bad[0])} has different prompt tokens "
                         "in its chosen and rejected rows")
    return common - 1, lengths, answer_start


def _chosen_image_inputs(model: nn.Module, batch: Batch, n_pairs: int) -> dict[str, Any]:
    """The image inputs of the chosen rows 0..B-1 (the rejected rows show the same images)."""
    out: dict[str, Any] = {}
    for k, v in model_inputs(batch).items():
        if k in REF_COLUMNS or k in ("input_ids", "attention_mask", "use_cache"):
            continue
        if k == "mm_encoder_outputs":  # cached features (image_features.py), not pixels
            out[k] = {"image": _first_images(model, batch, n_pairs, v["image"].pooler_output)}
        else:
            out[k] = v[:n_pairs]
    return out


def _first_images(model: nn.Module, batch: Batch, n_rows: int,
                  pooled: Tensor | list[Tensor]) -> Any:
    """The cached features of rows 0..n_rows-1's images. One (tokens, hidden) entry per image,
    row-major over the batch, so those rows' images come first; their count follows from the
    image tokens in those rows."""
    # Imported here, as image_features.py is: the algorithms table loads without transformers.
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    config = getattr(model, "module", model).config  # DDP / DeepSpeed wrap the bare model
    token = getattr(config, "image_token_id", None)
    if token is None:
        token = config.image_token_index
    n_tokens = int((batch["input_ids"][:n_rows] == token).sum())
    return BaseModelOutputWithPooling(pooler_output=pooled[:n_tokens // pooled[0].shape[0]])


def _shared_prefix_answer_logps(model: nn.Module, batch: Batch) -> Tensor:
    """The same (2B,) as `_stacked_answer_logps`, with the shared part run once per pair.

    Forward 1: the B shared prefixes (image, prompt, and the answers' common opening), keeping
    the KV cache and the logits that score the shared answer tokens. Forward 2: the 2B
    continuations against that cache repeated to chosen + rejected rows (gradients flow back
    through it), with position ids that continue each row's own prefix.
    """
    model_type = getattr(model, "module", model).config.model_type  # DDP / DeepSpeed wrap it
    if model_type not in SHARED_PREFIX_MODELS:
        raise ValueError(f"dpo.shared_prefix: model_type {model_type!r} is not one of "
                         f"{', '.join(sorted(SHARED_PREFIX_MODELS))}; set dpo.shared_prefix=false")
    ids, labels = batch["input_ids"], batch["labels"]
    prefix, lengths, answer_start = _shared_prefix_lengths(batch)  # (B,), (2B,), (2B,)
    n_pairs, p_max = prefix.shape[0], int(prefix.max())
    prefix_mask = (torch.arange(p_max, device=ids.device) < prefix[:, None]).long()  # (B, P)
    # Logits only from the first position that scores an answer token (the lm_head over the
    # image and prompt positions would be thrown away); at least one, as logits_to_keep=0
    # means all.
    keep = max(p_max - (int(answer_start.min()) - 1), 1)
    image_inputs = _chosen_image_inputs(model, batch, n_pairs)
    out = model(input_ids=ids[:n_pairs, :p_max], attention_mask=prefix_mask, use_cache=True,
                logits_to_keep=keep, **image_inputs)
    # Those logits predict tokens p_max-keep+1 .. p_max; a row's tokens past its P are not shared.
    # token_logprobs drops the last logits column, so a zero column stands in for it.
    first = p_max - keep
    shared_labels = labels[:n_pairs, first:p_max + 1].masked_fill(
        torch.arange(first, p_max + 1, device=ids.device) > prefix[:, None], IGNORE_INDEX)
    shared_logps = token_logprobs(nn.functional.pad(out.logits, (0, 0, 0, 1)), shared_labels)
    shared = sequence_logprobs(shared_logps, target_mask(shared_labels))  # (B,)

    cache = out.past_key_values
    if cache is None:  # transformers drops the cache under gradient checkpointing
        raise ValueError("dpo.shared_prefix: the model returned no KV cache (gradient "
                         "checkpointing?); set dpo.shared_prefix=false")
    rows = torch.arange(n_pairs, device=ids.device)
    cache.batch_select_indices(torch.cat([rows, rows]))  # chosen rows first, as the collator
    start = prefix.repeat(2)  # (2B,) each row continues from its pair's prefix
    steps = torch.arange(int((lengths - start).max()), device=ids.device)
    index = (start[:, None] + steps).clamp(max=ids.shape[1] - 1)  # (2B, Tc)
    real = steps < (lengths - start)[:, None]
    # Token 0 of a continuation is the last shared one, already scored above; the shift in
    # token_logprobs drops its label, so nothing is counted twice.
    cont_labels = labels.gather(1, index).masked_fill(~real, IGNORE_INDEX)
    logits = model(input_ids=ids.gather(1, index),
                   attention_mask=torch.cat([prefix_mask.repeat(2, 1), real.long()], 1),
                   position_ids=start[:, None] + steps, past_key_values=cache,
                   use_cache=True).logits
    own = sequence_logprobs(token_logprobs(logits, cont_labels), target_mask(cont_labels))
    return shared.repeat(2) + own


def _answer_logps(model: nn.Module, batch: Batch, shared_prefix: bool) -> Tensor:
    packed = "sequence_ids" in batch
    fn = _shared_prefix_answer_logps if shared_prefix and not packed else _stacked_answer_logps
    return fn(model, batch)


@torch.no_grad()
def reference_logps(reference: nn.Module, batch: Batch,
                    shared_prefix: bool = True) -> tuple[Tensor, Tensor]:
    """Summed answer log-probs under a frozen model: (chosen (B,), rejected (B,)), float32.

    The columns `ref_chosen_logps` / `ref_rejected_logps` that the precompute pass writes; the
    live-reference path computes the same numbers inside the objective. `shared_prefix` as
    `DPOConfig.shared_prefix` (the same numbers either way, to float rounding).
    """
    return split_pairs(_answer_logps(reference, batch, shared_prefix))


def dpo_objective(cfg: DPOConfig, reference: nn.Module | None) -> Objective:
    """The DPO objective; `reference` (frozen, eval mode) for the live reference, None when the
    batches carry precomputed `ref_chosen_logps` / `ref_rejected_logps` (cfg.precompute_ref)."""
    if cfg.loss not in DPO_LOSSES:
        raise ValueError(f"dpo.loss={cfg.loss!r}: expected one of {', '.join(DPO_LOSSES)}")
    if cfg.label_smoothing and cfg.loss not in SMOOTHED:
        raise ValueError(f"dpo.label_smoothing={cfg.label_smoothing} has no effect with "
                         f"dpo.loss={cfg.loss!r}; it applies to {', '.join(sorted(SMOOTHED))}")
    if cfg.precompute_ref != (reference is None):
        raise ValueError("dpo: pass a frozen reference model exactly when precompute_ref is false "
                         f"(precompute_ref={cfg.precompute_ref}, reference given: "
                         f"{reference is not None})")
    loss_fn = DPO_LOSSES[cfg.loss]
    weights = {"dpo": 1.0}
    if cfg.sft_weight > 0:
        weights["sft"] = cfg.sft_weight

    def count(batch: Batch) -> dict[str, float]:
        counts = {"dpo": samples_in(batch) / 2}  # pairs
        if "sft" in weights:
            counts["sft"] = float(split_pairs(_answer_tokens(batch))[0].sum())
        return counts

    def forward(model: nn.Module, batch: Batch) -> tuple[dict[str, Tensor], dict[str, float]]:
        if reference is None:
            missing = [c for c in REF_COLUMNS if c not in batch]
            if missing:
                raise KeyError(f"dpo.precompute_ref: batch lacks {missing}; run the precompute "
                               "pass (ray_glue/dpo.py) over the data first")
            ref_logps = torch.cat([batch[c].float() for c in REF_COLUMNS])
        else:
            # Reference first: its activations are freed before the policy's graph is built,
            # so the peak holds one forward's activations, not two.
            ref_logps = torch.cat(reference_logps(reference, batch, cfg.shared_prefix))
        logps = _answer_logps(model, batch, cfg.shared_prefix)  # (2B,) summed over answer tokens
        ref_logps = ref_logps.to(logps)
        sft_sum = -split_pairs(logps)[0].sum()  # the chosen answers' summed NLL, before averaging
        if cfg.loss in AVERAGED:
            n_tokens = _answer_tokens(batch).clamp(min=1)  # (2B,) answer lengths
            logps, ref_logps = logps / n_tokens, ref_logps / n_tokens
        (pc, pr), (rc, rr) = split_pairs(logps), split_pairs(ref_logps)
        loss, metrics = loss_fn(pc, pr, rc, rr, cfg)
        sums = {"dpo": loss * pc.shape[0]}  # every variant is a mean over pairs
        if "sft" in weights:
            sums["sft"] = sft_sum
        extra = {k: float(metrics[k]) for k in METRICS}
        extra.update(logps_chosen=float(pc.detach().mean()),
                     logps_rejected=float(pr.detach().mean()))
        return sums, extra

    return Objective(weights=weights, count=count, forward=forward)
