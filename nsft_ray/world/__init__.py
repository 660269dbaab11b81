"""ShapesWorld: seeded procedural images, scene graphs, captions/QA and preference pairs."""

from nsft_ray.world.check import answer_errors, contradictions, is_correct
from nsft_ray.world.generate import SPLITS, Sampler, build_split, policy_rejections, write_world
from nsft_ray.world.language import (
    ERROR_KINDS,
    QA_KINDS,
    Question,
    answer,
    caption,
    corpus,
    corrupt,
    question_text,
    sample_question,
)
from nsft_ray.world.render import render, render_png, to_png
from nsft_ray.world.scene import POSITIONS, Obj, Scene, sample_scene, split_of

__all__ = [
    "POSITIONS", "Obj", "Scene", "sample_scene", "split_of",
    "render", "render_png", "to_png",
    "ERROR_KINDS", "QA_KINDS", "Question", "caption", "question_text", "answer",
    "sample_question", "corrupt", "corpus",
    "contradictions", "is_correct", "answer_errors",
    "SPLITS", "Sampler", "build_split", "policy_rejections", "write_world",
]
