"""The memory planner (nsft_ray/plan.py, `nsft-ray plan`): closed forms worked by hand, parameter
counts against real models, a real optimizer step's bytes, placement on cluster.yaml, refusals."""

from __future__ import annotations

import io
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from nsft_ray.config import PlanConfig, load_config
from nsft_ray.plan import (
    GiB,
    Memory,
    ModelShape,
    PlanRefused,
    kv_cache_bytes,
    lm_activation_bytes,
    logits_bytes,
    method_roles,
    model_shape,
    model_states,
    node_types,
    place,
    vision_activation_bytes,
)

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster.yaml"
LLAVA7B = ROOT / "jobs" / "configs" / "compare_llava7b.yaml"


# ------------------------------------------------------------------------------ closed forms


def test_zero0_mixed_precision_adam_holds_16_bytes_per_parameter():
    """ZeRO paper §3: 2Ψ (fp16 params) + 2Ψ (fp16 grads) + 12Ψ (fp32 master, m, v) = 16Ψ;
    a 1e9-parameter model needs 16e9 bytes of model states on every worker at stage 0."""
    m = model_states(10**9, 10**9, param_bytes=2, mixed=True, stage=0, workers=8)
    assert (m.parameters, m.gradients, m.optimizer) == (2 * 10**9, 2 * 10**9, 12 * 10**9)
    assert m.device() == 16 * 10**9 and m.host == 0


@pytest.mark.parametrize("stage, expected", [
    # (params, grads, optimizer) per worker for Ψ = 1e9 over N = 8, by hand from the paper's Fig. 1
    (1, (2 * 10**9, 2 * 10**9, 12 * 10**9 // 8)),  # P_os: 2Ψ + 2Ψ + 12Ψ/N
    (2, (2 * 10**9, 2 * 10**9 // 8, 12 * 10**9 // 8)),  # P_os+g: 2Ψ + 14Ψ/N
    (3, (2 * 10**9 // 8, 2 * 10**9 // 8, 12 * 10**9 // 8)),  # P_os+g+p: 16Ψ/N = 2e9
])
def test_zero_stages_partition_over_the_workers(stage, expected):
    """Fails if a stage partitions the wrong state (e.g. stage 2 leaving gradients whole)."""
    m = model_states(10**9, 10**9, param_bytes=2, mixed=True, stage=stage, workers=8)
    assert (m.parameters, m.gradients, m.optimizer) == expected
    if stage == 3:
        assert m.device() == 2 * 10**9  # 16 GB / 8


def test_fp32_adam_is_4_4_8_with_no_master_copy():
    """fp32 training: 4 (params) + 4 (grads) + 8 (two fp32 moments); no master weights."""
    m = model_states(10**9, 10**9, param_bytes=4, mixed=False, stage=0, workers=1)
    assert (m.parameters, m.gradients, m.optimizer) == (4 * 10**9, 4 * 10**9, 8 * 10**9)


def test_frozen_parameters_have_no_gradients_or_optimizer_state():
    m = model_states(10**9, 4 * 10**8, param_bytes=2, mixed=True, stage=0, workers=1)
    assert (m.parameters, m.gradients, m.optimizer) == (2 * 10**9, 8 * 10**8, 48 * 10**8)


def test_optimizer_offload_moves_states_and_fp32_grads_to_host():
    """ZeRO-2 + offload over 8: the accelerator keeps 2Ψ of params only; the host holds the
    12Ψ/8 optimizer partition and a 4Ψ/8 fp32 gradient partition = 2e9 bytes for Ψ = 1e9."""
    m = model_states(10**9, 10**9, param_bytes=2, mixed=True, stage=2, workers=8,
                     offload_optimizer=True)
    assert (m.parameters, m.gradients, m.optimizer) == (2 * 10**9, 0, 0)
    assert m.host == 12 * 10**9 // 8 + 4 * 10**9 // 8 == 2 * 10**9
    p = model_states(10**9, 10**9, param_bytes=2, mixed=True, stage=3, workers=8,
                     offload_optimizer=True, offload_params=True)
    assert p.device() == 0 and p.host == 2 * 10**9 + 2 * 10**9 // 8


def test_kv_cache_by_hand():
    """LLaVA-1.5-7B (32 layers, 32 KV heads x 128): 2 x 32 x 4096 x 2 bytes = 512 KiB per token;
    2304 tokens (2048 prompt + 256 new) = 1152 MiB."""
    assert kv_cache_bytes(layers=32, kv_dim=32 * 128, tokens=2304, dtype_bytes=2) == 1152 * 2**20
    # Grouped-query attention (8 KV heads) caches a quarter of that.
    assert kv_cache_bytes(32, 8 * 128, 2304, 2) == 288 * 2**20


def test_activation_and_logit_formulas_by_hand():
    """LLaVA-1.5-7B's LM (h 4096, f 11008, 32 heads of 128, no GQA), s=2048, b=1, 32 layers.
    Values per token and layer: 8·4096 + 2·4096 + 4·11008 + 2·128 = 85,248; in bf16
    85,248·2 + 4·32 + 6·4096 = 195,200 bytes, so 2048 x 32 x 195,200 = 12,792,627,200; in
    float32 85,248·4 + 128 = 341,120. Logits with gradients: bf16 plus a float32 copy."""
    shape = ModelShape(parameters=1, trainable=1, hidden=4096, layers=32, kv_dim=4096,
                       ffn=11008, heads=32)
    assert lm_activation_bytes(1, 2048, shape, act_bytes=2) == 12_792_627_200
    assert lm_activation_bytes(1, 2048, shape, act_bytes=4) == 2048 * 32 * 341_120
    # Unknown MLP width and heads: f = 4h, no head terms: (10h + 16h)·4 per token and layer.
    bare = ModelShape(parameters=1, trainable=1, hidden=64, layers=2)
    assert lm_activation_bytes(3, 5, bare, act_bytes=4) == 3 * 5 * 2 * 26 * 64 * 4
    # A ViT-L-sized tower: 576 patches, h 1024, f 4096, 24 layers, 16 heads; per patch
    # (8·1024 + 2·4096)·2 = 32,768 bytes per layer + 4·16, and 1024·2 for the embeddings.
    vit = ModelShape(parameters=1, trainable=1, vision_hidden=1024, vision_layers=24,
                     vision_tokens=576, vision_ffn=4096, vision_heads=16)
    assert vision_activation_bytes(2, vit, 2) == 2 * 576 * (24 * (32_768 + 64) + 2048)
    assert logits_bytes(2, 10, 100, 2, grad=True) == 2 * 10 * 100 * (2 + 4)
    assert logits_bytes(2, 10, 100, 4, grad=True) == 2 * 10 * 100 * 4
    assert logits_bytes(2, 10, 100, 2, grad=False) == 2 * 10 * 100 * 2


# ---------------------------------------------------------------------- counts, real models


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from nsft_ray.config import WorldConfig
    from nsft_ray.models import build_tiny_vlm
    from nsft_ray.world import corpus

    root = tmp_path_factory.mktemp("plan")
    texts = corpus(WorldConfig(), n=100, seed=0)
    return {arch: build_tiny_vlm(root / arch, texts, arch=arch) for arch in ("idefics3", "llava")}


@pytest.mark.parametrize("arch", ["idefics3", "llava"])
@pytest.mark.parametrize("frozen", [(), ("vision",)])
def test_parameter_count_from_config_json_equals_the_loaded_model(tiny, arch, frozen):
    """Counted on the meta device from config.json alone; the oracle is the real loaded model
    (fails if the vision tower, the projector or model.freeze is miscounted)."""
    from nsft_ray.models import freeze, load_vlm

    shape = model_shape(str(tiny[arch]), frozen, PlanConfig())
    model, _ = load_vlm(tiny[arch])
    freeze(model, frozen)
    assert shape.parameters == sum(p.numel() for p in model.parameters())
    assert shape.trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert shape.lm_head == model.get_output_embeddings().weight.numel()
    assert shape.image_tokens == (4 if arch == "idefics3" else 16)  # models.py: 64 px images


def test_llava_1_5_7b_count_in_the_bundled_config(tmp_path):
    """The 7B config's plan.num_parameters equals a meta-device count of LLaVA-1.5-7B's
    architecture (llava-hf/llava-1.5-7b-hf's config.json hyper-parameters; 7.06 B published)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=1024, intermediate_size=4096,
                                       num_hidden_layers=24, num_attention_heads=16,
                                       image_size=336, patch_size=14, projection_dim=768),
        text_config=LlamaConfig(vocab_size=32064, hidden_size=4096, intermediate_size=11008,
                                num_hidden_layers=32, num_attention_heads=32,
                                num_key_value_heads=32, tie_word_embeddings=False),
        image_token_id=32000, vision_feature_layer=-2, image_seq_length=576,
        tie_word_embeddings=False)
    config.save_pretrained(tmp_path)
    shape = model_shape(str(tmp_path), (), PlanConfig())
    plan = load_config(LLAVA7B).plan
    assert shape.parameters == plan.num_parameters == 7_063_427_072
    assert (shape.hidden, shape.layers, shape.vocab, shape.image_tokens) == (
        plan.hidden_size, plan.num_layers, plan.vocab_size, plan.image_tokens)


def _measured_states(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> Memory:
    return Memory(
        parameters=sum(p.nbytes for p in model.parameters()),
        gradients=sum(p.grad.nbytes for p in model.parameters() if p.grad is not None),
        # torch keeps a 4-byte `step` scalar per parameter tensor beside the two moments; the
        # planner ignores it (a few hundred bytes), so it is left out here.
        optimizer=sum(v.nbytes for s in optimizer.state.values() for k, v in s.items()
                      if k != "step"))


@pytest.mark.parametrize("frozen", [(), ("vision",)])
def test_predicted_model_states_equal_a_real_optimizer_step(tiny, frozen, capsys):
    """One sft step of the tiny Idefics3 (fp32, one worker, ZeRO-0 / plain AdamW): parameter,
    gradient and Adam-state bytes measured as tensor nbytes equal the plan exactly; activations
    are predicted only (printed)."""
    from nsft_ray.algorithms import load_policy
    from nsft_ray.collate import Collator
    from nsft_ray.loop import make_optimizer

    cfg = load_config(None, [f"model.name_or_path={tiny['idefics3']}", "deepspeed.stage=0",
                             "train.micro_batch_size=1", "train.max_length=64",
                             f"model.freeze={list(frozen)}"])
    predicted = method_roles("sft", cfg, model_shape(str(tiny["idefics3"]), frozen,
                                                     cfg.plan))["policy"].memory
    model, processor = load_policy(cfg)
    optimizer = make_optimizer(model, cfg.optim)
    rows = [{"id": "r0", "image": Image.new("RGB", (64, 64), "red"), "messages": [
        {"role": "user", "content": "Is there a red circle in the picture?"},
        {"role": "assistant", "content": "Yes, there is a red circle."}]}]
    model.train()
    model(**Collator(processor, max_length=64)(rows)).loss.backward()
    optimizer.step()
    measured = _measured_states(model, optimizer)
    with capsys.disabled():
        print(f"\n  tiny idefics3, freeze={list(frozen)}: bytes predicted / measured")
        for part in ("parameters", "gradients", "optimizer", "activations"):
            got = getattr(measured, part) if part != "activations" else None
            print(f"    {part:<12} {getattr(predicted, part):>12,} / "
                  f"{'(not measured)' if got is None else f'{got:,}'}")
    assert (predicted.parameters, predicted.gradients, predicted.optimizer) == (
        measured.parameters, measured.gradients, measured.optimizer)


# ------------------------------------------------------------------------ placement, the CLI


def _nodes(**plan) -> list:
    return node_types(yaml.safe_load(CLUSTER.read_text()), PlanConfig(**plan))


def test_node_types_read_cluster_yaml_with_instance_memory():
    nodes = {n.name: n for n in _nodes(max_workers=1)}
    a100 = nodes["worker.a100.8x"]
    assert (a100.accelerators, a100.accelerator, a100.accelerator_bytes) == (8, "A100-40GB",
                                                                             40 * GiB)
    assert nodes["worker.a10g.1x"].accelerator_bytes == 24 * GiB
    assert nodes["worker.a10g.1x"].max_workers == 1  # plan.max_workers caps cluster.yaml's 8
    assert nodes["head.cpu"].head and nodes["head.cpu"].cpus == 0
    with pytest.raises(PlanRefused, match="unknown node type 'worker.h100'"):
        _nodes(accelerator_gib={"worker.h100": 80})


@pytest.mark.parametrize("workers, node", [(1, "worker.a10g.1x"), (8, "worker.a100.8x")])
def test_a_small_model_packs_a_group_onto_the_node_type_that_holds_it_whole(tiny, workers, node):
    """One worker goes to the smaller 1-GPU type; eight stay together on one 8-GPU node (PACK)
    instead of spreading over eight A10G nodes."""
    from nsft_ray.ray_glue.placement import PLANS

    cfg = load_config(None, [f"model.name_or_path={tiny['idefics3']}", "resources.use_gpu=true",
                             f"resources.num_workers={workers}", "resources.cpus_per_worker=8"])
    roles = method_roles("sft", cfg, model_shape(str(tiny["idefics3"]), (), cfg.plan))
    placed = place("sft", roles, PLANS["sft"](cfg), _nodes(), cfg.plan)
    assert placed.fits and placed.nodes == ((node, {"trainer": workers}),)


def test_colocated_ppo_roles_share_one_bundle_and_add_their_memory(tiny):
    from nsft_ray.plan import _bundles
    from nsft_ray.ray_glue.placement import PLANS

    cfg = load_config(None, [f"model.name_or_path={tiny['idefics3']}",
                             "ppo.roles.colocate=[reward, reference]"])
    roles = method_roles("ppo", cfg, model_shape(str(tiny["idefics3"]), (), cfg.plan))
    shared = [b for b in _bundles(roles, PLANS["ppo"](cfg)) if b.group.startswith("shared:")]
    assert len(shared) == 1
    assert shared[0].device_bytes == (roles["reward"].memory.device()
                                      + roles["reference"].memory.device())


def _cli(*argv: str) -> tuple[int, str, str]:
    from nsft_ray.cli import main

    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main(["plan", *argv])
    return code, out.getvalue(), err.getvalue()


def test_7b_comparison_as_bundled_is_refused_with_the_shortfall():
    """cluster.yaml's p4d.24xlarge has 40 GB A100s: the 7B comparison (no gradient
    checkpointing, micro-batch 4 x 2048) cannot fit; the refusal names the largest node and
    the shortfall, exits 1, and comes within seconds (no weights, no cluster)."""
    import time

    start = time.perf_counter()
    code, out, err = _cli("--config", str(LLAVA7B), "--cluster", str(CLUSTER))
    assert code == 1 and time.perf_counter() - start < 20
    assert "refused" in err and "worker.a100.8x" in err and "A100-40GB" in err
    assert "short by" in err
    for method in ("sft", "nsft", "dpo", "ppo", "reward"):
        assert f"\n{method}" in out  # every method's table is printed before the verdict


def test_7b_plan_places_every_method_on_the_gpu_node_types():
    """With 80 GB A100s (p4de) and smaller micro-batches the same comparison fits: every method
    lands on cluster.yaml's 8-GPU type, PPO's eight role actors on one node."""
    code, out, err = _cli("--config", str(LLAVA7B), "--cluster", str(CLUSTER),
                          "plan.accelerator_gib={worker.a100.8x: 80}",
                          "train.micro_batch_size=2", "ppo.mini_batch_size=1")
    assert code == 0, err
    assert out.count("fits: 1 node(s): worker.a100.8x [") == 5
    assert "worker.a10g.1x [" not in out
    assert "all 5 runs fit" in out


def test_workers_beyond_max_workers_are_refused(tiny):
    """16 one-GPU workers of a small model: two 8-GPU nodes would hold them, but
    plan.max_workers=1 leaves one A100 node and one A10G node (9 GPUs)."""
    from nsft_ray.ray_glue.placement import PLANS

    cfg = load_config(None, [f"model.name_or_path={tiny['idefics3']}", "resources.use_gpu=true",
                             "resources.num_workers=16", "plan.max_workers=1"])
    roles = method_roles("sft", cfg, model_shape(str(tiny["idefics3"]), (), cfg.plan))
    placed = place("sft", roles, PLANS["sft"](cfg), _nodes(max_workers=1), cfg.plan)
    assert not placed.fits
    assert "7 of 16 bundles found no node" in placed.problems[0]
    assert "plan.max_workers=1" in placed.problems[0]


def test_unknown_model_size_is_refused():
    with pytest.raises(PlanRefused, match="set plan.num_parameters"):
        model_shape("/nowhere/llava", (), PlanConfig())


def test_a_running_clusters_nodes_from_ray_nodes():
    """ray.nodes() entries -> node types of one node each: the accelerator's memory from Ray's
    accelerator_type label (or plan.accelerator_gib by that label), host memory from Ray's
    `memory` resource, dead nodes left out, the head found by its internal resource."""
    from nsft_ray.plan import live_node_types

    nodes = [
        {"Alive": True, "NodeID": "aaaaaaaa11", "Resources": {
            "CPU": 8.0, "GPU": 2.0, "memory": 64 * GiB, "accelerator_type:A100-80G": 1.0,
            "node:__internal_head__": 1.0}},
        {"Alive": False, "NodeID": "dead", "Resources": {"CPU": 96.0}},
        {"Alive": True, "NodeID": "bbbbbbbb22", "Resources": {
            "CPU": 4.0, "GPU": 1.0, "memory": 8 * GiB, "accelerator_type:X9": 1.0}},
    ]
    (a, b), notes = live_node_types(nodes, PlanConfig())
    assert (a.name, a.accelerators, a.accelerator_bytes, a.host_bytes, a.head) == (
        "node aaaaaaaa", 2, 80 * GiB, 64 * GiB, True)
    assert b.accelerator_bytes > 1000 * GiB and not b.head  # unknown: not checked, and said so
    assert len(notes) == 1 and "X9" in notes[0] and "plan.accelerator_gib" in notes[0]
    (_, b), notes = live_node_types(nodes, PlanConfig(accelerator_gib={"X9": 12}))
    assert b.accelerator_bytes == 12 * GiB and not notes
