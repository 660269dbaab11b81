"""Placement-group plans per algorithm, and a resource pre-flight check that fails fast.

PPO runs four model roles (actor, critic, reward, reference) and rollout engines. Each role is a
group of Ray actors on its OWN placement group; bundle i holds actor i and is sized from
`ppo.roles.<role>` (num_cpus, num_gpus). On small clusters the roles named in
`ppo.roles.colocate` share one placement group instead: bundle i is the largest per-actor ask
among those k roles and each role's actor i takes 1/k of it (fractional CPU/GPU), like OpenRLHF's
colocated actor/reference. sft, nsft, dpo and reward are one group of Ray Train workers.

    plan = PLANS["ppo"](cfg)
    reservation = reserve(plan, timeout_s=cfg.ppo.roles.timeout_s)  # raises PlacementError
    handle = ActorRole.options(**reservation.options("actor", rank=0)).remote(...)

`reserve` first compares the plan with the cluster's resources (a plan that can never fit fails
at once), then waits at most `timeout_s` for the groups, and otherwise removes them and raises
a message saying what was asked (per role and in total) and what exists, instead of hanging.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import yaml
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from nsft_ray.config import Config, ResourcesConfig, RoleResources, RolesConfig

__all__ = ["PLANS", "PPO_ROLES", "GroupPlan", "Plan", "PlacementError", "Reservation",
           "accelerator_options", "check_memory", "check_resources", "on_gpus", "ppo_plan",
           "reserve", "trainer_plan", "worker_options"]

PPO_ROLES = ("actor", "critic", "reward", "reference", "rollout")
Bundle = dict[str, float]


class PlacementError(RuntimeError):
    """The cluster cannot (or did not in time) hold the placement groups a plan asks for."""


@dataclass(frozen=True)
class GroupPlan:
    name: str
    bundles: tuple[Bundle, ...]
    strategy: str
    roles: tuple[str, ...]  # roles whose actors live in this group


@dataclass(frozen=True)
class Plan:
    algo: str
    groups: tuple[GroupPlan, ...]
    role_group: dict[str, str]  # role -> group name
    per_actor: dict[str, Bundle]  # role -> resources each of its actors requests
    num_actors: dict[str, int]
    config_key: str  # where the user changes the sizes, for messages
    accelerator: str = "GPU"  # the Ray resource an accelerator is asked for by (bundles' key)

    def total(self) -> Bundle:
        out: Bundle = {}
        for g in self.groups:
            for b in g.bundles:
                for k, v in b.items():
                    out[k] = out.get(k, 0.0) + v
        return out

    def describe(self) -> str:
        """A table of roles: group, actors, resources per actor and per role."""
        lines = [f"  {'role':<10} {'group':<24} {'actors':>6}  {'each':<16} total"]
        for role, group in self.role_group.items():
            n = self.num_actors[role]
            each = self.per_actor[role]
            lines.append(f"  {role:<10} {group:<24} {n:>6}  {_fmt(each):<16} "
                         f"{_fmt({k: v * n for k, v in each.items()})}")
        lines.append(f"  total asked (bundles of all groups): {_fmt(self.total())}")
        return "\n".join(lines)


def _fmt(res: Bundle) -> str:
    return ", ".join(f"{k} {v:g}" for k, v in sorted(res.items()) if v) or "nothing"


def accelerator_options(accelerator: str, amount: float) -> dict[str, Any]:
    """Ray task/actor options asking for `amount` accelerators: `num_gpus` for GPUs, else the
    custom resource that stands for them (a simulated cluster: ray_glue/simcluster.py)."""
    if not amount:
        return {"num_gpus": 0.0}
    return {"num_gpus": amount} if accelerator == "GPU" else {"resources": {accelerator: amount}}


def on_gpus(res: ResourcesConfig) -> bool:
    """The trainers' processes compute on CUDA: they take accelerators and those are GPUs (a
    simulated cluster's custom resource is only a reservation; its processes compute on CPU)."""
    return res.use_gpu and res.accelerator == "GPU"


def worker_options(res: ResourcesConfig) -> dict[str, Any]:
    """Ray options for a task or actor that stands in for one training worker (DPO's reference
    pass, the reward model's evaluation): its CPUs and its accelerator."""
    return {"num_cpus": res.cpus_per_worker,
            **accelerator_options(res.accelerator, 1.0 if res.use_gpu else 0.0)}


def _bundle(r: RoleResources, accelerator: str = "GPU") -> Bundle:
    return {k: v for k, v in (("CPU", r.num_cpus), (accelerator, r.num_gpus)) if v > 0}


def ppo_plan(roles: RolesConfig, accelerator: str = "GPU") -> Plan:
    """One placement group per PPO role, or a shared one for the roles in `roles.colocate`;
    `num_gpus` asks for `accelerator` (resources.accelerator)."""
    spec: dict[str, RoleResources] = {name: getattr(roles, name) for name in PPO_ROLES}
    for name, r in spec.items():
        if r.num_actors < 1 or r.num_cpus < 0 or r.num_gpus < 0 or not _bundle(r):
            raise ValueError(f"ppo.roles.{name}: expected num_actors >= 1 and num_cpus/num_gpus "
                             f">= 0, not both 0; got {r}")
    unknown = [n for n in roles.colocate if n not in spec]
    if unknown:
        raise ValueError(f"ppo.roles.colocate: unknown role {unknown[0]!r}; roles: {PPO_ROLES}")
    shared = tuple(dict.fromkeys(roles.colocate))
    if len(shared) == 1:
        raise ValueError("ppo.roles.colocate: name at least two roles to share a group")
    if len({spec[n].num_actors for n in shared}) > 1:
        raise ValueError("ppo.roles.colocate: colocated roles need the same num_actors, got "
                         + ", ".join(f"{n}={spec[n].num_actors}" for n in shared))
    groups, role_group, per_actor = [], {}, {}
    for name, r in spec.items():
        if name in shared:
            continue
        bundle = _bundle(r, accelerator)
        groups.append(GroupPlan(name, (bundle,) * r.num_actors, roles.strategy, (name,)))
        role_group[name], per_actor[name] = name, bundle
    if shared:
        asks = {n: _bundle(spec[n], accelerator) for n in shared}
        keys = {k for ask in asks.values() for k in ask}
        bundle = {k: max(ask.get(k, 0.0) for ask in asks.values()) for k in keys}
        group = "shared:" + "+".join(shared)
        groups.append(GroupPlan(group, (bundle,) * spec[shared[0]].num_actors, roles.strategy,
                                shared))
        for n in shared:
            role_group[n] = group
            per_actor[n] = {k: v / len(shared) for k, v in bundle.items()}
    order = {n: i for i, n in enumerate(PPO_ROLES)}
    role_group = dict(sorted(role_group.items(), key=lambda kv: order[kv[0]]))
    return Plan("ppo", tuple(groups), role_group, per_actor,
                {n: spec[n].num_actors for n in spec}, "ppo.roles.<role>", accelerator)


def trainer_plan(resources: ResourcesConfig, algo: str) -> Plan:
    """The Ray Train worker group of sft / nsft / dpo / reward (Ray Train creates it itself)."""
    acc = resources.accelerator
    each = {"CPU": resources.cpus_per_worker, **({acc: 1.0} if resources.use_gpu else {})}
    group = GroupPlan("trainer", (each,) * resources.num_workers, "PACK", ("trainer",))
    return Plan(algo, (group,), {"trainer": "trainer"}, {"trainer": each},
                {"trainer": resources.num_workers}, "resources", acc)


PLANS: dict[str, Callable[[Config], Plan]] = {
    "sft": lambda cfg: trainer_plan(cfg.resources, "sft"),
    "nsft": lambda cfg: trainer_plan(cfg.resources, "nsft"),
    "dpo": lambda cfg: trainer_plan(cfg.resources, "dpo"),
    "reward": lambda cfg: trainer_plan(cfg.resources, "reward"),
    "ppo": lambda cfg: ppo_plan(cfg.ppo.roles, cfg.resources.accelerator),
}


def check_resources(
    plan: Plan, cluster: Bundle, available: Bundle, nodes: list[Bundle]
) -> str | None:
    """Why `plan` can never fit a cluster with these totals and node sizes, or None.

    Static checks only: every resource's total, every bundle against the largest node, and a
    STRICT_PACK group against one node. Whether it fits *now* is for the placement groups to say.
    """
    problems = []
    for key, asked in sorted(plan.total().items()):
        if asked > cluster.get(key, 0.0) + 1e-9:
            problems.append(f"{key}: asked {asked:g}, the cluster has {cluster.get(key, 0.0):g}")
    for g in plan.groups:
        need = [g.bundles[0]] if g.strategy != "STRICT_PACK" else [
            {k: sum(b.get(k, 0.0) for b in g.bundles) for k in g.bundles[0]}]
        for b in need:
            if nodes and not any(all(n.get(k, 0.0) >= v - 1e-9 for k, v in b.items())
                                 for n in nodes):
                sizes = "; ".join(_fmt(_cpu_gpu(n, plan.accelerator)) for n in nodes)
                problems.append(f"group {g.name}: a {g.strategy} bundle of {_fmt(b)} fits on no "
                                f"single node (nodes: {sizes})")
    if not problems:
        return None
    return _message(plan, "cannot be satisfied by this Ray cluster", problems, cluster, available)


def _cpu_gpu(res: Bundle, accelerator: str = "GPU") -> Bundle:
    return {k: v for k, v in res.items() if k in ("CPU", accelerator)}


def _message(plan: Plan, what: str, problems: list[str], cluster: Bundle,
             available: Bundle) -> str:
    keys = set(plan.total()) | {"CPU", plan.accelerator}
    return "\n".join([
        f"{plan.algo} placement {what}:",
        *[f"  - {p}" for p in problems],
        plan.describe(),
        f"  cluster has: {_fmt({k: cluster.get(k, 0.0) for k in keys})}"
        f" (available now: {_fmt({k: available.get(k, 0.0) for k in keys})})",
        f"Lower {plan.config_key} num_cpus / num_gpus / num_actors"
        + (", colocate roles (ppo.roles.colocate)" if plan.algo == "ppo" else "")
        + ", or add nodes.",
    ])


@dataclass
class Reservation:
    """Ready placement groups for a plan; `options` places one actor of a role."""

    plan: Plan
    groups: dict[str, PlacementGroup]

    def options(self, role: str, rank: int) -> dict[str, Any]:
        """Ray actor options for actor `rank` of `role`: its bundle and its share of it."""
        if role not in self.plan.role_group:
            raise KeyError(f"role {role!r} is not in the {self.plan.algo} plan")
        if not 0 <= rank < self.plan.num_actors[role]:
            raise IndexError(f"{role} has {self.plan.num_actors[role]} actors; no rank {rank}")
        each = self.plan.per_actor[role]
        return {
            "num_cpus": each.get("CPU", 0.0),
            **accelerator_options(self.plan.accelerator, each.get(self.plan.accelerator, 0.0)),
            "scheduling_strategy": PlacementGroupSchedulingStrategy(
                self.groups[self.plan.role_group[role]], placement_group_bundle_index=rank,
                placement_group_capture_child_tasks=True),
        }

    def table(self) -> dict[str, dict]:
        """Each group as Ray reports it (`ray.util.placement_group_table`)."""
        return {name: ray.util.placement_group_table(pg) for name, pg in self.groups.items()}

    def remove(self) -> None:
        for pg in self.groups.values():
            remove_placement_group(pg)


def reserve(plan: Plan, timeout_s: float, autoscaling: bool = False) -> Reservation:
    """Create the plan's placement groups; raise PlacementError within ~timeout_s if they
    cannot be (all) placed, after removing the ones created.

    On an autoscaling cluster (resources.autoscaling) the nodes that will hold the groups may
    not exist yet: the pending groups are the demand the autoscaler launches them for, so only
    the timeout applies.
    """
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    problem = None if autoscaling else check_resources(
        plan, ray.cluster_resources(), ray.available_resources(), nodes)
    if problem:
        raise PlacementError(problem + "\n(On a cluster that adds nodes on demand, set "
                             "resources.autoscaling=true: placement then waits for them.)")
    tag = uuid.uuid4().hex[:6]
    groups = {g.name: placement_group(list(g.bundles), strategy=g.strategy,
                                      name=f"nsft-{plan.algo}-{g.name}-{tag}")
              for g in plan.groups}
    ready = {name: pg.ready() for name, pg in groups.items()}
    done, _ = ray.wait(list(ready.values()), num_returns=len(ready), timeout=timeout_s)
    pending = [name for name, ref in ready.items() if ref not in done]
    if pending:
        for pg in groups.values():
            remove_placement_group(pg)
        time.sleep(0.5)  # let the removal return the resources before reporting what is free
        raise PlacementError(_message(
            plan, f"timed out after {timeout_s:g} s",
            [f"placement group(s) {', '.join(pending)} not ready: the resources exist but are "
             "held by other work (or too fragmented across nodes)"],
            ray.cluster_resources(), ray.available_resources()))
    return Reservation(plan, groups)


def check_memory(algo: str, cfg: Config) -> None:
    """The memory planner's verdict before a launch reserves anything: raises plan.PlanRefused
    (what was asked, the largest node, the shortfall) when `algo`'s roles cannot fit the running
    cluster's nodes, or, on an autoscaling cluster, plan.cluster's node types. A model the
    planner cannot size, or an autoscaling cluster without plan.cluster, is launched unchecked
    with a line saying so."""
    from nsft_ray import plan as planner

    if not cfg.plan.check:
        return
    if cfg.resources.autoscaling and not cfg.plan.cluster:
        print("memory check: skipped (resources.autoscaling without plan.cluster: the nodes to "
              "come are not known here)", flush=True)
        return
    try:
        shape = planner.model_shape(cfg.model.name_or_path, cfg.model.freeze, cfg.plan)
    except planner.PlanRefused as e:
        print(f"memory check: skipped ({e})", flush=True)
        return
    if cfg.plan.cluster:
        nodes = planner.node_types(yaml.safe_load(Path(cfg.plan.cluster).read_text()), cfg.plan)
        where, notes = cfg.plan.cluster, []
    else:
        nodes, notes = planner.live_node_types(ray.nodes(), cfg.plan)
        where = "this Ray cluster"
    for note in notes:
        print(f"memory check: {note}", flush=True)
    placed = planner.place(algo, planner.method_roles(algo, cfg, shape), PLANS[algo](cfg), nodes,
                           cfg.plan)
    if not placed.fits:
        raise planner.PlanRefused(
            f"{algo} does not fit {where} (predicted memory per role; `nsft-ray plan` prints "
            "the whole table; plan.check=false launches anyway):\n  "
            + "\n  ".join(placed.problems))

