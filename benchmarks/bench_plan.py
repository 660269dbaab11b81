"""The memory planner against measurement: predicted vs measured peak bytes per role, on CPU.

    .venv/bin/python benchmarks/bench_plan.py --sizes tiny small --out runs/bench/plan.json

For each model size (the offline Idefics3 builds of nsft_ray.models.SIZES) this runs, in this
process and in float32 like a CPU cluster worker:

- sft, nsft with its KL reference (two resident models) and dpo with a live reference: two
  optimizer steps of the recipe (`ALGORITHMS[algo]`, `loop.fit`, `loop.TorchEngine`) on one
  micro-batch; the measured peak is the trainer process's, both models included;
- one PPO iteration (`algorithms.ppo.ppo_iteration` on `InProcessRoles`): each call a role
  makes (log-probs, values, scores, updates) is measured on its own, so a role's peak is its own
  model, optimizer state and working memory, not the other roles'.

Measured: torch's MemTracker (torch.distributed._tools.mem_tracker), which follows every tensor
storage that is alive (parameters, gradients, optimizer states, activations, temporaries): the
same quantity as CUDA's max_memory_allocated on a GPU, free of the Python interpreter, the
allocator's cache and shared libraries that the process RSS would add. Predicted:
nsft_ray.plan.method_roles for the same model, micro-batch and sequence lengths (the batch's
padded lengths and the longest response, as the plan's `train.max_length`/`ppo.max_new_tokens`
would be set for it). The trainer process's prediction is the sum of its roles. Prints a table
and writes JSON; tests/test_bench_plan.py holds the result within 15%.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from torch.distributed._tools.mem_tracker import MemTracker  # noqa: E402

CPU = torch.device("cpu")
PPO_ROLES = ("actor", "critic", "reward", "reference")
TRAINER_METHODS = {  # method -> (algorithm, overrides): the models each keeps resident
    "sft": ("sft", []),
    "nsft+kl": ("nsft", ["nsft.kl_coef=0.1"]),
    "dpo": ("dpo", ["dpo.precompute_ref=false"]),
}


def build_assets(root: Path, size: str) -> dict[str, Path]:
    """A ShapesWorld split, the Idefics3 VLM of `size` and a value-head reward model on it."""
    import nsft_ray.world as world
    from nsft_ray.config import WorldConfig
    from nsft_ray.models import VLMWithValueHead, build_tiny_vlm, load_vlm, save_value_model

    model = build_tiny_vlm(root / size, world.corpus(WorldConfig(), n=300, seed=0), size=size)
    if not (root / "world").exists():
        world.write_world(WorldConfig(n_train=16, n_eval=4), root / "world", seed=0)
    base, processor = load_vlm(model)
    save_value_model(VLMWithValueHead(base), root / f"{size}_reward", processor)
    return {"model": model, "reward": root / f"{size}_reward", "world": root / "world"}


class PeakTracker(MemTracker):
    """MemTracker's process-wide live-tensor peak without its per-module statistics, which
    refuse a module that runs twice in one session (two steps, a policy's chosen and rejected
    passes); only the total is used here."""

    def _pre_fw_hook(self, module: Any, inputs: Any) -> None: ...
    def _post_fw_hook(self, module: Any, inputs: Any, outputs: Any) -> None: ...
    def _pre_bw_hook(self, module: Any, args: Any) -> None: ...
    def _post_bw_hook(self, module: Any, args: Any) -> None: ...


def peak_bytes(tracked: list[Any], fn: Callable[[], Any]) -> tuple[Any, int]:
    """fn()'s result and the peak bytes of live tensors while it ran: the `tracked` modules'
    and optimizers' tensors plus everything fn allocates."""
    tracker = PeakTracker()
    tracker.track_external(*tracked)
    with tracker:
        out = fn()
    return out, int(tracker.get_tracker_snapshot("peak")[CPU]["Total"])


def _config(assets: dict[str, Path], overrides: list[str]):
    from nsft_ray.config import load_config

    return load_config(None, [f"model.name_or_path={assets['model']}", "deepspeed.stage=0",
                              "train.cache_image_features=false", "train.cache_encoded=false",
                              *overrides])


def _rows(assets: dict[str, Path], algo: str, batch: int) -> dict:
    """One micro-batch of the world's rows, as Ray Data hands them to the collator."""
    import pyarrow.parquet as pq

    from nsft_ray.negatives.pipeline import construct_rows

    prefs = pq.read_table(assets["world"] / "pref_train.parquet").to_pylist()[:batch]
    if algo == "dpo":
        rows = prefs
    else:
        from nsft_ray.config import Config

        conversations, _ = construct_rows(prefs, Config().negatives)
        rows = (conversations * batch)[:batch]
    return {k: [r[k] for r in rows] for k in rows[0]}


def measure_trainer(method: str, assets: dict[str, Path], batch: int) -> dict:
    """Two optimizer steps of `method`'s recipe on one micro-batch: measured and predicted."""
    from nsft_ray.algorithms import ALGORITHMS
    from nsft_ray.loop import Hooks, TorchEngine, fit, make_optimizer, make_scheduler
    from nsft_ray.plan import method_roles, model_shape

    algo, overrides = TRAINER_METHODS[method]
    cfg = _config(assets, [f"train.micro_batch_size={batch}", *overrides])
    spec = ALGORITHMS[algo]
    model, processor = spec.load(cfg)
    micro = spec.collate(processor, cfg)(_rows(assets, algo, batch))
    optimizer = make_optimizer(model, cfg.optim)
    engine = TorchEngine(model, optimizer, make_scheduler(optimizer, cfg.optim, 2),
                         cfg.optim.max_grad_norm)

    def train() -> None:  # the reference copy is made in here, so it is measured too
        objective = spec.objective(cfg, model, CPU)
        fit(objective, engine, lambda epoch: [micro], total_steps=2, grad_accum=1,
            hooks=Hooks(log=lambda metrics: None))

    _, measured = peak_bytes([model, optimizer], train)
    # The plan sizes activations by train.max_length: here the batch's padded length.
    seqs = micro["input_ids"].shape[1]
    at = _config(assets, [f"train.micro_batch_size={batch}", f"train.max_length={seqs}",
                          *overrides])
    roles = method_roles(algo, at, model_shape(str(assets["model"]), (), at.plan))
    predicted = sum(r.memory.device() for r in roles.values())
    return {"method": method, "role": "+".join(roles), "predicted": predicted,
            "measured": measured, "shape": f"{micro['input_ids'].shape[0]} x {seqs}"}


# The Roles calls of one PPO iteration, by the role whose memory each one uses.
CALL_ROLE = {"actor_logprobs": "actor", "update_actor": "actor", "critic_values": "critic",
             "update_critic": "critic", "reward_scores": "reward",
             "reference_logprobs": "reference"}


def _measured_roles(cfg):
    """InProcessRoles whose every role call is measured on its own (peak per role), and which
    records the scored sequences' prompt and response lengths."""
    from nsft_ray.algorithms.ppo import InProcessRoles, Sequences

    roles = InProcessRoles(cfg)
    roles.peaks, roles.lengths = dict.fromkeys(PPO_ROLES, 0), {}
    held = {"actor": [roles.actor.model, roles.actor.engine.optimizer],
            "critic": [roles.critic.model, roles.critic.engine.optimizer],
            "reference": [roles.reference.model],
            "reward": [m for m in [roles.reward.model] if m is not None]}

    def measured(role: str, call: Callable[..., Any]) -> Callable[..., Any]:
        def run(*args: Any) -> Any:
            if isinstance(args[0], Sequences):
                roles.lengths = {"prompt": args[0].prompt_len,
                                 "response": args[0].action_mask.shape[1]}
            out, peak = peak_bytes(held[role], lambda: call(*args))
            roles.peaks[role] = max(roles.peaks[role], peak)
            return out
        return run

    for name, role in CALL_ROLE.items():
        setattr(roles, name, measured(role, getattr(roles, name)))
    return roles


def measure_ppo(assets: dict[str, Path], batch: int, max_new_tokens: int) -> list[dict]:
    """One PPO iteration in one process; each of the four roles' peak against the plan."""
    from transformers import AutoProcessor

    from nsft_ray.algorithms.ppo import load_prompts, ppo_iteration
    from nsft_ray.plan import method_roles, model_shape

    ppo = [f"train.data=[{assets['world'] / 'pref_train.parquet'}]", "ppo.engine=hf",
           f"ppo.reward_model={assets['reward']}", f"ppo.rollout_batch_size={batch}",
           f"ppo.mini_batch_size={batch // 2}", f"ppo.max_new_tokens={max_new_tokens}"]
    cfg = _config(assets, ppo)
    rows, _ = load_prompts(cfg)
    roles = _measured_roles(cfg)
    processor = AutoProcessor.from_pretrained(cfg.model.name_or_path)
    ppo_iteration(0, roles, rows, processor, cfg.ppo, cfg.run.seed)
    # The plan's sequences: train.max_length (the prompt, image tokens included) + the response.
    at = _config(assets, [*ppo, f"train.max_length={roles.lengths['prompt']}",
                          f"ppo.max_new_tokens={roles.lengths['response']}"])
    plans = method_roles("ppo", at, model_shape(str(assets["model"]), (), at.plan))
    shape = f"{batch} x ({roles.lengths['prompt']} + {roles.lengths['response']})"
    return [{"method": "ppo", "role": r, "predicted": plans[r].memory.device(),
             "measured": roles.peaks[r], "shape": shape} for r in PPO_ROLES]


def measure(size: str, root: Path, batch: int, max_new_tokens: int) -> list[dict]:
    assets = build_assets(root, size)
    results = [measure_trainer(m, assets, batch) for m in TRAINER_METHODS]
    results += measure_ppo(assets, batch, max_new_tokens)
    for r in results:
        r["size"], r["ratio"] = size, r["predicted"] / r["measured"]
    return results


def table(results: list[dict]) -> str:
    head = ["size", "method", "role", "batch", "predicted MiB", "measured MiB",
            "predicted/measured"]
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    for r in results:
        lines.append(" | ".join([r["size"], r["method"], r["role"], r["shape"],
                                 f"{r['predicted'] / 2**20:.1f}", f"{r['measured'] / 2**20:.1f}",
                                 f"{r['ratio']:.3f}"]))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["tiny", "small"])
    parser.add_argument("--batch", type=int, default=4, help="micro-batch; PPO rollout batch")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--out", type=Path, default=Path("runs/bench/plan.json"))
    args = parser.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        results = [r for size in args.sizes
                   for r in measure(size, Path(tmp), args.batch, args.max_new_tokens)]
    print(table(results))
    write_report(args, results)


def write_report(args: argparse.Namespace, results: list[dict]) -> None:
    """args.out: the arguments (as strings) and the results, as JSON."""
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"config": {k: str(v) for k, v in vars(args).items()},
                                    "results": results}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
