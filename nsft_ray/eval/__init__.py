"""Evaluation: POPE (logit-gap AUROC, image-swap control), CHAIR and attribute/count/position
probes on ShapesWorld; benchmark readers.

    from nsft_ray.eval import evaluate
    result = evaluate("runs/nsft/model", "data/world", EvalConfig())
"""

from nsft_ray.eval.chair import chair_metrics, object_mentions, score_caption
from nsft_ray.eval.pope import SETTINGS, parse_yes_no, pope_items, pope_metrics, yes_no_metrics
from nsft_ray.eval.runner import evaluate, plan_eval, score

__all__ = [
    "evaluate", "plan_eval", "score",
    "SETTINGS", "pope_items", "parse_yes_no", "yes_no_metrics", "pope_metrics",
    "object_mentions", "score_caption", "chair_metrics",
]
