"""Serving overhead: requests/s and latency through HTTP (Ray Serve) versus calling the same model
in-process, at equal batch size, in one run.

    python benchmarks/bench_serve.py --model-dir runs/tiny_vlm --batch 8 --requests 64 \
        --out runs/bench_serve.json
    python benchmarks/bench_serve.py --quick --out runs/bench_serve_quick.json

in-process: the backend's generate() on batches of exactly `--batch` requests, built from the same
JSON body the HTTP clients send (parse -> validate -> decode image -> generate).
http: `--batch` concurrent clients against a Serve app whose model deployment batches up to
`--batch` requests (max_batch_size); one replica with `--threads` CPUs (the in-process side runs
with as many torch threads). Batches fill from concurrent arrivals, so a server batch can be
smaller than `--batch` when a client is between requests.
Without --model-dir an Idefics3 model of `--size` (tiny or small) is built into a temporary folder.
http goes to the ingress replica's own port (Ray Serve's direct ingress, as `nsft-ray serve` prints
it) unless --via-proxy sends it through Serve's proxy.
--quick: Ray Serve started once; `--repeats` interleaved repeats of (in-process, http with
--clients, default 2 x --batch, http with exactly --batch clients) at --batch and of (in-process,
http) at batch 1. The JSON's `ratios.serve_http_vs_in_process` (2 x --batch clients: a full batch
always queued, as the in-process side always has its next batch ready),
`ratios.serve_http_vs_in_process_closed_loop` (--batch clients: the model idles for each round
trip) and `p50_overhead_ms_batch1` are taken between the medians. `outputs_agree`: every round
returned the in-process side's greedy texts. `stream`: one client's streamed requests ("stream":
true) with 64 new tokens, the time to the first text chunk against the time to the whole answer,
and whether the streamed text equals the whole answer's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository's packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx  # noqa: E402

from benchmarks.load_test import make_payloads, percentile  # noqa: E402

__all__ = ["InProcess", "bench_in_process", "bench_http", "bench_stream", "run_bench", "run_quick",
           "main"]

MODEL = "bench"


def _summary(mode: str, batch: int, latencies: list[float], elapsed: float) -> dict:
    return {
        "mode": mode, "batch": batch, "requests": len(latencies),
        "requests_per_s": round(len(latencies) / elapsed, 2),
        "p50_ms": round(1000 * percentile(latencies, 50), 1),
        "p99_ms": round(1000 * percentile(latencies, 99), 1),
    }


class InProcess:
    """The backend loaded in this process with `threads` torch threads, as a replica runs it."""

    def __init__(self, model_dir: str, backend: str, threads: int, batch: int = 0) -> None:
        import torch

        from serve.backends import make_backend
        from serve.config import LimitsConfig

        # The replica gets `threads` CPUs and as many torch threads: the same compute here.
        torch.set_num_threads(threads)
        self.limits = LimitsConfig()
        self.engine = make_backend(backend, model_dir, self.limits, batch)
        # vLLM's AsyncLLM keeps a task on the loop of its first call: one loop for every call.
        self.loop = asyncio.new_event_loop() if backend == "vllm" else None

    def generate(self, body: bytes, batch: int) -> list[str]:
        """`batch` copies of the JSON `body`, parsed, validated and decoded like the gateway
        does, generated as one batch (vllm: sent together); -> the first choice's text of each."""
        from serve.api import parse_request, to_gen_request

        requests = [to_gen_request(parse_request(body), self.limits) for _ in range(batch)]
        if self.loop is not None:
            async def together() -> list:
                return await asyncio.gather(*(self.engine.generate(r) for r in requests))

            results = self.loop.run_until_complete(together())
        else:
            results = self.engine.generate(requests)
        if any(not hasattr(r, "choices") for r in results):
            raise RuntimeError(f"in-process generate failed: {results}")
        return [r.choices[0][0] for r in results]

    def close(self) -> None:
        """Stop vLLM's engine (its engine-core process and the loop's task)."""
        if self.loop is not None:
            self.engine.close()
            pending = asyncio.all_tasks(self.loop)
            for task in pending:
                task.cancel()
            self.loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            self.loop.close()


def bench_in_process(local: InProcess, batch: int, requests: int, max_tokens: int,
                     warmup: int = 3) -> dict:
    """Batches of exactly `batch` requests; latency = its batch's time (parsing included)."""
    good, _ = make_payloads(MODEL, max_tokens)
    for _ in range(warmup):  # first calls allocate and tune kernels
        local.generate(good, batch)
    latencies: list[float] = []
    texts: set[str] = set()
    t0 = time.perf_counter()
    while len(latencies) < requests:
        t = time.perf_counter()
        texts.update(local.generate(good, batch))
        latencies += [time.perf_counter() - t] * batch
    elapsed = time.perf_counter() - t0
    return {**_summary("in-process", batch, latencies, elapsed), "texts": sorted(texts)}


def bench_http(url: str, model: str, batch: int, requests: int, max_tokens: int,
               warmup: int = 2, clients: int = 0) -> dict:
    """`clients` (default `batch`) concurrent closed-loop clients sending `requests` in total
    against a server batching up to `batch`; latency per HTTP request."""
    clients = clients or batch
    good, _ = make_payloads(model, max_tokens)
    endpoint = url.rstrip("/") + "/v1/chat/completions"
    headers = {"Content-Type": "application/json"}
    with httpx.Client(timeout=120.0) as warm:
        for _ in range(warmup):
            warm.post(endpoint, content=good, headers=headers).raise_for_status()

    def client(http: httpx.Client, n: int) -> list[tuple[float, str]]:
        out = []
        for _ in range(n):
            t = time.perf_counter()
            r = http.post(endpoint, content=good, headers=headers)
            r.raise_for_status()
            out.append((time.perf_counter() - t, r.json()["choices"][0]["message"]["content"]))
        return out

    shares = [requests // clients + (i < requests % clients) for i in range(clients)]
    # Clients made and connected before the clock starts, as a load generator's keep-alive pool
    # is: an httpx.Client builds an SSL context (the CA bundle) when it is made, 50-100 ms of CPU
    # each, which py-spy showed taking 56% of the load generator's samples inside the timed
    # window, on the cores the server needs; the first request of each also opened its TCP
    # connection inside the window.
    sessions = [httpx.Client(timeout=120.0) for _ in range(clients)]
    try:
        for http in sessions:
            http.get(url.rstrip("/") + "/health").raise_for_status()
        t0 = time.perf_counter()
        with ThreadPoolExecutor(max_workers=clients) as pool:
            done = [item for part in pool.map(client, sessions, shares) for item in part]
        elapsed = time.perf_counter() - t0
    finally:
        for http in sessions:
            http.close()
    summary = _summary("http (Ray Serve)", batch, [lat for lat, _ in done], elapsed)
    return {**summary, "clients": clients, "texts": sorted({text for _, text in done})}


def bench_stream(url: str, model: str, requests: int, max_tokens: int) -> dict:
    """One client's streamed requests, one at a time: the time to the first text chunk and to
    [DONE], the text chunks per answer, and the streamed text against a non-streamed answer."""
    good = json.loads(make_payloads(model, max_tokens)[0])
    endpoint = url.rstrip("/") + "/v1/chat/completions"
    first, whole, pieces, texts = [], [], [], set()
    with httpx.Client(timeout=120.0) as http:
        answer = http.post(endpoint, json=good).json()["choices"][0]["message"]["content"]
        for _ in range(requests + 1):  # the first warms the path
            t0, t_first, text, n = time.perf_counter(), None, "", 0
            with http.stream("POST", endpoint, json={**good, "stream": True}) as r:
                r.raise_for_status()
                for line in r.iter_lines():
                    if not line.startswith("data: {"):
                        continue
                    for choice in json.loads(line[len("data: "):])["choices"]:
                        piece = choice["delta"].get("content")
                        if piece:
                            t_first, text, n = t_first or time.perf_counter(), text + piece, n + 1
            first.append((t_first or time.perf_counter()) - t0)
            whole.append(time.perf_counter() - t0)
            pieces.append(n)
            texts.add(text)
    return {"requests": requests, "max_tokens": max_tokens,
            "first_text_p50_ms": round(1000 * percentile(first[1:], 50), 1),
            "whole_p50_ms": round(1000 * percentile(whole[1:], 50), 1),
            "text_pieces_per_answer": statistics.median(pieces[1:]),
            "text_equal": texts == {answer}}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_serve(model_dir: str, model: str, backend: str, batch: int, threads: int,
                 overrides: tuple[str, ...] = (), via_proxy: bool = False,
                 versus: tuple[str, ...] = ()) -> tuple[str, str, str]:
    """Serve the model (serve config `overrides` last); return the URL the clients call, which
    endpoint it is (the ingress replica's own port, direct ingress as `nsft-ray serve` prints
    it, or Serve's proxy) and, with `versus`, the URL of a second app "versus" that serves the
    same model with `versus` added to the overrides ("" without)."""
    import ray
    from ray import serve

    from nsft_ray.ray_glue.runtime import ray_log_dir
    from serve.app import use_latency_settings

    if not ray.is_initialized():
        # Workers must import `serve` even when the package is used from a source checkout.
        root = str(Path(__file__).resolve().parents[1])
        os.environ["PYTHONPATH"] = os.pathsep.join(
            p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
        # The settings `nsft-ray serve` uses; among them the replicas' priority, which equals the
        # in-process side's (the driver's) only with this.
        use_latency_settings()
        # The replicas' logs (an access-log line per request) stay in Ray's log folder instead
        # of being printed here: thousands of lines per run, and printed by a thread of this
        # process, the load generator's, on the cores the server needs.
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
        print(f"Ray's logs (the replicas' included): {ray_log_dir()}", flush=True)
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    base = (model_dir, model, backend, batch, threads, port, via_proxy)
    url, endpoint = _deploy(*base, overrides, "")
    return url, endpoint, _deploy(*base, (*overrides, *versus), "versus")[0] if versus else ""


def _deploy(model_dir: str, model: str, backend: str, batch: int, threads: int, port: int,
            via_proxy: bool, overrides: tuple[str, ...], name: str) -> tuple[str, str]:
    """One Serve app for the model, at route prefix /`name` (the main app at /)."""
    from ray import serve

    from serve.app import APP_NAME, build_app, direct_urls
    from serve.config import load_serve_config

    cfg = load_serve_config(models={model: model_dir}, backend=backend, port=port, overrides=[
        f"replicas.max_batch_size={batch}", f"replicas.max_ongoing_requests={max(32, batch)}",
        f"replicas.num_cpus={threads}", *overrides])
    app_name, prefix = name or APP_NAME, f"/{name}" if name else ""
    serve.run(build_app(cfg), name=app_name, route_prefix=prefix or "/")
    replicas = [] if via_proxy else direct_urls("127.0.0.1", app_name)
    if len(replicas) == 1:
        return replicas[0] + prefix, "replica (direct ingress)"
    return f"http://127.0.0.1:{port}{prefix}", "proxy"


def _stop_serve() -> None:
    from ray import serve

    serve.shutdown()


def _ratio(http: dict, inproc: dict) -> float:
    return round(http["requests_per_s"] / inproc["requests_per_s"], 3)


def run_bench(model_dir: str, *, backend: str = "hf", batch: int = 8, requests: int = 64,
              max_tokens: int = 16, threads: int = 1, url: str = "", model: str = MODEL,
              clients: int = 0, overrides: tuple[str, ...] = (), via_proxy: bool = False) -> dict:
    """Both modes once on the same model, served as `model` (at `url` if given, else started
    here); `clients` concurrent HTTP clients (default `batch`)."""
    import torch

    previous = torch.get_num_threads()
    local = InProcess(model_dir, backend, threads, batch)
    try:
        inproc = bench_in_process(local, batch, requests, max_tokens)
    finally:
        local.close()
        torch.set_num_threads(previous)
    started, endpoint = not url, "--url"
    if started:
        url, endpoint, _ = _start_serve(model_dir, model, backend, batch, threads, overrides,
                                        via_proxy)
    try:
        http = bench_http(url, model, batch, requests, max_tokens, clients=clients)
    finally:
        if started:
            _stop_serve()
    return {
        "model_dir": model_dir, "backend": backend, "max_tokens": max_tokens, "threads": threads,
        "serve_overrides": list(overrides), "endpoint": endpoint,
        "results": [inproc, http],
        "outputs_agree": inproc["texts"] == http["texts"],
        "http_overhead_p50_ms": round(http["p50_ms"] - inproc["p50_ms"], 1),
        "http_throughput_ratio": _ratio(http, inproc),
        "ratios": {"serve_http_vs_in_process": _ratio(http, inproc)},
    }


def _median_row(rows: list[dict]) -> dict:
    """The per-key median of repeats of one mode at one batch."""
    out = {k: rows[0][k] for k in ("mode", "batch", "requests", "clients") if k in rows[0]}
    for key in ("requests_per_s", "p50_ms", "p99_ms"):
        out[key] = round(statistics.median(r[key] for r in rows), 2)
    out["repeats"] = len(rows)
    return out


def _quick_rounds(batch: int, requests: int, requests_batch1: int, clients: int,
                  versus: bool) -> list[tuple[str, int, int, int]]:
    """One repeat's rounds as (mode, batch, requests, clients): at `batch`, in-process, HTTP
    with `clients` (saturating), the "versus" app's HTTP likewise when there is one, and HTTP
    with exactly `batch` clients (closed loop); at batch 1, in-process and one HTTP client."""
    rounds = [("in-process", batch, requests, 0), ("http", batch, requests, clients)]
    if versus:
        rounds.append(("versus", batch, requests, clients))
    if clients != batch:
        rounds.append(("http", batch, requests, batch))
    if batch != 1:
        rounds += [("in-process", 1, requests_batch1, 0), ("http", 1, requests_batch1, 1)]
    return rounds


def run_quick(model_dir: str, *, backend: str = "hf", batch: int = 8, requests: int = 256,
              requests_batch1: int = 16, max_tokens: int = 16, threads: int = 1,
              repeats: int = 5, url: str = "", model: str = MODEL, clients: int = 0,
              overrides: tuple[str, ...] = (), via_proxy: bool = False,
              versus: tuple[str, ...] = (), stream_max_tokens: int = 64) -> dict:
    """`repeats` interleaved repeats of `_quick_rounds`, then `bench_stream`; one Serve app for
    all (and a second, "versus", with the `versus` overrides, measured in the same repeats).
    Ratios and overheads are taken between the medians. `clients` defaults to 2 x `batch`: a
    closed-loop client waits for its answer, so with only `batch` of them the model idles for
    every round trip, while the in-process side, whose next batch is always ready, measures
    capacity."""
    import torch

    if url and versus:
        raise ValueError("versus: a second app is served only by a Serve started here; drop "
                         "--url or --versus")
    clients = clients or 2 * batch
    previous = torch.get_num_threads()
    local = InProcess(model_dir, backend, threads, batch)
    started, endpoint, urls = not url, "--url", {"http": url}
    if started:
        urls["http"], endpoint, urls["versus"] = _start_serve(
            model_dir, model, backend, batch, threads, overrides, via_proxy, versus)
    rounds = _quick_rounds(batch, requests, requests_batch1, clients, bool(versus))
    raw: dict[tuple[str, int, int], list[dict]] = {}
    try:
        for mode, b, _, c in rounds:  # warm every round's path before any timing
            if mode == "in-process":
                bench_in_process(local, b, b, max_tokens, warmup=2)
            else:
                bench_http(urls[mode], model, b, c, max_tokens, warmup=2, clients=c)
        for _ in range(repeats):
            for mode, b, n, c in rounds:
                raw.setdefault((mode, b, c), []).append(
                    bench_in_process(local, b, n, max_tokens, warmup=0) if mode == "in-process"
                    else bench_http(urls[mode], model, b, n, max_tokens, warmup=0, clients=c))
        streamed = bench_stream(urls["http"], model, requests_batch1, stream_max_tokens)
    finally:
        local.close()
        torch.set_num_threads(previous)
        if started:
            _stop_serve()
    report = _quick_report(raw, batch, clients, model_dir=model_dir, backend=backend,
                           max_tokens=max_tokens, threads=threads, repeats=repeats,
                           serve_overrides=list(overrides), endpoint=endpoint)
    report["stream"] = streamed
    if versus:
        report["versus"] = _versus_report(raw, batch, clients, versus)
    return report


def _quick_report(raw: dict, batch: int, clients: int, **meta) -> dict:
    med = {key: _median_row(rows) for key, rows in raw.items()}
    texts = {key: sorted({t for r in rows for t in r["texts"]}) for key, rows in raw.items()}
    agree = all(t == texts[("in-process", key[1], 0)] for key, t in texts.items())
    inproc, inproc1 = med[("in-process", batch, 0)], med[("in-process", 1, 0)]
    ratios = {"serve_http_vs_in_process": _ratio(med[("http", batch, clients)], inproc)}
    if ("http", batch, batch) in med:
        ratios["serve_http_vs_in_process_closed_loop"] = _ratio(med[("http", batch, batch)],
                                                                inproc)
    return {
        "quick": True, **meta, "clients": clients,
        "results": [med[k] for k in med if k[0] != "versus"],
        "raw": {f"{m}@{b}" + (f"x{c}" if c else ""):
                [{k: r[k] for k in ("requests_per_s", "p50_ms", "p99_ms")} for r in rows]
                for (m, b, c), rows in raw.items()},
        "outputs_agree": agree,
        "http_overhead_p50_ms": round(med[("http", batch, clients)]["p50_ms"]
                                      - inproc["p50_ms"], 1),
        "p50_overhead_ms_batch1": round(med[("http", 1, 1)]["p50_ms"] - inproc1["p50_ms"], 1),
        "ratios": ratios,
    }


def _versus_report(raw: dict, batch: int, clients: int, versus: tuple[str, ...]) -> dict:
    """The second app against the first, repeat by repeat (each pair ran back to back, so the
    machine's drift between repeats cancels), and against in-process."""
    ours, theirs = raw[("http", batch, clients)], raw[("versus", batch, clients)]
    inproc = _median_row(raw[("in-process", batch, 0)])
    pairs = [v["requests_per_s"] / h["requests_per_s"] for h, v in zip(ours, theirs, strict=True)]
    return {
        "overrides": list(versus),
        "requests_per_s": _median_row(theirs)["requests_per_s"],
        "vs_in_process": _ratio(_median_row(theirs), inproc),
        "vs_http_per_repeat": [round(x, 3) for x in pairs],
        "vs_http_median": round(statistics.median(pairs), 3),
    }


def print_table(report: dict) -> None:
    cols = ("mode", "batch", "clients", "requests", "requests_per_s", "p50_ms", "p99_ms")
    rows = [[str(r.get(c, "")) for c in cols] for r in report["results"]]
    widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(cols)]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True)))
    for row in rows:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)))
    if report.get("quick"):
        print(f"medians of {report['repeats']} interleaved repeats; p50 overhead at batch 1: "
              f"{report['p50_overhead_ms_batch1']} ms")
    if "stream" in report:
        st = report["stream"]
        print(f"streamed ({st['max_tokens']} tokens, 1 client): first text at "
              f"{st['first_text_p50_ms']} ms, whole answer at {st['whole_p50_ms']} ms (p50), "
              f"{st['text_pieces_per_answer']} pieces per answer; equals the whole answer: "
              f"{st['text_equal']}")
    if "versus" in report:
        v = report["versus"]
        print(f"versus ({' '.join(v['overrides'])}): {v['requests_per_s']} req/s, "
              f"{v['vs_in_process']} of in-process; against http, repeat by repeat: "
              f"median {v['vs_http_median']} ({v['vs_http_per_repeat']})")
    ratios = ", ".join(f"{k} {v}" for k, v in report["ratios"].items())
    print(f"http clients called the {report['endpoint']}; http overhead at p50: "
          f"{report['http_overhead_p50_ms']} ms; {ratios}; "
          f"outputs agree: {report['outputs_agree']}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-dir", default="", help="HF folder (default: build a VLM of --size)")
    p.add_argument("--size", choices=["tiny", "small"], default="tiny",
                   help="the Idefics3 build when there is no --model-dir (small: ~36M parameters)")
    p.add_argument("--backend", choices=["hf", "vllm"], default="hf")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--requests", type=int, default=256,
                   help="requests per round at --batch (256: 32 batches of 8, so that a round's "
                   "ramp-up and drain are a small part of it)")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads in-process = CPUs of the Serve replica")
    p.add_argument("--url", default="", help="use this running server instead of starting Ray "
                   "Serve (it must serve --model-dir as --model)")
    p.add_argument("--model", default=MODEL, help="served name of the model")
    p.add_argument("--quick", action="store_true",
                   help="medians of --repeats interleaved rounds at --batch and at batch 1, one "
                   "Serve app for all (under 4 minutes on 2 cores)")
    p.add_argument("--repeats", type=int, default=5, help="rounds per mode with --quick")
    p.add_argument("--requests-batch1", type=int, default=16,
                   help="requests per round at batch 1 with --quick")
    p.add_argument("--clients", type=int, default=0,
                   help="concurrent closed-loop HTTP clients at --batch (default: --batch without "
                   "--quick; 2x --batch with it, which keeps a full batch queued as the "
                   "in-process side always has one; --quick also runs exactly --batch clients, "
                   "with which the model idles for every round trip)")
    p.add_argument("--gateway", action="store_true",
                   help="serve through the gateway deployment (direct=false, the layout of "
                        "several models) instead of the model replica as its own ingress")
    p.add_argument("--via-proxy", action="store_true",
                   help="send the HTTP clients to Serve's proxy (the `port` address) instead of "
                        "the ingress replica's own direct-ingress port")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="serve config override for the served app (repeatable), e.g. "
                        "replicas.engine_process=false to generate in the replica's process")
    p.add_argument("--versus", action="append", default=[], metavar="KEY=VALUE",
                   help="with --quick: also serve the model as a second app with this override "
                        "(repeatable) and measure it in the same repeats, e.g. "
                        "replicas.engine_process=false")
    p.add_argument("--out", default="", help="JSON file to write")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model_dir = args.model_dir
    if not model_dir:
        from nsft_ray.config import WorldConfig
        from nsft_ray.models import build_tiny_vlm
        from nsft_ray.world import corpus

        model_dir = str(build_tiny_vlm(Path(tempfile.mkdtemp()) / f"{args.size}_vlm",
                                       corpus(WorldConfig(), n=300, seed=0), size=args.size))
    common = dict(backend=args.backend, batch=args.batch, requests=args.requests,
                  max_tokens=args.max_tokens, threads=args.threads, url=args.url,
                  model=args.model, clients=args.clients, via_proxy=args.via_proxy,
                  overrides=tuple(["direct=false"] * args.gateway + args.set))
    model_dir = str(Path(model_dir).resolve())
    if args.quick:
        report = run_quick(model_dir, repeats=args.repeats, versus=tuple(args.versus),
                           requests_batch1=args.requests_batch1, **common)
    else:
        report = run_bench(model_dir, **common)
    print_table(report)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2))
        print(f"# written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
