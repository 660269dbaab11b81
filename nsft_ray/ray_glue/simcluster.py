"""A simulated autoscaling Ray cluster on one machine, its node types read from cluster.yaml.

    with SimulatedCluster.from_cluster_yaml("cluster.yaml") as cluster:
        env = cluster.client_env()      # RAY_ADDRESS etc. for `nsft-ray submit` / jobs/*.py
        ... submit work; cluster.nodes(), cluster.kill_node(node_id), cluster.timeline()

Ray's own autoscaler runs it, with Ray's fake multi-node provider
(`ray.autoscaler._private.fake_multi_node`): every worker node the autoscaler launches is a real
raylet (with its agents and worker processes) on this machine. What is simulated is only the
machine boundary and the accelerators: cluster.yaml's GPUs stand as a custom resource
(`accelerator` by default), which our code requests through `resources.accelerator`, so the
placement and scaling logic under test is the one a GPU cluster runs.

Scaled to a small machine: every worker type keeps its name, min_workers and the ratio of its
accelerators (1x stays 1, 8x becomes `max_accelerators`); CPUs per node and max_workers are capped,
the idle timeout is seconds instead of minutes. The head gets no CPUs, like cluster.yaml's.

The head runs `ray start --head --block` in its own session, on free ports (other Ray instances
on the machine are left alone: this never calls `ray stop`); `stop()` kills every process of this
cluster, found by its GCS address and session, the worker nodes' included.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import yaml

__all__ = ["SimulatedCluster", "WorkerType", "worker_types_from_cluster_yaml"]

HEAD_TYPE = "ray.head.default"  # the fake provider's name for the head node type
FAKE_HEAD_NODE_ID = "f" * 51 + "00000"  # the fake provider's head id (workers count up from it)


@dataclass(frozen=True)
class WorkerType:
    name: str
    cpus: int
    accelerators: int
    min_workers: int
    max_workers: int


def worker_types_from_cluster_yaml(path: str | Path, *, cpus: int = 2, max_accelerators: int = 2,
                                   max_workers: int = 3) -> list[WorkerType]:
    """cluster.yaml's worker node types, scaled to this machine (see the module docstring)."""
    config = yaml.safe_load(Path(path).read_text())
    head = config.get("head_node_type")
    out = []
    for name, spec in config.get("available_node_types", {}).items():
        if name == head:
            continue
        res = spec.get("resources", {})
        gpus = int(res.get("GPU", 0))
        out.append(WorkerType(
            name=name, cpus=min(int(res.get("CPU", cpus)), cpus),
            accelerators=min(gpus, max_accelerators),
            min_workers=int(spec.get("min_workers", 0)),
            max_workers=min(int(spec.get("max_workers", max_workers)), max_workers)))
    if not out:
        raise ValueError(f"{path}: available_node_types has no worker type besides the head")
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SimulatedCluster:
    """Start with `start()` (or `with`); `stop()` removes every node and the head."""

    def __init__(self, worker_types: list[WorkerType], *, accelerator: str = "accelerator",
                 idle_timeout_s: float = 10.0, upscaling_speed: float = 10.0):
        if accelerator == "GPU":
            raise ValueError("a simulated cluster stands accelerators as a custom resource; "
                             "pass another name than GPU (e.g. accelerator)")
        self.worker_types = worker_types
        self.accelerator = accelerator
        self.idle_timeout_s = idle_timeout_s
        self.upscaling_speed = upscaling_speed
        self.port = self.dashboard_port = 0
        self.temp_dir = ""
        self._proc: subprocess.Popen | None = None

    @classmethod
    def from_cluster_yaml(cls, path: str | Path, *, accelerator: str = "accelerator",
                          idle_timeout_s: float = 10.0, **scale: int) -> SimulatedCluster:
        return cls(worker_types_from_cluster_yaml(path, **scale), accelerator=accelerator,
                   idle_timeout_s=idle_timeout_s)

    # ---------------------------------------------------------------------------- addresses

    @property
    def gcs_address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def client_env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """Environment for a process that talks to this cluster (jobs, `nsft-ray submit`)."""
        env = dict(os.environ if base is None else base)
        env.update({"RAY_ADDRESS": self.gcs_address, "RAY_AUTH_MODE": "disabled",
                    "RAY_USAGE_STATS_ENABLED": "0",
                    "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"})
        return env

    # ---------------------------------------------------------------------------- lifecycle

    def autoscaling_config(self) -> dict[str, Any]:
        """The autoscaler's cluster config: cluster.yaml's shape with the fake provider."""
        types: dict[str, Any] = {HEAD_TYPE: {"resources": {"CPU": 0}, "node_config": {},
                                             "max_workers": 0}}
        for t in self.worker_types:
            res = {"CPU": t.cpus, **({self.accelerator: t.accelerators} if t.accelerators else {})}
            types[t.name] = {"resources": res, "node_config": {}, "min_workers": t.min_workers,
                             "max_workers": t.max_workers}
        return {
            "cluster_name": "nsft-ray-sim",
            "max_workers": sum(t.max_workers for t in self.worker_types),
            "upscaling_speed": self.upscaling_speed,
            "idle_timeout_minutes": self.idle_timeout_s / 60,
            # Worker raylets join the head's GCS on our port, not the provider's default 6379.
            # Nodes come up already set up (no SSH updaters) with the config they were launched
            # with, as the fake provider expects; the autoscaler's liveness check stays on.
            "provider": {"type": "fake_multinode", "gcs_address": self.gcs_address,
                         "disable_node_updaters": True, "disable_launch_config_check": True,
                         # Every node here shares one IP: the autoscaler must tell them apart
                         # by node id (the provider's ids, which the nodes are started with).
                         "use_node_id_as_ip": True},
            "auth": {"ssh_user": "ubuntu"},
            "available_node_types": types,
            "head_node_type": HEAD_TYPE,
            "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
            "rsync_exclude": [], "rsync_filter": [], "initialization_commands": [],
            "setup_commands": [], "head_setup_commands": [], "worker_setup_commands": [],
            "head_start_ray_commands": [], "worker_start_ray_commands": [],
        }

    def start(self, timeout_s: float = 120.0) -> SimulatedCluster:
        self.port, self.dashboard_port = _free_port(), _free_port()
        # Ray's unix socket paths must stay short (~107 bytes): a short folder under /tmp.
        self.temp_dir = tempfile.mkdtemp(prefix="rsim", dir="/tmp")
        config_path = Path(self.temp_dir) / "autoscaling.json"
        config_path.write_text(json.dumps(self.autoscaling_config()))
        env = self.client_env()
        env.pop("RAY_ADDRESS")
        # The head takes the id the fake provider knows it by (its workers get theirs from it).
        env.update({"RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1",
                    "RAY_OVERRIDE_NODE_ID_FOR_TESTING": FAKE_HEAD_NODE_ID})
        # Free ports for the head's agents: another Ray on this machine may hold the defaults.
        ports = [f"--{flag}={_free_port()}" for flag in (
            "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port",
            "metrics-export-port")]
        self._proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block",
             f"--port={self.port}", "--node-ip-address=127.0.0.1", "--num-cpus=0",
             "--include-dashboard=true", "--dashboard-host=127.0.0.1",
             f"--dashboard-port={self.dashboard_port}", f"--autoscaling-config={config_path}",
             f"--temp-dir={self.temp_dir}", *ports],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            self.wait_for(lambda: self._dashboard_up(), timeout_s, "the head's job server")
        except Exception:
            self.stop()
            raise
        return self

    def _dashboard_up(self) -> bool:
        if self._proc is not None and self._proc.poll() is not None:
            raise RuntimeError(f"the simulated head exited ({self._proc.returncode}); its logs: "
                               f"{self.temp_dir}/session_latest/logs")
        from ray.job_submission import JobSubmissionClient

        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        try:
            JobSubmissionClient(self.dashboard_url).list_jobs()
            return True
        except Exception:
            return False

    def stop(self) -> None:
        """Kill the head and every worker node this cluster launched (nothing else)."""
        marks = (f"{self.gcs_address}", self.temp_dir)
        if self._proc is not None and self._proc.poll() is None:
            try:
                os.killpg(self._proc.pid, signal.SIGTERM)
                self._proc.wait(timeout=10)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
        for proc in self._processes(lambda cmd: any(m and m in cmd for m in marks)):
            _kill_tree(proc)
        if self._proc is not None:
            try:
                os.killpg(self._proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def __enter__(self) -> SimulatedCluster:
        return self.start() if self._proc is None else self

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---------------------------------------------------------------------------- observing

    def nodes(self) -> list[dict]:
        """Every node the cluster has had: id, type, state, resources, start/end (ms)."""
        from ray.util.state import list_nodes

        out = []
        for n in list_nodes(address=self.dashboard_url, detail=True, limit=1000,
                            raise_on_missing_output=False):
            labels = n.labels or {}
            out.append({"node_id": n.node_id, "state": n.state, "is_head": n.is_head_node,
                        "type": labels.get("ray.io/node-group", "head" if n.is_head_node else ""),
                        "resources": n.resources_total, "start_ms": n.start_time_ms,
                        "end_ms": n.end_time_ms})
        return out

    def alive_workers(self) -> list[dict]:
        return [n for n in self.nodes() if n["state"] == "ALIVE" and not n["is_head"]]

    def timeline(self) -> list[str]:
        """The nodes added and removed, in order, as readable lines (for logs and notes)."""
        events = []
        for n in self.nodes():
            kind = "head" if n["is_head"] else "worker"
            res = ", ".join(f"{k} {v:g}" for k, v in sorted(n["resources"].items())
                            if k in ("CPU", self.accelerator))
            if n["start_ms"]:
                events.append((n["start_ms"], f"+ {kind} {n['node_id'][-8:]} ({res})"))
            if n["state"] == "DEAD" and n["end_ms"]:
                events.append((n["end_ms"], f"- {kind} {n['node_id'][-8:]}"))
        t0 = min((t for t, _ in events), default=0)
        return [f"{(t - t0) / 1000:7.1f}s {line}" for t, line in sorted(events)]

    def kill_node(self, node_id: str) -> int:
        """Kill a worker node as a machine dies: its raylet and every process under it, at once
        (SIGKILL, no clean shutdown). Returns the number of processes killed."""
        raylets = self._processes(lambda cmd: f"--node_id={node_id}" in cmd
                                  and "raylet" in cmd.split(" ", 1)[0])
        if not raylets:
            raise ValueError(f"no raylet of node {node_id} is running")
        return sum(_kill_tree(p) for p in raylets)

    def wait_for(self, predicate: Callable[[], Any], timeout_s: float, what: str,
                 every_s: float = 1.0) -> Any:
        deadline = time.monotonic() + timeout_s
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"simulated cluster: {what} not seen within {timeout_s:g} s")
            time.sleep(every_s)

    @staticmethod
    def _processes(match: Callable[[str], bool]) -> list[psutil.Process]:
        out = []
        for p in psutil.process_iter(["cmdline"]):
            cmd = " ".join(p.info["cmdline"] or [])
            if cmd and match(cmd):
                out.append(p)
        return out


def _kill_tree(proc: psutil.Process) -> int:
    """SIGKILL a process and all its descendants; the number that were still alive."""
    try:
        victims = [*proc.children(recursive=True), proc]
    except psutil.NoSuchProcess:
        return 0
    killed = 0
    for p in victims:
        try:
            p.kill()
            killed += 1
        except psutil.NoSuchProcess:
            pass
    return killed


def main(argv: list[str] | None = None) -> None:
    """`python -m nsft_ray.ray_glue.simcluster [cluster.yaml]`: run one until Ctrl-C, printing
    the address to submit to and, at the end, the node timeline."""
    import argparse

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("cluster_yaml", nargs="?", default="cluster.yaml")
    p.add_argument("--idle-timeout-s", type=float, default=10.0)
    args = p.parse_args(argv)
    with SimulatedCluster.from_cluster_yaml(args.cluster_yaml,
                                            idle_timeout_s=args.idle_timeout_s) as cluster:
        types = ", ".join(f"{t.name} (CPU {t.cpus}, {cluster.accelerator} {t.accelerators}, "
                          f"max {t.max_workers})" for t in cluster.worker_types)
        print(f"simulated cluster up: worker types {types}\n"
              f"  export RAY_AUTH_MODE=disabled RAY_ADDRESS={cluster.dashboard_url}\n"
              "  and add resources.accelerator=accelerator resources.autoscaling=true to a job's "
              "overrides. Ctrl-C stops it.", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            print("\n".join(["node timeline:", *cluster.timeline()]))


if __name__ == "__main__":
    main()
