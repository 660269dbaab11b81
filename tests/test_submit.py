"""`nsft-ray submit` against a real Ray head on loopback: a tiny training job SUCCEEDS.

The test starts its own head (`ray start --head --block` in a subprocess, token auth disabled for
this head and its client, as shared/ENVIRONMENT.md describes), submits `jobs/train.py`, reads the
job's logs, and stops only the head it started by ending that subprocess.
"""

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def head():
    port, dash = _free_port(), _free_port()
    # Every port the head's agents listen on is a free one: the session's embedded Ray (conftest)
    # already holds the defaults (the dashboard agent's 52365), and a second agent that cannot bind
    # it never registers, so every submit is refused with "No available agent".
    agent_ports = [f"--dashboard-agent-listen-port={_free_port()}",
                   f"--dashboard-agent-grpc-port={_free_port()}",
                   f"--runtime-env-agent-port={_free_port()}",
                   f"--metrics-export-port={_free_port()}"]
    # Ray's unix socket paths must stay short (~107 bytes): not under pytest's long tmp_path.
    temp_dir = tempfile.mkdtemp(prefix="rt", dir="/tmp")
    # Jobs run `python ...` from PATH: put this virtualenv first, as cluster.yaml does on nodes.
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    proc = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", f"--port={port}",
         "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
         f"--dashboard-port={dash}", "--include-dashboard=true", "--num-cpus=4",
         f"--temp-dir={temp_dir}", *agent_ports],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
    )
    address = f"http://127.0.0.1:{dash}"
    from ray.job_submission import JobSubmissionClient

    deadline = time.monotonic() + 120
    while True:
        try:
            JobSubmissionClient(address).list_jobs()
            break
        except Exception:
            if proc.poll() is not None or time.monotonic() > deadline:
                out = proc.stdout.read().decode() if proc.poll() is not None else ""
                proc.kill()
                pytest.fail(f"Ray head did not come up: {out[-2000:]}")
            time.sleep(2)
    yield address, env
    os.killpg(proc.pid, signal.SIGTERM)  # only the processes of the head this test started
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
    shutil.rmtree(temp_dir, ignore_errors=True)


def test_submit_tiny_training_job_succeeds(head, tmp_path):
    from nsft_ray.config import WorldConfig
    from nsft_ray.models import build_tiny_vlm
    from nsft_ray.world import corpus, write_world

    address, env = head
    write_world(WorldConfig(n_train=12, n_eval=2, max_objects=2), tmp_path / "w", seed=0)
    build_tiny_vlm(tmp_path / "m", corpus(WorldConfig(), n=100, seed=0))
    run_dir = tmp_path / "run"
    cmd = [str(BIN / "nsft-ray"), "submit", "--address", address, "--working-dir", str(ROOT),
           "--timeout", "600", "--", "python", "jobs/train.py", "--algo", "sft",
           f"model.name_or_path={tmp_path / 'm'}",
           f"train.data=[{tmp_path / 'w' / 'sft_train.parquet'}]",
           f"run.dir={run_dir}", "train.max_steps=2", "train.micro_batch_size=2",
           "deepspeed.enabled=false", "train.export=false"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "SUCCEEDED" in out.stdout
    assert '"steps": 2' in out.stdout  # the job's own log (train summary), streamed back
    assert (run_dir / "summary.json").exists()

    # A failing entrypoint gives a non-zero exit code.
    bad = subprocess.run(cmd[:9] + ["python", "-c", "raise SystemExit(3)"], env=env,
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 1 and "FAILED" in bad.stdout
