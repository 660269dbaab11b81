"""train_ppo: the PPO controller (the driver; the maths is in algorithms/ppo.py).

One iteration:
    generation  the rollout engines sample responses to a batch of prompts
    experience  actor and reference log-probs, critic values, reward scores (all roles at once),
                then rewards with the KL penalty, GAE and whitening here
    train       actor and critic PPO updates, in parallel
    sync        actor weights -> rollout engines, then greedy(engine) == greedy(actor) is checked

Roles run on their own placement groups (placement.py; a pre-flight check fails fast when the
cluster cannot hold them). Re-running with the same run.dir resumes from the latest checkpoint.

Run folder::

    RUN/config.yaml  metrics.jsonl  metrics.csv  tb/  quarantine.parquet (if any bad row)
        checkpoints/iter_000002/{actor.pt, critic.pt, state.json}
        model/  (the actor, a Hugging Face folder)   critic/  (value model)   summary.json
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pyarrow.parquet as pq
import ray
import torch
from torch import Tensor

from nsft_ray.algorithms.ppo import (
    MODELS_RESIDENT,
    build_sequences,
    make_experience,
    prompt_indices,
)
from nsft_ray.algorithms.reward_rules import meta_problem
from nsft_ray.collate import decode_image, encode_prompt
from nsft_ray.config import Config, save_config
from nsft_ray.data import READ_ERROR, read_preference_file
from nsft_ray.models import VALUE_HEAD_FILE
from nsft_ray.ray_glue.placement import Reservation, ppo_plan, reserve
from nsft_ray.ray_glue.ppo_roles import (
    ActorRole,
    CriticRole,
    HFEngine,
    ReferenceRole,
    RewardRole,
    VLLMEngine,
)
from nsft_ray.ray_glue.train import MetricsWriter, ensure_ray, read_metrics
from nsft_ray.schema import quarantine_table

__all__ = ["check_ppo_config", "load_prompts", "train_ppo"]

PHASES = ("generation", "experience", "train", "sync")


def check_ppo_config(cfg: Config) -> None:
    """Raise ValueError naming the key when the PPO settings cannot work together."""
    ppo = cfg.ppo
    if not cfg.model.name_or_path:
        raise ValueError("model.name_or_path: the actor's starting checkpoint is required")
    if not cfg.train.data:
        raise ValueError("train.data: give the preference Parquet file(s) holding the prompts")
    if ppo.reward == "model" and not ppo.reward_model:
        raise ValueError("ppo.reward_model: a reward-model folder (save_value_model) is needed "
                         "for ppo.reward=model; or set ppo.reward=rules (rule-based ablation)")
    for key in ("reward_model", "critic_model"):
        path = getattr(ppo, key)
        if path and not (ppo.reward == "rules" and key == "reward_model") and not Path(
                path, VALUE_HEAD_FILE).is_file():
            raise ValueError(f"ppo.{key}: {path} has no {VALUE_HEAD_FILE}; expected a folder "
                             "written by save_value_model (the reward-model trainer's output)")
    if ppo.iterations < 1 or ppo.rollout_batch_size < 1 or ppo.samples_per_prompt < 1:
        raise ValueError("ppo.iterations, ppo.rollout_batch_size, ppo.samples_per_prompt: "
                         "expected >= 1")
    n = ppo.rollout_batch_size * ppo.samples_per_prompt
    for role in ("actor", "critic"):
        k = getattr(ppo.roles, role).num_actors
        if n % (k * ppo.mini_batch_size):
            raise ValueError(
                f"ppo.rollout_batch_size * ppo.samples_per_prompt = {n} sequences must split "
                f"evenly over ppo.roles.{role}.num_actors={k} actors in mini-batches of "
                f"ppo.mini_batch_size={ppo.mini_batch_size}")
    if ppo.engine == "vllm" and ppo.roles.rollout.num_gpus > 0 and ppo.roles.actor.num_gpus == 0:
        raise ValueError("ppo.roles.actor.num_gpus: vLLM's GPU weight transfer (NCCL) needs the "
                         "actor on a GPU too")


def load_prompts(cfg: Config) -> tuple[list[dict], list[dict]]:
    """Preference rows -> prompt rows {id, image (bytes), prompt, meta}, and quarantined rows.

    A row is quarantined (with the reason) when its prompt is empty, its image does not decode,
    or, for the rule reward, its meta lacks the scene graph and question. Files in another
    data.format than parquet (JSONL, a published layout) are read onto the contract first; only
    their prompt and image are used (a VLFeedback rating tie is still a good prompt).
    """
    keys = {"id": cfg.data.id_key, "image": cfg.data.image_key, "prompt": cfg.data.prompt_key}
    if cfg.data.format != "parquet":  # read_preference_file has mapped the columns already
        keys = {k: k for k in keys}
    rows, bad = [], []
    for path in cfg.train.data:
        if not Path(path).exists():
            raise FileNotFoundError(f"train.data: {path} does not exist")
        table = (pq.read_table(path) if cfg.data.format == "parquet"
                 else read_preference_file(path, cfg.data))
        missing = [c for c in keys.values() if c not in table.column_names]
        if missing:
            raise ValueError(f"train.data: {path} has no column {missing[0]!r} "
                             f"(columns: {', '.join(table.column_names)})")
        for r in table.to_pylist():
            row = {k: r[c] for k, c in keys.items()} | {"meta": r.get("meta") or "{}"}
            reason = None
            if not isinstance(row["prompt"], str) or not row["prompt"].strip():
                reason = "empty prompt"
            else:
                try:
                    decode_image(row["image"])
                except Exception as e:  # PIL raises many types for broken bytes
                    reason = f"image does not decode: {e!r}"
            # Our readers (not a user's Parquet) leave JSON meta, with what they could not read.
            read_error = (json.loads(row["meta"]).get(READ_ERROR)
                          if reason and cfg.data.format != "parquet" else None)
            if read_error:  # the reader knows why the prompt or image is missing: say that
                reason = f"{read_error['reason']}: {read_error['detail']}"
            if reason is None and cfg.ppo.reward == "rules":
                reason = meta_problem(row["meta"])
            if reason is None:
                rows.append(row)
            else:
                bad.append({"id": row["id"], "stage": "ppo_prompts", "reason": reason,
                            "detail": path, "row": r})
    return rows, bad


# ------------------------------------------------------------------------------------ roles


class _Roles:
    """The Ray actor handles of every role, spawned into their placement-group bundles."""

    def __init__(self, cfg: Config, reservation: Reservation):
        ppo, seed, dtype = cfg.ppo, cfg.run.seed, cfg.model.dtype
        model = cfg.model.name_or_path
        critic_path = ppo.critic_model or (ppo.reward_model if ppo.reward == "model" else model)
        critic_from_actor = not ppo.critic_model and ppo.reward != "model"
        self.vllm_gpu = ppo.engine == "vllm" and ppo.roles.rollout.num_gpus > 0
        max_len = cfg.train.max_length + ppo.max_new_tokens

        def steps(role: str) -> int:  # optimizer steps of the whole run, per actor
            n_seq = ppo.rollout_batch_size * ppo.samples_per_prompt
            k = getattr(ppo.roles, role).num_actors
            return ppo.iterations * ppo.ppo_epochs * n_seq // (k * ppo.mini_batch_size)

        def spawn(role: str, cls, *args) -> list:
            return [cls.options(**reservation.options(role, rank)).remote(*args)
                    for rank in range(reservation.plan.num_actors[role])]

        self.by_role = {
            "actor": spawn("actor", ActorRole, model, dtype, ppo, cfg.optim, steps("actor"),
                           seed, cfg.model.freeze),
            "critic": spawn("critic", CriticRole, critic_path, critic_from_actor, dtype, ppo,
                            cfg.optim, steps("critic"), seed),
            "reward": spawn("reward", RewardRole, ppo.reward, ppo.reward_model, dtype, cfg.world),
            "reference": spawn("reference", ReferenceRole, ppo.reference_model or model, dtype),
            "rollout": (spawn("rollout", VLLMEngine, model, dtype, seed, max_len)
                        if ppo.engine == "vllm" else spawn("rollout", HFEngine, model, dtype)),
        }
        self.actor, self.critic = self.by_role["actor"], self.by_role["critic"]
        self.reward, self.reference = self.by_role["reward"], self.by_role["reference"]
        self.engines = self.by_role["rollout"]

    def all(self) -> list:
        return [h for hs in self.by_role.values() for h in hs]

    def start(self) -> dict[str, list[dict]]:
        """Wait for every actor; join data-parallel groups; check they share one tokenizer."""
        where = {role: ray.get([h.where.remote() for h in hs]) for role, hs in self.by_role.items()}
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
        return where

    def kill(self) -> None:
        for h in self.all():
            ray.kill(h)


def _split(n: int, k: int) -> list[Tensor]:
    return list(torch.arange(n).tensor_split(k))


def _map_rows(handles: list, method: str, obj, *args) -> list:
    """Split `obj` (Sequences / Experience) by rows over `handles`; call `method` on each."""
    return [getattr(h, method).remote(obj.select(rows), *args)
            for h, rows in zip(handles, _split(len(obj), len(handles)), strict=True)]


def _mean_dicts(dicts: list[dict[str, float]]) -> dict[str, float]:
    return {k: sum(d[k] for d in dicts) / len(dicts) for k in dicts[0]}


# ------------------------------------------------------------------------------------ steps


def _generate(roles: _Roles, batch: list[dict], cfg: Config, seed: int
              ) -> tuple[list[list[int]], list[str]]:
    parts = ray.get([
        e.generate.remote([batch[i]["image"] for i in rows], [batch[i]["prompt"] for i in rows],
                          cfg.ppo, seed * 7 + rank)
        for rank, (e, rows) in enumerate(zip(roles.engines, _split(len(batch), len(roles.engines)),
                                             strict=True))])
    return [i for ids, _ in parts for i in ids], [t for _, texts in parts for t in texts]


def _sync(roles: _Roles, cfg: Config, run_dir: Path, check_rows: list[dict]) -> dict[str, float]:
    """Actor weights -> every engine; then compare greedy answers of engine and actor."""
    if cfg.ppo.engine == "hf":
        state = roles.actor[0].state_dict.remote()  # one copy in the object store for all
        ray.get([e.load_state.remote(state) for e in roles.engines])
    elif roles.vllm_gpu:
        ray.get(roles.actor[0].send_weights.remote())
    else:  # vllm-cpu: reload from a save_pretrained folder (must be on storage every node sees)
        path = ray.get(roles.actor[0].export.remote(str(run_dir / "sync_weights")))
        ray.get([e.reload.remote(path) for e in roles.engines])
    if cfg.ppo.sync_check == "off" or not check_rows:
        return {}
    images, prompts = [r["image"] for r in check_rows], [r["prompt"] for r in check_rows]
    n = cfg.ppo.max_new_tokens
    mine = ray.get(roles.actor[0].greedy.remote(images, prompts, n))
    theirs = ray.get([e.greedy.remote(images, prompts, n) for e in roles.engines])
    same = [a == b for ids in theirs for a, b in zip(ids, mine, strict=True)]
    if not all(same) and cfg.ppo.sync_check == "strict":
        raise RuntimeError(
            "after the weight sync the rollout engine's greedy answer differs from the actor's "
            f"(engine {theirs}, actor {mine}): the engine is not running the actor's weights "
            "(set ppo.sync_check=warn where precision alone can flip a greedy token, e.g. bf16)")
    return {"sync_greedy_match": sum(same) / len(same)}


def _checkpoint(run_dir: Path, iteration: int, roles: _Roles, keep: int) -> None:
    d = run_dir / "checkpoints" / f"iter_{iteration:06d}"
    d.mkdir(parents=True, exist_ok=True)
    # Data-parallel replicas hold identical weights and optimizer states: rank 0 saves.
    ray.get([roles.actor[0].save_checkpoint.remote(str(d / "actor.pt")),
             roles.critic[0].save_checkpoint.remote(str(d / "critic.pt"))])
    (d / "state.json").write_text(json.dumps({"iteration": iteration}))  # last: marks complete
    done = sorted(p for p in d.parent.glob("iter_*") if (p / "state.json").is_file())
    for old in done[: -max(keep, 1)]:
        shutil.rmtree(old)


def _latest_checkpoint(run_dir: Path) -> tuple[int, Path] | None:
    folders = (run_dir / "checkpoints").glob("iter_*")
    done = sorted(p for p in folders if (p / "state.json").is_file())
    if not done:
        return None
    return json.loads((done[-1] / "state.json").read_text())["iteration"], done[-1]


def _trim_metrics(run_dir: Path, upto: int) -> None:
    """A resumed run repeats the iterations after its checkpoint: drop their old lines."""
    kept = [m for m in read_metrics(run_dir) if m.get("step", 0) <= upto]
    path = run_dir / "metrics.jsonl"
    if path.exists():
        path.write_text("".join(json.dumps(m) + "\n" for m in kept))


# ------------------------------------------------------------------------------------ driver


def _memory(roles: _Roles) -> dict[str, int]:
    """Peak memory per role, summed over the role's actors."""
    return {role: sum(ray.get([h.peak_memory.remote() for h in hs]))
            for role, hs in roles.by_role.items()}


def _iteration(it: int, roles: _Roles, cfg: Config, rows: list[dict], processor, pad_id: int,
               run_dir: Path, check_rows: list[dict]) -> dict:
    """One PPO iteration; returns its metrics line."""
    ppo = cfg.ppo
    seed = cfg.run.seed * 100_000 + it
    clock = [time.perf_counter()]
    batch = [rows[i] for i in prompt_indices(len(rows), ppo.rollout_batch_size, it, cfg.run.seed)
             for _ in range(ppo.samples_per_prompt)]
    responses, texts = _generate(roles, batch, cfg, seed)
    clock.append(time.perf_counter())

    enc = encode_prompt(processor, [decode_image(r["image"]) for r in batch],
                        [r["prompt"] for r in batch])
    seq = build_sequences(enc, responses, pad_id, getattr(processor, "image_token_id", None))
    shards = _split(len(batch), len(roles.reward))
    refs = {  # all four roles work at the same time
        "old": _map_rows(roles.actor, "logprobs", seq),
        "ref": _map_rows(roles.reference, "logprobs", seq),
        "values": _map_rows(roles.critic, "values", seq),
        "scores": [h.score.remote(seq.select(s), [texts[i] for i in s],
                                  [batch[i]["meta"] for i in s])
                   for h, s in zip(roles.reward, shards, strict=True)],
    }
    got = {k: torch.cat(ray.get(v)) for k, v in refs.items()}
    exp, exp_metrics = make_experience(seq, got["old"], got["ref"], got["values"], got["scores"],
                                       ppo)
    clock.append(time.perf_counter())

    actor_refs = _map_rows(roles.actor, "train", exp, seed)  # actor and critic in parallel
    critic_refs = _map_rows(roles.critic, "train", exp, seed)
    actor_m, critic_m = _mean_dicts(ray.get(actor_refs)), _mean_dicts(ray.get(critic_refs))
    clock.append(time.perf_counter())

    sync_m = _sync(roles, cfg, run_dir, check_rows)
    clock.append(time.perf_counter())

    seconds = {p: clock[i + 1] - clock[i] for i, p in enumerate(PHASES)}
    memory = _memory(roles)
    return {
        "step": it + 1, "iteration": it + 1, "samples": len(batch),
        **{f"ppo/{k}": v for k, v in exp_metrics.items()},
        **{f"ppo/actor/{k}": v for k, v in actor_m.items()},
        **{f"ppo/critic/{k}": v for k, v in critic_m.items()},
        **{f"ppo/{k}": v for k, v in sync_m.items()},
        **{f"ppo/time/{k}_s": round(v, 4) for k, v in seconds.items()},
        **{f"ppo/memory/{k}_bytes": v for k, v in memory.items()},
        "ppo/samples_per_s": len(batch) / sum(seconds.values()),
        "peak_memory_bytes": sum(memory.values()),
        "example": texts[0],
    }


def train_ppo(cfg: Config) -> dict:
    """Run PPO; return the summary (also written to RUN/summary.json)."""
    from transformers import AutoProcessor

    check_ppo_config(cfg)
    ppo = cfg.ppo
    run_dir = Path(cfg.run.dir).resolve()
    save_config(cfg, run_dir)
    rows, bad = load_prompts(cfg)
    if bad:
        pq.write_table(quarantine_table(bad), run_dir / "quarantine.parquet")
    if not rows:
        raise ValueError(f"train.data: no usable prompt row ({len(bad)} quarantined, see "
                         f"{run_dir / 'quarantine.parquet'})")
    processor = AutoProcessor.from_pretrained(cfg.model.name_or_path)
    tok = processor.tokenizer
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    check_rows = rows[: ppo.sync_check_prompts]

    ensure_ray(cfg.resources.address)
    reservation = reserve(ppo_plan(ppo.roles), ppo.roles.timeout_s)  # fails fast, readably
    roles = None
    try:
        roles = _Roles(cfg, reservation)
        where = roles.start()
        pg_table = reservation.table()
        start, latest = 0, _latest_checkpoint(run_dir)
        if latest:
            start, path = latest
            ray.get([h.load_checkpoint.remote(str(path / "actor.pt")) for h in roles.actor]
                    + [h.load_checkpoint.remote(str(path / "critic.pt")) for h in roles.critic])
            _trim_metrics(run_dir, start)
        digests = {f"{r}_start": ray.get([h.digest.remote() for h in roles.by_role[r]])
                   for r in ("actor", "reference")}
        _sync(roles, cfg, run_dir, check_rows)  # a resumed actor differs from the engine's copy
        writer = MetricsWriter(run_dir)
        samples, last, loop_start = 0, {}, time.perf_counter()
        for it in range(start, ppo.iterations):
            last = _iteration(it, roles, cfg, rows, processor, pad_id, run_dir, check_rows)
            writer.write(last)
            samples += last["samples"]
            every = ppo.checkpoint_every
            if (every and (it + 1) % every == 0) or it + 1 == ppo.iterations:
                _checkpoint(run_dir, it + 1, roles, cfg.train.num_to_keep)
        train_seconds = time.perf_counter() - loop_start
        writer.close()
        ray.get([roles.actor[0].export.remote(str(run_dir / "model")),
                 roles.critic[0].export.remote(str(run_dir / "critic"))])
        shutil.rmtree(run_dir / "sync_weights", ignore_errors=True)
        digests |= {f"{r}_end": ray.get([h.digest.remote() for h in roles.by_role[r]])
                    for r in ("actor", "reference")}
        memory = _memory(roles)
    finally:
        if roles is not None:
            roles.kill()
        reservation.remove()

    lines = [m for m in read_metrics(run_dir) if m.get("step", 0) > start]
    summary = {
        "algo": "ppo",
        "iterations": ppo.iterations,
        "resumed_from_iteration": start if latest else None,
        "rows": len(rows),
        "quarantined": len(bad),
        "samples": samples,
        "train_seconds": round(train_seconds, 2),
        "samples_per_s": round(samples / max(train_seconds, 1e-9), 3),
        "phase_seconds": {p: round(sum(m[f"ppo/time/{p}_s"] for m in lines), 3) for p in PHASES},
        "models_resident": MODELS_RESIDENT if ppo.reward == "model" else MODELS_RESIDENT - 1,
        "peak_memory_bytes": sum(memory.values()),
        "peak_memory_bytes_per_role": memory,
        "placement_groups": pg_table,
        "role_group": reservation.plan.role_group,
        "roles": where,
        "digests": digests,
        "engine": ppo.engine,
        "reward": ppo.reward,
        "final_metrics": {k: v for k, v in last.items() if k != "example"},
        "model": str(run_dir / "model"),
        "critic": str(run_dir / "critic"),
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary
