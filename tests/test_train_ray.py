"""Ray Train end to end on a tiny VLM: sft and nsft through DeepSpeed and DDP workers.

Each Ray Train run costs ~20-40 s of start-up here, so each run checks several things:
- sft with plain DDP over two files, one holding corrupted rows: the bad rows are written to
  RUN/quarantine/quarantine.parquet with their reasons and the summary's counts add up; the good
  rows train, export a folder that `load_vlm` reloads and generates with, and a re-run of the
  same run.dir resumes from the last checkpoint instead of starting over;
- nsft on 2 DeepSpeed ZeRO-3 workers survives a worker killed mid-run (Ray Train restarts it from
  the last checkpoint) and exports the gathered ZeRO-3 weights;
- nsft with the KL term and a frozen (cached) vision tower on ZeRO-2: two resident models, a KL
  that moves off 0, frozen parts unchanged;
- nsft on 2 ZeRO-2 workers whose rank 0 dies after the step-2 checkpoint resumes at step 3 with
  the losses of an uninterrupted run (deterministic per-worker data order).
"""

import json
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import ray
import torch

from nsft_ray.config import Config, load_config
from nsft_ray.generation import generate
from nsft_ray.models import load_vlm
from nsft_ray.schema import QUARANTINE_SCHEMA, conversation_table, loads_meta

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.fixture(scope="module")
def ray_local(ray_session):
    return ray_session


@pytest.fixture(scope="module")
def assets(train_assets):  # conftest.py: a tiny world, base VLM, reward model and nSFT rows
    return train_assets


def _cfg(assets: Path, run: str, *overrides: str) -> Config:
    return load_config(None, [
        f"model.name_or_path={assets / 'base'}", f"run.dir={assets / run}",
        "train.micro_batch_size=4", "train.log_every=1", "train.max_length=192",
        "optim.lr=1e-3", *overrides,
    ])


def _steps(run_dir: Path) -> list[int]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["step"] for line in lines]


def _mixed_rows(assets: Path) -> tuple[Path, Path, dict]:
    """The world's valid sft rows, and a file of rows the validator must quarantine (and one
    valid negative row that sft's origin filter drops)."""
    good = assets / "world" / "sft_train.parquet"
    base = pq.read_table(good).to_pylist()[0]
    bad = {  # id -> (reason the validator must give, the corrupted fields)
        "bad-image": ("undecodable_image", {"image": b"\x89PNG but not really"}),
        "bad-empty": ("bad_messages", {"messages": []}),
        "bad-origin": ("bad_origin", {"origin": "positive"}),
    }
    rows = [{**base, "id": k, **fields} for k, (_, fields) in bad.items()]
    rows.append({**base, "id": "ok-negative", "origin": "negative"})  # valid; not an sft origin
    pq.write_table(conversation_table(rows), assets / "mixed.parquet")
    return good, assets / "mixed.parquet", bad


def _check_quarantine(run: Path, summary: dict, good: Path, bad: dict) -> None:
    n_good = pq.read_metadata(good).num_rows
    data = summary["data"]
    assert data["read"] == n_good + len(bad) + 1 == data["valid"] + data["quarantined"]
    assert data["quarantined"] == len(bad)
    assert data["by_reason"] == {reason: 1 for reason, _ in bad.values()}
    assert summary["rows"] == n_good  # the valid negative row is dropped by sft's origin filter
    assert json.loads((run / "summary.json").read_text())["data"] == data
    q = pq.read_table(run / "quarantine" / "quarantine.parquet")
    assert q.schema.equals(QUARANTINE_SCHEMA) and data["quarantine"] == str(
        (run / "quarantine" / "quarantine.parquet").resolve())
    got = {r["id"]: r for r in q.to_pylist()}
    assert {k: r["reason"] for k, r in got.items()} == {k: v[0] for k, v in bad.items()}
    assert all(r["stage"] == "validate" and r["detail"] for r in got.values())


def test_sft_ddp_quarantines_trains_exports_and_resumes(ray_local, assets):
    """One DDP run on valid and invalid rows: the invalid ones are quarantined with their
    reasons and counted, the rest train, export a loadable model, and a re-run resumes."""
    from nsft_ray.ray_glue.train import train

    good, mixed, bad = _mixed_rows(assets)
    data = f"train.data=[{good},{mixed}]"
    cfg = _cfg(assets, "sft", data, "deepspeed.enabled=false", "train.max_steps=3",
               "train.checkpoint_every=3")
    started_ms = time.time() * 1000
    summary = train(cfg, "sft")
    _check_quarantine(assets / "sft", summary, good, bad)
    # The processes this run started: validation ran as tasks (no validator actor without a
    # tokenizer), and the embedded Ray starts no PreemptionWatcher and reads Parquet without
    # FooterReader actors (runtime.py); the controller is there, so the list holds this run's.
    started = {a["ActorClassName"] for a in ray._private.state.actors().values()
               if a["StartTime"] >= started_ms}
    assert "TrainController" in started, started
    assert not {c for c in started if "ValidateBatchFn" in c
                or c in ("PreemptionWatcher", "FooterReader")}, started
    assert summary["steps"] == 3 and summary["models_resident"] == 1
    assert summary["samples_per_s"] > 0 and summary["peak_memory_bytes"] > 0
    assert _steps(assets / "sft") == [1, 2, 3]
    assert (assets / "sft" / "metrics.csv").exists() and (assets / "sft" / "config.yaml").exists()
    assert any((assets / "sft" / "tb").iterdir())  # TensorBoard events

    model, processor = load_vlm(assets / "sft" / "model")
    base, _ = load_vlm(assets / "base")
    changed = [not torch.equal(a, b) for a, b in zip(model.parameters(), base.parameters(),
                                                     strict=True)]
    assert any(changed)
    row = pq.read_table(assets / "world" / "sft_eval.parquet").to_pylist()[0]
    from nsft_ray.collate import decode_image

    answers = generate(model, processor, [decode_image(row["image"])], ["Describe the picture."],
                       max_new_tokens=8)
    assert len(answers) == 1 and isinstance(answers[0][0], str)

    # Same run.dir, larger budget: continues at step 4 from the step-3 checkpoint (collating
    # in Ray Data's iterator thread this time, the other batch path).
    train(_cfg(assets, "sft", data, "deepspeed.enabled=false", "train.max_steps=5",
               "train.checkpoint_every=3", "train.prefetch_collate=true"), "sft")
    assert _steps(assets / "sft") == [1, 2, 3, 4, 5]
    # The two runs' step bars are closed on the driver (a repeated closing state reopened them:
    # runtime._drop_repeated_bar_closes); their states arrive with the worker's forwarded logs.
    from ray.experimental import tqdm_ray

    time.sleep(3)
    assert not [b.state["desc"] for g in tqdm_ray.instance().bar_groups.values()
                for b in g.bars_by_uuid.values()]


@pytest.mark.heavy
def test_nsft_zero3_two_workers_survives_a_killed_worker(ray_local, assets):
    from nsft_ray.ray_glue.train import train

    cfg = _cfg(assets, "nsft_z3", f"train.data=[{assets / 'nsft.parquet'}]",
               "deepspeed.stage=3", "resources.num_workers=2", "train.max_steps=3",
               "train.checkpoint_every=1", "train.crash_at_step=2", "train.max_failures=1",
               "train.micro_batch_size=2")
    summary = train(cfg, "nsft")
    run = assets / "nsft_z3"
    assert (run / ".crashed_at_2").exists()  # the worker really died once
    steps = _steps(run)
    # The worker died in step 2, before logging or checkpointing it; the restarted workers resumed
    # from step 1's checkpoint (a fresh start would have logged step 1 twice).
    assert steps == [1, 2, 3]
    assert summary["models_resident"] == 1 and summary["deepspeed_stage"] == 3
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert {"nsft/chosen_loss", "nsft/negative_loss", "nsft/grad_norm"} <= set(metrics[-1])

    # The export holds the full (gathered) weights, not ZeRO-3's empty placeholders.
    model, _ = load_vlm(run / "model")
    base, _ = load_vlm(assets / "base")
    for (name, a), b in zip(model.named_parameters(), base.parameters(), strict=True):
        assert a.shape == b.shape, name
    assert any(not torch.equal(a, b) for a, b in zip(model.parameters(), base.parameters(),
                                                      strict=True))


def _check_memory_split(memory: dict, model_dir, frozen: tuple[str, ...]) -> None:
    """summary.json's memory: the measured peak split at the runtime baseline, and the planner's
    policy and reference parts against the model's own parameter counts (float32: 4 bytes a
    parameter, Adam 8 bytes a trained one; the frozen parts take neither gradient nor state)."""
    from nsft_ray.models import part_module

    trainer = memory["measured"]["trainer"]
    assert 0 < trainer["runtime_bytes"] < trainer["peak_bytes"]
    assert trainer["model_bytes"] == trainer["peak_bytes"] - trainer["runtime_bytes"]
    model, _ = load_vlm(model_dir)
    total = sum(p.numel() for p in model.parameters())
    fixed = sum(p.numel() for part in frozen for p in part_module(model, part).parameters())
    policy, reference = memory["plan"]["policy"], memory["plan"]["reference"]
    assert policy["parameters"] == reference["parameters"] == 4 * total
    assert policy["gradients"] == 4 * (total - fixed) and policy["optimizer"] == 8 * (total - fixed)
    assert reference["gradients"] == reference["optimizer"] == 0


def test_startup_breakdown_by_hand():
    """Fails if a stage is measured from the wrong mark, if a restarted worker's later start
    replaces the first one, or if a run without a first-step time gets made-up figures."""
    from nsft_ray.ray_glue.train import _startup

    first = {"time": 118.5, "entered": 118.0, "model_loaded": 121.0, "engine_ready": 122.0}
    restart = {"time": 140.5, "entered": 140.0, "model_loaded": 141.0, "engine_ready": 141.5}
    metrics = [{"step": 1, "first_step_time": 125.0}, {"step": 2},
               {"step": 3, "first_step_time": 150.0}]
    assert _startup(100.0, 110.0, [restart, first], metrics) == {
        "prepare": 10.0, "workers": 8.0, "model_load": 3.0, "engine_init": 1.0,
        "first_step": 3.0, "total": 25.0}
    assert _startup(100.0, 110.0, [first], [{"step": 1}]) is None


def test_first_batch_early_yields_every_item_once_in_order():
    """The worker's early start of epoch 0 (fetched while the model loads): fails if an item is
    lost, repeated or reordered, if the fetch runs in the caller's thread (no overlap), or if the
    stream's error does not reach the training thread."""
    import threading

    from nsft_ray.ray_glue.train import FirstBatchEarly

    threads = []

    def items(n: int, fail_at: int | None = None):
        threads.append(threading.current_thread().name)
        for i in range(n):
            if i == fail_at:
                raise OSError("block read failed")
            yield i

    early = FirstBatchEarly(items(5))
    assert list(early.batches()) == [0, 1, 2, 3, 4]
    assert threads == ["first-batch"]  # the stream started in the background thread
    assert early.batches() is None  # once: a second epoch 0 reads a fresh stream
    assert list(FirstBatchEarly(items(0)).batches()) == []
    with pytest.raises(OSError, match="block read failed"):
        FirstBatchEarly(items(3, fail_at=0)).batches()
    later = FirstBatchEarly(items(3, fail_at=2)).batches()
    assert [next(later), next(later)] == [0, 1]
    with pytest.raises(OSError, match="block read failed"):
        next(later)


def test_the_worker_hook_quiets_the_cleaners_logger_by_its_real_name():
    """The setup hook names the placement-group cleaner's logger without importing its module;
    fails if Ray renames or moves the module (the per-second warnings would be back)."""
    from ray.train.v2._internal.execution.controller import placement_group_cleaner

    from nsft_ray.ray_glue.runtime import PLACEMENT_GROUP_CLEANER

    assert placement_group_cleaner.logger.name == PLACEMENT_GROUP_CLEANER


def test_the_false_no_cpu_warning_is_named_by_ray_datas_own_text():
    """The embedded Ray drops Ray Data's "the Dataset job will hang" warning by its
    logger and text; fails if Ray moves or rewords it (the false alarm would be back)."""
    import inspect

    import ray.data.dataset

    from nsft_ray.ray_glue.runtime import NO_FREE_CPUS, RAY_DATA_DATASET

    assert ray.data.dataset.logger.name == RAY_DATA_DATASET
    assert NO_FREE_CPUS in inspect.getsource(ray.data.dataset)


def test_embedded_workers_draw_no_weight_loading_bars(ray_local):
    """A worker's transformers bars reach the console as one line per refresh (13 in the demo);
    the embedded Ray's workers start with them off, the driver keeps its own."""
    @ray.remote
    def bars_on() -> bool:
        import transformers

        return transformers.utils.logging.is_progress_bar_enabled()

    assert ray.get(bars_on.remote()) is False


def test_nsft_kl_with_a_frozen_tower_on_zero2(ray_local, assets):
    """nSFT with the KL term, vision tower and connector frozen (their features cached), ZeRO-2,
    length-grouped micro-batches: two models resident, a KL that is 0 at the start and positive
    once the policy moved, and the frozen parts unchanged in the export while the rest
    trained."""
    from nsft_ray.ray_glue.train import train

    cfg = _cfg(assets, "nsft_kl", f"train.data=[{assets / 'nsft.parquet'}]",
               "deepspeed.stage=2", "train.max_steps=2", "nsft.kl_coef=0.1",
               "model.freeze=[vision,connector]", "train.micro_batch_size=2",
               "train.group_by_length=4")  # the worker's grouping path, end to end
    summary = train(cfg, "nsft")
    assert summary["models_resident"] == 2 and summary["deepspeed_stage"] == 2
    _check_memory_split(summary["memory"], assets / "base", frozen=("vision", "connector"))
    startup = summary["startup_seconds"]  # every mark recorded, in order
    assert list(startup) == ["prepare", "workers", "model_load", "engine_init", "first_step",
                             "total"]
    assert all(v >= 0 for v in startup.values()) and startup["workers"] > 0
    assert sum(startup.values()) - startup["total"] == pytest.approx(startup["total"], abs=0.05)
    kl = [m["nsft/kl_loss"] for m in _metrics(assets / "nsft_kl")]
    assert kl[0] == pytest.approx(0.0, abs=1e-6) and kl[1] > 1e-6  # fails if KL is never computed
    model, _ = load_vlm(assets / "nsft_kl" / "model")
    base, _ = load_vlm(assets / "base")
    trained = dict(base.named_parameters())
    changed = {n: not torch.equal(p, trained[n]) for n, p in model.named_parameters()}
    frozen = [n for n in changed if ".vision_model." in n or ".connector." in n]
    assert frozen and not any(changed[n] for n in frozen)
    assert any(changed[n] for n in changed if n not in frozen)


def test_negative_rows_keep_their_parent(assets):
    rows = pq.read_table(assets / "nsft.parquet").to_pylist()
    parents = {r["id"] for r in pq.read_table(assets / "world" / "pref_train.parquet").to_pylist()}
    negatives = [r for r in rows if r["origin"] == "negative"]
    assert negatives and all(r["parent_id"] in parents for r in negatives)
    assert all(loads_meta(r["meta"]).get("constructor") for r in negatives)


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.heavy
def test_zero2_interrupted_run_resumes_with_the_uninterrupted_losses(ray_local, assets):
    """Two 2-worker ZeRO-2 runs of 4 steps with the same config and seed: A runs through; B's
    rank 0 dies in step 3, after the step-2 checkpoint, and Ray Train restarts the group from it
    (a re-run of the same command resumes the same way: the sft test). B must give A's losses:
    same weights, optimizer and LR-schedule state, and the same rows per worker. A collates in
    Ray Data's iterator thread (train.prefetch_collate), B on the training thread: the same
    batches either way.

    The data is 4 files: with several blocks read in parallel, Ray Data's block order (and so
    each worker's rows) varied between runs until train.preserve_order (seen: 4 of 4 pairs of
    runs with preserve_order=false differed from step 2 on).
    """
    from nsft_ray.ray_glue.train import train

    table = pq.read_table(assets / "nsft.parquet")
    shards = [assets / "shards" / f"part-{i}.parquet" for i in range(4)]
    shards[0].parent.mkdir(exist_ok=True)
    for i, path in enumerate(shards):
        pq.write_table(table.slice(i * 24, 24), path)
    common = (f"train.data=[{','.join(map(str, shards))}]", "deepspeed.stage=2",
              "resources.num_workers=2", "train.micro_batch_size=2", "train.max_steps=4",
              "train.checkpoint_every=2", "train.export=false")
    train(_cfg(assets, "z2_a", *common, "train.prefetch_collate=true"), "nsft")
    interrupted = _cfg(assets, "z2_b", *common, "train.crash_at_step=3", "train.max_failures=1")
    summary = train(interrupted, "nsft")  # rank 0 dies in step 3; Ray Train restarts the group
    run_b = assets / "z2_b"
    assert (run_b / ".crashed_at_3").exists()
    assert [w["start_step"] for w in summary["workers"]] == [0, 0, 2, 2]  # resumed at step 2

    a, b = _metrics(assets / "z2_a"), _metrics(run_b)
    assert [m["step"] for m in b] == [1, 2, 3, 4] and summary["steps"] == 4
    for key in ("nsft/loss", "nsft/negative_loss", "nsft/lr", "nsft/grad_norm"):
        assert [m[key] for m in b] == pytest.approx([m[key] for m in a], rel=1e-5), key
