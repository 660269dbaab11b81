"""Load test for the serving app: N concurrent clients for D seconds against a running server.

    python benchmarks/load_test.py --url http://127.0.0.1:8000 --clients 50 --duration 30 \
        --out runs/load_test.json

Each client sends image + question chat completions back to back until the time is up; a share
of them (--bad-fraction) are deliberately bad (invalid base64, bytes that are not an image,
unknown model, broken JSON) and must be answered with a 4xx. Reports requests/s, latency
percentiles of the good requests, and counts by status class; exits 1 on any 5xx, transport
error, or answer of the wrong class.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import random
import sys
import time
from pathlib import Path

import httpx

__all__ = ["make_payloads", "run_load", "percentile", "main"]


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100) by linear interpolation; nan for no values."""
    if not values:
        return float("nan")
    v = sorted(values)
    pos = (len(v) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def _image_uri(seed: int = 0) -> str:
    from nsft_ray.config import WorldConfig
    from nsft_ray.world import render_png, sample_scene

    png = render_png(sample_scene(random.Random(seed), WorldConfig()))
    return "data:image/png;base64," + base64.b64encode(png).decode()


def make_payloads(model: str, max_tokens: int) -> tuple[bytes, list[bytes]]:
    """-> (a good request body, bad bodies that must each get a 4xx)."""
    def body(url: str, name: str = model) -> dict:
        return {"model": name, "max_tokens": max_tokens, "temperature": 0.0, "messages": [
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": "Describe the picture."}]}]}

    good = body(_image_uri())
    bad = [
        body("data:image/png;base64,@@not base64@@"),
        body("data:image/png;base64," + base64.b64encode(b"these bytes are no image").decode()),
        body(good["messages"][0]["content"][0]["image_url"]["url"], name="no-such-model"),
    ]
    return json.dumps(good).encode(), [json.dumps(b).encode() for b in bad] + [b'{"model": ']


async def _client(
    http: httpx.AsyncClient, url: str, headers: dict, good: bytes, bad: list[bytes],
    bad_fraction: float, deadline: float, rng: random.Random, records: list[tuple],
) -> None:
    while time.perf_counter() < deadline:
        is_bad = rng.random() < bad_fraction
        payload = rng.choice(bad) if is_bad else good
        t0 = time.perf_counter()
        try:
            resp = await http.post(url, content=payload, headers=headers)
            status = resp.status_code
        except httpx.HTTPError:
            status = 0  # transport error: no HTTP answer at all
        records.append((is_bad, status, time.perf_counter() - t0))


async def _run(url: str, model: str, clients: int, duration: float, max_tokens: int,
               bad_fraction: float, token: str | None, seed: int) -> dict:
    good, bad = make_payloads(model, max_tokens)
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    records: list[tuple] = []
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(limits=limits, timeout=120.0) as http:
        endpoint = url.rstrip("/") + "/v1/chat/completions"
        t0 = time.perf_counter()
        await asyncio.gather(*(
            _client(http, endpoint, headers, good, bad, bad_fraction, t0 + duration,
                    random.Random(seed + i), records)
            for i in range(clients)
        ))
        elapsed = time.perf_counter() - t0
    ok_latency = [lat for is_bad, status, lat in records if not is_bad and status == 200]
    count = {k: 0 for k in ("2xx", "4xx", "5xx", "transport", "wrong_class")}
    for is_bad, status, _ in records:
        key = "transport" if status == 0 else f"{status // 100}xx"
        count[key] = count.get(key, 0) + 1
        if (is_bad and not 400 <= status < 500) or (not is_bad and status != 200):
            count["wrong_class"] += 1
    return {
        "url": url, "model": model, "clients": clients, "duration_s": duration,
        "max_tokens": max_tokens, "bad_fraction": bad_fraction,
        "elapsed_s": round(elapsed, 3), "requests": len(records),
        "bad_requests": sum(r[0] for r in records),
        "requests_per_s": round(len(records) / elapsed, 2),
        "ok_requests_per_s": round(len(ok_latency) / elapsed, 2),
        "latency_ms": {f"p{q}": round(1000 * percentile(ok_latency, q), 1) for q in (50, 90, 99)},
        "status": count,
    }


def run_load(
    url: str, model: str = "", *, clients: int = 50, duration: float = 30.0, max_tokens: int = 16,
    bad_fraction: float = 0.1, token: str | None = None, seed: int = 0,
) -> dict:
    """Run the load test; `model` empty: the first of the server's /v1/models."""
    if clients < 1 or duration <= 0 or not 0 <= bad_fraction <= 1:
        raise ValueError(f"clients={clients}, duration={duration}, bad_fraction={bad_fraction}: "
                         "expected clients >= 1, duration > 0, 0 <= bad_fraction <= 1")
    if not model:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        listing = httpx.get(url.rstrip("/") + "/v1/models", headers=headers, timeout=30.0)
        listing.raise_for_status()
        model = listing.json()["data"][0]["id"]
    return asyncio.run(_run(url, model, clients, duration, max_tokens, bad_fraction, token, seed))


def print_table(r: dict) -> None:
    s, lat = r["status"], r["latency_ms"]
    rows = [
        ("clients x seconds", f"{r['clients']} x {r['duration_s']:g}"),
        ("requests (bad)", f"{r['requests']} ({r['bad_requests']})"),
        ("requests/s (all, ok)", f"{r['requests_per_s']}, {r['ok_requests_per_s']}"),
        ("latency p50/p90/p99 ms", f"{lat['p50']} / {lat['p90']} / {lat['p99']}"),
        ("2xx / 4xx / 5xx", f"{s['2xx']} / {s['4xx']} / {s['5xx']}"),
        ("transport errors", str(s["transport"])),
        ("wrong status class", str(s["wrong_class"])),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--model", default="", help="served name (default: the first listed)")
    p.add_argument("--clients", type=int, default=50)
    p.add_argument("--duration", type=float, default=30.0, help="seconds")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--bad-fraction", type=float, default=0.1)
    p.add_argument("--token-env", default="", help="environment variable holding the token")
    p.add_argument("--out", default="", help="JSON file to write")
    args = p.parse_args(argv)
    token = os.environ.get(args.token_env) if args.token_env else None
    result = run_load(args.url, args.model, clients=args.clients, duration=args.duration,
                      max_tokens=args.max_tokens, bad_fraction=args.bad_fraction, token=token)
    print_table(result)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
        print(f"# written to {args.out}")
    s = result["status"]
    return 1 if s["5xx"] or s["transport"] or s["wrong_class"] else 0


if __name__ == "__main__":
    sys.exit(main())
