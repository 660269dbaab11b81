"""The one place nsft-ray starts or joins Ray, with a console a person can read.

On a cluster (``address`` or RAY_ADDRESS) the job's runtime env, set at submission, applies. The
embedded local Ray gets the environment our workers need and a quiet console:

* Ray's own INFO lines ("Started a local Ray instance", per-report lines) stay in the session's
  log folder (``ray_log_dir()``); warnings and errors still reach the console.
* Ray Data's progress lines go to ray-data.log (ray_data_logging.yaml, set in __init__.py).
* Ray Train reports are logged at WARNING on the console (``TRAIN_LOGGING``).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import ray
import ray.data
import ray.train

__all__ = ["ensure_ray", "ray_log_dir", "quiet_embedded_worker", "quiet_train_reports", "step_bar",
           "TRAIN_LOGGING",
           "REPORT_POLL_ENV", "REPORT_POLL_S", "PREEMPTION_WATCHER_ENV", "DATASOURCE_V2_ENV"]

# Ray Train's controller collects a worker's `ray.train.report` only when it polls (every 2 s by
# default) and the worker blocks until then: poll faster on the embedded Ray, where short steps
# would otherwise wait up to 2 s per report (measured: benchmarks/README.md).
REPORT_POLL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
REPORT_POLL_S = "0.2"
# Ray Train starts a PreemptionWatcher actor with every run, to drain workers off cloud nodes
# being preempted. An embedded Ray is this one machine, which nothing preempts: there it would
# only be one more process to start before each run's first step (a cluster keeps it).
PREEMPTION_WATCHER_ENV = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"
# Ray Data 2.60 reads Parquet through its DataSource V2 by default, which first reads the files'
# footers on a pool of new FooterReader actors (2-3 fresh processes per read here), built to
# spread footer reads over a cluster's nodes. On one machine the V1 reader plans the read in the
# calling process: reading, shuffling and materializing the demo's 3,982 corrective rows took
# 0.3-0.4 s against 2.2-4.0 s (benchmarks/README.md). Embedded Ray only; a cluster keeps V2.
DATASOURCE_V2_ENV = "RAY_DATA_USE_DATASOURCE_V2"
# For RunConfig(logging_config=...): "Reporting training result N: TrainingReport(...)" is INFO.
TRAIN_LOGGING = ray.train.LoggingConfig(log_level="WARNING")
# Ray Data's logger that says (once per process, as a warning) that the bars we turned off are off.
RAY_DATA_PROGRESS = "ray.data._internal.progress"
RAY_DATA_DATASET = "ray.data.dataset"
NO_FREE_CPUS = "The Dataset job will hang unless more CPUs"
PLACEMENT_GROUP_CLEANER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"


def ensure_ray(address: str = "", num_cpus: int | None = None) -> None:
    """Connect to `address` (or RAY_ADDRESS); otherwise start an embedded local Ray."""
    if ray.is_initialized():
        return
    _drop_repeated_bar_closes()
    # One progress bar per stage is ours to draw; Ray Data's per-operator bars (validation,
    # splits, eval passes) would interleave with it. Datasets carry this context to their workers.
    ray.data.DataContext.get_current().enable_progress_bars = False
    # ...and Ray Data would say once, as a warning, that its bars are off.
    logging.getLogger(RAY_DATA_PROGRESS).setLevel(logging.ERROR)
    address = address or os.environ.get("RAY_ADDRESS", "")
    if address:
        ray.init(address=address, logging_level=logging.WARNING)
        return
    env = {"env_vars": _embedded_env_vars(), "worker_process_setup_hook": quiet_embedded_worker}
    # This process's Ray Data read ray.data's defaults at import; its datasets carry the context.
    ray.data.DataContext.get_current().use_datasource_v2 = env["env_vars"][DATASOURCE_V2_ENV] != "0"
    # Ray 2.60 announces at every local start that token auth is on by default; for an instance
    # that lives and dies with this process that is noise (a cluster's head still says it).
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(
        logging.ERROR)
    # Before each execution Ray Data warns that "the Dataset job will hang" when Ray's resource
    # view shows no free CPU. The embedded Ray runs one stage at a time, and the CPUs it sees
    # taken are the last stage's (a Train run's placement group, finished tasks), which Ray's view
    # shows as free a moment later: a false alarm (the demo printed it in most runs).
    dataset_logger = logging.getLogger(RAY_DATA_DATASET)
    if not any(isinstance(f, _DropMessage) for f in dataset_logger.filters):  # once per process
        dataset_logger.addFilter(_DropMessage(NO_FREE_CPUS))
    # address="local": always a new embedded instance, never a stray one another process started.
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, runtime_env=env,
             logging_level=logging.WARNING)
    print(f"Ray started; its logs: {ray_log_dir()}", flush=True)


def _embedded_env_vars() -> dict[str, str]:
    """The environment of every process of the embedded Ray (set here too, so the driver agrees;
    a variable the user exported wins)."""
    # Without a GPU, DeepSpeed warns in every process that imports it that it "could not detect"
    # one and falls back to CPU; naming the accelerator says the same thing once, here.
    import torch

    defaults = {REPORT_POLL_ENV: REPORT_POLL_S, PREEMPTION_WATCHER_ENV: "0", DATASOURCE_V2_ENV: "0",
                "DS_ACCELERATOR": "cuda" if torch.cuda.is_available() else "cpu"}
    env = {k: os.environ.setdefault(k, v) for k, v in defaults.items()}
    # transformers' "Loading weights" bars: in a worker each refresh is one more forwarded console
    # line (13 in the demo, from its eval and sampler actors); the driver keeps its own.
    return {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
            "HF_HUB_DISABLE_PROGRESS_BARS": "1", **env,
            "RAY_DATA_LOGGING_CONFIG": os.environ["RAY_DATA_LOGGING_CONFIG"]}


class _DropMessage(logging.Filter):
    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def _drop_repeated_bar_closes() -> None:
    """A Ray Train worker's stdout reaches the driver twice (every step-bar state appeared
    twice in the demo's console). tqdm_ray's driver, given the closing state of a bar it has
    already closed, opens a new bar that nothing closes and redraws it until the process ends:
    the demo's console showed every finished run's bar again at each refresh. This drops a
    closing state for a bar the driver does not hold (tests/test_train_ray.py checks it)."""
    from ray.experimental import tqdm_ray

    original = tqdm_ray._BarManager._process_state_update_locked
    if getattr(original, "drops_repeated_closes", False):
        return

    def update(manager: Any, state: dict) -> None:
        group = manager.bar_groups.get((state["ip"], state["pid"]))
        if state.get("closed") and not (group and group.has_bar(state["uuid"])):
            return
        original(manager, state)

    update.drops_repeated_closes = True  # type: ignore[attr-defined]
    tqdm_ray._BarManager._process_state_update_locked = update


def ray_log_dir() -> str:
    """The Ray session's log folder (where worker, Ray Data and Ray Train logs are written)."""
    return os.path.join(ray._private.worker._global_node.get_session_dir_path(), "logs")


def quiet_embedded_worker() -> None:
    """Every worker process of the embedded Ray runs this first (worker_process_setup_hook).

    Ray Train's placement-group cleaner asks the State API each second whether the controller
    lives; the embedded Ray runs without the dashboard that serves that API, so it would log a
    warning every second of every run (861 of the demo's 1,320 console lines). It only matters
    when a controller dies without cleaning up, and the embedded Ray ends with the process.
    """
    # By the logger's name (the module's __name__): importing the module to ask would load
    # ray.train (about 1.1 s on 2 cores) in every worker process, Ray Data's included.
    logging.getLogger(PLACEMENT_GROUP_CLEANER).setLevel(logging.ERROR)
    # Ray Train's data split coordinator runs Ray Data in a worker, where it says again that the
    # progress bars we turned off are off.
    logging.getLogger(RAY_DATA_PROGRESS).setLevel(logging.ERROR)


def quiet_train_reports() -> None:
    """On a Ray Train worker: no console line per `ray.train.report` (metrics.jsonl has them),
    and no weight-loading bars.

    TRAIN_LOGGING cannot remove them on Ray 2.60: that module names its logger by its file path
    (``logging.getLogger(__file__)``), outside the ``ray.train`` tree the level filter covers.
    """
    import transformers
    from ray.train.v2._internal.execution import context

    logging.getLogger(context.__file__).setLevel(logging.WARNING)
    # "Loading weights" / "Writing model shards" bars, twice per run: the step bar is the one.
    transformers.utils.logging.disable_progress_bar()


class _NoBar:
    def update(self, n: int = 1) -> None: ...
    def set_description(self, desc: str) -> None: ...
    def close(self) -> None: ...


def step_bar(desc: str, total: int, done: int, show: bool = True):
    """A training run's step bar, drawn once by the driver (Ray's tqdm_ray): a worker's own tqdm
    reaches the console as one forwarded line per refresh. Other ranks get a bar that draws
    nothing."""
    if not show:
        return _NoBar()
    from ray.experimental import tqdm_ray

    # Each state sent is also one (empty) forwarded log line on the driver: every 5 s, not 1 s.
    bar = tqdm_ray.tqdm(total=total, desc=desc, unit="step", flush_interval_s=5.0)
    bar.n = done  # resumed runs start where their checkpoint was
    return bar
