"""PPO on a local Ray: four roles on four placement groups, weight sync, resume."""

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pyarrow.parquet as pq
import pytest

import nsft_ray.world as world
from nsft_ray.algorithms.ppo import sample_responses, state_digest
from nsft_ray.collate import decode_image
from nsft_ray.config import WorldConfig, load_config
from nsft_ray.models import VLMWithValueHead, build_tiny_vlm, load_vlm, save_value_model

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.ray
MODEL_ROLES = ("actor", "critic", "reward", "reference")


@pytest.fixture(scope="module")
def setup(tmp_path_factory, ray_session):
    tmp = tmp_path_factory.mktemp("ppo_ray")
    model = build_tiny_vlm(tmp / "m", world.corpus(WorldConfig(), n=300, seed=0))
    world.write_world(WorldConfig(n_train=40, n_eval=10), tmp / "w", seed=0)
    base, processor = load_vlm(model)
    # Stand-in for the reward-model trainer's output: a value head on the tiny backbone.
    save_value_model(VLMWithValueHead(base), tmp / "rm", processor)
    return {"tmp": tmp, "model": model, "initial_digest": state_digest(base)}


def _cfg(setup, run: str, *overrides: str):
    tmp = setup["tmp"]
    return load_config(None, [
        f"run.dir={tmp / run}", f"model.name_or_path={setup['model']}",
        f"train.data=[{tmp / 'w' / 'pref_train.parquet'}]", f"ppo.reward_model={tmp / 'rm'}",
        "ppo.iterations=2", "ppo.rollout_batch_size=4", "ppo.mini_batch_size=2",
        "ppo.max_new_tokens=8", "ppo.checkpoint_every=1", "optim.lr=3e-3",
        "optim.schedule=constant", "optim.warmup_ratio=0.0", "ppo.roles.timeout_s=60",
        *overrides])


def _metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def hf_run(setup):
    from nsft_ray.ray_glue.ppo import train_ppo

    cfg = _cfg(setup, "hf", "ppo.engine=hf", "ppo.roles.actor.num_actors=2")
    return cfg, train_ppo(cfg)


def test_four_roles_on_four_placement_groups(hf_run):
    cfg, summary = hf_run
    roles = summary["roles"]
    assert len(roles["actor"]) == 2  # data parallel: both ranks in the actor's group
    pg_ids = {role: {w["placement_group_id"] for w in roles[role]} for role in roles}
    assert all(len(ids) == 1 for ids in pg_ids.values())
    model_groups = [next(iter(pg_ids[r])) for r in MODEL_ROLES]
    assert len(set(model_groups)) == 4 and next(iter(pg_ids["rollout"])) not in model_groups
    # The same groups as Ray reports them: created during the run, removed after it.
    recorded = {t["placement_group_id"]: t for t in summary["placement_groups"].values()}
    assert set(model_groups) <= set(recorded)
    assert all(recorded[g]["state"] == "CREATED" for g in model_groups)
    assert len(recorded[next(iter(pg_ids["actor"]))]["bundles"]) == 2
    table = ray.util.placement_group_table()
    assert all(table[g]["state"] == "REMOVED" for g in model_groups)
    assert summary["models_resident"] == 4
    per_role = summary["peak_memory_bytes_per_role"]
    assert set(per_role) == {*MODEL_ROLES, "rollout"} and all(v > 0 for v in per_role.values())
    assert summary["peak_memory_bytes"] == sum(per_role.values())
    # Each role's peak split at what its actors held before loading a model (the runtime).
    measured = summary["memory"]["measured"]
    assert {g: m["peak_bytes"] for g, m in measured.items()} == per_role
    assert all(0 < m["runtime_bytes"] < m["peak_bytes"]
               and m["model_bytes"] == m["peak_bytes"] - m["runtime_bytes"]
               for m in measured.values())
    assert set(summary["memory"]["plan"]) >= set(MODEL_ROLES)


def test_actor_learns_reference_stays_and_engine_follows(hf_run, setup):
    cfg, summary = hf_run
    d = summary["digests"]
    assert d["reference_start"] == d["reference_end"] == [setup["initial_digest"]]
    assert d["actor_start"] == [setup["initial_digest"]] * 2
    assert d["actor_end"][0] == d["actor_end"][1] != setup["initial_digest"]  # replicas agree
    exported, processor = load_vlm(summary["model"])
    assert state_digest(exported) == d["actor_end"][0]
    lines = _metrics(Path(cfg.run.dir))
    assert [m["step"] for m in lines] == [1, 2]
    assert all(m["ppo/sync_greedy_match"] == 1.0 for m in lines)
    for key in ("generation", "experience", "train", "sync"):
        assert all(m[f"ppo/time/{key}_s"] > 0 for m in lines)
    assert summary["samples"] == 8 and summary["samples_per_s"] > 0
    # The sync check had something to detect: training changed the greedy answers.
    initial, _ = load_vlm(setup["model"])
    data = pq.read_table(cfg.train.data[0]).to_pylist()[:4]
    images, prompts = [decode_image(r["image"]) for r in data], [r["prompt"] for r in data]
    kw = dict(max_new_tokens=8, greedy=True)
    assert (sample_responses(initial, processor, images, prompts, **kw)
            != sample_responses(exported, processor, images, prompts, **kw))


def test_resume_from_a_checkpoint_equals_the_uninterrupted_run(hf_run):
    """Resumed on another placement (reward and reference colocated): placement is no input."""
    from nsft_ray.ray_glue.ppo import train_ppo

    cfg, first = hf_run
    run_dir = Path(cfg.run.dir)
    shutil.rmtree(run_dir / "checkpoints" / "iter_000002")  # as if it died during iteration 2
    shutil.rmtree(run_dir / "model")
    roles = replace(cfg.ppo.roles, colocate=("reward", "reference"))
    resumed = train_ppo(replace(cfg, ppo=replace(cfg.ppo, roles=roles)))
    assert resumed["resumed_from_iteration"] == 1 and resumed["samples"] == 4
    assert resumed["digests"]["actor_start"][0] != first["digests"]["actor_start"][0]
    assert resumed["digests"]["actor_end"] == first["digests"]["actor_end"]
    assert [m["step"] for m in _metrics(run_dir)] == [1, 2]
    shared = {w["placement_group_id"] for r in ("reward", "reference") for w in resumed["roles"][r]}
    assert len(shared) == 1 and resumed["role_group"]["reference"] == "shared:reward+reference"
    assert len(resumed["placement_groups"]) == 4


@pytest.mark.vllm
@pytest.mark.slow
def test_vllm_engine_with_rule_reward_syncs_after_every_update(setup):
    pytest.importorskip("vllm")
    from nsft_ray.ray_glue.ppo import train_ppo

    cfg = _cfg(setup, "vllm", "ppo.engine=vllm", "ppo.reward=rules")
    summary = train_ppo(cfg)
    lines = _metrics(Path(cfg.run.dir))
    # strict sync check: a mismatch would have raised; every iteration's check matched.
    assert len(lines) == 2 and all(m["ppo/sync_greedy_match"] == 1.0 for m in lines)
    assert summary["digests"]["actor_end"] != summary["digests"]["actor_start"]
    assert summary["models_resident"] == 3  # the rule reward holds no model
    assert summary["peak_memory_bytes_per_role"]["rollout"] > 0
    # Rule rewards are -1, 0 or +1 per answer: a batch mean of 4 is a multiple of 1/4.
    assert all((4 * m["ppo/score"]).is_integer() for m in lines)


@ray.remote
class _FlakyStart:
    """Its first process dies while starting (os._exit: no exception, as a crash in dlopen);
    the next one starts. With fail_in_init it raises in its constructor instead."""

    def __init__(self, flag: str, fail_in_init: bool = False):
        import os

        if fail_in_init:
            raise ValueError("bad constructor argument")
        if not os.path.exists(flag):
            open(flag, "w").close()
            os._exit(1)

    def where(self) -> dict:
        return {"pid": __import__("os").getpid()}


def test_a_role_actor_that_died_while_starting_is_started_once_more(ray_session, tmp_path,
                                                                       capsys):
    """Fails if RayRoles' wait (ray_glue.ppo.started) gives up on an actor whose process died
    while starting, or retries one whose constructor raised (it would fail the same way)."""
    from nsft_ray.ray_glue.ppo import started

    flag = str(tmp_path / "first_start")
    made = []

    def make():
        made.append(_FlakyStart.remote(flag))
        return made[-1]

    handle, where = started(make(), make, "critic actor 0")
    assert len(made) == 2 and handle is made[1] and where["pid"] > 0
    assert "critic actor 0 died while starting" in capsys.readouterr().out
    with pytest.raises(ray.exceptions.ActorDiedError, match="bad constructor argument"):
        started(_FlakyStart.remote(flag, fail_in_init=True), make, "reward actor 0")
    assert len(made) == 2  # no second start after a constructor's own error
