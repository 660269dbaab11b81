"""compare: a tiny two-method run on a local Ray writes report.json, report.md and the plots, and
a repeated command re-runs nothing (resume at method level)."""

import json

import pyarrow.parquet as pq
import pytest

from nsft_ray.compare import (
    BaseGateFailed,
    _shared_rows,
    _stage,
    budget,
    candidates,
    compare,
    gate_check,
    role_bytes,
)
from nsft_ray.config import Config, ConfigError, WorldConfig, load_config
from nsft_ray.models import build_tiny_vlm
from nsft_ray.negatives.pipeline import construct_rows
from nsft_ray.schema import conversation_table
from nsft_ray.world import corpus, write_world


def test_role_bytes_count_models_and_adam_states():
    """The report's bytes per role come from the planner: float32 weights (4 B) and two float32
    Adam moments (8 B) per trained parameter, frozen references with no optimizer state, the
    value head's 11 float32 parameters on the critic and reward model (hidden 10)."""
    from nsft_ray.plan import ModelShape

    cfg = load_config(None, ["deepspeed.stage=0"])
    shape = ModelShape(parameters=1000, trainable=1000, hidden=10, layers=1)

    def split(method, shape):
        b = role_bytes(method, cfg, shape)
        return b["param_bytes_by_role"], b["optimizer_bytes_by_role"]

    assert split("nsft", shape) == ({"policy": 4000}, {"policy": 8000})
    params, optim = split("dpo", shape)
    assert params == {"policy": 4000, "reference": 4000} and optim["reference"] == 0
    params, optim = split("ppo", shape)
    assert {"actor", "critic", "reward", "reference"} <= set(params)
    assert params["critic"] == 4000 + 44 and optim["critic"] == 8000 + 88
    assert params["reward"] == 4000 + 44 and optim["reward"] == 0
    frozen = ModelShape(parameters=1000, trainable=600, hidden=10, layers=1)  # model.freeze
    assert split("sft", frozen) == ({"policy": 4000}, {"policy": 4800})
    assert split("base", shape) == ({"policy": 4000}, {"policy": 0})
    # The model-attributable peak: weights + Adam + the larger of gradients and activations.
    peak = role_bytes("sft", cfg, shape)["model_bytes_by_role"]["policy"]
    assert peak >= 4000 + 8000 + 4000 and role_bytes("base", cfg, shape)[
        "model_bytes_by_role"] == {"policy": 4000}


def test_unknown_method_is_rejected_when_the_config_loads():
    with pytest.raises(ConfigError, match="'rlhf' is not one of"):
        load_config(None, ["compare.methods=[base,rlhf]"])


def test_replaced_keys_name_their_replacement():
    """Fails if an old config's compare.steps / compare.lr is ignored or silently overrides."""
    with pytest.raises(ConfigError, match="compare.steps was replaced: set compare.epochs"):
        load_config(None, ["compare.steps=120"])
    with pytest.raises(ConfigError, match="compare.grid.sft_lr"):
        load_config(None, ["compare.lr=0.001"])


def test_grid_needs_the_same_search_effort_per_method():
    with pytest.raises(ConfigError, match="same, non-zero number of candidates"):
        load_config(None, ["compare.grid.sft_lr=[0.001,0.0005]"])
    cfg = load_config(None, [f"compare.grid.{k}=[{a},{b}]" for k, a, b in (
        ("sft_lr", 1, 2), ("nsft_lr", 3, 4), ("dpo_lr", 5, 6), ("dpo_beta", 0.1, 0.2),
        ("ppo_lr", 7, 8), ("ppo_kl_coef", 0.01, 0.02))])
    assert candidates("dpo", cfg) == [{"optim": {"lr": 5.0}, "dpo": {"beta": 0.1}},
                                      {"optim": {"lr": 6.0}, "dpo": {"beta": 0.2}}]
    assert candidates("ppo", cfg)[1] == {"optim": {"lr": 8.0}, "ppo": {"kl_coef": 0.02}}
    assert [len(candidates(m, cfg)) for m in ("sft", "nsft", "dpo", "ppo")] == [2, 2, 2, 2]


def test_budget_rule_every_method_sees_each_pair_equally():
    """Hand-computed: 100 shared pairs, 90 chosen and 95 negative conversations, batch 8 x 2
    accumulation, 1.5 passes: sft ceil(1.5*90/16)=9 steps, nsft ceil(1.5*185/16)=18, dpo
    ceil(1.5*100/16)=10, ppo ceil(1.5*100/32)=5 iterations of 32 prompts."""
    cfg = load_config(None, ["compare.epochs=1.5", "train.micro_batch_size=8",
                             "train.grad_accum=2", "ppo.rollout_batch_size=32"])
    counts = {"shared_pairs": 100, "chosen_conversations": 90, "negative_conversations": 95,
              "refute_only": {"negative_conversations": 60}}
    assert budget("sft", cfg, counts) == {"rows": 90, "steps": 9}
    assert budget("nsft", cfg, counts) == {"rows": 185, "steps": 18}
    assert budget("nsft_no_chosen", cfg, counts) == {"rows": 95, "steps": 9}
    assert budget("nsft_refute_only", cfg, counts) == {"rows": 150, "steps": 15}
    assert budget("dpo", cfg, counts) == {"rows": 100, "steps": 10}
    assert budget("ppo", cfg, counts) == {"rows": 100, "iterations": 5, "reward_steps": 10}


def test_gate_check_mean_of_three_pope_settings():
    result = {"pope": {"random": {"accuracy": 0.8}, "popular": {"accuracy": 0.7},
                       "adversarial": {"accuracy": 0.45}}}
    gate = gate_check(result, 0.6, 0.9)
    assert gate["value"] == pytest.approx(0.65) and gate["passed"]
    assert gate["adversarial"] == 0.45 and gate["auroc"] is None  # no "all" entry given
    assert not gate_check(result, 0.7, 0.9)["passed"]  # 0.65 below the declared low
    assert not gate_check(result, 0.5, 0.6)["passed"]  # above the declared high
    result["pope"]["all"] = {"accuracy": 0.6, "auroc": 0.71}
    assert gate_check(result, 0.6, 0.9)["auroc"] == 0.71  # reported beside, never gating


def _tiny_inputs(tmp_path):
    wcfg = WorldConfig(n_train=16, n_val=3, n_eval=4, max_objects=2)
    write_world(wcfg, tmp_path / "w", seed=0)
    build_tiny_vlm(tmp_path / "m", corpus(wcfg, n=150, seed=0))
    prefs = pq.read_table(tmp_path / "w" / "pref_train.parquet").to_pylist()
    conversations, failures = construct_rows(prefs, Config().negatives)
    pq.write_table(conversation_table(conversations), tmp_path / "conv.parquet")
    return len(prefs), {f["id"] for f in failures}


def _tiny_config(tmp_path, *overrides):
    return load_config(None, [
        f"compare.base_model={tmp_path / 'm'}", f"compare.eval_data={tmp_path / 'w'}",
        f"compare.conversations={tmp_path / 'conv.parquet'}",
        f"compare.preferences={tmp_path / 'w' / 'pref_train.parquet'}",
        "train.micro_batch_size=4", "train.max_length=160", "deepspeed.enabled=false",
        "eval.max_images=3", "eval.max_new_tokens=12", "eval.pope_per_image=1", *overrides,
    ])


@pytest.mark.ray
@pytest.mark.slow
def test_compare_protocol_gate_shared_rows_selection_and_resume(tmp_path, ray_session):
    """Fails if a base outside the gate is compared anyway, if the methods train on different
    rows, if a 2-candidate grid is not chosen on val, or if a repeated command re-trains."""
    n_prefs, failed = _tiny_inputs(tmp_path)
    # An untrained base answers POPE at chance: the declared gate stops everything.
    stopped = tmp_path / "stopped"
    with pytest.raises(BaseGateFailed, match="fails the base gate"):
        compare(_tiny_config(tmp_path, "compare.methods=[base,nsft]"), stopped)
    assert json.loads((stopped / "base_gate.json").read_text())["passed"] is False
    assert not (stopped / "records").exists()

    grid = [f"compare.grid.{k}=[{a},{b}]" for k, a, b in (
        ("sft_lr", 1e-3, 1e-4), ("nsft_lr", 1e-3, 1e-4), ("dpo_lr", 1e-3, 1e-4),
        ("dpo_beta", 0.1, 0.1), ("ppo_lr", 1e-5, 1e-5), ("ppo_kl_coef", 0.05, 0.05))]
    cfg = _tiny_config(tmp_path, "compare.gate=false", "compare.pairs=8",
                       "compare.methods=[base,sft]", *grid)
    out = tmp_path / "compare"
    agg = compare(cfg, out)
    assert list(agg) == ["base", "sft"]
    counts = json.loads((out / "data" / "counts.json").read_text())
    assert counts["preference_rows"] == n_prefs
    assert counts["dropped_for_all"] == len(failed) and counts["shared_pairs"] == 8
    shared = pq.read_table(out / "data" / "preferences.parquet")["id"].to_pylist()
    assert len(shared) == 8 and not set(shared) & failed
    parents = set(pq.read_table(out / "data" / "conversations.parquet")["parent_id"]
                  .to_pylist())
    assert parents == set(shared)
    # Selection ran on val: both candidates trained and scored, the better one chosen.
    sel = json.loads((out / "selection" / "sft.json").read_text())
    assert len(sel["val_scores"]) == 2 and sel["metric"] == "headline_mean"
    assert sel["chosen"] == max(range(2), key=lambda i: sel["val_scores"][i])
    assert not (out / "selection" / "nsft.json").exists()  # not compared, not tuned
    sft = json.loads((out / "records" / "sft-seed0.json").read_text())
    assert sft["budget"] == {"rows": 8, "steps": 2}
    # The planner's split for the trained model: weights, Adam moments, a model peak above both.
    model, params = sft["model_bytes_by_role"]["policy"], sft["param_bytes_by_role"]["policy"]
    assert model > params + sft["optimizer_bytes_by_role"]["policy"] > params > 0
    # The measured peak beside the worker's runtime before its model loaded (training summary).
    assert 0 < sft["runtime_bytes_by_role"]["policy"] < sft["memory_by_role"]["policy"]
    report = json.loads((out / "report.json").read_text())
    assert report["protocol"]["shared_rows"]["shared_pairs"] == 8
    assert report["protocol"]["grid_size"] == 2
    for name in ("report.json", "report.md", "quality.png", "memory.png", "curves.png"):
        assert (out / name).stat().st_size > 0, name
    record = out / "records" / "sft-seed0.json"
    before = record.stat().st_mtime_ns
    compare(cfg, out)  # everything recorded: nothing re-trained
    assert record.stat().st_mtime_ns == before


def test_keys_compare_sets_itself_are_refused(tmp_path):
    """Fails if dpo.beta (or another key the grid or the budget rule sets) is silently replaced."""
    n, _ = _tiny_inputs(tmp_path)
    with pytest.raises(ValueError, match="dpo.beta is set by compare from compare.grid.dpo_beta"):
        compare(_tiny_config(tmp_path, "dpo.beta=0.3"), tmp_path / "out")
    with pytest.raises(ValueError, match="train.max_steps is set by compare"):
        compare(_tiny_config(tmp_path, "train.max_steps=5"), tmp_path / "out")


def test_ablations_change_only_what_they_ablate(tmp_path):
    """Fails if an nSFT ablation trains with other rows or settings than nSFT's chosen ones
    beyond what it ablates (without chosen, with KL, refute-only conversations)."""
    cfg = load_config(None, ["compare.base_model=/m", "compare.ablation_kl_coef=0.2",
                             "compare.grid.nsft_lr=[0.003]"])
    counts = {"shared_pairs": 10, "chosen_conversations": 10, "negative_conversations": 10,
              "refute_only": {"negative_conversations": 9}}
    cand = candidates("nsft", cfg)[0]

    def stage(method):
        return _stage(method, cand, 1, cfg, tmp_path, tmp_path / method, counts)

    nsft, no_chosen, kl, refute = (stage(m) for m in ("nsft", "nsft_no_chosen", "nsft_kl",
                                                      "nsft_refute_only"))
    assert nsft.optim.lr == 0.003 and nsft.run.seed == 1 and nsft.nsft.use_chosen
    assert nsft.train.data == (str(tmp_path / "data" / "conversations.parquet"),)
    assert (no_chosen.nsft.use_chosen, no_chosen.nsft.kl_coef) == (False, 0.0)
    assert (kl.nsft.use_chosen, kl.nsft.kl_coef) == (True, 0.2)
    assert refute.train.data == (str(tmp_path / "data" / "conversations_refute_only.parquet"),)
    for s in (no_chosen, kl, refute):
        assert s.optim.lr == 0.003 and s.model.name_or_path == "/m"
    assert [s.train.max_steps for s in (nsft, no_chosen, kl, refute)] == [3, 2, 3, 3]


def test_shared_rows_do_not_depend_on_the_order_build_negatives_wrote(tmp_path):
    """build-negatives writes rows in the order Ray Data's tasks finish. Fails if compare's
    shared conversations keep that order (a seeded shuffle of another order trains on another
    order): the same rows written in two orders, across two files, must give one file."""
    import random

    import pyarrow as pa

    wcfg = WorldConfig(n_train=8, n_val=2, n_eval=2, max_objects=2)
    write_world(wcfg, tmp_path / "w", seed=0)
    prefs = pq.read_table(tmp_path / "w" / "pref_train.parquet").to_pylist()
    table = conversation_table(construct_rows(prefs, Config().negatives)[0])
    written = []
    for name, seed in (("a", 1), ("b", 2)):
        order = list(range(table.num_rows))
        random.Random(seed).shuffle(order)
        (tmp_path / name).mkdir()
        half = len(order) // 2
        for part, rows in (("0", order[:half]), ("1", order[half:])):
            pq.write_table(table.take(pa.array(rows)), tmp_path / name / f"part-{part}.parquet")
        cfg = load_config(None, [f"compare.conversations={tmp_path / name}",
                                 f"compare.preferences={tmp_path / 'w' / 'pref_train.parquet'}",
                                 "compare.pairs=5", "compare.methods=[base,sft,nsft]"])
        _shared_rows(cfg, tmp_path / f"out_{name}")
        written.append(pq.read_table(tmp_path / f"out_{name}" / "data" / "conversations.parquet"))
    assert written[0].equals(written[1])
    rows = written[0].to_pylist()
    # By the preference file's order (the first 5 constructed pairs), chosen before negatives.
    pairs = list(dict.fromkeys(r["parent_id"] for r in rows))
    assert pairs == [p["id"] for p in prefs if p["id"] in set(pairs)]
    assert [r["origin"] for r in rows if r["parent_id"] == pairs[0]][0] == "chosen"


def test_shared_rows_read_any_data_format_and_training_reads_ours(tmp_path):
    """Fails if compare cannot take a preference file in another layout (here JSON Lines with an
    image folder) or if the training stages would read compare's own Parquet with that layout's
    reader."""
    n, failed = _tiny_inputs(tmp_path)
    prefs = pq.read_table(tmp_path / "w" / "pref_train.parquet").to_pylist()
    (tmp_path / "img").mkdir()
    with (tmp_path / "prefs.jsonl").open("w") as f:
        for r in prefs:
            (tmp_path / "img" / f"{r['id']}.png").write_bytes(r["image"])
            f.write(json.dumps({"id": r["id"], "image": f"img/{r['id']}.png", "prompt": r["prompt"],
                                "chosen": r["chosen"], "rejected": r["rejected"]}) + "\n")
        f.write('{"id": "broken", "prompt": "no image"}\n')  # unreadable: dropped for all
    cfg = _tiny_config(tmp_path, f"compare.preferences={tmp_path / 'prefs.jsonl'}",
                       "data.format=jsonl", "compare.pairs=0")
    counts = _shared_rows(cfg, tmp_path / "out")
    assert counts["preference_rows"] == n + 1 and counts["dropped_for_all"] == len(failed) + 1
    shared = pq.read_table(tmp_path / "out" / "data" / "preferences.parquet").to_pylist()
    by_id = {r["id"]: r for r in prefs}
    assert {r["id"] for r in shared} == set(by_id) - failed
    assert all(r["image"] == by_id[r["id"]]["image"] for r in shared)  # the file's bytes
    stage = _stage("dpo", {}, 0, cfg, tmp_path / "out", tmp_path / "run", counts)
    assert stage.data.format == "parquet"
