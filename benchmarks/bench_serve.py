"""Serving overhead: requests/s and latency through HTTP (Ray Serve) versus calling the same model
in-process, at equal batch size, in one run.

    python benchmarks/bench_serve.py --model-dir runs/tiny_vlm --batch 8 --requests 64 \
        --out runs/bench_serve.json

in-process: the backend's generate() on batches of exactly `--batch` requests, built from the same
JSON body the HTTP clients send (parse -> validate -> decode image -> generate).
http: `--batch` concurrent clients against a Serve app whose model deployment batches up to
`--batch` requests (max_batch_size); one replica with `--threads` CPUs (the in-process side runs
with as many torch threads). Batches fill from concurrent arrivals, so a server batch can be
smaller than `--batch` when a client is between requests.
Without --model-dir a tiny Idefics3 model is built into a temporary folder.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository's packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx  # noqa: E402

from benchmarks.load_test import make_payloads, percentile  # noqa: E402

__all__ = ["bench_in_process", "bench_http", "run_bench", "main"]

MODEL = "bench"


def _summary(mode: str, batch: int, latencies: list[float], elapsed: float) -> dict:
    return {
        "mode": mode, "batch": batch, "requests": len(latencies),
        "requests_per_s": round(len(latencies) / elapsed, 2),
        "p50_ms": round(1000 * percentile(latencies, 50), 1),
        "p99_ms": round(1000 * percentile(latencies, 99), 1),
    }


def bench_in_process(model_dir: str, backend: str, batch: int, requests: int,
                     max_tokens: int, threads: int) -> dict:
    """The backend called directly with batches of `batch` requests; latency = its batch's time."""
    import torch

    from serve.api import parse_request, to_gen_request
    from serve.backends import make_backend
    from serve.config import LimitsConfig

    # The replica gets `threads` CPUs (Ray sets OMP_NUM_THREADS to match): the same compute here.
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    limits = LimitsConfig()
    engine = make_backend(backend, model_dir, limits)
    good, _ = make_payloads(MODEL, max_tokens)
    for _ in range(3):  # warm-up: first calls allocate and tune kernels
        engine.generate([to_gen_request(parse_request(good), limits)] * batch)
    latencies: list[float] = []
    t0 = time.perf_counter()
    while len(latencies) < requests:
        t = time.perf_counter()
        # Each request is parsed and decoded like the gateway does, inside the timing.
        results = engine.generate([to_gen_request(parse_request(good), limits)
                                   for _ in range(batch)])
        if any(not hasattr(r, "choices") for r in results):
            raise RuntimeError(f"in-process generate failed: {results}")
        latencies += [time.perf_counter() - t] * batch
    elapsed = time.perf_counter() - t0
    torch.set_num_threads(previous)
    return _summary("in-process", batch, latencies, elapsed)


def bench_http(url: str, model: str, batch: int, requests: int, max_tokens: int) -> dict:
    """`batch` concurrent clients sending `requests` in total; latency per HTTP request."""
    good, _ = make_payloads(model, max_tokens)
    endpoint = url.rstrip("/") + "/v1/chat/completions"
    headers = {"Content-Type": "application/json"}
    with httpx.Client(timeout=120.0) as warm:
        for _ in range(2):
            warm.post(endpoint, content=good, headers=headers).raise_for_status()

    def client(n: int) -> list[float]:
        out = []
        with httpx.Client(timeout=120.0) as http:
            for _ in range(n):
                t = time.perf_counter()
                http.post(endpoint, content=good, headers=headers).raise_for_status()
                out.append(time.perf_counter() - t)
        return out

    shares = [requests // batch + (i < requests % batch) for i in range(batch)]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=batch) as pool:
        latencies = [lat for part in pool.map(client, shares) for lat in part]
    return _summary("http (Ray Serve)", batch, latencies, time.perf_counter() - t0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_serve(model_dir: str, model: str, backend: str, batch: int, threads: int) -> str:
    import ray
    from ray import serve

    from serve.app import APP_NAME, build_app
    from serve.config import load_serve_config

    if not ray.is_initialized():
        # Workers must import `serve` even when the package is used from a source checkout.
        root = str(Path(__file__).resolve().parents[1])
        os.environ["PYTHONPATH"] = os.pathsep.join(
            p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
        ray.init(num_cpus=4, include_dashboard=False)
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    cfg = load_serve_config(models={model: model_dir}, backend=backend, port=port, overrides=[
        f"replicas.max_batch_size={batch}", f"replicas.max_ongoing_requests={max(32, batch)}",
        f"replicas.num_cpus={threads}"])
    serve.run(build_app(cfg), name=APP_NAME, route_prefix="/")
    return f"http://127.0.0.1:{port}"


def run_bench(model_dir: str, *, backend: str = "hf", batch: int = 8, requests: int = 64,
              max_tokens: int = 16, threads: int = 1, url: str = "", model: str = MODEL) -> dict:
    """Both modes on the same model, served as `model` (at `url` if given, else started here)."""
    inproc = bench_in_process(model_dir, backend, batch, requests, max_tokens, threads)
    started = not url
    if started:
        url = _start_serve(model_dir, model, backend, batch, threads)
    try:
        http = bench_http(url, model, batch, requests, max_tokens)
    finally:
        if started:
            from ray import serve

            serve.shutdown()
    return {
        "model_dir": model_dir, "backend": backend, "max_tokens": max_tokens, "threads": threads,
        "results": [inproc, http],
        "http_overhead_p50_ms": round(http["p50_ms"] - inproc["p50_ms"], 1),
        "http_throughput_ratio": round(http["requests_per_s"] / inproc["requests_per_s"], 3),
    }


def print_table(report: dict) -> None:
    cols = ("mode", "batch", "requests", "requests_per_s", "p50_ms", "p99_ms")
    rows = [[str(r[c]) for c in cols] for r in report["results"]]
    widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(cols)]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True)))
    for row in rows:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)))
    print(f"http overhead at p50: {report['http_overhead_p50_ms']} ms; "
          f"http / in-process throughput: {report['http_throughput_ratio']}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-dir", default="", help="HF folder (default: build a tiny VLM)")
    p.add_argument("--backend", choices=["hf", "vllm"], default="hf")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads in-process = CPUs of the Serve replica")
    p.add_argument("--url", default="", help="use this running server instead of starting Ray "
                   "Serve (it must serve --model-dir as --model)")
    p.add_argument("--model", default=MODEL, help="served name of the model")
    p.add_argument("--out", default="", help="JSON file to write")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model_dir = args.model_dir
    if not model_dir:
        from nsft_ray.config import WorldConfig
        from nsft_ray.models import build_tiny_vlm
        from nsft_ray.world import corpus

        model_dir = str(build_tiny_vlm(Path(tempfile.mkdtemp()) / "tiny_vlm",
                                       corpus(WorldConfig(), n=300, seed=0)))
    report = run_bench(str(Path(model_dir).resolve()), backend=args.backend, batch=args.batch,
                       requests=args.requests, max_tokens=args.max_tokens,
                       threads=args.threads, url=args.url, model=args.model)
    print_table(report)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2))
        print(f"# written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
