"""nsft-ray: align vision-language models with nSFT and compare it with SFT, DPO and PPO on Ray.

The public surface below is imported lazily (torch and transformers load only when a name that
needs them is first used), so `import nsft_ray` and `nsft-ray --help` stay fast.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# name -> module that defines it
_PUBLIC = {
    "Config": "nsft_ray.config",
    "ConfigError": "nsft_ray.config",
    "load_config": "nsft_ray.config",
    "PREFERENCE_SCHEMA": "nsft_ray.schema",
    "CONVERSATION_SCHEMA": "nsft_ray.schema",
    "write_world": "nsft_ray.world",
    "build_tiny_vlm": "nsft_ray.models",
    "load_vlm": "nsft_ray.models",
    "generate": "nsft_ray.generation",
    "construct_rows": "nsft_ray.negatives.pipeline",
    "ALGORITHMS": "nsft_ray.algorithms",
    "fit": "nsft_ray.loop",
    "evaluate": "nsft_ray.eval",
}

__all__ = ["__version__", *_PUBLIC]


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'nsft_ray' has no attribute {name!r}")
