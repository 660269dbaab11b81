"""DPO with a precomputed reference: one Ray Data batch-inference pass before training.

    preference rows ──► map_batches(ReferenceLogps: the reference VLM, loaded once per actor)
        ──► + ref_chosen_logps, ref_rejected_logps ──► RUN/ref_logps/*.parquet ──► TorchTrainer

Training then holds only the policy (`dpo.precompute_ref: true`). The columns are the summed
answer log-probs of `algorithms.dpo.reference_logps`, the same numbers the live reference
computes. A resumed run (same run.dir) reuses the folder when RUN/ref_logps.json says it was
written from the same model, data and max_length; otherwise the pass runs again.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import ray

from nsft_ray.config import Config, to_dict
from nsft_ray.ray_glue.placement import on_gpus, worker_options

__all__ = ["ReferenceLogps", "with_reference_logps"]


class ReferenceLogps:
    """Ray Data callable class: appends the reference log-probs to a batch of preference rows."""

    def __init__(self, model_dir: str, dtype: str, max_length: int, device: str,
                 shared_prefix: bool = True):
        from nsft_ray.models import load_vlm
        from nsft_ray.preference_collate import PreferenceCollator

        self.model, processor = load_vlm(model_dir, dtype=dtype, device=device)  # once per actor
        self.collate = PreferenceCollator(processor, max_length)
        self.device = device
        self.shared_prefix = shared_prefix  # DPOConfig.shared_prefix: the same numbers either way

    def __call__(self, batch: pa.Table) -> pa.Table:
        from nsft_ray.algorithms.dpo import reference_logps

        inputs = {k: v.to(self.device) for k, v in self.collate(batch.to_pylist()).items()}
        chosen, rejected = reference_logps(self.model, inputs, self.shared_prefix)
        return (batch.append_column("ref_chosen_logps", pa.array(chosen.cpu().numpy()))
                .append_column("ref_rejected_logps", pa.array(rejected.cpu().numpy())))


def with_reference_logps(ds: ray.data.Dataset, cfg: Config, run_dir: Path) -> ray.data.Dataset:
    """`ds` (preference rows) with the reference columns, read back from RUN/ref_logps."""
    out, marker = run_dir / "ref_logps", run_dir / "ref_logps.json"
    model = Path(cfg.model.name_or_path)
    key = {"model": str(model.resolve()) if model.exists() else cfg.model.name_or_path,
           "dtype": cfg.model.dtype, "max_length": cfg.train.max_length,
           "data": [str(Path(p).resolve()) for p in cfg.train.data],
           # Other validation settings keep other rows: the folder must be recomputed.
           "validation": to_dict(cfg.data.validation) if cfg.train.validate else None}
    done = json.loads(marker.read_text()) if marker.exists() else {}
    if done.get("key") != key or not out.is_dir():
        rows = ds.count()
        tmp = run_dir / "ref_logps.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        res = cfg.resources
        ds.map_batches(
            ReferenceLogps,
            fn_constructor_kwargs={"model_dir": cfg.model.name_or_path, "dtype": cfg.model.dtype,
                                   "max_length": cfg.train.max_length,
                                   "device": "cuda" if on_gpus(res) else "cpu",
                                   "shared_prefix": cfg.dpo.shared_prefix},
            batch_size=cfg.dpo.precompute_batch_size, batch_format="pyarrow",
            # The trainer's resources are free until it starts: one actor per future worker.
            compute=ray.data.ActorPoolStrategy(size=cfg.resources.num_workers),
            **worker_options(res),
        ).write_parquet(str(tmp))
        written = ray.data.read_parquet(str(tmp)).count()
        if written != rows:
            raise RuntimeError(f"dpo.precompute_ref: {rows} preference rows in, {written} "
                               f"written to {tmp}; expected every row once")
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)  # the folder appears whole; a crash above leaves only ref_logps.tmp
        marker.write_text(json.dumps({"key": key, "rows": rows}, indent=2))
    ref = ray.data.read_parquet(str(out))
    return ref.materialize() if cfg.train.materialize else ref
