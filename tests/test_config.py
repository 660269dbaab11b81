import re

import pytest

from nsft_ray.config import (
    Config,
    ConfigError,
    WorldConfig,
    apply_overrides,
    from_dict,
    load_config,
    save_config,
)


def test_defaults_and_yaml_with_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("run:\n  seed: 3\nworld:\n  n_train: 10\n  shapes: [circle, star]\n")
    overrides = ["world.n_eval=7", "data.validation.max_tokens=64", "world.caption_pair_fraction=1"]
    cfg = load_config(path, overrides)
    assert isinstance(cfg, Config)
    assert cfg.run.seed == 3
    assert cfg.world.n_train == 10 and cfg.world.n_eval == 7
    assert cfg.world.shapes == ("circle", "star")
    assert cfg.data.validation.max_tokens == 64
    assert cfg.world.caption_pair_fraction == 1.0
    assert isinstance(cfg.world.caption_pair_fraction, float)
    assert cfg.world.image_size == WorldConfig().image_size  # untouched default


def test_scientific_notation_override_is_a_float():
    data = apply_overrides({}, ["negatives.llm.temperature=1e-5"])
    assert data == {"negatives": {"llm": {"temperature": 1e-5}}}


def test_unknown_key_names_key_and_allowed_keys():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["world.n_trian=5"])
    msg = str(e.value)
    assert "world.n_trian" in msg and "n_train" in msg and "n_eval" in msg


def test_unknown_section():
    with pytest.raises(ConfigError, match="unknown key bogus; allowed keys in the top level: run"):
        from_dict(Config, {"bogus": {}})


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("world.n_train=abc", "world.n_train: expected an integer, got 'abc'"),
        ("world.n_train=1.5", "world.n_train: expected an integer"),
        ("negatives.include_chosen=3", "negatives.include_chosen: expected true or false"),
        ("world.negatives=magic", "world.negatives: 'magic' is not one of 'synthetic', 'policy'"),
        ("world.shapes=circle", "world.shapes: expected a list"),
        ("run=5", "run: expected a mapping"),
        ("world", "expected key=value"),
    ],
)
def test_wrong_types_name_the_key(override, fragment):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert fragment in str(e.value)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_saved_config_reloads_identically(tmp_path):
    cfg = load_config(None, ["world.n_train=11", "negatives.constructor=template"])
    path = save_config(cfg, tmp_path / "run")
    assert load_config(path) == cfg


def test_bundled_job_configs_load():
    from pathlib import Path

    configs = sorted(Path(__file__).resolve().parents[1].glob("jobs/configs/**/*.yaml"))
    assert configs, "jobs/configs has no YAML files"
    for path in configs:
        load_config(path)  # raises on any unknown key or wrong type


def test_absolute_paths_fixes_existing_relative_paths_only(tmp_path, monkeypatch):
    from nsft_ray.config import absolute_paths

    (tmp_path / "models" / "base").mkdir(parents=True)
    (tmp_path / "prefs.parquet").write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    cfg = absolute_paths(load_config(None, [
        "model.name_or_path=models/base", "train.data=[prefs.parquet]", "run.dir=runs/x",
        "compare.base_model=llava-hf/llava-1.5-7b-hf"]))
    assert cfg.model.name_or_path == str(tmp_path / "models" / "base")
    assert cfg.train.data == (str(tmp_path / "prefs.parquet"),)
    assert cfg.run.dir == str(tmp_path / "runs" / "x")  # not there yet: made absolute anyway
    assert cfg.compare.base_model == "llava-hf/llava-1.5-7b-hf"  # a hub id stays as it is


@pytest.mark.parametrize("stage, workers, expected", [
    ("auto", 1, 0), ("auto", 4, 2), (2, 1, 2), (3, 1, 3), (0, 8, 0)])
def test_zero_stage_auto_suits_the_worker_count(stage, workers, expected):
    """One worker has nothing to partition: auto means stage 0 there, ZeRO-2 across workers;
    an explicit stage is never changed, and DeepSpeed's JSON gets the resolved one."""
    from nsft_ray.config import DeepSpeedConfig, OptimConfig
    from nsft_ray.ray_glue.deepspeed import deepspeed_config

    ds = DeepSpeedConfig(stage=stage)
    assert ds.zero_stage(workers) == expected
    got = deepspeed_config(ds, OptimConfig(), micro_batch_size=2, grad_accum=1,
                           world_size=workers, on_gpu=False)
    assert got["zero_optimization"]["stage"] == expected
    assert ("contiguous_gradients" in got["zero_optimization"]) == (expected >= 2)
    assert load_config(None, [f"deepspeed.stage={stage}"]).deepspeed.stage == stage


@pytest.mark.parametrize("override, fragment", [
    ("model.freeze=[tower]", "model.freeze[0]: 'tower' is not one of 'vision', 'connector'"),
    ("ppo.roles.colocate=[actor,critc]", "ppo.roles.colocate[1]: 'critc' is not one of"),
    ("compare.methods=[sft,rlhf]", "compare.methods[1]: 'rlhf' is not one of"),
])
def test_fixed_choices_are_checked_when_the_config_loads(override, fragment):
    """A typo in a fixed choice fails at load time, naming the key, not inside a Ray worker."""
    with pytest.raises(ConfigError, match=re.escape(fragment)):
        load_config(None, [override])


def test_group_by_length_is_a_window_and_needs_collation_on_the_training_thread():
    """Fails if a negative window passes, or if grouping is accepted with prefetch_collate, where
    Ray Data collates each batch before the worker could regroup its rows."""
    assert load_config(None, ["train.group_by_length=16"]).train.group_by_length == 16
    with pytest.raises(ConfigError, match="train.group_by_length=-1"):
        load_config(None, ["train.group_by_length=-1"])
    with pytest.raises(ConfigError, match="prefetch_collate=false"):
        load_config(None, ["train.group_by_length=4", "train.prefetch_collate=true"])
