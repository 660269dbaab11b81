"""Serving configuration: typed frozen dataclasses, loaded from YAML like the rest of nsft-ray.

    cfg = load_serve_config("serve/example.yaml", ["port=8001", "limits.max_images=2"])
    cfg = load_serve_config(models={"base": "runs/base/export"}, backend="hf")

`models` maps a served name (the request's "model" field) to a Hugging Face folder; the order is
the order of /v1/models and of the playground's columns.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from nsft_ray.config import ConfigError, apply_overrides, from_dict

__all__ = [
    "AutoscalingConfig",
    "ReplicaConfig",
    "LimitsConfig",
    "ServeConfig",
    "load_serve_config",
]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


@dataclass(frozen=True)
class AutoscalingConfig:
    """Passed to Ray Serve as `autoscaling_config` of every model deployment."""

    min_replicas: int = 1
    max_replicas: int = 2
    target_ongoing_requests: float = 4.0  # queued + running requests per replica to aim for
    upscale_delay_s: float = 10.0
    downscale_delay_s: float = 60.0


@dataclass(frozen=True)
class ReplicaConfig:
    """Resources and batching of each model deployment (one deployment per served model)."""

    num_replicas: int = 1  # ignored when autoscaling is set
    autoscaling: AutoscalingConfig | None = None
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    max_ongoing_requests: int = 32  # per replica; more queue in the router (backpressure)
    # hf: concurrent requests merged into one generate() call; vllm: the most requests its
    # continuously formed batch runs at once (max_num_seqs).
    max_batch_size: int = 8
    # How long a partial batch waits for the callers expected back (serve/batching.py); a lone
    # caller never waits. 0.01 s split 8 closed-loop clients into 7 + 1 on a loaded machine.
    batch_wait_timeout_s: float = 0.05
    # hf: the model generates in a child process of the replica (serve/engine_process.py), so
    # HTTP handling does not take turns with generation on one GIL. vLLM runs its engine core in
    # a process of its own already and ignores this.
    engine_process: bool = True

    @property
    def max_replicas(self) -> int:
        """The most replicas of one model deployment that can run at once."""
        return self.autoscaling.max_replicas if self.autoscaling else self.num_replicas


@dataclass(frozen=True)
class LimitsConfig:
    """What one request may ask for; anything beyond gets a 4xx, never reaches the model."""

    max_body_bytes: int = 16 * 1024 * 1024
    max_image_bytes: int = 8 * 1024 * 1024  # per decoded image
    max_image_pixels: int = 4096 * 4096  # width * height per image
    max_images: int = 1  # per request (the project's models are trained on one image)
    max_tokens: int = 512  # upper bound for a request's max_tokens
    default_max_tokens: int = 64  # when the request does not say
    max_n: int = 8  # choices per request
    max_context: int = 0  # prompt + completion tokens; 0: the model's max_position_embeddings


@dataclass(frozen=True)
class ServeConfig:
    models: dict = field(default_factory=dict)  # served name -> model folder
    backend: Literal["hf", "vllm"] = "hf"
    host: str = "127.0.0.1"
    port: int = 8000
    auth_token_env: str = ""  # environment variable holding the bearer token; empty: no auth
    # One model: its replicas are the HTTP ingress too (no gateway -> model hop; measured with
    # benchmarks/bench_serve.py). Several models always get a gateway in front.
    direct: bool = True
    gateway_replicas: int = 1  # replicas of the FastAPI ingress (validation, routing)
    replicas: ReplicaConfig = field(default_factory=ReplicaConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)

    def __post_init__(self) -> None:
        if not self.models:
            raise ConfigError("models: expected at least one entry name: model_folder")
        for name, path in self.models.items():
            if not isinstance(name, str) or not _NAME.match(name):
                raise ConfigError(
                    f"models.{name}: a served name must be 1-64 characters of letters, digits, "
                    "'.', '_' or '-', starting with a letter or digit"
                )
            if not isinstance(path, str) or not path:
                raise ConfigError(f"models.{name}: expected a model folder (string), got {path!r}")
        limits = self.limits
        if limits.default_max_tokens > limits.max_tokens:
            raise ConfigError(
                f"limits.default_max_tokens={limits.default_max_tokens}: expected <= "
                f"limits.max_tokens={limits.max_tokens}"
            )
        for key in ("max_body_bytes", "max_image_bytes", "max_image_pixels", "max_tokens",
                    "default_max_tokens", "max_n"):
            if getattr(limits, key) < 1:
                raise ConfigError(f"limits.{key}={getattr(limits, key)}: expected >= 1")
        if limits.max_images < 0 or limits.max_context < 0:
            raise ConfigError("limits.max_images and limits.max_context: expected >= 0")
        if self.replicas.max_batch_size < 1 or self.replicas.num_replicas < 1:
            raise ConfigError("replicas.max_batch_size and replicas.num_replicas: expected >= 1")
        if self.replicas.max_ongoing_requests < self.replicas.max_batch_size:
            raise ConfigError(
                f"replicas.max_ongoing_requests={self.replicas.max_ongoing_requests}: expected >= "
                f"replicas.max_batch_size={self.replicas.max_batch_size} (else batches never fill)"
            )


def load_serve_config(
    path: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    *,
    models: dict[str, str] | None = None,
    backend: str | None = None,
    host: str | None = None,
    port: int | None = None,
) -> ServeConfig:
    """A YAML file (or the defaults), then the command-line choices, then dotted overrides.

    `models` replaces the file's models (command line `--model NAME=DIR`).
    """
    data: dict = {}
    if path:
        data = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
    if models:
        data["models"] = dict(models)
    for key, value in (("backend", backend), ("host", host), ("port", port)):
        if value is not None:
            data[key] = value
    return from_dict(ServeConfig, apply_overrides(data, list(overrides)))
