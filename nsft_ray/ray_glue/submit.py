"""`nsft-ray submit`: submit a `jobs/*.py` entrypoint to a Ray cluster and follow it.

    RAY_ADDRESS=http://head:8265 nsft-ray submit -- python jobs/train.py --algo nsft --config ...

A thin layer over Ray's `JobSubmissionClient`: uploads the working directory, streams the job's
logs, and returns 0 if the job SUCCEEDED, 1 otherwise (so shells and CI can branch on it).
"""

from __future__ import annotations

import asyncio
import os
import sys
import time

from ray.exceptions import AuthenticationError
from ray.job_submission import JobStatus, JobSubmissionClient

__all__ = ["AUTH_HINT", "submit"]

# Ray 2.60 enables token authentication: a client finds the head's token only in token mode.
AUTH_HINT = (
    "the Ray head refused this client (token authentication, on by default since Ray 2.60). "
    "Run with RAY_AUTH_MODE=token: the client then reads the token `ray start` wrote "
    "(~/.ray/auth_token on the head's machine; elsewhere copy it there, or set RAY_AUTH_TOKEN "
    "or RAY_AUTH_TOKEN_PATH). A head started with RAY_AUTH_MODE=disabled needs the same on "
    "the client"
)

TERMINAL = {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}


async def _tail(client: JobSubmissionClient, job_id: str) -> None:
    async for lines in client.tail_job_logs(job_id):
        print(lines, end="", flush=True)


def _submit_with_retry(client: JobSubmissionClient, entrypoint: str, runtime_env: dict,
                       wait_s: float = 300.0) -> str:
    """Submit; while a just-started head has no job agent yet, retry for up to `wait_s`."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env)
        except RuntimeError as e:
            if "No available agent" not in str(e):
                raise
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"the head at {client.get_address()} has no job agent after {wait_s:.0f} s. "
                    "Its dashboard agent did not start: see dashboard_agent.log in the head's "
                    "Ray logs; a common cause is another Ray instance on that machine holding the "
                    "agent's port (52365 unless `ray start --dashboard-agent-listen-port` says "
                    "otherwise)") from e
            time.sleep(2.0)


def submit(entrypoint: list[str], *, address: str = "", working_dir: str = ".",
           follow: bool = True, timeout_s: float = 0.0,
           env_vars: dict[str, str] | None = None) -> int:
    """Submit `entrypoint`; with `follow`, stream logs until the job ends and return its status."""
    address = address or os.environ.get("RAY_ADDRESS", "")
    if not address:
        raise ValueError("no Ray address: pass --address or set RAY_ADDRESS "
                         "(e.g. http://127.0.0.1:8265)")
    if not entrypoint:
        raise ValueError("nothing to run: give the entrypoint after --, "
                         "e.g. -- python jobs/train.py --algo sft ...")
    runtime_env = {
        "working_dir": working_dir,
        "excludes": [".venv", "runs", ".git", "**/__pycache__"],
        "env_vars": {"HF_HUB_OFFLINE": "1", **(env_vars or {})},
    }
    try:
        client = JobSubmissionClient(address)
        job_id = _submit_with_retry(client, " ".join(entrypoint), runtime_env)
    except AuthenticationError as e:  # the CLI prints a ValueError as one line, no traceback
        raise ValueError(f"{AUTH_HINT} (Ray said: {e.message})") from e
    print(f"submitted {job_id} to {address}", flush=True)
    if not follow:
        return 0
    try:
        asyncio.run(_tail(client, job_id))
    except Exception as e:  # log streaming is best effort; the status below is what counts
        print(f"(log stream ended: {e})", file=sys.stderr)
    deadline = time.monotonic() + timeout_s if timeout_s else None
    while (status := client.get_job_status(job_id)) not in TERMINAL:
        if deadline and time.monotonic() > deadline:
            print(f"job {job_id} still {status} after {timeout_s:.0f} s", file=sys.stderr)
            return 1
        time.sleep(1.0)
    print(f"job {job_id}: {status}", flush=True)
    return 0 if status == JobStatus.SUCCEEDED else 1
