"""Batched decoding: a Gemma-2B-shaped model (random weights) decoding 1, 2, 4 and 8 prompts at
once through the fused step, in bfloat16 and int4, alternated run by run in one process.

    python benchmarks/batch_decode.py                      # 2B shape, 18 layers
    python benchmarks/batch_decode.py --layers 4 --rounds 1

A decode step reads every weight once whatever the number of sequences, so while the step stays
bound by memory, B sequences cost about what one does and tokens/s grows about B-fold: the
table gives each batch's step time against batch 1's (the speed per token each sequence keeps)
and its total tokens/s. Prompts differ in length (left-padded), greedy, no stop tokens.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from decode import kernels_line
from quant_decode import positive

import gemmakit
from gemmakit.generation import stream_generate
from gemmakit.kernels.decode_step import MAX_ROWS
from gemmakit.quant.model import quantize_model


def step_seconds(model, prompts, n) -> float:
    """Seconds per decode step (the first token, which includes the prefill, excluded)."""
    stamps = []
    for _ in stream_generate(model, prompts, n, stop_tokens=[]):
        stamps.append(time.perf_counter())
    return (stamps[-1] - stamps[0]) / (len(stamps) - 1)


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, object]:
    """(arguments, the model config): every bad value refused in one line on stderr (exit
    status 2) before a model is built."""
    ap = argparse.ArgumentParser(prog="batch_decode.py", description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="gemma-2b")
    ap.add_argument("--layers", type=positive, default=None, help="fewer layers for a quick run")
    ap.add_argument("--new-tokens", type=positive, default=16)
    ap.add_argument("--rounds", type=positive, default=2)
    ap.add_argument("--batches", type=positive, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--modes", nargs="+", default=["bf16", "int4"], choices=["bf16", "int4"])
    args = ap.parse_args(argv)
    if max(args.batches) > MAX_ROWS:  # more would fall back to the eager step, unsaid
        ap.error(f"--batches: {max(args.batches)} is more than the fused step's {MAX_ROWS} rows")
    if args.new_tokens < 2:
        ap.error("--new-tokens: at least 2 (the first token includes the prefill)")
    try:
        cfg = gemmakit.get_config(args.preset)
    except ValueError as e:
        ap.error(f"--preset: {e}")
    return args, cfg.replace(n_layers=args.layers) if args.layers else cfg


def main() -> None:
    args, cfg = parse_args()
    models = {}
    for mode in args.modes:
        model = gemmakit.build_model(cfg, dtype=torch.bfloat16)
        models[mode] = model if mode == "bf16" else quantize_model(model, mode)
    prompts = [[2] + list(range(1000, 1003 + 3 * i)) for i in range(max(args.batches))]
    for model in models.values():  # the fused step's plan and greedy's int8 head made first
        step_seconds(model, prompts[:1], 3)
    times = {(m, b): [] for m in args.modes for b in args.batches}
    for _ in range(args.rounds):
        for mode in args.modes:
            for b in args.batches:
                times[mode, b].append(step_seconds(models[mode], prompts[:b], args.new_tokens))
    print(
        f"\n{cfg.name} ({cfg.n_layers} layers), {torch.get_num_threads()} threads, "
        f"{args.new_tokens} greedy tokens, {args.rounds} alternated rounds (medians)"
    )
    print(kernels_line())
    print(f"{'weights':8}{'batch':>6}{'ms/step':>9}{'x batch 1':>11}{'tok/s':>8}")
    for mode in args.modes:
        one = statistics.median(times[mode, args.batches[0]])
        for b in args.batches:
            s = statistics.median(times[mode, b])
            print(f"{mode:8}{b:6d}{s * 1e3:9.1f}{s / one:10.2f}x{b / s:8.2f}")


if __name__ == "__main__":
    main()
