"""Placement plans (pure) and the resource pre-flight check on a local Ray."""

import time

import pytest

from nsft_ray.config import ResourcesConfig, RoleResources, RolesConfig
from nsft_ray.ray_glue.placement import (
    PlacementError,
    check_resources,
    on_gpus,
    ppo_plan,
    reserve,
    trainer_plan,
    worker_options,
)


def test_ppo_plan_one_group_per_role_sized_from_config():
    roles = RolesConfig(actor=RoleResources(num_actors=2, num_cpus=2, num_gpus=1),
                        reward=RoleResources(num_cpus=0.5))
    plan = ppo_plan(roles)
    assert [g.name for g in plan.groups] == ["actor", "critic", "reward", "reference", "rollout"]
    actor = plan.groups[0]
    assert actor.bundles == ({"CPU": 2.0, "GPU": 1.0},) * 2 and actor.roles == ("actor",)
    assert plan.total() == {"CPU": 2 * 2 + 1 + 0.5 + 1 + 1, "GPU": 2.0}
    assert plan.per_actor["reward"] == {"CPU": 0.5}


def test_colocated_roles_share_one_group_with_fractional_shares():
    roles = RolesConfig(actor=RoleResources(num_cpus=1, num_gpus=1),
                        reference=RoleResources(num_cpus=0.5, num_gpus=1),
                        colocate=("actor", "reference"))
    plan = ppo_plan(roles)
    shared = [g for g in plan.groups if g.name == "shared:actor+reference"]
    assert len(plan.groups) == 4 and len(shared) == 1
    assert shared[0].bundles == ({"CPU": 1.0, "GPU": 1.0},)  # the largest ask, once
    assert plan.per_actor["actor"] == plan.per_actor["reference"] == {"CPU": 0.5, "GPU": 0.5}
    assert plan.role_group["reference"] == "shared:actor+reference"
    with pytest.raises(ValueError, match="unknown role 'policy'"):
        ppo_plan(RolesConfig(colocate=("actor", "policy")))
    with pytest.raises(ValueError, match="same num_actors"):
        ppo_plan(RolesConfig(actor=RoleResources(num_actors=2), colocate=("actor", "critic")))


def test_check_resources_names_what_is_missing():
    plan = ppo_plan(RolesConfig(actor=RoleResources(num_cpus=64)))
    message = check_resources(plan, {"CPU": 8.0}, {"CPU": 8.0}, [{"CPU": 8.0}])
    assert "CPU: asked 68, the cluster has 8" in message
    assert "actor" in message and "CPU 64" in message and "ppo.roles" in message
    # Enough CPUs in total, but no node can hold a 6-CPU bundle.
    plan = trainer_plan(ResourcesConfig(num_workers=1, cpus_per_worker=6), "sft")
    message = check_resources(plan, {"CPU": 8.0}, {"CPU": 8.0}, [{"CPU": 4.0}, {"CPU": 4.0}])
    assert "fits on no single node" in message
    assert check_resources(plan, {"CPU": 8.0}, {"CPU": 8.0}, [{"CPU": 8.0}]) is None


@pytest.fixture(scope="module")
def local_ray(ray_session):
    return ray_session


@pytest.mark.ray
def test_unsatisfiable_plan_fails_fast_with_a_readable_message(local_ray):
    plan = ppo_plan(RolesConfig(actor=RoleResources(num_cpus=64)))
    start = time.monotonic()
    with pytest.raises(PlacementError) as err:
        reserve(plan, timeout_s=60)
    assert time.monotonic() - start < 20
    text = str(err.value)
    assert "cannot be satisfied" in text and "asked 68" in text and "cluster has: CPU 8" in text


@pytest.mark.ray
def test_groups_that_cannot_be_placed_now_time_out_and_are_removed(local_ray):
    ray = local_ray
    first = reserve(ppo_plan(RolesConfig(actor=RoleResources(num_cpus=3))), timeout_s=20)
    try:  # 7 of 8 CPUs held: a second 7-CPU plan fits the cluster but not what is left
        table = first.table()
        assert len(table) == 5 and all(t["state"] == "CREATED" for t in table.values())
        opts = first.options("critic", 0)
        assert opts["num_cpus"] == 1.0
        assert opts["scheduling_strategy"].placement_group_bundle_index == 0
        before = set(ray.util.placement_group_table())
        start = time.monotonic()
        with pytest.raises(PlacementError, match="timed out after 2 s") as err:
            reserve(ppo_plan(RolesConfig(actor=RoleResources(num_cpus=3))), timeout_s=2)
        assert time.monotonic() - start < 20
        assert "available now: CPU 1" in str(err.value)
        new = {k: v for k, v in ray.util.placement_group_table().items() if k not in before}
        assert new and all(v["state"] == "REMOVED" for v in new.values())
    finally:
        first.remove()


@pytest.mark.parametrize("use_gpu, accelerator, expected_device, expected_options", [
    (False, "GPU", False, {"num_cpus": 2, "num_gpus": 0.0}),
    (True, "GPU", True, {"num_cpus": 2, "num_gpus": 1.0}),
    # a simulated cluster: the custom resource is reserved, the process computes on CPU
    (True, "sim_gpu", False, {"num_cpus": 2, "resources": {"sim_gpu": 1.0}}),
])
def test_worker_options_and_device(use_gpu, accelerator, expected_device, expected_options):
    """Fails if a simulated accelerator sends a worker to CUDA, or a worker asks for no GPU."""
    res = ResourcesConfig(use_gpu=use_gpu, accelerator=accelerator, cpus_per_worker=2)
    assert on_gpus(res) is expected_device
    assert worker_options(res) == expected_options


@pytest.mark.ray
def test_a_launch_whose_memory_cannot_fit_is_refused_before_anything_starts(local_ray, tmp_path,
                                                                             capsys):
    """Fails if `nsft-ray train` does not run the planner's check on the running cluster before
    it reads data or starts Ray Train: a micro-batch whose activations exceed every node's
    memory is refused with the shortfall (exit 1) and leaves no metrics behind."""
    from nsft_ray.cli import main
    from nsft_ray.config import WorldConfig
    from nsft_ray.models import build_tiny_vlm
    from nsft_ray.world import corpus

    model = build_tiny_vlm(tmp_path / "m", corpus(WorldConfig(), n=50, seed=0))
    run = tmp_path / "run"
    args = ["train", "--algo", "sft", f"model.name_or_path={model}", f"run.dir={run}",
            f"train.data=[{tmp_path / 'nowhere.parquet'}]", "train.max_length=4096"]
    assert main([*args, "train.micro_batch_size=100000"]) == 1
    err = capsys.readouterr().err
    assert "sft does not fit this Ray cluster" in err, err
    assert "GiB of host memory; the largest node type" in err, err
    assert not (run / "metrics.jsonl").exists()
    # The same launch with a micro-batch that fits passes the check and fails on the data.
    with pytest.raises(FileNotFoundError, match="train.data: "):
        main([*args, "train.micro_batch_size=1"])
