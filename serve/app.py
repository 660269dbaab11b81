"""Ray Serve application: aligned VLMs behind OpenAI-compatible HTTP, plus a playground page.

    nsft-ray serve --model base=runs/base/export --model nsft=runs/nsft/export --port 8000
    nsft-ray serve --config serve/example.yaml

Layout: one `ModelServer` deployment per served model and one `Gateway` deployment (the FastAPI
ingress from serve/api.py). One deployment per model, rather than one holding a dict, because
each model then has its own replicas, autoscaling (driven by its own queue), batching and
resources, a model that crashes or lags does not stall the others, and a replica's memory is one
model. The gateway parses, validates and decodes images once, so the model replicas only generate.
A single model is served by one `DirectModel` deployment instead (`direct: true`, the default):
its replicas are the HTTP ingress and hold the model, so a request makes no gateway -> model hop.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from pathlib import Path

from ray import serve
from ray.serve import Application
from ray.serve.handle import DeploymentHandle

from nsft_ray.config import ConfigError
from serve.api import create_app, resolve_token
from serve.backends import GenRequest, GenResult, make_backend
from serve.batching import Batcher, stream
from serve.config import LimitsConfig, ReplicaConfig, ServeConfig, load_serve_config
from serve.engine_process import EngineProcess
from serve.schemas import ApiError

__all__ = [
    "ModelEngine", "ModelServer", "DirectModel", "Gateway", "HandleEngine", "build_app", "main",
    "APP_NAME", "LATENCY_SETTINGS", "use_latency_settings", "direct_urls",
]

APP_NAME = "nsft-serve"


class ModelEngine:
    """One model; concurrent requests are merged into batches of up to max_batch_size."""

    def __init__(self, backend: str, path: str, limits: LimitsConfig, max_batch_size: int,
                 batch_wait_timeout_s: float, engine_process: bool = True) -> None:
        self.backend = (EngineProcess(backend, path, limits) if engine_process and backend == "hf"
                        else make_backend(backend, path, limits, max_batch_size))
        # hf: serve/batching.py, not @serve.batch: Serve's batcher splits concurrent requests into
        # batches of 1-2 while the model is busy (see that module's docstring). vLLM batches
        # continuously in its own engine process (VLLMBackend): requests go straight to it.
        self.batcher = (None if backend == "vllm" else
                        Batcher(self.backend.generate, max_batch_size, batch_wait_timeout_s))

    async def generate(self, request: GenRequest) -> GenResult | ApiError:
        if self.batcher is None:
            return await self.backend.generate(request)
        return await self.batcher.submit(request)

    async def stream(self, request: GenRequest) -> AsyncIterator:
        """(choice, text piece)s while `request` (stream=True) generates, then its result."""
        items = (self.backend.stream(request) if self.batcher is None
                 else stream(lambda on_text: self.batcher.submit(request, on_text)))
        async with aclosing(items):  # a caller that stops reading ends vLLM's request at once
            async for item in items:
                yield item

    def check_health(self) -> None:
        """Ray Serve calls this periodically; raising makes it replace the replica."""
        if isinstance(self.backend, EngineProcess) and not self.backend.alive():
            raise RuntimeError("the engine process exited; this replica cannot generate")


@serve.deployment
class ModelServer(ModelEngine):
    """A model behind the gateway (several models)."""


class HandleEngine:
    """The Engine interface of serve/api.py over a ModelServer deployment handle."""

    def __init__(self, handle: DeploymentHandle) -> None:
        self.handle = handle

    async def generate(self, request: GenRequest) -> GenResult | ApiError:
        return await self.handle.generate.remote(request)

    async def stream(self, request: GenRequest) -> AsyncIterator:
        # A streaming handle call: the replica's async generator yields across the hop.
        response = self.handle.options(stream=True).stream.remote(request)
        ended = False
        try:
            async for item in response:
                ended = not isinstance(item, tuple)  # the result comes after the (choice, piece)s
                yield item
        finally:
            # A client that disconnected: cancelling the call closes the replica's generator,
            # which stops the request there. Ray Serve also cancels the handle calls of a request
            # it cancels (the HTTP path); this covers a stream closed while its request lives.
            if not ended:
                response.cancel()


@serve.deployment
@serve.ingress()
class Gateway:
    """The FastAPI ingress; the app is built on the replica from handles to the model servers."""

    def __init__(self, models: dict[str, DeploymentHandle], limits: LimitsConfig,
                 auth_token_env: str) -> None:
        engines = {name: HandleEngine(handle) for name, handle in models.items()}
        self._fastapi = create_app(engines, limits, resolve_token(auth_token_env))

    def __serve_build_asgi_app__(self):
        return self._fastapi


@serve.deployment
@serve.ingress()
class DirectModel:
    """One model and the FastAPI ingress in the same replica: requests reach the batcher without
    a gateway -> model call (a serialized request and a reply per request)."""

    def __init__(self, name: str, backend: str, path: str, limits: LimitsConfig,
                 max_batch_size: int, batch_wait_timeout_s: float, auth_token_env: str,
                 engine_process: bool = True) -> None:
        self.engine = ModelEngine(backend, path, limits, max_batch_size, batch_wait_timeout_s,
                                  engine_process)
        self._fastapi = create_app({name: self.engine}, limits, resolve_token(auth_token_env))

    def __serve_build_asgi_app__(self):
        return self._fastapi

    def check_health(self) -> None:
        self.engine.check_health()


# Ray and Ray Serve settings for a latency-bound app, read when Ray starts its processes (so they
# reach the proxy too); measured with benchmarks/bench_serve.py --quick (issue 12).
LATENCY_SETTINGS = {
    # Ray starts workers at nice 15 (background priority): the replicas lost the cores to any
    # other process on the machine, and to an in-process caller at nice 0.
    "RAY_worker_niceness": "0",
    # User code and the handle router on the replica's own event loop: two fewer thread handoffs
    # (each a GIL wait) per request and hop. Our handlers do not block: generation runs in a
    # worker thread (serve/batching.py).
    "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
    "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0",
    # Ray Serve's direct ingress: each ingress replica also serves HTTP on a port of its own
    # (from 30000), so a client that calls it makes no proxy -> replica hop (`direct_urls`).
    # The proxy on `port` still answers as before. At batch 8 on 2 cores: 0.64-0.86x the
    # in-process throughput against 0.54-0.60x through the proxy (benchmarks/README.md).
    "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",
    # A stopping direct-ingress replica stays open 30 s by default so that an external load
    # balancer can drop it; the embedded Ray has none, and Ctrl-C would wait for nothing.
    "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2",
}


def use_latency_settings() -> None:
    """LATENCY_SETTINGS into this process's environment (what is set already wins); call before
    Ray starts. Has no effect on a cluster started elsewhere."""
    for key, value in LATENCY_SETTINGS.items():
        os.environ.setdefault(key, value)


def direct_urls(host: str, app_name: str = APP_NAME) -> list[str]:
    """The HTTP addresses at which `app_name`'s ingress replicas answer without the proxy
    (Ray Serve's direct ingress, LATENCY_SETTINGS); empty when it is off or no replica runs.

    A replica binds to Serve's `host` on its own node: a wildcard host is reached at the
    replica's node address, any other host only for the replicas on this node.
    """
    import ray
    from ray.serve._private.common import REPLICA_ID_FULL_ID_STR_PREFIX
    from ray.serve.context import _get_global_client

    # The controller's list for external load balancers (Ray 2.60 has no public call for it):
    # it names the running ingress replicas and their ports, or the proxies when none runs.
    groups = ray.get(_get_global_client()._controller.get_target_groups.remote(app_name))
    wildcard, here = host in ("0.0.0.0", "::"), ray.util.get_node_ip_address()
    return [f"http://{target.ip if wildcard else host}:{target.port}"
            for group in groups if group.app_name == app_name and group.protocol.value == "HTTP"
            for target in group.targets
            if target.name.startswith(REPLICA_ID_FULL_ID_STR_PREFIX)
            and (wildcard or target.ip == here)]


def _model_options(r: ReplicaConfig) -> dict:
    options: dict = {
        "ray_actor_options": {"num_cpus": r.num_cpus, "num_gpus": r.num_gpus},
        "max_ongoing_requests": r.max_ongoing_requests,
    }
    if r.autoscaling is not None:
        options["autoscaling_config"] = dataclasses.asdict(r.autoscaling)
    else:
        options["num_replicas"] = r.num_replicas
    return options


def _token_env(spec: ServeConfig) -> dict:
    """The bearer token's variable for the ingress replicas; fails here, not in a replica, when
    it is unset. The replica may run on another node: carry the variable, not the environment."""
    token = resolve_token(spec.auth_token_env)
    return {} if token is None else {"runtime_env": {"env_vars": {spec.auth_token_env: token}}}


def build_app(spec: ServeConfig) -> Application:
    """The Serve application for `spec`: Gateway -> one ModelServer per model, or one
    DirectModel for a single model (`direct`)."""
    # Replicas do not share the driver's working directory: pass absolute folders.
    folders = {name: str(Path(path).resolve()) if Path(path).exists() else path
               for name, path in spec.models.items()}
    r = spec.replicas
    if spec.direct and len(folders) == 1:
        [(name, folder)] = folders.items()
        options = _model_options(r)
        options["ray_actor_options"].update(_token_env(spec))
        return DirectModel.options(name=f"model-{name}", **options).bind(
            name, spec.backend, folder, spec.limits, r.max_batch_size, r.batch_wait_timeout_s,
            spec.auth_token_env, r.engine_process)
    models = {name: ModelServer.options(name=f"model-{name}", **_model_options(r)).bind(
        spec.backend, folder, spec.limits, r.max_batch_size, r.batch_wait_timeout_s,
        r.engine_process)
        for name, folder in folders.items()}
    # The gateway only parses and routes: no CPU reservation, so it never waits for a core.
    actor_options: dict = {"num_cpus": 0, **_token_env(spec)}
    # A gateway request stays ongoing while its model generates, so the gateway must admit as many
    # as the model replicas behind it accept; Serve's default (5) starved batches of 8 (issue 12).
    gateway_ongoing = -(-len(models) * r.max_ongoing_requests * r.max_replicas
                        // spec.gateway_replicas)
    gateway = Gateway.options(num_replicas=spec.gateway_replicas, ray_actor_options=actor_options,
                              max_ongoing_requests=gateway_ongoing)
    return gateway.bind(models, spec.limits, spec.auth_token_env)


def _parse_models(items: list[str]) -> dict[str, str]:
    models: dict[str, str] = {}
    for item in items:
        name, eq, path = item.partition("=")
        if not eq or not name or not path:
            raise ConfigError(f"--model {item!r}: expected NAME=DIR, e.g. nsft=runs/nsft/export")
        if name in models:
            raise ConfigError(f"--model {item!r}: the name {name!r} is given twice")
        models[name] = path
    return models


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nsft-ray serve", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", help="serve YAML (see serve/example.yaml)")
    p.add_argument("--model", action="append", default=[], metavar="NAME=DIR",
                   help="a model folder served under NAME (repeatable; replaces the file's models)")
    p.add_argument("--host", default=None, help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="HTTP port (default 8000)")
    p.add_argument("--backend", choices=["hf", "vllm"], default=None)
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    return p


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    """Start Serve with the given models and block until Ctrl-C. Returns the exit code."""
    args = build_parser().parse_args(argv)
    try:
        cfg = load_serve_config(args.config, args.overrides, models=_parse_models(args.model),
                                backend=args.backend, host=args.host, port=args.port)
        remote = bool(os.environ.get("RAY_ADDRESS"))
        missing = [f"models.{n}: {p} does not exist" for n, p in cfg.models.items()
                   if not Path(p).exists()]
        if missing and not remote:  # on a cluster the folders may live on the nodes only
            raise ConfigError("; ".join(missing))
        app = build_app(cfg)
    except (ConfigError, RuntimeError, OSError) as e:
        print(f"nsft-ray serve: {e}", file=sys.stderr)
        return 2
    import ray

    from nsft_ray.ray_glue.runtime import ensure_ray

    # Logical CPUs: enough for every replica even on a 2-core laptop (they share the cores).
    # RAY_ADDRESS (a cluster) wins over this; ensure_ray reads it.
    need = len(cfg.models) * cfg.replicas.num_cpus * cfg.replicas.max_replicas
    use_latency_settings()
    ensure_ray(num_cpus=max(os.cpu_count() or 1, int(need + 0.999)))
    # SIGTERM (docker stop, systemd) shuts down as cleanly as Ctrl-C.
    signal.signal(signal.SIGTERM, _interrupt)
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    url = f"http://{cfg.host}:{cfg.port}"
    try:
        serve.run(app, name=APP_NAME, route_prefix="/")
        print(f"serving {', '.join(cfg.models)} ({cfg.backend}): playground {url}/ , "
              f"OpenAI base_url {url}/v1 ; Ctrl-C stops", flush=True)
        direct = direct_urls(cfg.host)
        if direct:  # the same API without the proxy hop, one address per replica
            print(f"each replica also answers directly (no proxy hop): {' , '.join(direct)}",
                  flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("stopping", flush=True)
    except RuntimeError as e:  # a replica failed to start (its traceback is in the log above)
        print(f"nsft-ray serve: the application did not start: {e}", file=sys.stderr)
        return 1
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
