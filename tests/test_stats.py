"""nsft_ray.stats against values worked out by hand: AUROC, its SE, t-intervals, the paired
bootstrap's sign and width, verdicts."""

import math

import pytest

from nsft_ray.stats import (
    HEADLINE,
    auroc,
    binomial_se,
    hanley_mcneil_se,
    mean_ci,
    paired_bootstrap,
    ratio_se,
    t_quantile,
    verdict,
)


def test_auroc_two_by_two_by_hand():
    """Positives 0.9, 0.4; negatives 0.4, 0.1: pairs (0.9>0.4), (0.9>0.1), (0.4>0.1) right,
    (0.4=0.4) a tie counted 1/2 -> (3 + 0.5) / 4 = 0.875. Labels and scores in any order."""
    assert auroc([True, False, True, False], [0.4, 0.1, 0.9, 0.4]) == 0.875
    assert auroc([True, False], [0.0, 1.0]) == 0.0  # perfectly wrong
    assert auroc([True, True, False, False], [1, 1, 1, 1]) == 0.5  # all ties
    assert auroc([True, True], [0.1, 0.2]) is None  # one class only
    assert auroc([True, False], [0.1, None]) is None
    with pytest.raises(ValueError, match="2 labels but 1 scores"):
        auroc([True, False], [0.1])


def test_hanley_mcneil_by_hand():
    """A = 0.875, 2 positives, 2 negatives: Q1 = 0.875 / 1.125 = 0.777778,
    Q2 = 2 * 0.765625 / 1.875 = 0.816667; SE^2 = (0.109375 + 0.012153 + 0.051042) / 4
    = 0.0431424 -> SE = 0.207707."""
    assert hanley_mcneil_se(0.875, 2, 2) == pytest.approx(0.207707, abs=1e-6)
    assert hanley_mcneil_se(0.875, 0, 2) is None


def test_t_quantiles_match_the_table_and_mean_ci():
    """Student t table: t(0.975, 2) = 4.303, t(0.975, 10) = 2.228, t(0.995, 1) = 63.657.
    mean_ci([1, 2, 3]): mean 2, s = 1 -> 2 ± 4.303 / sqrt(3) = 2 ± 2.484."""
    assert t_quantile(0.975, 2) == pytest.approx(4.303, abs=5e-4)
    assert t_quantile(0.975, 10) == pytest.approx(2.228, abs=5e-4)
    assert t_quantile(0.995, 1) == pytest.approx(63.657, abs=5e-3)
    assert t_quantile(0.025, 2) == pytest.approx(-4.303, abs=5e-4)
    m, lo, hi = mean_ci([1.0, 2.0, 3.0])
    assert m == 2.0 and lo == pytest.approx(2 - 2.4843, abs=1e-3)
    assert hi == pytest.approx(2 + 2.4843, abs=1e-3)
    assert mean_ci([0.7]) == (0.7, None, None)  # one seed: no interval
    assert mean_ci([]) == (None, None, None)
    with pytest.raises(ValueError, match="df=0"):
        t_quantile(0.9, 0)


def test_standard_errors_by_hand():
    assert binomial_se(0.5, 100) == 0.05 and binomial_se(0.5, 0) is None
    # R = 1/7 over (H, M) = (1, 4), (0, 3): SE = (3/7) / 3.5 = 6/49 (see test_eval's CHAIR test).
    assert ratio_se([1, 0], [4, 3]) == pytest.approx(6 / 49)
    assert ratio_se([1], [4]) is None


def _items(n_images, kind="count", correct=None, per_image=1, scores=None, labels=None,
           hallucinated=None, mentions=None):
    """Columnar items as evaluate returns them: `per_image` probes of `kind` per image."""
    n = n_images * per_image
    correct = correct or [True] * n
    return {
        "key": [f"img{i // per_image}|{kind}|q{i % per_image}" for i in range(n)],
        "kind": [kind] * n,
        "correct": correct,
        "label": labels or [None] * n,
        "settings": [["random", "adversarial"] if kind == "pope" else None] * n,
        "score": scores or [None] * n,
        "hallucinated": hallucinated or [None] * n,
        "mentions": mentions or [None] * n,
    }


def test_bootstrap_known_sign_and_exact_zero():
    """a answers every count question right, b every other one: delta = +0.5 on each seed and
    the interval excludes 0 -> better; identical items -> delta 0, interval [0, 0] ->
    indistinguishable."""
    count = HEADLINE["count"]
    a = {s: _items(200) for s in range(3)}
    b = {s: _items(200, correct=[i % 2 == 0 for i in range(200)]) for s in range(3)}
    d = paired_bootstrap(a, b, count, n_boot=500)
    assert d.delta == pytest.approx(0.5) and 0.35 < d.ci_low < 0.5 < d.ci_high < 0.65
    assert verdict(*d, count.higher_is_better) == "better"
    assert verdict(*paired_bootstrap(b, a, count, n_boot=500), True) == "worse"
    zero = paired_bootstrap(a, {s: _items(200) for s in range(3)}, count, n_boot=200)
    assert tuple(zero) == (0.0, 0.0, 0.0)
    assert verdict(*zero, True) == "indistinguishable"


def test_lower_is_better_for_chair_and_auroc_from_scores():
    chair = HEADLINE["CHAIR_i"]
    few = {0: _items(100, "caption", hallucinated=[0] * 99 + [1], mentions=[3] * 100)}
    many = {0: _items(100, "caption", hallucinated=[1] * 100, mentions=[3] * 100)}
    d = paired_bootstrap(few, many, chair, n_boot=300)
    assert d.delta == pytest.approx(1 / 300 - 1 / 3) and d.ci_high < 0
    assert verdict(*d, chair.higher_is_better) == "better"
    # AUROC: a ranks every positive above every negative (1.0), b inverts them (0.0).
    labels = [i % 2 == 0 for i in range(100)]
    right = [1.0 if y else -1.0 for y in labels]
    a = {0: _items(50, "pope", per_image=2, labels=labels, scores=right)}
    b = {0: _items(50, "pope", per_image=2, labels=labels, scores=[-s for s in right])}
    d = paired_bootstrap(a, b, HEADLINE["POPE AUROC (adv)"], n_boot=200)
    assert tuple(d) == (1.0, 1.0, 1.0)
    no_scores = {0: _items(50, "pope", per_image=2, labels=labels)}
    assert all(math.isnan(x) for x in paired_bootstrap(a, no_scores, HEADLINE["POPE AUROC (adv)"]))


def test_seeds_are_resampled_not_only_items():
    """Seed 0: a beats b by 0.5; seed 1: b beats a by 0.5; mean delta 0. Resampling items only
    would give a narrow interval around 0 (about ±0.07: items barely vary); resampling seeds
    too draws (0, 0) or (1, 1) a quarter of the time each, so the interval reaches ±0.5.
    Fails if seeds are not resampled."""
    count = HEADLINE["count"]
    half = [i % 2 == 0 for i in range(200)]
    a = {0: _items(200), 1: _items(200, correct=half)}
    b = {0: _items(200, correct=half), 1: _items(200)}
    d = paired_bootstrap(a, b, count, n_boot=1000)
    assert d.delta == 0.0 and d.ci_low < -0.25 and d.ci_high > 0.25
    assert verdict(*d, True) == "indistinguishable"


def test_images_not_probes_are_resampled():
    """Fails if probes are resampled one by one: repeating each image's probe 5 times (perfectly
    correlated copies) must not narrow the interval."""
    count = HEADLINE["count"]
    flags = [i % 3 != 0 for i in range(60)]
    one = paired_bootstrap({0: _items(60)}, {0: _items(60, correct=flags)}, count, n_boot=400)
    five = paired_bootstrap({0: _items(60, per_image=5)},
                            {0: _items(60, per_image=5, correct=[f for f in flags for _ in
                                                                 range(5)])},
                            count, n_boot=400)
    assert five.delta == pytest.approx(one.delta)
    assert five.ci_high - five.ci_low == pytest.approx(one.ci_high - one.ci_low, rel=0.05)


def test_items_must_pair():
    with pytest.raises(ValueError, match="do not pair"):
        paired_bootstrap({0: _items(3)}, {0: _items(4)}, HEADLINE["count"])
    with pytest.raises(ValueError, match="share no seed"):
        paired_bootstrap({0: _items(3)}, {1: _items(3)}, HEADLINE["count"])


@pytest.mark.parametrize("delta, lo, hi, higher, expected", [
    (0.1, 0.05, 0.15, True, "better"), (0.1, 0.05, 0.15, False, "worse"),
    (-0.1, -0.15, -0.05, True, "worse"), (-0.1, -0.15, -0.05, False, "better"),
    (0.01, -0.01, 0.03, True, "indistinguishable"), (0.0, 0.0, 0.0, False, "indistinguishable"),
])
def test_verdict(delta, lo, hi, higher, expected):
    assert verdict(delta, lo, hi, higher) == expected


def test_headline_values_of_one_evaluation_by_hand():
    """Fails if a headline metric reads another kind's items or weights them wrongly: 4 count
    questions with 3 right -> 0.75; captions 1+0 hallucinated of 3+5 mentioned -> 1/8."""
    from nsft_ray.stats import headline_values

    count = _items(4, correct=[True, True, False, True])
    caption = _items(2, "caption", correct=[False, True], hallucinated=[1, 0], mentions=[3, 5])
    merged = {k: count[k] + caption[k] for k in count}
    values = headline_values(merged)
    assert values["count"] == pytest.approx(0.75)
    assert values["CHAIR_i"] == pytest.approx(1 / 8)
    assert math.isnan(values["attribute"])  # no such items: not computable, not 0
