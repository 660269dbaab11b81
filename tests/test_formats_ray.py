"""`nsft-ray build-negatives data.format=<published layout>` end to end on the tests' shared Ray.

One Parquet layout (RLAIF-V, read by Ray Data's Parquet reader and mapped per batch) and one JSON
layout (POVID, split per file and mapped per batch), through the console script's own function.
"""

import json

import pyarrow.dataset as pads
import pytest
from test_formats import RLAIF_V_BAD, write_povid, write_rlaif_v

from nsft_ray.cli import main

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def local_ray(ray_session):
    return ray_session


@pytest.mark.parametrize("fmt, write, bad", [
    ("rlaif-v", write_rlaif_v, RLAIF_V_BAD),
    ("povid", write_povid, {"mismatch": "prompt_mismatch", "long": "multi_turn",
                            "no-image": "image_not_found", "not-turns": "wrong_type"}),
])
def test_build_negatives_reads_the_published_layout(local_ray, tmp_path, fmt, write, bad,
                                                    capsys):
    """Fails if a layout is not registered with the Ray readers, or a bad row goes missing, or
    the console's counts differ from summary.json's (it once printed constructed as valid)."""
    path, out = write(tmp_path), tmp_path / "out"
    assert main(["build-negatives", "--input", str(path), "--out", str(out),
                 f"data.format={fmt}"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["read"] == len(bad) + summary["valid"]
    assert summary["read"] == summary["constructed"] + summary["quarantined"]
    by_reason = summary["quarantined_by_stage"]["validate"]
    assert by_reason == {r: list(bad.values()).count(r) for r in bad.values()}
    words = [line.split() for line in capsys.readouterr().out.splitlines()]
    console = {w[0]: int(w[1]) for w in words
               if w[:1] in (["read"], ["valid"], ["constructed"], ["quarantined"])}
    assert console == {k: summary[k] for k in ("read", "valid", "constructed", "quarantined")}
    quarantine = pads.dataset(out / "quarantine.parquet").to_table().to_pylist()
    assert {q["id"]: q["reason"] for q in quarantine if q["stage"] == "validate"} == bad
    conversations = pads.dataset(out / "conversations").to_table().to_pylist()
    assert summary["constructed"] >= 1 and conversations
    parents = {c["parent_id"] for c in conversations}
    assert parents <= {"0", "1", "ok"}  # only the good rows were constructed from


def test_ppo_prompts_from_a_published_layout(tmp_path):
    """Fails if PPO's prompt loader ignores data.format (it read Parquet only)."""
    from test_formats import write_vlfeedback

    from nsft_ray.config import load_config
    from nsft_ray.ray_glue.ppo import load_prompts

    path = write_vlfeedback(tmp_path)
    cfg = load_config(None, [f"train.data=[{path}]", "data.format=vlfeedback"])
    kept, bad = load_prompts(cfg)
    # A rating tie or a single rating is no preference pair, but still a prompt and an image.
    assert sorted(r["id"] for r in kept) == ["bad-completions", "ok", "one-rated", "tie"]
    assert all(r["prompt"] == "What is in the image?" for r in kept)
    reasons = {b["id"]: b["reason"] for b in bad}
    assert reasons["no-image"].startswith("image_not_found: image: file ")
    assert reasons["vlfeedback-6"].startswith("malformed_json: vlfeedback.jsonl line 6")


@pytest.mark.parametrize("fmt", ["trl", "vlfeedback", "hadpo"])
def test_dpo_training_rows_from_a_published_layout(local_ray, tmp_path, fmt):
    """Fails if the trainer's reader (dpo and the reward model train on preference rows) ignores
    data.format, or its validation pass keeps or drops other rows than the local reader's."""
    from test_formats import WRITERS, read, write_hadpo

    from nsft_ray.config import load_config
    from nsft_ray.ray_glue.train import build_train_dataset

    path = (WRITERS.get(fmt) or write_hadpo)(tmp_path / "in" if fmt == "hadpo" else tmp_path)
    cfg = load_config(None, [f"train.data=[{path}]", f"data.format={fmt}",
                             f"run.dir={tmp_path / 'run'}", "train.shuffle=false",
                             "data.validation.max_tokens=64", "data.validation.min_side=8"])
    ds, counts = build_train_dataset(cfg, "dpo")
    valid, bad = read(path, fmt)  # the local reader and validator: the oracle
    assert sorted(r["id"] for r in ds.take_all()) == sorted(valid)
    assert counts["read"] == len(valid) + len(bad) and counts["by_reason"] == {
        r: list(bad.values()).count(r) for r in set(bad.values())}
