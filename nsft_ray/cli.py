"""The `nsft-ray` console script.

    nsft-ray world --out DIR [--config FILE] [key=value ...]
    nsft-ray init-model --out DIR [--size tiny|small] [--arch idefics3|llava] [key=value ...]
    nsft-ray build-negatives --input PREFERENCE_PARQUET --out DIR [--config FILE] [key=value ...]
    nsft-ray train --algo sft|nsft|dpo|reward|ppo --config FILE [key=value ...]   (run.dir)
    nsft-ray eval --model DIR --data WORLD_DIR [--out DIR]   (+ eval.pope=... eval.amber=...)
    nsft-ray compare --config FILE --out DIR [key=value ...]
    nsft-ray plan --config FILE --cluster cluster.yaml [--algo A] [key=value ...]  (exit 1: no fit)
    nsft-ray serve --model base=DIR --model nsft=DIR [--port 8000]  (or --config FILE)
    nsft-ray submit [--address URL] -- python jobs/train.py ...     (exit code = job status)
    nsft-ray demo --out runs/demo
    nsft-ray data inspect PATH [--rows N] [key=value ...]   (e.g. data.format=auto)
    nsft-ray data convert PATH --out DIR [key=value ...]    (to our preference Parquet)

Every command loads the typed config (YAML + dotted overrides), prints the resolved config, saves it
in its output folder, and calls one library function. Heavy imports happen inside the commands so
`nsft-ray --help` stays fast.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from nsft_ray.config import (
    Config,
    ConfigError,
    absolute_paths,
    load_config,
    save_config,
)

__all__ = ["main", "build_parser"]


def _resolved(args: argparse.Namespace, extra: list[str] = ()) -> Config:
    # Paths are relative to where the command runs; Ray workers run elsewhere, so fix them here.
    return absolute_paths(load_config(args.config, [*extra, *args.overrides]))


def _announce(cfg: Config, out: Path) -> None:
    # The whole resolved config is ~250 lines: it goes to the file, the console gets its path.
    print(f"resolved config: {save_config(cfg, out)}", flush=True)


def cmd_world(args: argparse.Namespace) -> dict:
    from nsft_ray.world import write_world

    cfg = _resolved(args)
    out = Path(args.out)
    _announce(cfg, out)
    sampler = None
    if cfg.world.negatives == "policy":
        if not cfg.world.policy_model:
            raise ConfigError("world.policy_model: required when world.negatives=policy")
        from nsft_ray.generation import make_sampler

        sampler = make_sampler(
            cfg.world.policy_model,
            temperature=cfg.world.policy_temperature,
            max_new_tokens=cfg.world.policy_max_new_tokens,
            batch_size=cfg.world.policy_batch_size,
        )
    summary = write_world(cfg.world, out, seed=cfg.run.seed, sampler=sampler)
    print(json.dumps(summary, indent=2))
    return summary


def cmd_init_model(args: argparse.Namespace) -> dict:
    from nsft_ray.models import build_tiny_vlm, load_vlm, param_count
    from nsft_ray.world import corpus

    extra = [f"model.size={args.size}"] if args.size else []
    extra += [f"model.arch={args.arch}"] if args.arch else []
    cfg = _resolved(args, extra)
    out = Path(args.out)
    texts = corpus(cfg.world, n=args.corpus_size, seed=cfg.run.seed)
    build_tiny_vlm(
        out, texts, size=cfg.model.size, arch=cfg.model.arch,
        image_size=cfg.world.image_size, seed=cfg.run.seed,
    )
    model, _ = load_vlm(out)  # prove the folder loads through the same path as real checkpoints
    info = {"out": str(out), "arch": cfg.model.arch, "size": cfg.model.size,
            "parameters": param_count(model)}
    print(json.dumps(info, indent=2))
    return info


def cmd_build_negatives(args: argparse.Namespace) -> dict:
    from nsft_ray.ray_glue.negatives import build_negatives

    cfg = _resolved(args)
    out = Path(args.out)
    _announce(cfg, out)
    return build_negatives(args.input, out, cfg.data, cfg.negatives)


TRAIN_ALGOS = ("sft", "nsft", "dpo", "reward", "ppo")


def cmd_train(args: argparse.Namespace) -> dict:
    cfg = _resolved(args)
    print(f"resolved config: {Path(cfg.run.dir) / 'config.yaml'}", flush=True)
    if args.algo == "ppo":  # its own controller: four roles on their own placement groups
        from nsft_ray.ray_glue.ppo import train_ppo

        summary = train_ppo(cfg)
    else:  # Ray Train + DeepSpeed; saves the resolved config in run.dir
        from nsft_ray.ray_glue.train import train

        summary = train(cfg, args.algo)
    print(json.dumps(summary, indent=2))
    return summary


def cmd_eval(args: argparse.Namespace) -> dict:
    from nsft_ray.ray_glue.eval import run_eval

    cfg = _resolved(args)
    bench = bool(cfg.eval.pope or cfg.eval.amber or cfg.eval.mmhal)
    if not args.data and not bench:
        raise ConfigError("eval: give --data (a ShapesWorld folder), eval.pope, eval.amber or "
                          "eval.mmhal")
    generate_fn = score_fn = None
    if bench:  # loaded once, for the benchmarks and (engine=local) ShapesWorld too
        from nsft_ray.eval.runner import hf_answer_fns

        generate_fn, score_fn = hf_answer_fns(args.model, cfg.eval.max_new_tokens,
                                              cfg.eval.cache_image_features)
    result: dict = {}
    if args.data:
        local = {"generate_fn": generate_fn, "score_fn": score_fn} if generate_fn else {}
        result = run_eval(args.model, args.data, cfg.eval, seed=cfg.run.seed, **local)
    if bench:
        from nsft_ray.eval.benchmarks import run_benchmarks

        result["benchmarks"] = run_benchmarks(generate_fn, score_fn, cfg.eval, args.out)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "eval.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return result


def cmd_compare(args: argparse.Namespace) -> dict:
    from nsft_ray.compare import compare

    cfg = _resolved(args)
    print(f"resolved config: {Path(args.out) / 'config.yaml'}", flush=True)
    return compare(cfg, Path(args.out))


def _plan_methods(cfg: Config, algo: str | None) -> dict[str, tuple[str, Config]]:
    """Label -> (algorithm, config): --algo, else compare.methods (ablations that hold the same
    memory as nsft share its line) and PPO's reward model when compare trains one first."""
    if algo:
        return {algo: (algo, cfg)}
    from dataclasses import replace

    from nsft_ray.compare import algo_of

    labels: dict[tuple[str, bool], list[str]] = {}
    for method in cfg.compare.methods:
        if algo_of(method):  # nsft_kl alone changes memory: a reference copy for its KL term
            labels.setdefault((algo_of(method), method == "nsft_kl"), []).append(method)
    out = {}
    for (name, kl), methods in labels.items():
        kl_cfg = replace(cfg, nsft=replace(cfg.nsft, kl_coef=cfg.compare.ablation_kl_coef))
        label = methods[0] + (f" (and {', '.join(methods[1:])})" if methods[1:] else "")
        out[label] = (name, kl_cfg if kl else cfg)
    if "ppo" in cfg.compare.methods and cfg.ppo.reward == "model" and not cfg.ppo.reward_model:
        out["reward (PPO's reward model, trained first)"] = ("reward", cfg)
    return out


def cmd_plan(args: argparse.Namespace) -> dict:
    from nsft_ray import plan as planner
    from nsft_ray.ray_glue.placement import PLANS  # the groups `reserve` would create

    cfg = _resolved(args)
    methods = _plan_methods(cfg, args.algo)
    if args.algo:
        model = cfg.model.name_or_path or cfg.compare.base_model
    else:  # compare trains every method from its base
        model = cfg.compare.base_model or cfg.model.name_or_path
    cluster = yaml.safe_load(Path(args.cluster).read_text())
    nodes = planner.node_types(cluster, cfg.plan)
    shape = planner.model_shape(model, cfg.model.freeze, cfg.plan)
    print(f"# plan: {args.config or '(defaults)'} on {args.cluster}")
    print(planner.format_shape(shape, cfg.model.dtype))
    print(planner.format_nodes(nodes, cfg.plan))
    results = {}
    for label, (algo, method_cfg) in methods.items():
        roles = planner.method_roles(algo, method_cfg, shape)
        groups = PLANS[algo](method_cfg)
        placed = planner.place(label, roles, groups, nodes, cfg.plan,
                               int(cluster.get("max_workers", 0)))
        print("\n" + planner.format_method(label, roles, groups, placed))
        results[label] = placed
    refused = {k: p for k, p in results.items() if not p.fits}
    if refused:
        biggest = max(nodes, key=lambda t: (t.accelerator_bytes, t.accelerators, t.cpus))
        raise planner.PlanRefused(
            f"{len(refused)} of {len(results)} runs do not fit {args.cluster} (largest node "
            f"type: {biggest.name}, {biggest.accelerators} x {biggest.accelerator} "
            f"{biggest.accelerator_bytes / planner.GiB:g} GiB):\n"
            + "\n".join(f"  {k}: {'; '.join(p.problems)}" for k, p in refused.items()))
    print(f"\nall {len(results)} runs fit {args.cluster}")
    return {k: [n for n, _ in p.nodes] for k, p in results.items()}


DEMO_CONFIG = Path(__file__).resolve().parents[1] / "jobs" / "configs" / "tiny" / "demo.yaml"


def cmd_demo(args: argparse.Namespace) -> dict:
    from nsft_ray.demo import run_demo

    if args.config is None and DEMO_CONFIG.exists():
        args.config = str(DEMO_CONFIG)
    cfg = _resolved(args)
    return run_demo(Path(args.out), cfg)


COMMANDS = {
    "world": (cmd_world, "write ShapesWorld SFT and preference datasets (train/eval Parquet)"),
    "init-model": (cmd_init_model, "build a tiny VLM offline (tokenizer trained locally)"),
    "build-negatives": (cmd_build_negatives, "preference Parquet -> nSFT corrective conversations"),
    "train": (cmd_train, "train sft (base / continual SFT), nsft, dpo, reward or ppo on Ray"),
    "eval": (cmd_eval, "evaluate a model folder on the ShapesWorld eval split"),
    "compare": (cmd_compare, "train every method from one base, evaluate, write the report"),
    "demo": (cmd_demo, "the miniature experiment end to end on an embedded local Ray"),
    "plan": (cmd_plan, "predict memory per method and role; place the roles on cluster.yaml"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nsft-ray", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (_fn, help_text) in PASSTHROUGH.items():
        sub.add_parser(name, help=help_text, add_help=False)  # listed in --help; parsed apart
    for name, (_fn, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--config", help="YAML config file (see jobs/configs/)")
        p.add_argument("overrides", nargs="*", metavar="key=value",
                       help="dotted config overrides, e.g. world.n_train=500 run.seed=1")
        if name == "build-negatives":
            p.add_argument("--input", required=True, help="preference Parquet file or folder")
        if name == "init-model":
            p.add_argument("--size", choices=["tiny", "small"])
            p.add_argument("--arch", choices=["idefics3", "llava"])
            p.add_argument("--corpus-size", type=int, default=4000,
                           help="ShapesWorld sentences the tokenizer is trained on")
        if name == "train":
            p.add_argument("--algo", required=True, choices=TRAIN_ALGOS)
        if name == "plan":
            p.add_argument("--cluster", required=True, help="Ray cluster-launcher YAML")
            p.add_argument("--algo", choices=TRAIN_ALGOS,
                           help="plan this algorithm (default: compare.methods)")
        if name == "eval":
            p.add_argument("--model", required=True, help="Hugging Face model folder")
            p.add_argument("--data", help="ShapesWorld folder (uses *_eval.parquet); optional "
                                          "with eval.pope / eval.amber (published benchmarks)")
        if name not in ("train", "eval", "plan"):
            p.add_argument("--out", required=True, help="output folder")
        elif name == "eval":
            p.add_argument("--out", help="folder for eval.json (optional)")
    return parser


def _submit(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="nsft-ray submit",
        description="submit a jobs/*.py entrypoint to a Ray cluster (RAY_ADDRESS), follow its "
                    "logs, exit 0 if it SUCCEEDED",
        epilog="example: nsft-ray submit -- python jobs/train.py --algo sft --config ...")
    parser.add_argument("--address", default="", help="job server, e.g. http://127.0.0.1:8265")
    parser.add_argument("--working-dir", default=".")
    parser.add_argument("--no-follow", action="store_true", help="return once submitted")
    parser.add_argument("--timeout", type=float, default=0.0, help="seconds; 0: no limit")
    parser.add_argument("entrypoint", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    entrypoint = args.entrypoint[1:] if args.entrypoint[:1] == ["--"] else args.entrypoint
    from nsft_ray.ray_glue.submit import submit

    return submit(entrypoint, address=args.address, working_dir=args.working_dir,
                  follow=not args.no_follow, timeout_s=args.timeout)


def _serve(argv: list[str]) -> int:
    from serve.app import main as serve_main

    return serve_main(argv)


def _data(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="nsft-ray data", description="look at preference or conversation data before "
                                          "training on it; convert it to our Parquet (no Ray)")
    sub = parser.add_subparsers(dest="action", required=True)
    inspect = sub.add_parser("inspect", help="format (detected with data.format=auto), row "
                             "count, column -> contract mapping, first rows, quarantine counts")
    inspect.add_argument("--rows", type=int, default=3, help="first rows to show")
    inspect.add_argument("--json", action="store_true", help="print the report as JSON")
    convert = sub.add_parser("convert", help="valid rows -> OUT/preferences.parquet (our "
                             "contract), the rest -> OUT/quarantine.parquet")
    convert.add_argument("--out", required=True, help="output folder")
    for p in (inspect, convert):
        p.add_argument("path", help="a file or a folder of shards")
        p.add_argument("--config", help="YAML config file (its data section is used)")
        p.add_argument("overrides", nargs="*", metavar="key=value",
                       help="dotted config overrides, e.g. data.format=auto data.root=images/")
    # Overrides may follow an option (`PATH --out DIR key=value`): argparse leaves those over.
    args, rest = parser.parse_known_args(argv)
    if any(r.startswith("-") or "=" not in r for r in rest):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    from nsft_ray.data_inspect import convert_input, format_report, inspect_input

    cfg = load_config(args.config, [*args.overrides, *rest])
    if args.action == "convert":
        print(json.dumps(convert_input(args.path, cfg.data, args.out), indent=2))
        return 0
    report = inspect_input(args.path, cfg.data, n_rows=args.rows)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


# Commands with their own argument parsers (they pass arguments through).
PASSTHROUGH = {
    "serve": (_serve, "host models over OpenAI-compatible HTTP with Ray Serve (see serve/)"),
    "submit": (_submit, "submit a jobs/*.py entrypoint to a Ray cluster and follow it"),
    "data": (_data, "data inspect|convert PATH: how a file will be read; to our Parquet"),
}


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may reach a model hub
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in PASSTHROUGH:
        try:
            return PASSTHROUGH[argv[0]][0](argv[1:])
        except ValueError as e:
            print(f"nsft-ray {argv[0]}: {e}", file=sys.stderr)
            return 2
    args = build_parser().parse_args(argv)
    fn = COMMANDS[args.command][0]
    start = time.perf_counter()
    from nsft_ray.compare import BaseGateFailed
    from nsft_ray.plan import PlanRefused

    try:
        fn(args)
    except ConfigError as e:
        print(f"nsft-ray {args.command}: config error: {e}", file=sys.stderr)
        return 2
    except BaseGateFailed as e:  # a declared stop, not a crash: no traceback
        print(f"nsft-ray {args.command}: stopped: {e}", file=sys.stderr)
        return 3
    except PlanRefused as e:  # what was asked, the largest node, the shortfall
        print(f"nsft-ray {args.command}: refused: {e}", file=sys.stderr)
        return 1
    print(f"# {args.command} finished in {time.perf_counter() - start:.1f} s")
    return 0


def run(argv: list[str]) -> Any:
    """Entry for jobs/*.py: the same as the console script, raising SystemExit on failure."""
    code = main(argv)
    if code:
        raise SystemExit(code)


if __name__ == "__main__":
    raise SystemExit(main())
