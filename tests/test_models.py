"""Tiny VLMs built offline: build -> save -> load -> forward/backward -> generate; value head."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import textwrap

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"

import torch  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from nsft_ray.collate import Collator  # noqa: E402
from nsft_ray.generation import encode_prompt, generate, make_sampler  # noqa: E402
from nsft_ray.models import (  # noqa: E402
    VALUE_HEAD_FILE,
    ValueHead,
    VLMWithValueHead,
    build_tiny_vlm,
    load_value_model,
    load_vlm,
    param_count,
    save_value_model,
    to_model_inputs,
)

SHAPES = ("circle", "square", "triangle", "star")
COLORS = ("red", "green", "blue", "yellow", "purple", "orange")
POSITIONS = ("top left", "top", "top right", "left", "center", "right",
             "bottom left", "bottom", "bottom right")
NUMBERS = ("no", "one", "two", "three", "four")


def _at(pos: str) -> str:
    return "in the center" if pos == "center" else f"at the {pos}"


def shapes_corpus(n: int = 300, seed: int = 0) -> list[str]:
    """ShapesWorld-style sentences (captions, questions, answers) per the shared grammar."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        s, c, p = rng.choice(SHAPES), rng.choice(COLORS), rng.choice(POSITIONS)
        size, num = rng.choice(("small", "large")), rng.choice(NUMBERS)
        bg = rng.choice(("plain", "striped", "dotted", "checkered"))
        out += [
            f"A {bg} picture with {num} {s}s and one {rng.choice(SHAPES)}. "
            f"There is a {size} {c} {s} {_at(p)}.",
            f"Is there a {c} {s} in the picture?",
            rng.choice([f"Yes, there is a {c} {s}.", f"No, there is no {c} {s}."]),
            f"What color is the {s} {_at(p)}? The {s} {_at(p)} is {c}.",
            f"What size is the {c} {s}? The {c} {s} is {size}.",
            f"How many {s}s are there? There are {num} {s}s.",
            f"Where is the {c} {s}? The {c} {s} is {_at(p)}.",
            f"What is the background of the picture? The background is {bg}.",
            f"{rng.choice(COLORS)} Answer with one word. Answer with a number.",
        ]
    return out


CORPUS = shapes_corpus()


def picture(color: str = "red", bg: str = "white") -> Image.Image:
    img = Image.new("RGB", (64, 64), bg)
    ImageDraw.Draw(img).ellipse((4, 4, 28, 28), fill=color)
    return img


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = build_tiny_vlm(tmp_path_factory.mktemp("vlm") / "tiny", CORPUS, seed=0)
    return path, *load_vlm(path)


def test_build_writes_a_loadable_folder_and_nothing_else(tmp_path):
    out = build_tiny_vlm(tmp_path / "m", CORPUS[:50])
    assert [p.name for p in tmp_path.iterdir()] == ["m"]
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json",
            "tokenizer.json", "chat_template.jinja"} <= names
    assert json.loads((out / "config.json").read_text())["model_type"] == "idefics3"


@pytest.mark.parametrize("arch", ["idefics3", "llava"])
def test_tiny_param_count_and_head_dims(tmp_path, arch):
    model, _ = load_vlm(build_tiny_vlm(tmp_path / arch, CORPUS, arch=arch))
    assert 1_000_000 <= param_count(model) <= 3_000_000
    for cfg in (model.config.text_config, model.config.vision_config):
        assert cfg.hidden_size // cfg.num_attention_heads >= 32  # vLLM CPU attention


def test_small_param_count_in_range(tmp_path):
    model, _ = load_vlm(build_tiny_vlm(tmp_path / "small", CORPUS, size="small"))
    assert 20_000_000 <= param_count(model) <= 50_000_000


def test_init_is_seeded_and_leaves_global_rng_alone(tmp_path):
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = load_vlm(build_tiny_vlm(tmp_path / "a", CORPUS, seed=1))[0].state_dict()
    assert torch.equal(torch.rand(1), before)  # the build used a forked RNG
    b = load_vlm(build_tiny_vlm(tmp_path / "b", CORPUS, seed=1))[0].state_dict()
    c = load_vlm(build_tiny_vlm(tmp_path / "c", CORPUS, seed=2))[0].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_build_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="arch='qwen'"):
        build_tiny_vlm(tmp_path / "x", CORPUS, arch="qwen")
    with pytest.raises(ValueError, match="multiple of 32"):
        build_tiny_vlm(tmp_path / "x", CORPUS, image_size=48)


def test_decode_roundtrip(tiny):
    _, _, processor = tiny
    tok = processor.tokenizer
    for text in [*CORPUS[:200], "Ünïcode ✓ and  double  spaces\nnew line"]:
        ids = tok.encode(text, add_special_tokens=False)
        assert tok.decode(ids) == text
    # A frequent word is one token, not bytes: the BPE really learned the corpus.
    assert len(tok.encode(" circle", add_special_tokens=False)) == 1


@pytest.mark.parametrize("arch", ["idefics3", "llava"])
def test_forward_backward_generate(tmp_path, arch):
    model, processor = load_vlm(build_tiny_vlm(tmp_path / arch, CORPUS, arch=arch))
    rows = [{"id": "r0", "image": picture(), "messages": [
        {"role": "user", "content": "Is there a red circle in the picture?"},
        {"role": "assistant", "content": "Yes, there is a red circle."}]}]
    batch = Collator(processor, max_length=128)(rows)
    model.train()
    loss = model(**batch).loss
    assert torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    vision = [p.grad for n, p in model.named_parameters() if "vision" in n and p.grad is not None]
    assert vision and any(g.abs().sum() > 0 for g in vision)  # the image reaches the loss
    answers = generate(model.eval(), processor, [picture(), picture("blue")],
                       ["Describe the picture.", "How many circles are there?"], max_new_tokens=5)
    assert len(answers) == 2 and all(len(a) == 1 and isinstance(a[0], str) for a in answers)


def test_overfit_one_conversation_then_generate_it_exactly(tmp_path):
    """Labels, template, generation prompt and eos agree: a model trained on one answer says it
    back word for word and stops at its end-of-turn token."""
    model, processor = load_vlm(build_tiny_vlm(tmp_path / "m", CORPUS))
    answer = "There are two circles."
    rows = [{"image": picture(), "messages": [
        {"role": "user", "content": "How many circles are there?"},
        {"role": "assistant", "content": answer}]}]
    batch = Collator(processor, max_length=128)(rows)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(10):
        opt.zero_grad()
        model(**batch).loss.backward()
        opt.step()
    out = generate(model.eval(), processor, [picture()], ["How many circles are there?"],
                   max_new_tokens=20)
    assert out == [[answer]]


def test_batched_left_padded_generation_matches_one_by_one(tiny):
    _, model, processor = tiny
    images = [picture(), picture("green", "black")]
    prompts = ["Describe the picture.",
               "What is the background of the picture? Answer with one word."]
    batched = generate(model, processor, images, prompts, max_new_tokens=6)
    single = [generate(model, processor, [i], [p], max_new_tokens=6)[0]
              for i, p in zip(images, prompts, strict=True)]
    assert batched == single
    enc = encode_prompt(processor, images, prompts)
    pad = processor.tokenizer.pad_token_id
    assert enc["input_ids"][0, 0] == pad and enc["attention_mask"][0, 0] == 0  # left padding
    assert (enc["input_ids"][:, -1] == enc["input_ids"][1, -1]).all()  # all end in the header


def test_sampling_k_answers_reproducible_with_seed(tiny):
    _, model, processor = tiny
    kw = dict(max_new_tokens=6, do_sample=True, num_return_sequences=3, seed=7)
    a = generate(model, processor, [picture(), picture("blue")], ["Describe.", "Count."], **kw)
    b = generate(model, processor, [picture(), picture("blue")], ["Describe.", "Count."], **kw)
    assert a == b and [len(x) for x in a] == [3, 3]
    with pytest.raises(ValueError, match="do_sample=True"):
        generate(model, processor, [picture()], ["x"], num_return_sequences=2)
    with pytest.raises(ValueError, match="2 prompts"):
        generate(model, processor, [picture()], ["x", "y"])


def test_make_sampler_batches_and_is_seeded(tiny):
    path = tiny[0]
    images, prompts = [picture(), picture("blue"), picture("green")], ["A?", "B?", "C?"]
    s1 = make_sampler(path, temperature=1.0, max_new_tokens=4, batch_size=2, seed=3)
    s2 = make_sampler(path, temperature=1.0, max_new_tokens=4, batch_size=2, seed=3)
    out = s1(images, prompts, 2)
    assert [len(x) for x in out] == [2, 2, 2] and out == s2(images, prompts, 2)


def test_load_vlm_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_vlm(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_vlm(tmp_path / "empty")
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=1, num_key_value_heads=1)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "llm")
    with pytest.raises(ValueError, match="'llama' model, not an image-text-to-text VLM"):
        load_vlm(tmp_path / "llm")
    with pytest.raises(ValueError, match="dtype='fp8'"):
        load_vlm(tmp_path / "llm", dtype="fp8")


def test_value_head_shapes_and_save_load_roundtrip(tiny, tmp_path):
    _, model, processor = tiny
    head = ValueHead(16)
    assert head(torch.randn(2, 5, 16)).shape == (2, 5)
    rows = [{"image": picture(), "messages": [{"role": "user", "content": q},
                                               {"role": "assistant", "content": a}]}
            for q, a in [("Is there a star?", "No."), ("Where is the red circle?",
                                                        "The red circle is at the top left.")]]
    batch = Collator(processor, max_length=128)(rows)
    vm = VLMWithValueHead(model).eval()
    with torch.no_grad():
        values = vm(batch)
    assert values.shape == batch["input_ids"].shape and values.dtype == torch.float32
    assert torch.isfinite(values).all()
    save_value_model(vm, tmp_path / "vm", processor)
    assert (tmp_path / "vm" / VALUE_HEAD_FILE).is_file()
    loaded, _ = load_value_model(tmp_path / "vm")
    with torch.no_grad():
        assert torch.allclose(loaded(batch), values, atol=1e-6)
    with pytest.raises(FileNotFoundError, match="not a saved value model"):
        load_value_model(tiny[0])


@pytest.mark.parametrize("arch", ["idefics3", "llava"])
def test_value_model_trains(tmp_path, arch):
    """Per-token values for both architectures; gradients reach the head and the backbone."""
    model, processor = load_vlm(build_tiny_vlm(tmp_path / arch, CORPUS, arch=arch))
    vm = VLMWithValueHead(model)
    batch = Collator(processor, max_length=128)([{"image": picture(), "messages": [
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yes."}]}])
    values = vm(batch)
    assert values.shape == batch["input_ids"].shape
    values.sum().backward()
    assert vm.value_head.proj.weight.grad.abs().sum() > 0
    first_layer = model.model.language_model.layers[0] if arch == "llava" else \
        model.model.text_model.layers[0]
    assert first_layer.mlp.up_proj.weight.grad.abs().sum() > 0


VLLM_SCRIPT = textwrap.dedent("""
    import json, os, sys
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ["HF_HUB_OFFLINE"] = "1"

    def main():
        from PIL import Image
        from transformers import AutoProcessor
        from vllm import LLM, SamplingParams
        model_dir, image_path, prompt_text, max_tokens = sys.argv[1:5]
        content = [{"type": "image"}, {"type": "text", "text": prompt_text}]
        chat = [{"role": "user", "content": content}]
        prompt = AutoProcessor.from_pretrained(model_dir).apply_chat_template(
            chat, add_generation_prompt=True)
        llm = LLM(model=model_dir, dtype="float32", enforce_eager=True, max_model_len=256,
                  limit_mm_per_prompt={"image": 1}, seed=0)
        image = Image.open(image_path).convert("RGB")
        out = llm.generate({"prompt": prompt, "multi_modal_data": {"image": image}},
                           SamplingParams(temperature=0.0, max_tokens=int(max_tokens)))
        print("RESULT " + json.dumps(list(out[0].outputs[0].token_ids)))

    if __name__ == "__main__":  # vLLM starts workers with spawn
        main()
""")


@pytest.mark.vllm
@pytest.mark.slow
@pytest.mark.heavy
def test_vllm_cpu_greedy_matches_transformers(tmp_path):
    """On a briefly trained model (varied tokens, not one repeated), so the check has teeth."""
    pytest.importorskip("vllm")
    path = build_tiny_vlm(tmp_path / "m", CORPUS, seed=0)
    model, processor = load_vlm(path)
    image, prompt, n = picture("purple", "gray"), "Describe the picture.", 16
    batch = Collator(processor, max_length=128)([{"image": image, "messages": [
        {"role": "user", "content": prompt},
        {"role": "assistant", "content": "A plain picture with one circle."}]}])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(6):
        opt.zero_grad()
        model(**batch).loss.backward()
        opt.step()
    model.eval().save_pretrained(path)
    image.save(tmp_path / "img.png")
    inputs = to_model_inputs(encode_prompt(processor, [image], [prompt]), model)
    with torch.no_grad():
        hf = model.generate(**inputs, max_new_tokens=n, do_sample=False)
    hf = hf[0, inputs["input_ids"].shape[1]:]
    script = tmp_path / "run_vllm.py"
    script.write_text(VLLM_SCRIPT)
    proc = subprocess.run(
        [sys.executable, str(script), str(path), str(tmp_path / "img.png"), prompt, str(n)],
        capture_output=True, text=True, timeout=500, cwd=tmp_path,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert lines, f"vLLM failed (rc={proc.returncode}):\n{proc.stderr[-3000:]}"
    vllm_ids = json.loads(lines[0][len("RESULT "):])
    print("transformers:", hf.tolist(), "\nvllm:        ", vllm_ids)
    assert vllm_ids == hf.tolist()


@pytest.mark.parametrize("arch", ["idefics3", "llava"])
def test_freeze_vision_and_connector(tmp_path, arch):
    from nsft_ray.models import freeze

    model, processor = load_vlm(build_tiny_vlm(tmp_path / arch, CORPUS, arch=arch))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    vision = "vision_model" if arch == "idefics3" else "vision_tower"
    connector = "connector" if arch == "idefics3" else "multi_modal_projector"
    frozen = freeze(model, ["vision", "connector"])
    expected = sum(p.numel() for n, p in model.named_parameters() if vision in n or connector in n)
    assert frozen == expected > 0
    assert freeze(model, ["vision"]) == 0  # already frozen
    rows = [{"id": "r0", "image": picture(), "messages": [
        {"role": "user", "content": "Is there a red circle in the picture?"},
        {"role": "assistant", "content": "Yes, there is a red circle."}]}]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    model(**Collator(processor, max_length=128)(rows)).loss.backward()
    opt.step()
    for n, p in model.named_parameters():
        changed = not torch.equal(p, before[n])
        if vision in n or connector in n:
            assert not p.requires_grad and not changed, n
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters()
               if "lm_head" in n)  # the language side still trains


def test_freeze_errors_name_the_part(tiny):
    from nsft_ray.models import freeze

    model, _ = load_vlm(tiny[0])  # a fresh copy: the fixture's model stays trainable
    with pytest.raises(ValueError, match="unknown part 'eyes'.*vision, connector"):
        freeze(model, ["eyes"])
    with pytest.raises(ValueError, match="Linear has no vision module"):
        freeze(torch.nn.Linear(2, 2), ["vision"])


def test_false_default_config_warning_dropped_real_ones_kept(tiny, tmp_path):
    """Loading an Idefics3 config warned about a pad id of transformers' own default config
    (vocabulary 32,000, pad 128,002), once per process: the demo's console had it 15 times.
    Fails if the filter is gone (the false warning shows) or too broad (a real bad id in a loaded
    config no longer warns)."""
    import logging

    import transformers
    from transformers import AutoConfig

    path = tiny[0]
    config = json.loads((path / "config.json").read_text())
    config["text_config"]["pad_token_id"] = 997  # outside the tiny vocabulary
    (tmp_path / "config.json").write_text(json.dumps(config))
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    logger = logging.getLogger("transformers.configuration_utils")
    logger.addHandler(handler)
    transformers.utils.logging.warning_once.cache_clear()  # earlier loads in this process
    try:
        AutoConfig.from_pretrained(path)
        AutoConfig.from_pretrained(tmp_path)
    finally:
        logger.removeHandler(handler)
    assert not [m for m in seen if "128002" in m], seen
    assert [m for m in seen if "pad_token_id" in m and "got 997" in m], seen
