"""The LLM constructor: reply parsing, a fake OpenAI-compatible server, batching and retries,
and real local models (transformers; vLLM inside Ray Data) on a tiny Llama built offline."""

import json
import threading
import time
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from nsft_ray.config import LLMConfig, NegativesConfig
from nsft_ray.negatives.codebook import KINDS, load_codebook
from nsft_ray.negatives.constructors import ConstructionError
from nsft_ray.negatives.llm import LLMConstructor, build_prompt, parse_reply
from nsft_ray.negatives.pipeline import NegativesBatchFn, construct_rows
from nsft_ray.schema import preference_table

CODEBOOK = load_codebook()
GOOD = {"turns": [{"question": "Is there a dog in the picture?",
                   "answer": "No, there is no dog in the picture.", "error_kind": "existence"}]}


def row(tag, id=None):
    """A preference row whose prompt carries `tag`, which tells the fake server how to reply."""
    return {
        "id": id or tag, "image": b"img", "prompt": f"[{tag}] Describe the picture.",
        "chosen": "A cat on a sofa.", "rejected": "A dog on a sofa.", "source": "t", "meta": "{}",
    }


# ----------------------------------------------------------------------------- parsing


@pytest.mark.parametrize(
    "text",
    [
        json.dumps(GOOD),
        "```json\n" + json.dumps(GOOD, indent=2) + "\n```",
        "Sure! Here are the turns:\n" + json.dumps(GOOD) + "\nHope this helps.",
    ],
)
def test_parse_reply_good(text):
    (turn,) = parse_reply(text, KINDS, max_turns=2)
    assert (turn.question, turn.answer, turn.error_kind) == (
        "Is there a dog in the picture?", "No, there is no dog in the picture.", "existence",
    )


@pytest.mark.parametrize(
    "text, reason",
    [
        ("", "llm_empty"),
        ("   \n", "llm_empty"),
        ('{"turns": []}', "llm_empty"),
        ("no json here", "llm_invalid_json"),
        ('{"turns": [{"question": "a",}', "llm_invalid_json"),
        ('["a"]', "llm_invalid_json"),
        ('{"answers": []}', "llm_bad_format"),
        (json.dumps({"turns": GOOD["turns"] * 3}), "llm_too_many_turns"),
        ('{"turns": ["q"]}', "llm_bad_turn"),
        ('{"turns": [{"question": "q", "answer": " ", "error_kind": "count"}]}', "llm_bad_turn"),
        ('{"turns": [{"question": "q", "answer": "a", "error_kind": "hue"}]}', "llm_unknown_kind"),
        ('{"turns": [{"question": "q", "answer": "a", "error_kind": "count", "role": "hint"}]}',
         "llm_bad_turn"),
    ],
)
def test_parse_reply_bad(text, reason):
    with pytest.raises(ConstructionError) as err:
        parse_reply(text, KINDS, max_turns=2)
    assert err.value.reason == reason


def test_parse_reply_reads_roles():
    reply = {"turns": [
        {"question": "Is there a cat?", "answer": "Yes, there is a cat.", "error_kind": "existence",
         "role": "confirm"},
        {"question": "Is there a dog?", "answer": "No, there is no dog.", "error_kind": "existence",
         "role": "refute"},
        {"question": "What is there?", "answer": "A cat.", "error_kind": "existence"},
    ]}
    assert [t.role for t in parse_reply(json.dumps(reply), KINDS, max_turns=3)] == [
        "confirm", "refute", None,
    ]


def test_prompt_holds_row_and_codebook():
    """Fails if G is no longer asked to confirm as well as refute, or refute_only still asks it
    to confirm."""
    prompt = build_prompt(row("x"), CODEBOOK, max_turns=3)
    for part in ("[x] Describe the picture.", "A cat on a sofa.", "A dog on a sofa.",
                 "- spatial:", "1 to 3 turns", "existence, attribute, count, scene, spatial",
                 'role "confirm"', 'role "refute"', '"role": "confirm or refute"',
                 'refute: "Is there a dog in the picture?" -> "No, there is no dog."',
                 'never answer "No" to a question about whether it is there'):
        assert part in prompt, part
    refute_only = build_prompt(row("x"), CODEBOOK, max_turns=3, corrective="refute_only")
    instruction = refute_only.split("Wrong answer: A dog on a sofa.", 1)[1]
    assert 'role "refute"' in instruction and 'role "confirm"' not in instruction


# ----------------------------------------------------------------------------- batching, retries


class ScriptedBackend:
    """Replies from a script per row tag; records every batched call."""

    def __init__(self, script):
        self.script = {tag: list(replies) for tag, replies in script.items()}
        self.calls = []

    def complete(self, prompts):
        self.calls.append(len(prompts))
        tags = [p.split("Question: [", 1)[1].split("]", 1)[0] for p in prompts]
        # each tag replies in script order; the last reply repeats
        return [self.script[t].pop(0) if len(self.script[t]) > 1 else self.script[t][0]
                for t in tags]


def test_batch_is_one_call_and_retries_only_failures():
    backend = ScriptedBackend({
        "good": [json.dumps(GOOD)],
        "flaky": ["garbage", json.dumps(GOOD)],
        "bad": ["garbage", "still garbage", '{"turns": []}'],
    })
    cfg = NegativesConfig(constructor="llm", llm=LLMConfig(max_retries=2))
    conversations, failures = construct_rows(
        [row("good"), row("flaky"), row("bad"), {**row("same"), "rejected": "A cat on a sofa."}],
        cfg, backend=backend,
    )
    assert backend.calls == [3, 2, 1]  # the identical-answer row never reaches the LLM
    assert sorted(c["id"] for c in conversations) == [
        "flaky/chosen", "flaky/neg0", "good/chosen", "good/neg0",
    ]
    neg = next(c for c in conversations if c["id"] == "good/neg0")
    assert neg["messages"] == [
        {"role": "user", "content": "Is there a dog in the picture?"},
        {"role": "assistant", "content": "No, there is no dog in the picture."},
    ]
    assert neg["error_kinds"] == ["existence"] and json.loads(neg["meta"])["constructor"] == "llm"
    reasons = {f["id"]: (f["reason"], f["detail"]) for f in failures}
    assert reasons["same"][0] == "identical_answers"
    assert reasons["bad"] == ("llm_empty", "the reply has no turns (after 3 attempts)")


def test_refute_only_drops_confirming_turns():
    """The ablation with G: turns marked confirm are dropped; a reply of confirmations alone is
    retried, then quarantined."""
    both = {"turns": [
        {"question": "Is there a cat?", "answer": "Yes, there is a cat.", "error_kind": "existence",
         "role": "confirm"},
        {"question": "Is there a dog?", "answer": "No, there is no dog.", "error_kind": "existence",
         "role": "refute"},
    ]}
    only_confirm = {"turns": both["turns"][:1]}
    backend = ScriptedBackend({"both": [json.dumps(both)], "confirm": [json.dumps(only_confirm)]})
    cfg = NegativesConfig(constructor="llm", corrective="refute_only", llm=LLMConfig(max_retries=1))
    conversations, failures = construct_rows([row("both"), row("confirm")], cfg, backend=backend)
    neg = next(c for c in conversations if c["id"] == "both/neg0")
    assert [m["content"] for m in neg["messages"]] == ["Is there a dog?", "No, there is no dog."]
    assert json.loads(neg["meta"])["turn_roles"] == ["refute"]
    assert [(f["id"], f["reason"]) for f in failures] == [("confirm", "llm_no_refuting_turn")]
    # with confirm_and_refute the same reply keeps both turns
    backend = ScriptedBackend({"both": [json.dumps(both)]})
    conversations, _ = construct_rows([row("both")], replace(cfg, corrective="confirm_and_refute"),
                                      backend=backend)
    neg = next(c for c in conversations if c["id"] == "both/neg0")
    assert json.loads(neg["meta"])["turn_roles"] == ["confirm", "refute"]


def test_single_row_call_raises():
    constructor = LLMConstructor(
        NegativesConfig(constructor="llm", llm=LLMConfig(max_retries=0)), CODEBOOK,
        ScriptedBackend({"x": ["nope"]}),
    )
    with pytest.raises(ConstructionError) as err:
        constructor(row("x"))
    assert err.value.reason == "llm_invalid_json"


# ----------------------------------------------------------------------------- fake HTTP server


REPLIES = {
    "good": json.dumps(GOOD),
    "fenced": "```json\n" + json.dumps(GOOD) + "\n```",
    "malformed": '{"turns": [{"question": ',
    "empty": "",
    "toomany": json.dumps({"turns": GOOD["turns"] * 9}),
}


class FakeOpenAI(BaseHTTPRequestHandler):
    requests: list = []

    def log_message(self, *args):  # keep pytest output clean
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        FakeOpenAI.requests.append((self.path, self.headers.get("Authorization"), body))
        prompt = body["messages"][0]["content"]
        tag = prompt.split("Question: [", 1)[1].split("]", 1)[0]
        if tag == "sleep":
            time.sleep(1.5)
        if tag == "error500":
            self.send_error(500, "boom")
            return
        payload = {"choices": [{"message": {"role": "assistant", "content": REPLIES.get(tag, "")}}]}
        data = json.dumps(payload).encode()
        try:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout test)
            pass


@pytest.fixture
def server():
    FakeOpenAI.requests = []
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), FakeOpenAI)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    httpd.shutdown()
    httpd.server_close()


def test_openai_backend_against_fake_server(server, monkeypatch):
    monkeypatch.setenv("FAKE_KEY", "sk-test")
    llm = LLMConfig(backend="openai", model="fake-model", base_url=server, api_key_env="FAKE_KEY",
                    timeout_s=0.5, max_retries=1, max_turns=8)
    cfg = NegativesConfig(constructor="llm", llm=llm)
    tags = ["good", "fenced", "malformed", "empty", "sleep", "toomany", "error500"]
    start = time.monotonic()
    out = NegativesBatchFn(cfg)(preference_table([row(t) for t in tags]))
    elapsed = time.monotonic() - start
    result = {}
    for r in out.to_pylist():
        result.setdefault(r["parent_id"], []).append((r["origin"], r["quarantine_reason"]))
    assert result == {
        "good": [("chosen", ""), ("negative", "")],
        "fenced": [("chosen", ""), ("negative", "")],
        "malformed": [("negative", "llm_invalid_json")],
        "empty": [("negative", "llm_empty")],
        "sleep": [("negative", "llm_timeout")],
        "toomany": [("negative", "llm_too_many_turns")],
        "error500": [("negative", "llm_http_error")],
    }
    # requests of a batch run in parallel: two timeouts of 0.5 s, not one per row
    assert elapsed < 3.0
    # 7 first attempts + 5 retries of the failed ones
    assert len(FakeOpenAI.requests) == 12
    path, auth, body = FakeOpenAI.requests[0]
    assert path == "/v1/chat/completions" and auth == "Bearer sk-test"
    assert body["model"] == "fake-model" and body["messages"][0]["role"] == "user"


def test_openai_backend_unreachable():
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    llm = LLMConfig(base_url=f"http://127.0.0.1:{port}/v1", max_retries=0, timeout_s=2)
    _, failures = construct_rows([row("good")], NegativesConfig(constructor="llm", llm=llm))
    assert failures[0]["reason"] == "llm_unreachable"


# ----------------------------------------------------------------------------- real local models


SHAPES_TEXT = [
    f"There is a {size} {color} {shape} at the {pos}."
    for size in ("small", "large")
    for color in ("red", "green", "blue", "yellow")
    for shape in ("circle", "square", "triangle", "star")
    for pos in ("top left", "bottom", "center")
]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.fixture(scope="module")
def tiny_llm(tmp_path_factory):
    """A random 2-layer Llama (head_dim 32) with a BPE tokenizer and a chat template, offline."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    path = tmp_path_factory.mktemp("tiny-llm")
    specials = ["<pad>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|end|>"]
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    lines = SHAPES_TEXT + CODEBOOK.describe().splitlines() + [json.dumps(GOOD)] * 5
    tok.train_from_iterator(
        lines, trainers.BpeTrainer(vocab_size=600, special_tokens=specials,
                                   initial_alphabet=pre_tokenizers.ByteLevel.alphabet()),
    )
    tok.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="<|end|>",
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(path)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=2048,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=True,
    )
    LlamaForCausalLM(config).save_pretrained(path)
    return str(path)


def _check_every_row_accounted(rows, out_rows):
    """Each input id ends as a valid negative conversation or as a quarantined row."""
    by_parent = {}
    for r in out_rows:
        by_parent.setdefault(r["parent_id"], []).append(r)
    assert set(by_parent) == {r["id"] for r in rows}
    for produced in by_parent.values():
        if produced[0]["quarantine_reason"]:
            assert len(produced) == 1 and produced[0]["messages"] == []
            assert produced[0]["quarantine_reason"].startswith("llm_"), produced[0]
        else:
            neg = next(r for r in produced if r["origin"] == "negative")
            roles = [m["role"] for m in neg["messages"]]
            assert roles and roles == ["user", "assistant"] * (len(roles) // 2)


def test_transformers_backend(tiny_llm):
    from nsft_ray.negatives.backends import TransformersBackend

    llm = LLMConfig(backend="transformers", model=tiny_llm, max_tokens=8, max_retries=0,
                    generation_batch_size=2)
    backend = TransformersBackend(llm)
    replies = backend.complete(["Describe the picture.", "Is there a red circle?", "Hi"])
    assert len(replies) == 3 and all(isinstance(r, str) for r in replies)
    # greedy: the same prompt gives the same reply, alone or in a padded batch
    assert backend.complete(["Hi"]) == [replies[2]]
    rows = [row(f"r{i}") for i in range(3)]
    out = NegativesBatchFn(NegativesConfig(constructor="llm", llm=llm), backend=backend)(
        preference_table(rows)
    )
    _check_every_row_accounted(rows, out.to_pylist())


@pytest.fixture(scope="module")
def memorizing_llm(tiny_llm, tmp_path_factory):
    """The tiny Llama trained until its greedy reply to the constructor's prompt for rows r0-r2 is
    GOOD as JSON: a real model whose output is scripted by its weights, so a backend's success path
    (prompt -> chat template -> generate -> decode -> parse) can be checked end to end."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llm)
    model = AutoModelForCausalLM.from_pretrained(tiny_llm)
    reply = json.dumps(GOOD) + tokenizer.eos_token
    batch = []
    for i in range(3):
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": build_prompt(row(f"r{i}"), CODEBOOK, 8)}],
            tokenize=False, add_generation_prompt=True)
        p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        r_ids = tokenizer(reply, add_special_tokens=False)["input_ids"]
        batch.append((torch.tensor(p_ids + r_ids), len(p_ids)))
    ids = torch.nn.utils.rnn.pad_sequence([x for x, _ in batch], batch_first=True,
                                          padding_value=tokenizer.pad_token_id)
    labels = torch.full_like(ids, -100)
    for i, (x, n_prompt) in enumerate(batch):
        labels[i, n_prompt: len(x)] = x[n_prompt:]
    mask = (torch.arange(ids.shape[1])[None] < torch.tensor([len(x) for x, _ in batch])[:, None])
    torch.manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(300):
        out = model(input_ids=ids, attention_mask=mask.long(), labels=labels)
        # Greedy decoding reproduces the reply exactly once every teacher-forced argmax is the
        # next reply token: stop there (about a third of the steps a loss threshold needs).
        predicted = out.logits[:, :-1].argmax(-1)
        target = labels[:, 1:]
        if bool((predicted[target != -100] == target[target != -100]).all()):
            break
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    else:
        raise AssertionError("the tiny LLM did not memorise the reply in 300 steps")
    path = tmp_path_factory.mktemp("memorizing-llm")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def _check_good_conversations(rows, out_rows):
    """Fails unless every row ends as its chosen conversation plus GOOD's negative turn."""
    got = {}
    for r in out_rows:
        assert not r["quarantine_reason"], r
        got.setdefault(r["parent_id"], {})[r["origin"]] = r["messages"]
    assert set(got) == {r["id"] for r in rows}
    for produced in got.values():
        assert [m["content"] for m in produced["negative"]] == [
            GOOD["turns"][0]["question"], GOOD["turns"][0]["answer"]]
        assert [m["role"] for m in produced["chosen"]] == ["user", "assistant"]


def test_transformers_backend_success_path(memorizing_llm):
    """Fails if the backend's prompt, generation or decoding breaks a reply the model gives."""
    llm = LLMConfig(backend="transformers", model=memorizing_llm, max_tokens=128, max_retries=0,
                    generation_batch_size=2)  # 2 + 1: a left-padded batch and a single row
    rows = [row(f"r{i}") for i in range(3)]
    out = NegativesBatchFn(NegativesConfig(constructor="llm", llm=llm))(preference_table(rows))
    _check_good_conversations(rows, out.to_pylist())


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.vllm
@pytest.mark.heavy
def test_vllm_backend_in_ray_data(memorizing_llm, ray_session):
    """Fails if vLLM's chat prompt, sampling or decoding breaks the reply the model gives, or if
    a row the constructor refuses is lost instead of quarantined."""
    pytest.importorskip("vllm")
    ray = ray_session
    llm = LLMConfig(backend="vllm", model=memorizing_llm, max_tokens=128, max_retries=1)
    cfg = NegativesConfig(constructor="llm", llm=llm, batch_size=2)
    rows = [row(f"r{i}") for i in range(3)] + [{**row("same"), "rejected": "A cat on a sofa."}]
    ds = ray.data.from_arrow(preference_table(rows)).map_batches(
        NegativesBatchFn, fn_constructor_kwargs={"cfg": cfg}, batch_format="pyarrow",
        batch_size=cfg.batch_size, compute=ray.data.ActorPoolStrategy(size=1), num_cpus=1,
    )
    out_rows = ds.take_all()
    same = [r for r in out_rows if r["parent_id"] == "same"]
    assert [r["quarantine_reason"] for r in same] == ["identical_answers"]
    _check_good_conversations(rows[:-1], [r for r in out_rows if r["parent_id"] != "same"])

