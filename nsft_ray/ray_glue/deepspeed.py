"""DeepSpeed for the trainers: the config per ZeRO stage, and an `Engine` adapter for `loop.fit`.

On CPU (the project's CI machines) DeepSpeed runs with ``DS_ACCELERATOR=cpu`` over the gloo process
group Ray Train created; on GPUs over NCCL in bf16. Two JIT compiles are avoided on CPU (see
shared/ENVIRONMENT.md): the shared-memory comm op (disabled below) and DeepSpeed's CPU Adam
(a torch AdamW is passed as the client optimizer instead).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from nsft_ray.config import DeepSpeedConfig, OptimConfig
from nsft_ray.loop import lr_lambda, make_optimizer

__all__ = ["DeepSpeedEngine", "deepspeed_config", "gathered_state_dict"]

CHECKPOINT_TAG = "ds"


def deepspeed_config(ds: DeepSpeedConfig, optim: OptimConfig, *, micro_batch_size: int,
                     grad_accum: int, world_size: int, on_gpu: bool) -> dict:
    """The DeepSpeed JSON config for one run."""
    bf16 = ds.precision == "bf16" or (ds.precision == "auto" and on_gpu)
    stage = ds.zero_stage(world_size)
    zero: dict = {"stage": stage}
    if stage >= 2:
        zero.update(overlap_comm=on_gpu, contiguous_gradients=True)
    if stage == 3:
        zero.update(stage3_gather_16bit_weights_on_model_save=True)
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": on_gpu}
    return {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": micro_batch_size * grad_accum * world_size,
        "gradient_clipping": optim.max_grad_norm,
        "zero_optimization": zero,
        "bf16": {"enabled": bf16},
        # Our AdamW is a torch optimizer; let DeepSpeed use it even with offload (no JIT build).
        "zero_force_ds_cpu_optimizer": False,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


class DeepSpeedEngine:
    """`loop.Engine` on a DeepSpeed engine.

    DeepSpeed counts micro-steps itself: ``engine.step()`` after *every* backward, and it applies
    the optimizer (with clipping and the LR schedule) only at the accumulation boundary. The loop
    already divides each term by its count over the whole step, so DeepSpeed must not divide by
    the accumulation steps again (``scale_wrt_gas=False``).
    """

    def __init__(self, model: nn.Module, ds: DeepSpeedConfig, optim: OptimConfig, *,
                 micro_batch_size: int, grad_accum: int, world_size: int, total_steps: int,
                 on_gpu: bool):
        if not on_gpu:
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        import deepspeed  # imported here: the accelerator is chosen at import time
        import deepspeed.ops

        # Skip the 40 s JIT build of the shared-memory comm op; gloo does the collectives.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        self._zero3 = ds.zero_stage(world_size) == 3
        config = deepspeed_config(ds, optim, micro_batch_size=micro_batch_size,
                                  grad_accum=grad_accum, world_size=world_size, on_gpu=on_gpu)
        optimizer = make_optimizer(model, optim)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(optim, total_steps))
        self.engine, _, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=config,
            dist_init_required=False,  # reuse the process group Ray Train created
        )
        self.model = self.engine

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss, scale_wrt_gas=False)
        self.engine.step()

    def step(self) -> float | None:
        norm = self.engine.get_global_grad_norm()
        return None if norm is None else float(norm)

    def lr(self) -> float:
        return float(self.engine.get_lr()[0])

    def save(self, path: Path, client_state: dict) -> None:
        # Every rank writes its own optimizer/parameter shards; rank 0 also the module states.
        self.engine.save_checkpoint(str(path), tag=CHECKPOINT_TAG, client_state=client_state)

    def load(self, path: Path) -> dict:
        _, client_state = self.engine.load_checkpoint(str(path), tag=CHECKPOINT_TAG)
        if client_state is None:
            raise RuntimeError(f"no DeepSpeed checkpoint with tag {CHECKPOINT_TAG!r} in {path}")
        return client_state

    def module(self) -> nn.Module:
        return self.engine.module

    def full_state_dict(self) -> dict | None:
        """The whole model's weights on rank 0 (ZeRO-3 shards gathered); None on other ranks."""
        return gathered_state_dict(self.engine.module, zero3=self._zero3)


def gathered_state_dict(module: nn.Module, *, zero3: bool) -> dict | None:
    """Collective under ZeRO-3 (every rank must call it); rank 0 gets CPU tensors, others None."""
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    if not zero3:
        return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()} \
            if rank == 0 else None
    import deepspeed

    state = {}
    # Gather one parameter at a time so peak memory stays at one full tensor beyond the shards.
    for name, param in module.named_parameters():
        with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
            if rank == 0:
                state[name] = param.detach().cpu().clone()
    if rank != 0:
        return None
    for name, buf in module.named_buffers():
        state[name] = buf.detach().cpu().clone()
    return state
