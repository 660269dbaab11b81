import os
import sys

# Nothing in the test suite may reach a model hub or phone home.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Ray Train collects a worker's report only when its controller polls (2 s by default) and the
# worker blocks until then; the tests log every step (see nsft_ray.ray_glue.runtime.ensure_ray).
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")


RAY_BLOCKER = (
    "import sys\n"
    "class Block:\n"
    "    def find_spec(self, name, path=None, target=None):\n"
    "        if name == 'ray' or name.startswith('ray.'):\n"
    "            raise ImportError('ray is blocked in this test')\n"
    "sys.meta_path.insert(0, Block())\n"
)


def run_with_ray_blocked(code: str):
    """Run `code` in a fresh interpreter where any `import ray` fails; ends by checking that
    nothing imported ray and printing 'ok'. Returns the CompletedProcess."""
    import subprocess
    import sys
    from pathlib import Path

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    script = RAY_BLOCKER + code + "\nassert 'ray' not in sys.modules\nprint('ok')\n"
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300, env=env)


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def ray_session():
    """The one Ray instance the Ray tests share, started by the product's own `ensure_ray`.

    8 logical CPUs (PPO's five roles and the placement tests ask for that many; they share the
    machine's real cores). Started once: each start costs ~8 s. vLLM's CPU KV cache is kept
    small for the vllm-marked tests; PYTHONPATH lets Serve replicas import `serve` from this
    checkout.
    """
    import ray

    from nsft_ray.ray_glue.runtime import ensure_ray

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    os.environ["PYTHONPATH"] = os.pathsep.join(
        p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
    if ray.is_initialized():  # a test module that has its own reasons started one
        ray.shutdown()
    if root not in sys.path:
        sys.path.insert(0, root)
    from serve.app import use_latency_settings

    use_latency_settings()  # the processes run as `nsft-ray serve` runs them (direct ingress...)
    ensure_ray(num_cpus=8)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def train_assets(tmp_path_factory):
    """What the Ray Train and cluster tests train from, built once per session: a tiny ShapesWorld
    (24 train and 6 eval images), a tiny VLM base/ trained tokenizer and all, a value-head reward
    model rm/ on that base, and the nSFT conversations of the world's train pairs nsft.parquet."""
    import pyarrow.parquet as pq

    from nsft_ray.config import Config, WorldConfig
    from nsft_ray.models import VLMWithValueHead, build_tiny_vlm, load_vlm, save_value_model
    from nsft_ray.negatives.pipeline import construct_rows
    from nsft_ray.schema import conversation_table
    from nsft_ray.world import corpus, write_world

    root = tmp_path_factory.mktemp("train_assets")
    wcfg = WorldConfig(n_train=24, n_eval=6, max_objects=3)
    write_world(wcfg, root / "world", seed=0)
    build_tiny_vlm(root / "base", corpus(wcfg, n=200, seed=0))
    base, processor = load_vlm(root / "base")
    save_value_model(VLMWithValueHead(base), root / "rm", processor)
    prefs = pq.read_table(root / "world" / "pref_train.parquet").to_pylist()
    conversations, _ = construct_rows(prefs, Config().negatives)
    pq.write_table(conversation_table(conversations), root / "nsft.parquet")
    return root
