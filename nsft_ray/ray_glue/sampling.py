"""On-policy sampling on a pool of Ray actors (for ShapesWorld's `negatives=policy`).

`RaySampler` is the same `sampler(images, prompts, k) -> k answers per prompt` callable as
`generation.make_sampler`, but each call is split across `actors` model-holding Ray actors that
sample in parallel, each with one CPU (Ray sets OMP_NUM_THREADS to the actor's CPUs, so the pool
does not oversubscribe the machine's cores). Use it as a context manager: the actors hold their
CPUs until it closes.
"""

from __future__ import annotations

import ray
from PIL import Image

from nsft_ray.generation import make_sampler

__all__ = ["RaySampler"]


@ray.remote(num_cpus=1)
class _SamplerActor:
    def __init__(self, path: str, temperature: float, max_new_tokens: int, batch_size: int,
                 seed: int | None):
        self._sample = make_sampler(path, temperature=temperature, max_new_tokens=max_new_tokens,
                                    batch_size=batch_size, seed=seed)

    def sample(self, images: list[Image.Image], prompts: list[str], k: int) -> list[list[str]]:
        return self._sample(images, prompts, k)


class RaySampler:
    """A sampler whose calls fan out over `actors` Ray actors holding the model at `path`."""

    def __init__(self, path: str, *, actors: int, temperature: float, max_new_tokens: int,
                 batch_size: int, seed: int | None = None, num_gpus: float = 0.0):
        if actors < 1:
            raise ValueError(f"actors={actors}: expected >= 1")
        self.pool = [
            _SamplerActor.options(num_gpus=num_gpus).remote(
                path, temperature, max_new_tokens, batch_size,
                None if seed is None else seed + 100_003 * i)  # distinct streams per actor
            for i in range(actors)
        ]

    def __call__(self, images: list[Image.Image], prompts: list[str], k: int) -> list[list[str]]:
        n = len(prompts)
        bounds = [n * i // len(self.pool) for i in range(len(self.pool) + 1)]
        refs = [a.sample.remote(images[lo:hi], prompts[lo:hi], k)
                for a, lo, hi in zip(self.pool, bounds, bounds[1:], strict=False) if hi > lo]
        return [answers for chunk in ray.get(refs) for answers in chunk]

    def close(self) -> None:
        for actor in self.pool:
            ray.kill(actor)  # frees their CPUs for the next stage
        self.pool = []

    def __enter__(self) -> RaySampler:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
