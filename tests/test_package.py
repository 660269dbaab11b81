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
