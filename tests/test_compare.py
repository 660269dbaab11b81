"""compare: a tiny two-method run on a local Ray writes report.json, report.md and the plots, and
a repeated command re-runs nothing (resume at method level)."""

import json

import pyarrow.parquet as pq
import pytest

from nsft_ray.compare import compare, role_bytes
from nsft_ray.config import Config, WorldConfig, load_config
from nsft_ray.models import build_tiny_vlm
from nsft_ray.negatives.pipeline import construct_rows
from nsft_ray.schema import conversation_table
from nsft_ray.world import corpus, write_world


def test_role_bytes_count_models_and_adam_states():
    cfg = Config()
    params, optim = role_bytes("nsft", cfg, n_params=1000)
    assert params == {"policy": 4000} and optim == {"policy": 8000}  # fp32 + two fp32 moments
    params, optim = role_bytes("dpo", cfg, n_params=1000)
    assert params == {"policy": 4000, "reference": 4000} and optim["reference"] == 0
    params, optim = role_bytes("ppo", cfg, n_params=1000, value_head=10)
    assert set(params) == {"actor", "critic", "reward", "reference"}
    assert params["critic"] == 4040 and optim["reward"] == 0 and optim["critic"] == 8080


def test_unknown_method_is_rejected(tmp_path):
    cfg = load_config(None, ["compare.methods=[base,rlhf]"])
    with pytest.raises(ValueError, match="unknown 'rlhf'"):
        compare(cfg, tmp_path)


@pytest.mark.ray
@pytest.mark.slow
def test_two_method_compare_writes_report_and_resumes(tmp_path):
    import ray

    wcfg = WorldConfig(n_train=16, n_eval=4, max_objects=2)
    write_world(wcfg, tmp_path / "w", seed=0)
    build_tiny_vlm(tmp_path / "m", corpus(wcfg, n=150, seed=0))
    prefs = pq.read_table(tmp_path / "w" / "pref_train.parquet").to_pylist()
    conversations, _ = construct_rows(prefs, Config().negatives)
    pq.write_table(conversation_table(conversations), tmp_path / "conv.parquet")
    cfg = load_config(None, [
        "compare.methods=[base,nsft]", "compare.steps=2", f"compare.base_model={tmp_path / 'm'}",
        f"compare.eval_data={tmp_path / 'w'}", f"compare.conversations={tmp_path / 'conv.parquet'}",
        "train.micro_batch_size=4", "train.max_length=160", "deepspeed.enabled=false",
        "eval.max_images=3", "eval.max_new_tokens=12", "eval.pope_per_image=1",
    ])
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        out = tmp_path / "compare"
        agg = compare(cfg, out)
        assert list(agg) == ["base", "nsft"]
        for name in ("report.json", "report.md", "quality.png", "memory.png", "curves.png"):
            assert (out / name).stat().st_size > 0, name
        report = json.loads((out / "report.json").read_text())
        nsft = report["methods"]["nsft"]
        assert nsft["models_resident"] == 1 and nsft["peak_memory_bytes"] > 0
        assert "| nsft |" in (out / "report.md").read_text()
        record = out / "records" / "nsft-seed0.json"
        before = record.stat().st_mtime_ns
        compare(cfg, out)  # everything recorded: nothing re-trained
        assert record.stat().st_mtime_ns == before
    finally:
        ray.shutdown()
