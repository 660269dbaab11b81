"""Claims extraction on hand-written sentences (the shared ShapesWorld grammar and free text)."""

import pytest

from nsft_ray.config import NegativesConfig, WorldConfig
from nsft_ray.negatives.claims import (
    GRID_POSITIONS,
    Claims,
    ObjectClaim,
    Vocabulary,
    extract_claims,
    number_word,
)

VOCAB = Vocabulary.from_config(NegativesConfig())


def claims(text: str) -> Claims:
    return extract_claims(text, VOCAB)


def test_caption():
    c = claims(
        "A striped picture with two circles and one square. There is a small red circle at the "
        "top left. There is a large blue circle in the center. There is a small green square at "
        "the bottom."
    )
    assert c.scene == "striped"
    assert c.counts == {"circle": 2, "square": 1}
    assert c.objects == (
        ObjectClaim("circle", "red", "small", "top left", True),
        ObjectClaim("circle", "blue", "large", "center", True),
        ObjectClaim("square", "green", "small", "bottom", True),
    )


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Yes, there is a red circle.", ObjectClaim("circle", "red", None, None, True)),
        ("No, there is no red circle.", ObjectClaim("circle", "red", None, None, False)),
        (
            "The circle at the top left is red.",
            ObjectClaim("circle", "red", None, "top left", True),
        ),
        ("The red circle is small.", ObjectClaim("circle", "red", "small", None, True)),
        ("The red circle is in the center.", ObjectClaim("circle", "red", None, "center", True)),
        (
            "The star isn't at the Bottom-Right.",
            ObjectClaim("star", None, None, "bottom right", False),
        ),
        ("No, the circle is red.", ObjectClaim("circle", "red", None, None, True)),
        ("The circle is red, not blue.", ObjectClaim("circle", None, None, None, False)),
    ],
)
def test_single_object_sentences(text, expected):
    c = claims(text)
    assert c.objects == (expected,)
    assert c.counts == {} and c.scene is None


def test_counts():
    assert claims("There are two circles.").counts == {"circle": 2}
    assert claims("There is one circle.").counts == {"circle": 1}
    none = claims("There are no circles.")
    assert none.counts == {"circle": 0}
    assert none.objects == (ObjectClaim("circle", None, None, None, False),)
    assert claims("I see 3 stars and a square.").counts == {"star": 3}
    # "a" is not a number; a number not directly before the object is no count claim
    assert claims("There is a circle.").counts == {}
    assert claims("There are two red circles.").counts == {}
    # the first claim about an object wins
    assert claims("There are two circles. There are three circles.").counts == {"circle": 2}


def test_several_objects_give_only_counts():
    c = claims("The red circle is left of the blue square.")
    assert c.objects == () and c.counts == {}


def test_longest_match_and_word_boundaries():
    assert claims("The circle is at the top left.").objects[0].position == "top left"
    assert claims("The circle is at the top.").objects[0].position == "top"
    # "red" inside "covered", "star" inside "starry": no match
    assert claims("The circle is covered in starry dust.").objects == (
        ObjectClaim("circle", None, None, None, True),
    )


def test_scene_and_free_text():
    assert claims("The background is dotted.").scene == "dotted"
    assert claims("It's CHECKERED, with a plain border.").scene == "checkered"
    free = claims("Hmm?! 🤔 ... ((( ]]] \n\n no idea; maybe 42 cats.")
    assert free == Claims(objects=(), counts={}, scene=None)
    assert claims("") == Claims(objects=(), counts={}, scene=None)


def test_vocabulary_from_world_config_and_validation():
    world = Vocabulary.from_config(WorldConfig(shapes=("Circle", "star"), backgrounds=("plain",)))
    assert world.objects == ("circle", "star") and world.positions == GRID_POSITIONS
    assert world.scenes == ("plain",)
    with pytest.raises(ValueError, match="'red' is in both colors and scenes"):
        Vocabulary(("circle",), ("red",), ("small",), ("top",), ("red",))
    with pytest.raises(ValueError, match="Vocabulary.sizes is empty"):
        Vocabulary(("circle",), ("red",), (), ("top",), ("plain",))


def test_number_word():
    assert [number_word(n) for n in (0, 1, 2, 9, 12)] == ["no", "one", "two", "nine", "12"]
