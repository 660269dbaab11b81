"""The public surface: every module imports, and the core imports with Ray unavailable."""

import importlib
import pkgutil

import nsft_ray


def _modules():
    for info in pkgutil.walk_packages(nsft_ray.__path__, "nsft_ray."):
        yield info.name


def test_every_module_imports():
    names = list(_modules())
    assert "nsft_ray.config" in names and "nsft_ray.schema" in names
    for name in names:
        importlib.import_module(name)


def test_all_names_exist():
    for name in _modules():
        mod = importlib.import_module(name)
        for attr in getattr(mod, "__all__", []):
            assert hasattr(mod, attr), f"{name}.__all__ lists {attr!r}, which is not defined"


def test_core_imports_without_ray():
    """Block `ray` and import every module outside ray_glue: the core must not need a cluster."""
    core = [n for n in _modules() if not n.startswith("nsft_ray.ray_glue")]
    from conftest import run_with_ray_blocked

    out = run_with_ray_blocked(
        "import importlib\n"
        f"for n in {core!r}:\n"
        "    importlib.import_module(n)\n"
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("ok")


def test_top_level_public_surface():
    assert nsft_ray.__all__[0] == "__version__"
    for name in nsft_ray.__all__:
        assert getattr(nsft_ray, name) is not None, name
    assert callable(nsft_ray.load_config) and "nsft" in nsft_ray.ALGORITHMS


def test_core_runs_real_work_with_ray_blocked(tmp_path):
    """Fails if the core reaches into Ray (or ray_glue) when it works, not only when it imports:
    with `ray` blocked, a world is written, build-negatives constructs rows in-process, two sft
    steps of loop.fit run on the world's conversations, and an evaluation pass scores the model."""
    from conftest import run_with_ray_blocked

    out = run_with_ray_blocked(f"""
import pyarrow.parquet as pq, torch
from pathlib import Path
from nsft_ray.algorithms.sft import sft_objective
from nsft_ray.collate import Collator
from nsft_ray.config import EvalConfig, NegativesConfig, OptimConfig, WorldConfig
from nsft_ray.eval import evaluate
from nsft_ray.loop import Hooks, TorchEngine, fit, make_optimizer, make_scheduler
from nsft_ray.models import build_tiny_vlm, load_vlm
from nsft_ray.negatives.pipeline import construct_rows
from nsft_ray.world import corpus, write_world

root = Path({str(tmp_path)!r})
wcfg = WorldConfig(n_train=8, n_val=2, n_eval=3, max_objects=2)
write_world(wcfg, root / "w", seed=0)
conversations, failures = construct_rows(
    pq.read_table(root / "w" / "pref_train.parquet").to_pylist(), NegativesConfig())
assert conversations and len(failures) < 8
model, processor = load_vlm(build_tiny_vlm(root / "m", corpus(wcfg, n=100, seed=0)))
rows = pq.read_table(root / "w" / "sft_train.parquet").to_pylist()[:8]
batches = [Collator(processor, 192)(rows[i:i + 4]) for i in (0, 4)]
opt = make_optimizer(model, OptimConfig())
engine = TorchEngine(model, opt, make_scheduler(opt, OptimConfig(), 2), 1.0)
logs = []
fit(sft_objective(), engine, lambda epoch: batches, total_steps=2, grad_accum=1,
    hooks=Hooks(log=logs.append, log_every=1))
assert len(logs) == 2 and all(torch.isfinite(torch.tensor(m["train/loss"])) for m in logs)
result = evaluate(str(root / "m"), str(root / "w"), EvalConfig(max_images=2, max_new_tokens=4))
assert result["engine"] == "local" and result["n_probes"] > 0
import sys
assert not [m for m in sys.modules if m.startswith("nsft_ray.ray_glue")]
""")
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("ok")
