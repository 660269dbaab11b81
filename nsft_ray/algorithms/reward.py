"""reward: a Bradley-Terry reward model on the VLM (the RM stage of InstructGPT / LLaVA-RLHF).

    L_rm = - mean over pairs of log sigmoid(r(x, y_w) - r(x, y_l)),   r(x, y) = w . h_last + b

x = (image, prompt), y_w / y_l the chosen / rejected answer; h_last is the VLM backbone's last
hidden state at the last non-pad token of the conversation and (w, b) a scalar value head
(`models.ValueHead`). Accuracy = share of pairs with r(y_w) > r(y_l) (ties count as wrong).
The loss is a mean over the pairs of the optimizer step (count = pairs).

Models resident: one (backbone + head; the LM head is frozen and unused). The trained model is
written with `save_value_model` to RUN/model, which PPO loads with `load_value_model`; at the end
`evaluate_reward_model` scores the held-out pairs of `reward.eval_data` (RUN/reward_eval.json).
What it simplifies: one scalar per whole answer (no per-token credit), no margin term.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from nsft_ray.algorithms.sft import model_inputs
from nsft_ray.config import Config
from nsft_ray.loop import Batch, Objective, samples_in
from nsft_ray.losses import bradley_terry_loss
from nsft_ray.preference_collate import REF_COLUMNS, PreferenceCollator, split_pairs

__all__ = [
    "evaluate_reward_model",
    "last_token_scores",
    "last_token_scores_packed",
    "load_reward_model",
    "pair_scores",
    "reward_objective",
    "save_reward_model",
]

METRICS = ("accuracy", "reward_margin", "rewards_chosen", "rewards_rejected")


def last_token_scores(values: Tensor, attention_mask: Tensor) -> Tensor:
    """(B, T) per-token values, (B, T) attention mask -> (B,) value at the last non-pad token."""
    if values.shape != attention_mask.shape:
        raise ValueError(f"values {tuple(values.shape)} and attention_mask "
                         f"{tuple(attention_mask.shape)} must have the same shape")
    positions = torch.arange(values.shape[1], device=values.device)
    # Last position the mask keeps; works for right and left padding alike.
    last = (positions * attention_mask.bool()).argmax(dim=-1)
    return values.gather(1, last.unsqueeze(1)).squeeze(1)


def last_token_scores_packed(values: Tensor, sequence_ids: Tensor) -> Tensor:
    """(R, T) per-token values of packed rows, (R, T) sequence ids (-1 on padding,
    collate.pack) -> (N,) value at each sequence's last token."""
    if values.shape != sequence_ids.shape:
        raise ValueError(f"values {tuple(values.shape)} and sequence_ids "
                         f"{tuple(sequence_ids.shape)} must have the same shape")
    ids = sequence_ids.flatten()
    real = ids >= 0
    position = torch.arange(ids.numel(), device=ids.device)
    last = torch.full((int(ids.max()) + 1,), -1, dtype=torch.long, device=ids.device)
    last = last.scatter_reduce(0, ids[real], position[real], reduce="amax")
    return values.flatten()[last]


def pair_scores(model: nn.Module, batch: Batch) -> tuple[Tensor, Tensor]:
    """Scores of the stacked batch's chosen (B,) and rejected (B,) conversations, padded or
    packed (train.pack_tokens: a packed batch goes without its attention mask,
    sft.model_inputs)."""
    inputs = {k: v for k, v in model_inputs(batch).items() if k not in REF_COLUMNS}
    values = model(inputs)  # (R, T), VLMWithValueHead (or its DDP/DeepSpeed wrapper)
    if "sequence_ids" in batch:
        return split_pairs(last_token_scores_packed(values, batch["sequence_ids"]))
    return split_pairs(last_token_scores(values, batch["attention_mask"]))


def reward_objective() -> Objective:
    def forward(model: nn.Module, batch: Batch) -> tuple[dict[str, Tensor], dict[str, float]]:
        chosen, rejected = pair_scores(model, batch)
        loss, metrics = bradley_terry_loss(chosen, rejected)
        return {"reward": loss * chosen.shape[0]}, {k: float(metrics[k]) for k in METRICS}

    return Objective(weights={"reward": 1.0},
                     count=lambda b: {"reward": samples_in(b) / 2},  # pairs
                     forward=forward)


def load_reward_model(cfg: Config) -> tuple[nn.Module, Any]:
    """A saved value model (continues training), or a VLM with a fresh value head."""
    from nsft_ray.models import VALUE_HEAD_FILE, VLMWithValueHead, load_value_model, load_vlm

    path = Path(cfg.model.name_or_path)
    attention = cfg.model.attn_implementation
    if (path / VALUE_HEAD_FILE).is_file():
        model, processor = load_value_model(path, dtype=cfg.model.dtype,
                                            attn_implementation=attention)
    else:
        base, processor = load_vlm(path, dtype=cfg.model.dtype, attn_implementation=attention)
        # Same head on every worker, whatever each worker's seed (fork_rng keeps theirs).
        with torch.random.fork_rng():
            torch.manual_seed(cfg.run.seed)
            model = VLMWithValueHead(base)
    # Scores come from the hidden states: the LM head gets no gradient, so keep it out of the
    # optimizer (and of DeepSpeed's gradient partitions).
    model.base.get_output_embeddings().requires_grad_(False)
    return model, processor


def save_reward_model(module: nn.Module, processor: Any, out: Path,
                      state_dict: dict | None) -> None:
    """Write what `load_value_model` reads; `state_dict` (gathered under ZeRO-3) wins if given."""
    from safetensors.torch import save_file

    from nsft_ray.models import VALUE_HEAD_FILE, save_value_model

    if state_dict is None:
        save_value_model(module, out, processor)
        return
    # The module's own tensors may be ZeRO-3 partitions: write the gathered weights instead,
    # in the same layout save_value_model writes.
    parts: dict[str, dict[str, Tensor]] = {"base": {}, "value_head": {}}
    for k, v in state_dict.items():
        prefix, _, name = k.partition(".")
        if prefix not in parts:
            raise KeyError(f"reward model state_dict key {k!r}: expected base.* or value_head.*")
        parts[prefix][name] = v
    module.base.save_pretrained(out, state_dict=parts["base"])
    processor.save_pretrained(out)
    save_file({k: v.contiguous() for k, v in parts["value_head"].items()},
              str(Path(out) / VALUE_HEAD_FILE))


@torch.no_grad()
def evaluate_reward_model(model_dir: str | Path, data: str | Path, *, max_length: int,
                          batch_size: int, device: str = "cpu") -> dict[str, float]:
    """Held-out Bradley-Terry loss, accuracy and margin of a saved value model on a preference
    Parquet file (every row is scored; a row that cannot be encoded raises, naming its id)."""
    import pyarrow.parquet as pq

    from nsft_ray.models import load_value_model

    model, processor = load_value_model(model_dir, device=device)
    collate = PreferenceCollator(processor, max_length)
    chosen, rejected = [], []
    for record_batch in pq.ParquetFile(str(data)).iter_batches(batch_size=batch_size):
        batch = {k: v.to(device) for k, v in collate(record_batch.to_pylist()).items()}
        c, r = pair_scores(model, batch)
        chosen.append(c.float().cpu())
        rejected.append(r.float().cpu())
    if not chosen:
        raise ValueError(f"reward.eval_data: {data} holds no rows")
    loss, metrics = bradley_terry_loss(torch.cat(chosen), torch.cat(rejected))
    return {"pairs": int(sum(len(c) for c in chosen)), "loss": float(loss),
            **{k: float(metrics[k]) for k in METRICS}}
