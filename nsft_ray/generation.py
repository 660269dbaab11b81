"""One generation layer: chat prompt -> sampling -> stop/EOS -> text, on transformers or vLLM.

    gen = HFGenerator(model, processor)                  # or VLLMGenerator("runs/model")
    [[answer]] = gen.complete([user_turn(image, "Describe the picture.")], [[image]],
                              Sampling(max_new_tokens=32))
    answer.text, answer.token_ids, answer.finish_reason  # "A red circle.", [..., eos], "stop"

Every caller goes through here: evaluation (`generate`), PPO rollouts (`HFGenerator.token_ids` on
prompts the loop encoded once, `VLLMGenerator` in the Ray engines), on-policy sampling
(`make_sampler`), the LLM constructor (a text-only tokenizer works as the processor) and serving.
What both backends share, written once:

- prompts: the processor's (or tokenizer's) own chat template renders the chat (`render_chats`);
  a batch is left-padded so that generation continues right after each prompt (`encode_texts`);
  the template's special tokens are not added twice (`adds_special_tokens`);
- sampling: `Sampling` (temperature 0 = greedy; no top-k cut and no repetition penalty, whatever a
  checkpoint's generation_config says: the same distribution on both backends);
- stopping: the tokenizer's eos and any the checkpoint lists end an answer, which is cut after
  its first eos (`cut_after_eos`); stop strings cut the text before the earliest one
  (`apply_stop`); greedy answers asked for n times are computed once;
- streaming (transformers): `HFGenerator.complete(..., listeners=...)` hands each listened chat's
  text to a callback as it is generated, in pieces whose concatenation is the returned text
  (`TextStream`); a row stops generating at its stop string, or when its listener has gone;
- padding: `pad_token_id`, the pad token or else eos;
- vLLM's engine settings on CPU and GPU (`vllm_engine_args`, `VLLM_CPU_ENV`).

Neither ray nor vllm is imported here at module level: vllm loads when a VLLMGenerator is built.
`AsyncVLLMGenerator` is the same on vLLM's AsyncLLM (continuous batching, streamed text): serving.
"""

from __future__ import annotations

import functools
import itertools
import logging
import os
from collections.abc import Callable, Collection, Mapping, Sequence
from contextlib import aclosing
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from PIL import Image

from nsft_ray.schema import ROLES

if TYPE_CHECKING:
    from torch import Tensor
    from transformers import GenerationConfig, PreTrainedModel

# torch, transformers and the model code load on first use, not on import: serve's HTTP gateway
# imports Sampling and apply_stop from here and never holds a model.

__all__ = [
    "Sampling",
    "Completion",
    "TextStream",
    "HFGenerator",
    "VLLMGenerator",
    "AsyncVLLMGenerator",
    "VLLM_CPU_ENV",
    "adds_special_tokens",
    "apply_stop",
    "cut_after_eos",
    "encode_chats",
    "encode_prompt",
    "encode_texts",
    "eos_token_ids",
    "generate",
    "hf_generation_config",
    "make_sampler",
    "pad_token_id",
    "render_chats",
    "to_chat",
    "tokenizer_of",
    "user_turn",
    "vllm_engine_args",
]

log = logging.getLogger(__name__)
Chat = list[dict]  # [{"role", "content": str | [{"type": "text", "text"} | {"type": "image"}]}]
# vllm-cpu reserves 4 GiB of KV cache by default; 1 GiB fits the project's machines
# (shared/ENVIRONMENT.md). Set before vllm is imported; a value already set wins.
VLLM_CPU_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1"}


@dataclass(frozen=True)
class Sampling:
    """How to sample one prompt's answers."""

    max_new_tokens: int
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0  # used only when sampling
    n: int = 1  # answers per prompt; greedy ones are computed once and repeated
    seed: int | None = None  # HF: reseeds torch's global generator; vLLM: a per-request seed
    stop: tuple[str, ...] = ()  # the text ends before the earliest of these
    banned_ids: tuple[int, ...] = ()  # never generated (PPO: the image placeholder)

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens}: expected >= 1")
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature}: expected >= 0 (0 = greedy)")
        if self.n < 1:
            raise ValueError(f"n={self.n}: expected >= 1")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass(frozen=True)
class Completion:
    """One answer: its token ids (cut after the first eos, kept), its text (special tokens
    skipped, cut before the earliest stop string) and why it ended."""

    token_ids: list[int]
    text: str
    finish_reason: Literal["stop", "length"]  # "stop": eos or a stop string


# --------------------------------------------------------------------------------- prompts


def to_chat(image: Image.Image, messages: Sequence[Mapping[str, Any]]) -> Chat:
    """Schema messages -> the processor's chat format, the image first in the first user turn.

    Roles must alternate user, assistant, user, ... starting with user.
    """
    if not messages:
        raise ValueError("messages is empty; expected user/assistant turns")
    chat = []
    for i, m in enumerate(messages):
        role, content = str(m["role"]), str(m["content"])
        expected = ROLES[i % 2]
        if role != expected:
            raise ValueError(
                f"messages[{i}].role={role!r}: expected {expected!r} (turns alternate)"
            )
        parts: list[dict] = [{"type": "text", "text": content}]
        if i == 0:
            parts.insert(0, {"type": "image", "image": image})
        chat.append({"role": role, "content": parts})
    return chat


def user_turn(image: Image.Image | None, prompt: str) -> Chat:
    """One user turn asking `prompt` about `image` (None: a text-only chat, content a string)."""
    if image is None:
        return [{"role": "user", "content": prompt}]
    return to_chat(image, [{"role": "user", "content": prompt}])


def tokenizer_of(processor: Any) -> Any:
    """The tokenizer inside a processor; a tokenizer (text-only models) is its own."""
    return getattr(processor, "tokenizer", processor)


def render_chats(processor: Any, chats: Sequence[Chat]) -> list[str]:
    """Each chat rendered by the model's own chat template, ending in the assistant header."""
    return [processor.apply_chat_template(c, add_generation_prompt=True, tokenize=False)
            for c in chats]


def adds_special_tokens(processor: Any, texts: Sequence[str]) -> bool:
    """Whether encoding rendered chats should add the tokenizer's special tokens (e.g. BOS).

    transformers' rule, kept for both backends so that they see the same token ids: a tokenizer's
    chat template holds every special token it needs (never add); a processor adds them unless the
    rendered prompt already starts with BOS.
    """
    tokenizer = tokenizer_of(processor)
    if tokenizer is processor:
        return False
    bos = tokenizer.bos_token
    return not (bos is not None and bool(texts) and texts[0].startswith(bos))


def pad_token_id(tokenizer: Any) -> int:
    """The id padding fills in: the pad token, or eos for tokenizers that have none."""
    pad = tokenizer.pad_token_id
    pad = tokenizer.eos_token_id if pad is None else pad
    if pad is None:
        raise ValueError("the tokenizer has neither pad_token nor eos_token to pad with")
    return int(pad)


def encode_texts(
    processor: Any, texts: Sequence[str], images: Sequence[Sequence[Image.Image]] | None = None,
    padding_side: Literal["left", "right"] = "left",
) -> dict[str, Tensor]:
    """Rendered prompts (and each prompt's images) -> one padded batch of tensors.

    Left padding (the default) for generation: every prompt ends at the last column, so the
    first new token follows it directly. Right padding for a forward pass that reads the last
    prompt position (eval/scoring.py).
    """
    kwargs: dict[str, Any] = {"padding": True, "padding_side": padding_side,
                              "return_tensors": "pt"}
    if not adds_special_tokens(processor, texts):
        kwargs["add_special_tokens"] = False
    if images is not None and any(images):
        return dict(processor(text=list(texts), images=[list(i) for i in images], **kwargs))
    return dict(processor(text=list(texts), **kwargs))


def encode_chats(
    processor: Any, chats: Sequence[Chat], images: Sequence[Sequence[Image.Image]] | None = None,
    padding_side: Literal["left", "right"] = "left",
) -> dict[str, Tensor]:
    """Chats (and each chat's images, in the order of their placeholders) -> a padded batch."""
    return encode_texts(processor, render_chats(processor, chats), images, padding_side)


def encode_prompt(
    processor: Any, images: Sequence[Image.Image], prompts: Sequence[str],
    padding_side: Literal["left", "right"] = "left",
) -> dict[str, Tensor]:
    """(image, prompt) pairs -> padded generation inputs ending in the assistant header."""
    chats = [user_turn(image, p) for image, p in zip(images, prompts, strict=True)]
    return encode_chats(processor, chats, [[image] for image in images], padding_side)


# --------------------------------------------------------------------------------- stopping


def eos_token_ids(tokenizer: Any, generation_config: GenerationConfig | None = None) -> list[int]:
    """Every token that ends an answer: the tokenizer's eos and those the checkpoint lists."""
    listed = getattr(generation_config, "eos_token_id", None)
    listed = listed if isinstance(listed, list) else [listed]
    eos = sorted({tokenizer.eos_token_id, *listed} - {None})
    if not eos:
        raise ValueError("neither the tokenizer nor the checkpoint names an eos token")
    return eos


def cut_after_eos(ids: Sequence[int], eos_ids: int | Collection[int]) -> list[int]:
    """Token ids up to and including the first eos (all of them if there is none)."""
    ends = {eos_ids} if isinstance(eos_ids, int) else set(eos_ids)
    for i, token in enumerate(ids):
        if token in ends:
            return list(ids[: i + 1])
    return list(ids)


def apply_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """Cut `text` before the earliest stop string; True when one was found."""
    cuts = [i for i in (text.find(s) for s in stops) if i >= 0]
    return (text[: min(cuts)], True) if cuts else (text, False)


class TextStream:
    """One answer's text while it is generated: `push` each new token id, get the text that can
    be sent now. The pieces concatenate to the Completion's text (the same decode, eos cut and
    stop strings) because text is held back while it may still change:

    - the last word: a character whose bytes span several tokens decodes to U+FFFD until its
      last byte arrives, and a tokenizer's clean-up may join a word to what follows (" ." -> ".");
    - a tail that may begin a stop string (the stop string itself is never sent).

    An answer is final at its first eos or stop string: the rest is sent then, and later tokens
    (a batch generates until its longest answer ends) are ignored.
    """

    def __init__(self, tokenizer: Any, eos_ids: Collection[int], stops: Sequence[str]) -> None:
        self.tokenizer, self.eos_ids, self.stops = tokenizer, set(eos_ids), tuple(stops)
        self.ids: list[int] = []
        self.sent = ""  # what was handed out so far
        self.done = False
        # Incremental decoding, as vLLM's detokenizer does: decoding the whole answer at every
        # token costs O(T) per token, O(T²) per answer (0.56 s of a 2,048-token answer, on the
        # generating thread). The text of ids[:read] is known; each token decodes only
        # ids[prefix:], and what it adds is that window's text past the window's old text.
        self.text, self.prefix, self.read = "", 0, 0

    def push(self, token_id: int) -> str:
        """The text that became safe to send with this token ("" if none)."""
        if self.done:
            return ""
        self.ids.append(token_id)
        text, ended = self._decoded(), token_id in self.eos_ids
        # A trailing U+FFFD may be a character whose last bytes are still to come: no stop string
        # is matched against it before they do (a stop "\ufffd" would end the answer early).
        text, stopped = apply_stop(text if ended else text.rstrip("\ufffd"), self.stops)
        self.done = stopped or ended
        return self._advance(text if self.done else text[:self._stable(text)])

    def _decoded(self) -> str:
        """The answer's text so far: the whole decode's, from a few tokens' decode."""
        decode = functools.partial(self.tokenizer.decode, skip_special_tokens=True)
        old = decode(self.ids[self.prefix:self.read])
        window = decode(self.ids[self.prefix:])
        if window.startswith(old):
            piece = window[len(old):]
            text = self.text + piece
        else:  # the decoder changed the window's old text (a byte-fallback run): decode it all
            piece, text, self.text, self.prefix, self.read = None, decode(self.ids), "", 0, 0
        if not text.endswith("\ufffd"):  # not within a character split over byte tokens
            if piece != "":  # tokens with no text (a special token) are no context: a decoder
                self.prefix = self.read  # that strips a first space would strip the next one's
            self.text, self.read = text, len(self.ids)
        return text

    def finish(self, text: str) -> str:
        """The rest of the answer whose final text is `text`."""
        self.done = True
        if not text.startswith(self.sent):
            log.warning("a streamed answer's sent text %r is not a prefix of its final text %r "
                        "(the tokenizer changed held-back text); the rest is not sent",
                        self.sent, text)
        return self._advance(text)

    def _stable(self, text: str) -> int:
        """How much of `text` later tokens cannot change: up to its last whitespace, and before
        any tail that begins a stop string."""
        end = len(text)
        for stop in self.stops:
            for k in range(min(len(stop) - 1, end), 0, -1):
                if text.endswith(stop[:k]):
                    end = min(end, len(text) - k)
                    break
        while end > 0 and not text[end - 1].isspace():  # from the end: O(word), not O(text)
            end -= 1
        return max(end - 1, 0)

    def _advance(self, text: str) -> str:
        if len(text) <= len(self.sent) or not text.startswith(self.sent):
            # Held back text changed anyway (a tokenizer this rule does not cover): what was sent
            # cannot be taken back, so the rest is not sent rather than sent wrong.
            return ""
        piece, self.sent = text[len(self.sent):], text
        return piece


class _RowStops:
    """A transformers stopping criterion that also streams: at each step it hands every row's
    new token to that row's TextStream, sends the pieces, and reports as finished the rows whose
    answer ended (eos or a stop string: without this a row went on generating after its stop
    string until max_new_tokens, and its batch with it) or whose listener left (`send` returned
    False: a streaming client that disconnected). transformers pads a finished row from then on.
    """

    def __init__(self, streams: Mapping[int, TextStream],
                 send: Callable[[int, str], bool | None]) -> None:
        self.streams, self.send = streams, send
        self.left: set[int] = set()  # rows whose listener has gone

    def __call__(self, input_ids: Tensor, scores: Any, **kwargs: Any) -> Tensor:
        import torch

        tokens = input_ids[:, -1].tolist()
        for row, stream in self.streams.items():
            if stream.done:
                continue
            # Sent even when empty: the callback's answer says whether its listener is there.
            if self.send(row, stream.push(tokens[row])) is False:
                stream.done = True
                self.left.add(row)
        return torch.tensor([row in self.streams and self.streams[row].done
                             for row in range(input_ids.shape[0])], device=input_ids.device)

    def cut(self, rows: list[list[int]]) -> list[list[int]]:
        """Each finished row's ids up to the token that finished it (the padding after it is not
        part of the answer)."""
        return [row[:len(self.streams[i].ids)] if i in self.streams else row
                for i, row in enumerate(rows)]


# A streamed chat's callback: (choice index, text piece) -> False once its listener has gone.
Listener = Callable[[int, str], "bool | None"]


def _repeat_greedy(rows: list[list[Completion]], s: Sampling) -> list[list[Completion]]:
    # Greedy answers to one prompt are all equal: one was computed, the caller asked for n.
    return [row * (s.n // len(row)) for row in rows]


# --------------------------------------------------------------------------------- transformers


def hf_generation_config(s: Sampling, eos_ids: list[int], pad_id: int) -> GenerationConfig:
    """`s` as a transformers GenerationConfig with every knob explicit: generate() fills unset
    fields from the checkpoint's generation_config, whose top_k=50 or repetition_penalty would
    change what "greedy" or "temperature 1" means."""
    from transformers import GenerationConfig

    sample = not s.greedy
    return GenerationConfig(
        max_new_tokens=s.max_new_tokens,
        do_sample=sample,
        temperature=s.temperature if sample else None,
        top_p=s.top_p if sample else None,
        top_k=0 if sample else None,  # 0: no top-k cut; greedy ignores it
        repetition_penalty=1.0,
        num_return_sequences=s.n if sample else 1,
        eos_token_id=eos_ids,
        pad_token_id=pad_id,
        suppress_tokens=list(s.banned_ids) or None,
    )


class HFGenerator:
    """transformers `generate` on a loaded model and its processor (or tokenizer)."""

    def __init__(self, model: PreTrainedModel, processor: Any, features: Any = None) -> None:
        self.model, self.processor = model, processor
        # An image_features.ImageFeatureCache: each image's features computed once across calls
        # and handed to generate as `mm_encoder_outputs`.
        self.features = features
        self.tokenizer = tokenizer_of(processor)
        self.eos_ids = eos_token_ids(self.tokenizer, model.generation_config)
        self.pad_id = pad_token_id(self.tokenizer)
        if self.tokenizer.pad_token_id is None:  # a padded batch needs one; eos stands in
            self.tokenizer.pad_token_id = self.pad_id

    def token_ids(self, inputs: dict[str, Tensor], s: Sampling,
                  stops: _RowStops | None = None) -> list[list[int]]:
        """New token ids for encoded, left-padded prompts (`encode_chats`): (B * k) rows, prompt
        i's k answers consecutive (k = n when sampling, else 1), each cut after its first eos.
        `stops`: the rows that end early, and their streamed text."""
        import torch

        from nsft_ray.models import to_model_inputs

        config = hf_generation_config(s, self.eos_ids, self.pad_id)
        if s.seed is not None:
            torch.manual_seed(s.seed)
        enc = to_model_inputs(inputs, self.model)
        prompt_length = enc["input_ids"].shape[1]
        if self.features is not None:
            enc = self.features.attach(self.model, enc)
        with torch.no_grad():
            out = self.model.generate(**enc, generation_config=config,
                                      stopping_criteria=[stops] if stops else None)
        rows = out[:, prompt_length:].tolist()  # (B * k, T_new)
        return [cut_after_eos(r, self.eos_ids) for r in (stops.cut(rows) if stops else rows)]

    def complete(self, chats: Sequence[Chat], images: Sequence[Sequence[Image.Image]] | None,
                 s: Sampling, listeners: Mapping[int, Listener] | None = None,
                 ) -> list[list[Completion]]:
        """`s.n` completions per chat, generated as one left-padded batch; a row ends at its
        first eos or stop string.

        `listeners`: {chat index: callback(choice index, text piece)}; each listened chat's
        answers are handed out while they are generated (`TextStream`), every piece before this
        returns. A callback is called at every step, with "" when no text became final; one that
        returns False has gone, and its chat's rows stop generating.
        """
        if not chats:
            return []
        k = 1 if s.greedy else s.n
        listeners = listeners or {}
        # Rows with a stop string to find, or a listener, are followed token by token.
        followed = range(len(chats)) if s.stop else listeners
        streams = {i * k + j: TextStream(self.tokenizer, self.eos_ids, s.stop)
                   for i in followed for j in range(k)}

        def send(row: int, piece: str) -> bool:
            chat, choice = divmod(row, k)
            if chat not in listeners:
                return True
            # Greedy: one row stands for all n equal choices.
            kept = [listeners[chat](c, piece) for c in (range(s.n) if s.greedy else (choice,))]
            return not all(keep is False for keep in kept)

        stops = _RowStops(streams, send) if streams else None
        rows = self.token_ids(encode_chats(self.processor, chats, images), s, stops)
        completions = [self._completion(ids, s.stop) for ids in rows]
        for row, stream in streams.items():
            piece = stream.finish(completions[row].text)
            if piece and row not in stops.left:
                send(row, piece)
        return _repeat_greedy([completions[i * k:(i + 1) * k] for i in range(len(chats))], s)

    def _completion(self, ids: list[int], stops: Sequence[str]) -> Completion:
        ended = bool(ids) and ids[-1] in self.eos_ids
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        # The row ended at the token that completed a stop string; the text ends before it.
        text, stopped = apply_stop(text, stops)
        return Completion(ids, text, "stop" if ended or stopped else "length")


def generate(
    model: PreTrainedModel,
    processor: Any,
    images: list[Image.Image],
    prompts: list[str],
    *,
    max_new_tokens: int = 48,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    num_return_sequences: int = 1,
    seed: int | None = None,
    features: Any = None,
) -> list[list[str]]:
    """Answer each (image, prompt) as one user turn: `num_return_sequences` answers per prompt
    (`features`: an image_features.ImageFeatureCache, as in HFGenerator).

    Prompts are left-padded into one batch; answers are decoded without special tokens, stripped.
    """
    if len(images) != len(prompts):
        raise ValueError(f"got {len(images)} images but {len(prompts)} prompts; expected one each")
    if num_return_sequences > 1 and not do_sample:
        raise ValueError("num_return_sequences > 1 needs do_sample=True (greedy answers are equal)")
    if do_sample and temperature <= 0:
        raise ValueError(f"temperature={temperature}: expected > 0 when sampling")
    s = Sampling(max_new_tokens=max_new_tokens, temperature=temperature if do_sample else 0.0,
                 top_p=top_p, n=num_return_sequences, seed=seed)
    out = HFGenerator(model, processor, features).complete(
        [user_turn(i, p) for i, p in zip(images, prompts, strict=True)], [[i] for i in images], s)
    return [[c.text.strip() for c in row] for row in out]


def make_sampler(
    path: str | Path,
    *,
    temperature: float,
    max_new_tokens: int,
    batch_size: int,
    top_p: float = 1.0,
    seed: int | None = None,
) -> Callable[[list[Image.Image], list[str], int], list[list[str]]]:
    """Load the model at `path` once; return sampler(images, prompts, k) -> k answers per prompt.

    Used for on-policy negatives. With a seed, batch i samples with seed + i (reproducible).
    """
    from nsft_ray.models import load_vlm

    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: expected >= 1")
    model, processor = load_vlm(path)
    batch_no = itertools.count()  # across calls, so no two batches share a seed

    def sampler(images: list[Image.Image], prompts: list[str], k: int) -> list[list[str]]:
        answers: list[list[str]] = []
        for start in range(0, len(prompts), batch_size):
            batch_seed = None if seed is None else seed + next(batch_no)
            answers += generate(
                model, processor, images[start:start + batch_size],
                prompts[start:start + batch_size], max_new_tokens=max_new_tokens, do_sample=True,
                temperature=temperature, top_p=top_p, num_return_sequences=k, seed=batch_seed,
            )
        return answers

    return sampler


# --------------------------------------------------------------------------------- vLLM


def vllm_engine_args(
    model: str, *, on_gpu: bool, dtype: str = "auto", seed: int = 0,
    max_model_len: int | None = None, max_images: int | None = None,
) -> dict[str, Any]:
    """`vllm.LLM` keyword arguments, the one place that knows vLLM's CPU and GPU settings.

    CPU (vllm-cpu): float32 and eager mode, the settings shared/ENVIRONMENT.md proves (its CPU
    attention has no half-precision path here and no graphs to capture); `dtype` applies on GPU.
    `max_images` caps images per prompt (None: vLLM's default; leave it so for text-only models).
    """
    args: dict[str, Any] = {"model": str(model), "dtype": dtype if on_gpu else "float32",
                            "enforce_eager": not on_gpu, "seed": seed}
    if max_model_len is not None:
        args["max_model_len"] = max_model_len
    if max_images is not None:
        args["limit_mm_per_prompt"] = {"image": max_images}
    return args


class VLLMGenerator:
    """`vllm.LLM` on a model folder, with the folder's own processor (or tokenizer) rendering
    the chats; `llm` stays reachable for weight reloads and prompt log-probabilities."""

    def __init__(self, model_path: str | Path, *, dtype: str = "auto", seed: int = 0,
                 max_model_len: int | None = None, max_images: int | None = None,
                 engine_extra: Mapping[str, Any] | None = None) -> None:
        import torch
        from transformers import AutoProcessor

        self.on_gpu = torch.cuda.is_available()
        if not self.on_gpu:
            for key, value in VLLM_CPU_ENV.items():
                os.environ.setdefault(key, value)
        import vllm  # only here: the rest of the layer runs without vllm installed

        self.vllm = vllm
        self.llm = self._start(vllm_engine_args(
            str(model_path), on_gpu=self.on_gpu, dtype=dtype, seed=seed,
            max_model_len=max_model_len, max_images=max_images) | dict(engine_extra or {}))
        self.processor = AutoProcessor.from_pretrained(str(model_path))
        self.tokenizer = tokenizer_of(self.processor)
        self.eos_ids = eos_token_ids(self.tokenizer)

    def _start(self, args: dict[str, Any]) -> Any:
        return self.vllm.LLM(**args)

    def params(self, s: Sampling, **extra: Any) -> Any:
        """`s` as vllm.SamplingParams (banned tokens: -100, vLLM's strongest logit bias)."""
        return self.vllm.SamplingParams(
            n=1 if s.greedy else s.n, temperature=s.temperature,
            top_p=1.0 if s.greedy else s.top_p, max_tokens=s.max_new_tokens, seed=s.seed,
            stop=list(s.stop) or None, logit_bias={i: -100.0 for i in s.banned_ids} or None,
            **extra)

    def _encode_kwargs(self, texts: list[str]) -> dict[str, Any]:
        """Encode prompts as transformers would (`adds_special_tokens`)."""
        return ({} if adds_special_tokens(self.processor, texts)
                else {"tokenization_kwargs": {"add_special_tokens": False}})

    def requests(self, chats: Sequence[Chat],
                 images: Sequence[Sequence[Image.Image]] | None) -> list[dict[str, Any]]:
        """vLLM prompts: the rendered chat, its images as multimodal data."""
        out = []
        for i, text in enumerate(render_chats(self.processor, chats)):
            item: dict[str, Any] = {"prompt": text}
            ims = list(images[i]) if images is not None else []
            if ims:
                item["multi_modal_data"] = {"image": ims[0] if len(ims) == 1 else ims}
            out.append(item)
        return out

    def run(self, requests: list[dict[str, Any]], params: Any) -> list[Any]:
        """llm.generate on vLLM prompts (`requests`)."""
        return self.llm.generate(requests, params, use_tqdm=False,
                                 **self._encode_kwargs([r["prompt"] for r in requests]))

    def complete(self, chats: Sequence[Chat], images: Sequence[Sequence[Image.Image]] | None,
                 sampling: Sampling | Sequence[Sampling]) -> list[list[Completion]]:
        """`n` completions per chat; `sampling` for all chats or one per chat."""
        if not chats:
            return []
        per_chat = ([sampling] * len(chats) if isinstance(sampling, Sampling)
                    else list(sampling))
        outputs = self.run(self.requests(chats, images), [self.params(s) for s in per_chat])
        rows = [[self._completion(list(c.token_ids), c.text, c.finish_reason)
                 for c in sorted(o.outputs, key=lambda c: c.index)] for o in outputs]
        return [_repeat_greedy([row], s)[0] for row, s in zip(rows, per_chat, strict=True)]

    def _completion(self, ids: list[int], text: str, finish_reason: str | None) -> Completion:
        # vLLM cuts the text at stop strings itself; "abort" cannot reach here.
        return Completion(cut_after_eos(ids, self.eos_ids), text,
                          "length" if finish_reason == "length" else "stop")


class AsyncVLLMGenerator(VLLMGenerator):
    """vLLM's AsyncLLM on a model folder: each request joins the engine's running batch when it
    arrives and leaves when it ends (continuous batching), and its text comes out as it is
    generated. Serving's vllm backend. The engine's background task lives on the event loop of
    the first `stream` call: call it from one loop."""

    def _start(self, args: dict[str, Any]) -> Any:
        from vllm import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        return AsyncLLM.from_engine_args(AsyncEngineArgs(**args))

    async def stream(self, chat: Chat, images: Sequence[Image.Image], s: Sampling,
                     request_id: str) -> Any:
        """(choice index, text piece)s as they are generated, then the `s.n` Completions."""
        from vllm.sampling_params import RequestOutputKind

        [prompt] = self.requests([chat], [images])
        params = self.params(s, output_kind=RequestOutputKind.DELTA)  # new text only, per step
        texts: dict[int, str] = {}
        ids: dict[int, list[int]] = {}
        reasons: dict[int, str | None] = {}
        outputs = self.llm.generate(prompt, params, request_id,
                                    **self._encode_kwargs([prompt["prompt"]]))
        async with aclosing(outputs):  # closed early (the caller stopped): vLLM aborts it
            async for out in outputs:
                for c in out.outputs:
                    texts[c.index] = texts.get(c.index, "") + c.text
                    ids.setdefault(c.index, []).extend(c.token_ids)
                    reasons[c.index] = c.finish_reason
                    # Greedy: one vLLM answer stands for all n equal choices.
                    for choice in range(s.n) if s.greedy else (c.index,):
                        if c.text:
                            yield choice, c.text
        row = [self._completion(ids[i], texts[i], reasons[i]) for i in sorted(texts)]
        yield _repeat_greedy([row], s)[0]

    def close(self) -> None:
        self.llm.shutdown()
        # AsyncLLM.__del__ shuts down again; at interpreter exit that fails noisily.
        self.llm = None
