"""Negative construction without an LLM: codebook, template, text-diff, auto, the batch function,
the yes/no summary. Expected turns are written out by hand; ShapesWorld scene graphs are the
oracle for the template constructor's truthfulness."""

import json
from collections import Counter
from dataclasses import replace

import pyarrow as pa
import pytest
import yaml

from nsft_ray.config import NegativesConfig, WorldConfig
from nsft_ray.eval.pope import parse_yes_no
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
    corrective_answer_counts,
    split_output,
)
from nsft_ray.schema import (
    CONVERSATION_SCHEMA,
    QUARANTINE_SCHEMA,
    dumps_meta,
    loads_meta,
    preference_table,
)
from nsft_ray.world import Question, Scene, build_split
from nsft_ray.world.language import NUMBER_WORDS, truth

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
    assert CODEBOOK.render("existence.absent", {"thing": "dog"}) == (
        "Is there a dog in the picture?",
        "No, there is no dog.",
    )
    # articles follow the filled word; a sentence opening with a placeholder gets its capital
    assert CODEBOOK.render("existence.present", {"thing": "orange star"})[1] == (
        "Yes, there is an orange star."
    )
    fields = {"object": "star", "objects": "stars", "number": "one", "wrong": "two",
              "truth": "there is one star"}
    assert CODEBOOK.render("count.ask", fields) == (
        "How many stars are there?", "There is one star."
    )
    assert CODEBOOK.where("center") == "in the center"
    assert CODEBOOK.where("top left") == "at the top left"
    text = CODEBOOK.describe()
    assert all(f"- {k}:" in text for k in KINDS)
    assert 'confirm: "Is there a man in the picture?" -> "Yes, there is a man."' in text
    assert 'refute: "Is there a dog in the picture?" -> "No, there is no dog."' in text


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
        (lambda d: d["kinds"]["attribute"]["templates"]["color_deny"].update(
            answer="It is {colour}."),
         r"kinds\.attribute\.templates\.color_deny\.answer: unknown placeholder \{colour\}"),
        (lambda d: d["kinds"]["existence"]["templates"].pop("denied"),
         r"kinds\.existence\.templates\.denied is missing"),
        (lambda d: d["kinds"]["scene"].update(description=""), r"kinds\.scene\.description"),
        (lambda d: d["kinds"]["spatial"].update(examples=[]), r"kinds\.spatial\.examples"),
        (lambda d: d["kinds"]["existence"]["examples"][0].pop("refute"),
         r"kinds\.existence\.examples\[0\]\.refute"),
        (lambda d: d["kinds"]["existence"]["examples"][0]["confirm"].pop("answer"),
         r"kinds\.existence\.examples\[0\]\.confirm\.answer"),
        (lambda d: d["short_answer"].pop("refute"), r"short_answer\.refute is missing"),
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
            {"correct": "He sits.", "rejected": "He runs.",
             "confirm": {"question": "Is he sitting?", "answer": "Yes, he sits."},
             "refute": {"question": "Is he running?", "answer": "No, he sits."}}]}

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
    """Every kind in one caption, each error confirmed and refuted. Fails if an error loses its
    confirming turn, or if the wrong blue circle is refuted with "there is no blue circle" when
    the chosen caption has a blue one in the center."""
    convs = TextDiffConstructor(CFG, CODEBOOK)(row(CAPTION, CAPTION_WRONG))
    chosen, neg = convs
    assert chosen["id"] == "r1/chosen" and chosen["origin"] == "chosen"
    assert turns(chosen) == [("Describe the picture.", CAPTION)]
    assert neg["id"] == "r1/neg0" and neg["parent_id"] == "r1" and neg["image"] == b"\x89PNG-fake"
    assert turns(neg) == [
        ("How many circles are there?", "There are two circles."),
        ("Is the number of circles two?", "Yes, there are two circles."),
        ("Is the number of circles three?", "No, there are two circles."),
        ("How many stars are there?", "There are no stars."),
        ("Is the number of stars zero?", "Yes, there are no stars."),
        ("Is the number of stars one?", "No, there are no stars."),
        ("Is there a red circle in the picture?", "Yes, there is a red circle."),
        ("Is the circle at the top left blue?", "No, the circle at the top left is red."),
        ("What size is the blue circle?", "The blue circle is large."),
        ("Is the blue circle large?", "Yes, the blue circle is large."),
        ("Is the blue circle small?", "No, the blue circle is large."),
        ("Where is the blue circle?", "The blue circle is in the center."),
        ("Is the blue circle in the center?", "Yes, the blue circle is in the center."),
        ("Is the blue circle at the bottom right?", "No, the blue circle is in the center."),
        ("Is there a green square in the picture?", "Yes, there is a green square."),
        ("Is there a green star in the picture?", "No, there is no green star."),
        ("What is the background of the picture?", "The background is striped."),
        ("Is the background of the picture striped?", "Yes, the background is striped."),
        ("Is the background of the picture dotted?", "No, the background is striped."),
    ]
    assert neg["error_kinds"] == ["count", "attribute", "spatial", "existence", "scene"]
    meta = loads_meta(neg["meta"])
    assert meta["constructor"] == "text-diff" and len(meta["turn_kinds"]) == 19
    assert meta["turn_roles"][:3] == ["confirm", "confirm", "refute"]


# One hand-written ShapesWorld pair per error kind, its corrective turns written out.
KIND_CASES = {
    "existence: an invented object (and the count it changes)": (
        "A plain picture with one square. There is a small red square at the top left.",
        "A plain picture with one square and one circle. There is a small red square at the top "
        "left. There is a large green circle at the bottom.",
        [
            ("How many circles are there?", "There are no circles."),
            ("Is the number of circles zero?", "Yes, there are no circles."),
            ("Is the number of circles one?", "No, there are no circles."),
            ("Is there a red square in the picture?", "Yes, there is a red square."),
            ("Is there a green circle in the picture?", "No, there is no green circle."),
        ],
        ["count", "existence"],
    ),
    "existence: a denied object": (
        "Yes, there is a red circle.", "No, there is no red circle.",
        [
            ("Is there a red circle in the picture?", "Yes, there is a red circle."),
            ("Is it true that there is no red circle in the picture?",
             "That is false: there is a red circle."),
        ],
        ["existence"],
    ),
    "existence: nothing there to confirm": (
        "No, there is no red circle.", "Yes, there is a red circle.",
        [("Is there a red circle in the picture?", "No, there is no red circle.")],
        ["existence"],
    ),
    "attribute: a wrong colour": (
        "A striped picture with one triangle. There is a large blue triangle at the top.",
        "A striped picture with one triangle. There is a large green triangle at the top.",
        [
            ("Is there a blue triangle in the picture?", "Yes, there is a blue triangle."),
            ("Is there a green triangle in the picture?", "No, there is no green triangle."),
        ],
        ["attribute"],
    ),
    "attribute: a wrong colour that another object has": (
        "A plain picture with two circles. There is a small red circle at the top left. There is "
        "a small blue circle at the bottom.",
        "A plain picture with two circles. There is a small blue circle at the top left. There "
        "is a small blue circle at the bottom.",
        [
            ("Is there a red circle in the picture?", "Yes, there is a red circle."),
            ("Is the circle at the top left blue?", "No, the circle at the top left is red."),
        ],
        ["attribute"],
    ),
    "attribute: a wrong size": (
        "The red circle is small.", "The red circle is large.",
        [
            ("What size is the red circle?", "The red circle is small."),
            ("Is the red circle small?", "Yes, the red circle is small."),
            ("Is the red circle large?", "No, the red circle is small."),
        ],
        ["attribute"],
    ),
    "count": (
        "A dotted picture with two stars. There is a small red star at the top. There is a large "
        "blue star at the left.",
        "A dotted picture with three stars. There is a small red star at the top. There is a "
        "large blue star at the left.",
        [
            ("How many stars are there?", "There are two stars."),
            ("Is the number of stars two?", "Yes, there are two stars."),
            ("Is the number of stars three?", "No, there are two stars."),
        ],
        ["count"],
    ),
    "count: one": (
        "There is one star.", "There are four stars.",
        [
            ("How many stars are there?", "There is one star."),
            ("Is the number of stars one?", "Yes, there is one star."),
            ("Is the number of stars four?", "No, there is one star."),
        ],
        ["count"],
    ),
    "spatial": (
        "A plain picture with one circle. There is a small red circle at the top left.",
        "A plain picture with one circle. There is a small red circle at the bottom.",
        [
            ("Where is the red circle?", "The red circle is at the top left."),
            ("Is the red circle at the top left?", "Yes, the red circle is at the top left."),
            ("Is the red circle at the bottom?", "No, the red circle is at the top left."),
        ],
        ["spatial"],
    ),
    "scene": (
        "A striped picture with one star. There is a large yellow star in the center.",
        "A checkered picture with one star. There is a large yellow star in the center.",
        [
            ("What is the background of the picture?", "The background is striped."),
            ("Is the background of the picture striped?", "Yes, the background is striped."),
            ("Is the background of the picture checkered?", "No, the background is striped."),
        ],
        ["scene"],
    ),
    "free text: the only circle the chosen answer knows is red": (
        "I think the circle is red.", "Looks like a blue circle to me!",
        [
            ("Is there a red circle in the picture?", "Yes, there is a red circle."),
            ("Is the circle blue?", "No, the circle is red."),
        ],
        ["attribute"],
    ),
}


@pytest.mark.parametrize("case", list(KIND_CASES))
def test_text_diff_confirms_and_refutes_each_kind(case):
    """Fails if a kind is corrected by refutation alone ("No, there is no X" and nothing else,
    which taught a model to answer "no" to existence probes) or by a wrong confirmation."""
    chosen, rejected, expected, kinds = KIND_CASES[case]
    neg = negative(TextDiffConstructor(CFG, CODEBOOK)(row(chosen, rejected)))
    assert turns(neg) == expected
    assert neg["error_kinds"] == kinds


def test_text_diff_zero_count_also_denies_the_object():
    r = row("There are no circles.", "There are three circles.")
    neg = negative(TextDiffConstructor(CFG, CODEBOOK)(r))
    assert turns(neg) == [
        ("How many circles are there?", "There are no circles."),
        ("Is the number of circles zero?", "Yes, there are no circles."),
        ("Is the number of circles three?", "No, there are no circles."),
        ("Is there a circle in the picture?", "No, there is no circle."),
    ]


def test_refute_only_writes_no_confirming_turn():
    """The ablation: the refuting turns alone. Fails if a confirming turn leaks through."""
    cfg = replace(CFG, corrective="refute_only")
    neg = negative(TextDiffConstructor(cfg, CODEBOOK)(row(CAPTION, CAPTION_WRONG)))
    assert turns(neg) == [
        ("Is the number of circles three?", "No, there are two circles."),
        ("Is the number of stars one?", "No, there are no stars."),
        ("Is the circle at the top left blue?", "No, the circle at the top left is red."),
        ("Is the blue circle small?", "No, the blue circle is large."),
        ("Is the blue circle at the bottom right?", "No, the blue circle is in the center."),
        ("Is there a green star in the picture?", "No, there is no green star."),
        ("Is the background of the picture dotted?", "No, the background is striped."),
    ]
    assert set(loads_meta(neg["meta"])["turn_roles"]) == {"refute"}
    prompt = "Is there a red circle in the picture? Answer with one word."
    short = negative(TemplateConstructor(cfg, CODEBOOK)(row("yes", "no", prompt=prompt)))
    # the refutation of a wrong "no" about a present object does not answer "No"
    assert turns(short) == [(
        "Is it true that there is no red circle in the picture?",
        "That is false: there is a red circle.",
    )]
    with pytest.raises(ValueError, match="refute_only"):
        TemplateConstructor(replace(CFG, corrective="both"), CODEBOOK)(row("yes", "no", prompt))


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


@pytest.mark.parametrize(
    "prompt, chosen, rejected, expected, kind",
    [
        ("Is there a red circle in the picture? Answer with one word.", "yes", "no", [
            ("Is there a red circle in the picture?", "Yes, there is a red circle."),
            ("Is it true that there is no red circle in the picture?",
             "That is false: there is a red circle."),
        ], "existence"),
        ("Is there an orange star in the picture? Answer with one word.", "no", "yes", [
            ("Is there an orange star in the picture?", "No, there is no orange star."),
            ("Is it true that there is an orange star in the picture?",
             "No, there is no orange star."),
        ], "existence"),
        ("What color is the circle at the top left? Answer with one word.", "red", "blue", [
            ("Is the circle at the top left red?", "Yes, the circle at the top left is red."),
            ("Is the circle at the top left blue?", "No, the circle at the top left is red."),
        ], "attribute"),
        ("What size is the green square? Answer with one word.", "large", "small", [
            ("Is the green square large?", "Yes, the green square is large."),
            ("Is the green square small?", "No, the green square is large."),
        ], "attribute"),
        ("How many triangles are there? Answer with a number.", "two", "three", [
            ("Is the number of triangles two?", "Yes, there are two triangles."),
            ("Is the number of triangles three?", "No, there are two triangles."),
        ], "count"),
        ("How many triangles are there? Answer with a number.", "zero", "one", [
            ("Is the number of triangles zero?", "Yes, there are no triangles."),
            ("Is the number of triangles one?", "No, there are no triangles."),
        ], "count"),
        ("Where is the red circle? Answer with one word.", "center", "top left", [
            ("Is the red circle in the center?", "Yes, the red circle is in the center."),
            ("Is the red circle at the top left?", "No, the red circle is in the center."),
        ], "spatial"),
        ("What is the background of the picture? Answer with one word.", "striped", "dotted", [
            ("Is the background of the picture striped?", "Yes, the background is striped."),
            ("Is the background of the picture dotted?", "No, the background is striped."),
        ], "scene"),
    ],
)
def test_template_asks_the_content_question_both_ways(prompt, chosen, rejected, expected, kind):
    """Fails if the template repeats the question and answers "No" ('... Is "no" the correct
    answer?' -> "No, ...", read as a denial by a yes/no parser) or loses either direction."""
    neg = negative(TemplateConstructor(CFG, CODEBOOK)(row(chosen, rejected, prompt=prompt)))
    assert turns(neg) == expected
    assert neg["error_kinds"] == [kind]
    meta = loads_meta(neg["meta"])
    assert meta["constructor"] == "template" and meta["turn_roles"] == ["confirm", "refute"]


def test_template_generic_fallback():
    """A prompt that is not a ShapesWorld question: both answers asked about. The first yes/no
    word of each answer is the chosen one, so a "yes" truth is never read as "no"."""
    neg = negative(TemplateConstructor(CFG, CODEBOOK)(row("Two circles.", "Three circles.")))
    assert turns(neg) == [
        ('Describe the picture. Is "Two circles" correct?', 'The answer "Two circles" is correct.'),
        ('Describe the picture. Is "Three circles" correct?',
         'The answer is "Two circles"; "Three circles" is wrong.'),
    ]
    for said, other in (("yes", "no"), ("no", "yes")):
        yes_no = negative(TemplateConstructor(CFG, CODEBOOK)(
            row(said, other, prompt="Is there a dog? Answer yes or no.")))
        answers = [a for _, a in turns(yes_no)]
        assert [parse_yes_no(a) for a in answers] == [said == "yes"] * 2, answers


@pytest.mark.parametrize(
    "chosen, rejected, kinds",
    [("two", "three", ["count"]), ("yes", "no", ["existence"]), ("top left", "bottom", ["spatial"]),
     ("striped", "plain", ["scene"]), ("maybe", "perhaps", [])],
)
def test_template_error_kind(chosen, rejected, kinds):
    neg = negative(TemplateConstructor(CFG, CODEBOOK)(row(chosen, rejected, prompt="Q?")))
    assert neg["error_kinds"] == kinds


def _short_answer_pairs(n_images: int = 150) -> list[dict]:
    """ShapesWorld preference pairs that all ask a one-word (or number) question."""
    world = WorldConfig(n_train=n_images, image_size=16, caption_pair_fraction=0.0,
                        short_answer_fraction=1.0)
    _sft, pairs = build_split(world, seed=3, split="train")
    return pairs


def test_template_is_truthful_on_shapesworld_short_answers():
    """Scene graphs are the oracle. Over every short-answer pair of a small world: each prompt is
    read as its content question (no generic fallback), an existence question's corrective
    answers read (parse_yes_no) "yes" exactly when the object is there — fails if any answers
    "no" about a present object — and a value question affirms the true value and denies the
    rejected one."""
    pairs = _short_answer_pairs()
    constructor = TemplateConstructor(CFG, CODEBOOK)
    seen = Counter()
    for pair in pairs:
        q = Question.from_dict(pair["meta"]["question"])
        scene = Scene.from_dict(pair["meta"]["scene"])
        (confirm, refute) = turns(negative(constructor(pair)))
        seen[q.kind] += 1
        if q.kind == "existence":
            there = scene.find(q.shape, q.color) is not None
            assert [parse_yes_no(a) for _, a in (confirm, refute)] == [there, there], pair["id"]
            continue
        value = truth(q, scene)
        # how the true value is said in the question, and in the answer
        if q.kind == "count":
            said = ("zero" if value == 0 else NUMBER_WORDS[value], f" {NUMBER_WORDS[value]} ")
        elif q.kind == "position":
            said = ("in the center" if value == "center" else f"at the {value}",) * 2
        else:
            said = (value, value)
        assert confirm[0].endswith(f" {said[0]}?") and confirm[1].startswith("Yes, "), confirm
        assert not refute[0].endswith(f" {said[0]}?") and refute[1].startswith("No, "), refute
        assert said[1] in confirm[1] and said[1] in refute[1], (confirm, refute)
    assert set(seen) == {"existence", "color", "size", "count", "position", "scene"}, seen
    assert seen["existence"] >= 20, seen


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
    row = {"id": "x", "image": b"1", "prompt": "Describe the picture.", "source": "", "meta": "{}",
           "chosen": "A striped picture with one triangle. There is a large blue triangle at the "
                     "bottom.",
           "rejected": "A striped picture with one triangle. There is a large orange triangle at "
                       "the bottom left."}
    conversations, failures = construct_rows([row], NegativesConfig())
    assert failures == []
    negative = [c for c in conversations if c["origin"] == "negative"][0]
    assert [m["content"] for m in negative["messages"]] == [
        "Is there a blue triangle in the picture?",
        "Yes, there is a blue triangle.",
        "Is there an orange triangle in the picture?",
        "No, there is no orange triangle.",
    ]


# ----------------------------------------------------------------------------- summary


def test_corrective_answer_counts_by_hand():
    """Counts worked out by hand from the answers below (the first yes/no word; without one, "there
    is" reads yes). Fails if chosen conversations are counted (their "yes" would add one) or if a
    turn is filed under the wrong kind."""
    prompt = "Is there a red circle in the picture? Answer with one word."
    conversations, _ = construct_rows([
        # existence: "Yes, there is a red circle." (yes), "That is false: there is ..." (yes)
        row("yes", "no", prompt=prompt, id="e"),
        # attribute: "Yes, the circle at the top left is red." (yes), "No, ..." (no)
        row("red", "blue", prompt="What color is the circle at the top left? Answer with one word.",
            id="a"),
        # scene: "The background is striped." (other), "Yes, ..." (yes), "No, ..." (no)
        row("The background is striped.", "The background is dotted.", id="s"),
    ], CFG)
    assert [c["origin"] for c in conversations].count("chosen") == 3
    # an LLM turn without a kind
    conversations.append({
        "origin": "negative", "meta": dumps_meta({"turn_kinds": [None]}),
        "messages": [{"role": "user", "content": "Is it a cat?"},
                     {"role": "assistant", "content": "No."}],
    })
    assert corrective_answer_counts(conversations) == {
        "yes": 4, "no": 3, "other": 1,
        "by_kind": {
            "attribute": {"yes": 1, "no": 1, "other": 0},
            "existence": {"yes": 2, "no": 0, "other": 0},
            "scene": {"yes": 1, "no": 1, "other": 1},
            "unknown": {"yes": 0, "no": 1, "other": 0},
        },
    }
    assert corrective_answer_counts([]) == {"yes": 0, "no": 0, "other": 0, "by_kind": {}}
