"""Statistics for the comparison: intervals over seeds, paired bootstrap deltas, verdicts.

Pure functions of numbers and per-item eval results (`nsft_ray.eval.evaluate(...)["items"]`);
no model, no config.

    lo_hi = mean_ci([0.81, 0.84, 0.80])                 # t-interval over seeds
    d = paired_bootstrap(nsft_items, dpo_items, HEADLINE["POPE AUROC (adv)"])
    verdict(d.delta, d.ci_low, d.ci_high, higher_is_better=True)   # "better"

Headline metrics (HEADLINE) are computed from the items, so a bootstrap can resample them:
- POPE AUROC (adv) / POPE acc (adv): the adversarial setting's probes (its negatives are the
  absent objects most similar to the scene: the hardest, and the one the README reports); AUROC
  of the yes-minus-no logit gap, accuracy of the yes/no decision;
- CHAIR_i: hallucinated / all object mentions over the captions (a ratio of sums; lower is better);
- attribute (colour and size questions), count, position: accuracy.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

__all__ = ["Interval", "Delta", "Metric", "HEADLINE", "t_quantile", "mean_ci", "binomial_se",
           "auroc", "hanley_mcneil_se", "ratio_se", "paired_bootstrap", "verdict",
           "headline_values"]

Weights = np.ndarray  # (B, N): how often each of N items is drawn in each of B replicates


class Interval(NamedTuple):
    mean: float | None
    ci_low: float | None  # None: one value, no interval
    ci_high: float | None


class Delta(NamedTuple):
    delta: float  # metric(a) - metric(b), mean over the paired seeds; NaN: not computable
    ci_low: float
    ci_high: float


# --- closed forms -------------------------------------------------------------------------------


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (Numerical Recipes 6.4, Lentz)."""
    tiny, c, d = 1e-300, 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def _beta_inc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta I_x(a, b)."""
    if x <= 0.0 or x >= 1.0:
        return max(0.0, min(1.0, x))
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
                     + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):  # the fraction converges fast on this side
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_quantile(p: float, df: int) -> float:
    """The p-quantile of Student's t with `df` degrees of freedom (bisection on the CDF)."""
    if not 0.0 < p < 1.0 or df < 1:
        raise ValueError(f"t_quantile(p={p}, df={df}): expected 0 < p < 1 and df >= 1")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)

    def cdf(t: float) -> float:  # t >= 0
        return 1.0 - 0.5 * _beta_inc(df / 2.0, 0.5, df / (df + t * t))

    lo, hi = 0.0, 1.0
    while cdf(hi) < p:
        hi *= 2.0
    for _ in range(200):
        mid = (lo + hi) / 2.0
        lo, hi = (mid, hi) if cdf(mid) < p else (lo, mid)
    return (lo + hi) / 2.0


def mean_ci(values: Sequence[float], level: float = 0.95) -> Interval:
    """Mean and t-interval over seeds: mean ± t_{(1+level)/2, n-1} * s / sqrt(n).

    One value: (value, None, None); no value: (None, None, None).
    """
    vs = [float(v) for v in values]
    if not vs:
        return Interval(None, None, None)
    mean = statistics.fmean(vs)
    if len(vs) == 1:
        return Interval(mean, None, None)
    half = t_quantile((1.0 + level) / 2.0, len(vs) - 1) * statistics.stdev(vs) / math.sqrt(len(vs))
    return Interval(mean, mean - half, mean + half)


def binomial_se(p: float, n: int) -> float | None:
    """sqrt(p (1 - p) / n); None for n = 0."""
    return math.sqrt(p * (1.0 - p) / n) if n else None


def hanley_mcneil_se(auc: float, n_pos: int, n_neg: int) -> float | None:
    """Standard error of an AUROC (Hanley & McNeil 1982, eq. 2):
    Q1 = A / (2 - A), Q2 = 2 A^2 / (1 + A),
    SE^2 = (A (1 - A) + (n_pos - 1)(Q1 - A^2) + (n_neg - 1)(Q2 - A^2)) / (n_pos n_neg)."""
    if not n_pos or not n_neg:
        return None
    q1, q2 = auc / (2.0 - auc), 2.0 * auc * auc / (1.0 + auc)
    var = (auc * (1 - auc) + (n_pos - 1) * (q1 - auc**2) + (n_neg - 1) * (q2 - auc**2))
    return math.sqrt(max(var, 0.0) / (n_pos * n_neg))


def ratio_se(num: Sequence[float], den: Sequence[float]) -> float | None:
    """Delta-method standard error of R = sum(num) / sum(den) over n units (captions):
    SE^2 = sum_i (num_i - R den_i)^2 / (n (n - 1) mean(den)^2). None for n < 2 or sum(den) = 0."""
    n, total = len(num), float(sum(den))
    if n < 2 or not total:
        return None
    r = sum(num) / total
    resid = sum((x - r * y) ** 2 for x, y in zip(num, den, strict=True))
    return math.sqrt(resid / (n * (n - 1))) / (total / n)


def _weighted_auroc(scores: np.ndarray, labels: np.ndarray, w: Weights) -> np.ndarray:
    """Mann-Whitney AUROC of `scores` (N,) against `labels` (N,), one per row of weights (B, N):
    P(score of a positive > score of a negative), ties counted 1/2, each item counted w times."""
    order = np.argsort(scores, kind="stable")
    s, y, w = scores[order], labels[order], w[:, order]
    neg_w = w * ~y
    below = np.concatenate([np.zeros((len(w), 1)), np.cumsum(neg_w, axis=1)], axis=1)
    start, end = np.searchsorted(s, s, "left"), np.searchsorted(s, s, "right")  # tie groups
    under = below[:, start]  # negative weight strictly below each item's score
    tied = below[:, end] - under  # negative weight at the same score
    pos_w = w * y
    pairs = pos_w.sum(axis=1) * neg_w.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (pos_w * (under + 0.5 * tied)).sum(axis=1) / pairs


def auroc(labels: Sequence[bool], scores: Sequence[float | None]) -> float | None:
    """AUROC of `scores` for `labels` (Mann-Whitney, ties 1/2); None without both classes or with
    a missing score.

    By hand: positives scored 0.9 and 0.4, negatives 0.4 and 0.1. Of the 4 (positive, negative)
    pairs, (0.9, 0.4), (0.9, 0.1) and (0.4, 0.1) are ordered right and (0.4, 0.4) is a tie:
    AUROC = (3 + 1/2) / 4 = 0.875.
    """
    if len(labels) != len(scores):
        raise ValueError(f"{len(labels)} labels but {len(scores)} scores; expected one each")
    if any(s is None for s in scores) or all(labels) or not any(labels):
        return None
    y = np.asarray(labels, dtype=bool)
    out = _weighted_auroc(np.asarray(scores, dtype=float), y, np.ones((1, len(y))))
    return float(out[0])


# --- headline metrics over eval items ------------------------------------------------------------

Arrays = dict[str, np.ndarray]  # one seed's items as aligned arrays (see _arrays)


@dataclass(frozen=True)
class Metric:
    """A metric of eval items that a bootstrap can resample: `keep` picks the items it reads
    (arrays -> (N,) bool); fn(kept arrays, w (B, N_kept)) -> (B,), one value per row of
    weights (an item drawn k times has weight k)."""

    name: str
    higher_is_better: bool
    keep: Callable[[Arrays], np.ndarray]
    fn: Callable[[Arrays, Weights], np.ndarray]


def _ratio(num: np.ndarray, den: np.ndarray, w: Weights) -> np.ndarray:
    """sum(w num) / sum(w den) per replicate: a ratio of sums (accuracy: den = 1)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return (w @ num) / (w @ den)


def _kinds(*kinds: str) -> Callable[[Arrays], np.ndarray]:
    return lambda a: np.isin(a["kind"], kinds)


def _adversarial(a: Arrays) -> np.ndarray:
    return a["adversarial"]


def _accuracy(a: Arrays, w: Weights) -> np.ndarray:
    return _ratio(a["correct"], np.ones(len(a["correct"])), w)


def _auroc(a: Arrays, w: Weights) -> np.ndarray:
    if np.isnan(a["score"]).any():  # no score (an engine without logits): not computable
        return np.full(len(w), np.nan)
    return _weighted_auroc(a["score"], a["label"], w)


def _chair_i(a: Arrays, w: Weights) -> np.ndarray:
    return _ratio(a["hallucinated"], a["mentions"], w)


HEADLINE: dict[str, Metric] = {m.name: m for m in (
    Metric("POPE AUROC (adv)", True, _adversarial, _auroc),
    Metric("POPE acc (adv)", True, _adversarial, _accuracy),
    Metric("CHAIR_i", False, _kinds("caption"), _chair_i),
    Metric("attribute", True, _kinds("color", "size"), _accuracy),
    Metric("count", True, _kinds("count"), _accuracy),
    Metric("position", True, _kinds("position"), _accuracy),
)}


def _arrays(items: Mapping[str, Sequence[Any]], order: np.ndarray) -> Arrays:
    """Columnar eval items (evaluate's result["items"]) -> float/bool arrays in `order`."""
    def col(name: str, missing: float = 0.0) -> np.ndarray:
        return np.array([missing if v is None else float(v) for v in items[name]])[order]

    return {
        "kind": np.asarray(items["kind"])[order],
        "correct": col("correct"),
        "label": col("label").astype(bool),
        "adversarial": np.array(["adversarial" in (s or ()) for s in items["settings"]])[order],
        "score": col("score", math.nan),
        "hallucinated": col("hallucinated"),
        "mentions": col("mentions"),
    }


def headline_values(items: Mapping[str, Sequence[Any]]) -> dict[str, float]:
    """Every HEADLINE metric of one evaluation's items, as measured (no resampling)."""
    a = _arrays(items, np.arange(len(items["key"])))
    out = {}
    for name, metric in HEADLINE.items():
        keep = metric.keep(a)
        kept = {k: v[keep] for k, v in a.items()}
        out[name] = float(metric.fn(kept, np.ones((1, int(keep.sum()))))[0])
    return out


def _paired(a: Mapping[str, Sequence], b: Mapping[str, Sequence],
            metric: Metric) -> tuple[Arrays, Arrays, np.ndarray]:
    """The items `metric` reads, both sets aligned by key, and each item's image index (its
    cluster: 0 .. number of images with such items - 1)."""
    ka, kb = list(a["key"]), list(b["key"])
    if set(ka) != set(kb) or len(ka) != len(set(ka)):
        raise ValueError(f"items do not pair: {len(set(ka) ^ set(kb))} keys are in one set only "
                         "(evaluate both models with the same eval config and seed)")
    keys = sorted(ka)
    pos_a, pos_b = {k: i for i, k in enumerate(ka)}, {k: i for i, k in enumerate(kb)}
    xa = _arrays(a, np.array([pos_a[k] for k in keys]))
    xb = _arrays(b, np.array([pos_b[k] for k in keys]))
    keep = metric.keep(xa)
    # The key is "image id|kind|question": probes of one image are resampled together.
    images = [k.rsplit("|", 2)[0] for k, kept in zip(keys, keep, strict=True) if kept]
    _, cluster = np.unique(images, return_inverse=True)
    return ({k: v[keep] for k, v in xa.items()}, {k: v[keep] for k, v in xb.items()},
            cluster.astype(int))


def paired_bootstrap(
    a_items_by_seed: Mapping[Any, Mapping[str, Sequence]],
    b_items_by_seed: Mapping[Any, Mapping[str, Sequence]],
    metric: Metric, n_boot: int = 2000, seed: int = 0, level: float = 0.95,
) -> Delta:
    """delta = mean over paired seeds of metric(a) - metric(b), with a percentile interval.

    Each replicate resamples the seeds both methods share (with replacement), then, inside each
    drawn seed, the eval images with replacement; a and b get the same draws (paired by item key).
    Images, not probes, are the resampled unit: the probes of one image are correlated. With one
    seed only the images are resampled. A metric the items cannot give: Delta(nan, nan, nan).
    """
    seeds = sorted(set(a_items_by_seed) & set(b_items_by_seed), key=str)
    if not seeds:
        raise ValueError("paired_bootstrap: the two methods share no seed")
    pairs = [_paired(a_items_by_seed[s], b_items_by_seed[s], metric) for s in seeds]
    if any(not len(c) for _, _, c in pairs):  # e.g. no attribute questions were asked
        return Delta(math.nan, math.nan, math.nan)
    point = [metric.fn(a, np.ones((1, len(c))))[0] - metric.fn(b, np.ones((1, len(c))))[0]
             for a, b, c in pairs]
    delta = float(np.mean(point))
    if math.isnan(delta):
        return Delta(math.nan, math.nan, math.nan)
    rng = np.random.default_rng(seed)
    n_seeds = len(seeds)
    pick = rng.integers(n_seeds, size=(n_boot, n_seeds))  # replicate b, slot j -> a seed
    reps = np.zeros((n_boot, n_seeds))
    for s, (a, b, cluster) in enumerate(pairs):
        rows, slots = np.nonzero(pick == s)
        n_img = cluster.max() + 1
        for start in range(0, len(rows), 256):  # chunks bound the (B, N) weight matrices
            r, j = rows[start:start + 256], slots[start:start + 256]
            draws = rng.integers(n_img, size=(len(r), n_img)) + n_img * np.arange(len(r))[:, None]
            counts = np.bincount(draws.ravel(), minlength=len(r) * n_img).reshape(len(r), n_img)
            w = counts[:, cluster].astype(float)  # an image drawn k times counts its items k times
            reps[r, j] = metric.fn(a, w) - metric.fn(b, w)
    means = reps.mean(axis=1)
    lo, hi = np.nanquantile(means, [(1.0 - level) / 2.0, (1.0 + level) / 2.0])
    return Delta(delta, float(lo), float(hi))


def verdict(delta: float, lo: float, hi: float, higher_is_better: bool) -> str:
    """"better" / "worse" when the interval [lo, hi] of metric(a) - metric(b) excludes 0, else
    "indistinguishable"; the direction says which sign is better."""
    if lo > 0 or hi < 0:
        return "better" if (lo > 0) == higher_is_better else "worse"
    return "indistinguishable"
