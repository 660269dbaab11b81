"""Rule-based ShapesWorld reward: an ABLATION of PPO's learned reward model (ppo.reward=rules).

The default PPO reward is a learned reward model. On ShapesWorld the scene graph behind every
image is known, so an answer can also be scored by rules, with no model at all:

    r(answer) = +1   it makes at least one checkable claim and none contradicts the scene graph
                -1   at least one claim contradicts the scene graph (any codebook error kind:
                     existence, attribute, count, spatial, scene)
                 0   nothing checkable (no object, count or scene claim; a short answer that
                     does not parse as an answer to its question)

The answer is read in the context of its question (`world.check.answer_errors`), so a one-word
answer ("red", "two") is checked as the full sentence it stands for. The scene graph and the
question come from the preference row's `meta` (ShapesWorld writes both).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from nsft_ray.negatives.claims import Vocabulary
from nsft_ray.world.check import answer_errors
from nsft_ray.world.language import Question
from nsft_ray.world.scene import Scene

__all__ = ["REWARD_CORRECT", "REWARD_CONTRADICTING", "REWARD_UNCHECKABLE", "meta_problem",
           "rule_reward", "rule_rewards"]

REWARD_CORRECT = 1.0
REWARD_CONTRADICTING = -1.0
REWARD_UNCHECKABLE = 0.0


def _parse(meta: str | Mapping[str, Any]) -> dict[str, Any]:
    return json.loads(meta) if isinstance(meta, str) else dict(meta)


def meta_problem(meta: str | Mapping[str, Any] | None) -> str | None:
    """Why `meta` cannot be scored by rules (missing scene/question), or None if it can."""
    try:
        data = _parse(meta or {})
        Scene.from_dict(data["scene"])
        Question.from_dict(data["question"])
    except (KeyError, TypeError, ValueError) as e:
        return f"meta has no usable scene graph and question for the rule reward: {e!r}"
    return None


def rule_reward(answer: str, meta: str | Mapping[str, Any], vocab: Vocabulary) -> float:
    """+1 correct, -1 contradicting, 0 uncheckable (see the module docstring)."""
    data = _parse(meta)
    missing = [k for k in ("scene", "question") if k not in data]
    if missing:
        raise ValueError(f"meta has no {missing[0]!r}: the rule reward needs ShapesWorld meta")
    errors = answer_errors(Question.from_dict(data["question"]), answer,
                           Scene.from_dict(data["scene"]), vocab)
    if errors is None:
        return REWARD_UNCHECKABLE
    return REWARD_CONTRADICTING if errors else REWARD_CORRECT


def rule_rewards(
    answers: list[str], metas: list[str | Mapping[str, Any]], vocab: Vocabulary
) -> list[float]:
    """`rule_reward` for each (answer, meta) pair."""
    if len(answers) != len(metas):
        raise ValueError(f"got {len(answers)} answers but {len(metas)} metas; expected one each")
    return [rule_reward(a, m, vocab) for a, m in zip(answers, metas, strict=True)]
