"""Logits at the scored positions only (`sft.answer_logprobs`) against the full forward's logits.

    .venv/bin/python benchmarks/bench_logits.py --vocab 0 32000 --out runs/bench/logits.json

One nSFT micro-batch of the world's rows (its constructed conversations), padded and packed, on
the tiny Idefics3 build; its vocabulary as built (0) and grown to each `--vocab` (new rows
random, `resize_token_embeddings`), since the tiny model's few hundred tokens make the output
layer nearly free and a real VLM's 32,000-152,000 do not. Per setting: the median time of a
forward + backward of the summed answer log-probs (one torch thread, the two variants
interleaved, best of `--rounds` medians) and the peak bytes of live tensors (bench_plan's
MemTracker). Both variants give the same values (tests/test_packing.py holds them and their
gradients equal).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from bench_plan import _rows, build_assets, peak_bytes, write_report  # noqa: E402


def _step(model, batch, scored_only: bool) -> None:
    from nsft_ray.algorithms.sft import answer_logprobs, model_inputs
    from nsft_ray.logprobs import token_logprobs

    model.zero_grad(set_to_none=True)
    if scored_only:
        values = answer_logprobs(model, batch)
    else:
        values = token_logprobs(model(**model_inputs(batch)).logits, batch["labels"])
    (-values.sum()).backward()


def measure(model, batch, rounds: int, steps: int) -> dict[bool, dict]:
    times: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(rounds):
        for scored_only in (False, True):
            ts = []
            for _ in range(steps):
                start = time.perf_counter()
                _step(model, batch, scored_only)
                ts.append(time.perf_counter() - start)
            times[scored_only].append(statistics.median(ts))
    return {k: {"s_per_step": min(v),
                "peak_bytes": peak_bytes([model], lambda k=k: _step(model, batch, k))[1]}
            for k, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, nargs="+", default=[0, 32000],
                        help="vocabulary sizes; 0: the tiny build's own")
    parser.add_argument("--batch", type=int, default=8, help="conversations per micro-batch")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("runs/bench/logits.json"))
    args = parser.parse_args()
    from nsft_ray.algorithms import ALGORITHMS
    from nsft_ray.config import load_config
    from nsft_ray.models import load_vlm

    torch.set_num_threads(1)
    torch.manual_seed(0)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        assets = build_assets(Path(tmp), "tiny")
        rows = _rows(assets, "nsft", args.batch)
        for vocab in args.vocab:
            model, processor = load_vlm(assets["model"])
            if vocab:
                model.resize_token_embeddings(vocab, mean_resizing=False)
            model.train()
            for pack in (0, 512):
                cfg = load_config(None, [f"model.name_or_path={assets['model']}",
                                         "train.max_length=256", f"train.pack_tokens={pack}"])
                batch = ALGORITHMS["nsft"].collate(processor, cfg)(rows)
                for scored_only, r in measure(model, batch, args.rounds, args.steps).items():
                    results.append({
                        "vocab": model.config.get_text_config().vocab_size,
                        "rows": "packed" if pack else "padded",
                        "shape": list(batch["labels"].shape),
                        "logits": "scored positions" if scored_only else "every position", **r})
    print("| vocab | rows | shape | logits | s/step | peak MiB |\n|---:|---|---|---|---:|---:|")
    for r in results:
        print(f"| {r['vocab']} | {r['rows']} | {r['shape'][0]} x {r['shape'][1]} | {r['logits']} "
              f"| {r['s_per_step']:.4f} | {r['peak_bytes'] / 2**20:.1f} |")
    write_report(args, results)


if __name__ == "__main__":
    main()
