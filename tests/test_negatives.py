"""Negative construction without an LLM: codebook, template, text-diff, auto, the batch function."""

import json
from dataclasses import replace

import pyarrow as pa
import pytest
import yaml

from nsft_ray.config import NegativesConfig
from nsft_ray.negatives.codebook import KINDS, CodebookError, default_codebook_path, load_codebook
from nsft_ray.negatives.constructors import (
    AutoConstructor,
    ConstructionError,
    TemplateConstructor,
    TextDiffConstructor,
)
from nsft_ray.negatives.pipeline import (
    OUTPUT_SCHEMA,
    NegativesBatchFn,
    construct_rows,
    split_output,
)
from nsft_ray.schema import CONVERSATION_SCHEMA, QUARANTINE_SCHEMA, loads_meta, preference_table

CFG = NegativesConfig()
CODEBOOK = load_codebook()

CAPTION = (
    "A striped picture with two circles and one square. There is a small red circle at the top "
    "left. There is a large blue circle in the center. There is a small green square at the bottom."
)
CAPTION_WRONG = (
    "A dotted picture with three circles and one star. There is a small blue circle at the top "
    "left. There is a small blue circle at the bottom right. There is a small green star at the "
    "bottom."
)


def row(chosen, rejected, prompt="Describe the picture.", id="r1"):
    return {
        "id": id, "image": b"\x89PNG-fake", "prompt": prompt, "chosen": chosen,
        "rejected": rejected, "source": "test", "meta": "{}",
    }


def turns(conversation):
    """The (question, answer) pairs of a conversation, checking that roles alternate."""
    msgs = conversation["messages"]
    assert [m["role"] for m in msgs] == ["user", "assistant"] * (len(msgs) // 2)
    return [(msgs[i]["content"], msgs[i + 1]["content"]) for i in range(0, len(msgs), 2)]


def negative(conversations):
    (neg,) = [c for c in conversations if c["origin"] == "negative"]
    return neg


# ----------------------------------------------------------------------------- codebook


def test_bundled_codebook():
    assert tuple(CODEBOOK.kinds)[:5] == KINDS
    assert CODEBOOK.render("existence", "absent", {"thing": "dog"}) == (
        "Is there a dog in the picture?",
        "No, there is no dog in the picture.",
    )
    assert CODEBOOK.where("center") == "in the center"
    assert CODEBOOK.where("top left") == "at the top left"
    text = CODEBOOK.describe()
    assert all(f"- {k}:" in text for k in KINDS) and "Is there a dog in the picture?" in text


def _write_mutated(tmp_path, mutate):
    data = yaml.safe_load(default_codebook_path().read_text())
    mutate(data)
    path = tmp_path / "codebook.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: d["kinds"].pop("count"), r"kinds\.count is missing"),
        (lambda d: d["kinds"]["attribute"]["templates"].pop("size"),
         r"kinds\.attribute\.templates\.size is missing"),
        (lambda d: d["kinds"]["attribute"]["templates"]["color"].update(answer="It is {colour}."),
         r"kinds\.attribute\.templates\.color\.answer: unknown placeholder \{colour\}"),
        (lambda d: d["kinds"]["scene"].update(description=""), r"kinds\.scene\.description"),
        (lambda d: d["kinds"]["spatial"].update(examples=[]), r"kinds\.spatial\.examples"),
        (lambda d: d["kinds"]["existence"]["examples"][0].pop("answer"),
         r"kinds\.existence\.examples\[0\]\.answer"),
        (lambda d: d.pop("short_answer"), r"short_answer"),
        (lambda d: d["positions"].update(default="somewhere"), r"positions\.default"),
    ],
)
def test_malformed_codebook_names_the_key(tmp_path, mutate, message):
    with pytest.raises(CodebookError, match=message):
        load_codebook(_write_mutated(tmp_path, mutate))


def test_codebook_file_errors(tmp_path):
    with pytest.raises(CodebookError, match="does not exist"):
        load_codebook(str(tmp_path / "nope.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("kinds: [unclosed")
    with pytest.raises(CodebookError, match="not valid YAML"):
        load_codebook(str(bad))


def test_custom_codebook_drives_text_diff(tmp_path):
    def mutate(d):
        d["kinds"]["existence"]["templates"]["absent"]["answer"] = "Nope, no {thing} here."
        d["kinds"]["action"] = {"description": "wrong action", "examples": [
            {"rejected": "He runs.", "question": "What is he doing?", "answer": "He sits."}]}

    codebook = load_codebook(_write_mutated(tmp_path, mutate))
    assert "action" in codebook.kinds
    convs = TextDiffConstructor(CFG, codebook)(
        row("No, there is no red circle.", "Yes, there is a red circle.")
    )
    assert turns(negative(convs)) == [
        ("Is there a red circle in the picture?", "Nope, no red circle here.")
    ]


# ----------------------------------------------------------------------------- text-diff


def test_text_diff_caption():
    convs = TextDiffConstructor(CFG, CODEBOOK)(row(CAPTION, CAPTION_WRONG))
    chosen, neg = convs
    assert chosen["id"] == "r1/chosen" and chosen["origin"] == "chosen"
    assert turns(chosen) == [("Describe the picture.", CAPTION)]
    assert neg["id"] == "r1/neg0" and neg["parent_id"] == "r1" and neg["image"] == b"\x89PNG-fake"
    assert turns(neg) == [
        ("How many circles are there?", "There are two circles."),
        ("How many stars are there?", "There are no stars."),
        ("What color is the circle at the top left?", "The circle at the top left is red."),
        ("What size is the blue circle?", "The blue circle is large."),
        ("Where is the blue circle?", "The blue circle is in the center."),
        ("Is there a green star in the picture?", "No, there is no green star in the picture."),
        ("What is the background of the picture?", "The background is striped."),
    ]
    assert neg["error_kinds"] == ["count", "attribute", "spatial", "existence", "scene"]
    meta = loads_meta(neg["meta"])
    assert meta["constructor"] == "text-diff" and len(meta["turn_kinds"]) == 7


@pytest.mark.parametrize(
    "chosen, rejected, expected, kind",
    [
        ("No, there is no red circle.", "Yes, there is a red circle.",
         ("Is there a red circle in the picture?", "No, there is no red circle in the picture."),
         "existence"),
        ("Yes, there is a red circle.", "No, there is no red circle.",
         ("Is there a red circle in the picture?", "Yes, there is a red circle in the picture."),
         "existence"),
        ("The circle at the top left is red.", "The circle at the top left is blue.",
         ("What color is the circle at the top left?", "The circle at the top left is red."),
         "attribute"),
        ("The red circle is small.", "The red circle is large.",
         ("What size is the red circle?", "The red circle is small."), "attribute"),
        ("The red circle is at the top left.", "The red circle is in the center.",
         ("Where is the red circle?", "The red circle is at the top left."), "spatial"),
        ("There are two circles.", "There is one circle.",
         ("How many circles are there?", "There are two circles."), "count"),
        ("There is one star.", "There are four stars.",
         ("How many stars are there?", "There is one star."), "count"),
        ("The background is striped.", "The background is dotted.",
         ("What is the background of the picture?", "The background is striped."), "scene"),
        # free text: the only circle the chosen answer knows is red
        ("I think the circle is red.", "Looks like a blue circle to me!",
         ("What color is the circle?", "The circle is red."), "attribute"),
    ],
)
def test_text_diff_question_answers(chosen, rejected, expected, kind):
    neg = negative(TextDiffConstructor(CFG, CODEBOOK)(row(chosen, rejected)))
    assert turns(neg) == [expected]
    assert neg["error_kinds"] == [kind]


def test_text_diff_zero_count_also_denies_the_object():
    r = row("There are no circles.", "There are three circles.")
    neg = negative(TextDiffConstructor(CFG, CODEBOOK)(r))
    assert turns(neg) == [
        ("How many circles are there?", "There are no circles."),
        ("Is there a circle in the picture?", "No, there is no circle in the picture."),
    ]


@pytest.mark.parametrize(
    "chosen, rejected",
    [
        # the chosen answer says nothing about squares: a blue square cannot be ruled out
        ("The red circle is small.", "There is a blue square."),
        ("A nice picture of things.", "A bad picture of stuff."),
        ("There are two circles.", "There are two circles, I believe!"),
    ],
)
def test_text_diff_no_error_found(chosen, rejected):
    with pytest.raises(ConstructionError) as err:
        TextDiffConstructor(CFG, CODEBOOK)(row(chosen, rejected))
    assert err.value.reason == "no_error_found"


# ----------------------------------------------------------------------------- template, auto


def test_template():
    prompt = "What color is the circle at the top left? Answer with one word."
    convs = TemplateConstructor(CFG, CODEBOOK)(row("red", "blue", prompt=prompt))
    neg = negative(convs)
    assert turns(neg) == [
        (
            f'{prompt} Is "blue" the correct answer?',
            'No, "blue" is not correct. The correct answer is "red".',
        ),
        ('Is "red" the correct answer?', 'Yes, "red" is correct.'),
    ]
    assert neg["error_kinds"] == ["attribute"]
    assert loads_meta(neg["meta"])["constructor"] == "template"
    # a final full stop stays outside the quotes
    sentence = negative(TemplateConstructor(CFG, CODEBOOK)(row("Two circles.", "Three circles.")))
    assert turns(sentence)[1] == (
        'Is "Two circles" the correct answer?', 'Yes, "Two circles" is correct.'
    )


@pytest.mark.parametrize(
    "chosen, rejected, kinds",
    [("two", "three", ["count"]), ("yes", "no", ["existence"]), ("top left", "bottom", ["spatial"]),
     ("striped", "plain", ["scene"]), ("maybe", "perhaps", [])],
)
def test_template_error_kind(chosen, rejected, kinds):
    neg = negative(TemplateConstructor(CFG, CODEBOOK)(row(chosen, rejected, prompt="Q?")))
    assert neg["error_kinds"] == kinds


def test_auto_picks_by_answer_length():
    auto = AutoConstructor(replace(CFG, short_answer_words=2), CODEBOOK)
    short = negative(auto(row("top left", "bottom", prompt="Where is the red circle?")))
    assert loads_meta(short["meta"])["constructor"] == "template"
    long = negative(auto(row("The red circle is small.", "The red circle is large.")))
    assert loads_meta(long["meta"])["constructor"] == "text-diff"


@pytest.mark.parametrize(
    "bad, reason",
    [
        ({"rejected": "Red."}, "identical_answers"),
        ({"rejected": "  "}, "empty_rejected"),
        ({"chosen": None}, "bad_row"),
        ({"id": ""}, "empty_id"),
    ],
)
def test_bad_rows_raise(bad, reason):
    r = {**row("red.", "blue"), **bad}
    for constructor in (TemplateConstructor, TextDiffConstructor, AutoConstructor):
        with pytest.raises(ConstructionError) as err:
            constructor(CFG, CODEBOOK)(r)
        assert err.value.reason == reason


def test_include_chosen_false():
    convs = TemplateConstructor(replace(CFG, include_chosen=False), CODEBOOK)(row("red", "blue"))
    assert [c["id"] for c in convs] == ["r1/neg0"]


# ----------------------------------------------------------------------------- pipeline


ROWS = [
    row(CAPTION, CAPTION_WRONG, id="caption"),
    row("red", "blue", prompt="What color is the circle at the top left? Answer with one word.",
        id="short"),
    row("A nice picture.", "A picture of many things I cannot name.", id="no-error"),
    row("red", "Red", id="same"),
]


def test_construct_rows():
    conversations, failures = construct_rows(ROWS, CFG)
    assert [c["id"] for c in conversations] == [
        "caption/chosen", "caption/neg0", "short/chosen", "short/neg0",
    ]
    assert [(f["id"], f["stage"], f["reason"]) for f in failures] == [
        ("no-error", "negatives", "no_error_found"), ("same", "negatives", "identical_answers"),
    ]
    assert "image" not in failures[0]["row"] and failures[0]["row"]["chosen"] == "A nice picture."


def test_batch_fn_on_pyarrow_batch():
    out = NegativesBatchFn(CFG)(preference_table(ROWS))
    assert out.schema.equals(OUTPUT_SCHEMA)
    rows = out.to_pylist()
    # 2 conversations per good row, 1 quarantine row per bad row: nothing disappears
    assert [(r["id"], r["quarantine_reason"]) for r in rows] == [
        ("caption/chosen", ""), ("caption/neg0", ""), ("short/chosen", ""), ("short/neg0", ""),
        ("no-error", "no_error_found"), ("same", "identical_answers"),
    ]
    failed = rows[-1]
    assert failed["messages"] == [] and failed["origin"] == "negative"
    assert failed["parent_id"] == "same" and failed["image"] == b"\x89PNG-fake"

    conversations, quarantine = split_output(out)
    assert conversations.schema.equals(CONVERSATION_SCHEMA) and conversations.num_rows == 4
    assert quarantine.schema.equals(QUARANTINE_SCHEMA)
    q = quarantine.to_pylist()
    assert [(r["id"], r["stage"], r["reason"]) for r in q] == [
        ("no-error", "negatives", "no_error_found"), ("same", "negatives", "identical_answers"),
    ]
    assert json.loads(q[1]["row"])["rejected"] == "Red"


def test_batch_fn_empty_batch():
    out = NegativesBatchFn(CFG)(preference_table([]))
    assert out.num_rows == 0 and out.schema.equals(OUTPUT_SCHEMA)


def test_batch_fn_accepts_nulls():
    table = pa.Table.from_pylist(
        [{"id": "n", "image": None, "prompt": None, "chosen": "a", "rejected": "b",
          "source": None, "meta": None}]
    )
    (r,) = NegativesBatchFn(CFG)(table).to_pylist()
    assert (r["id"], r["quarantine_reason"]) == ("n", "bad_row")


def test_caption_count_summary_does_not_hide_a_wrong_colour():
    """The summary sentence ("with one triangle") restates the count; the described triangle is the
    object. Regression: the bare mention made the chosen list two triangles and nothing was found.
    Also: the filled template says "an orange", not "a orange"."""
    from nsft_ray.config import NegativesConfig
    from nsft_ray.negatives.pipeline import construct_rows

    row = {"id": "x", "image": b"1", "prompt": "Describe the picture.", "source": "", "meta": "{}",
           "chosen": "A striped picture with one triangle. There is a large blue triangle at the "
                     "bottom.",
           "rejected": "A striped picture with one triangle. There is a large orange triangle at "
                       "the bottom left."}
    conversations, failures = construct_rows([row], NegativesConfig())
    assert failures == []
    negative = [c for c in conversations if c["origin"] == "negative"][0]
    assert [m["content"] for m in negative["messages"]] == [
        "Is there an orange triangle in the picture?",
        "No, there is no orange triangle in the picture.",
    ]
