"""cluster.yaml: valid against the Ray cluster-launcher schema shipped inside `ray`, and its GPU
worker types can hold the PPO placement plan of the bundled 7B comparison config."""

from pathlib import Path

import yaml

from nsft_ray.config import load_config

ROOT = Path(__file__).resolve().parents[1]


def _cluster() -> dict:
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def test_cluster_yaml_is_valid_for_the_ray_launcher():
    from ray.autoscaler._private.util import validate_config

    cfg = _cluster()
    validate_config(cfg)  # raises on any schema violation
    gpu_types = [t for t in cfg["available_node_types"].values()
                 if t.get("resources", {}).get("GPU")]
    assert gpu_types and all(t["max_workers"] >= 1 and t["min_workers"] == 0 for t in gpu_types)
    assert any("[gpu]" in cmd for cmd in cfg["setup_commands"])  # installs the CUDA vLLM extra
    # Token auth: one token on every node, and every node's Ray started in token mode (a worker
    # without it cannot join a head that has it).
    assert cfg["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    starts = cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"]
    assert all("RAY_AUTH_MODE=token" in c for c in starts if "ray start" in c)


def test_gpu_node_types_satisfy_the_ppo_plan_of_the_bundled_gpu_config():
    from nsft_ray.ray_glue.placement import check_resources, ppo_plan

    cfg = _cluster()
    nodes = [dict(t["resources"]) for t in cfg["available_node_types"].values()]
    # The autoscaler can add max_workers of each type: the cluster at full size.
    total: dict[str, float] = {}
    for t in cfg["available_node_types"].values():
        count = t.get("max_workers", 1) if t is not cfg["available_node_types"][
            cfg["head_node_type"]] else 1
        for k, v in t["resources"].items():
            total[k] = total.get(k, 0.0) + v * count
    for name in ("compare_llava7b.yaml", "ppo_llava7b.yaml"):
        plan = ppo_plan(load_config(ROOT / "jobs" / "configs" / name).ppo.roles)
        assert plan.total().get("GPU", 0) > 0, name
        assert check_resources(plan, total, total, nodes) is None, name
    # And the check does catch a plan no node type can hold.
    big = ppo_plan(load_config(None, ["ppo.roles.actor.num_gpus=16"]).ppo.roles)
    assert "fits on no single node" in check_resources(big, total, total, nodes)
