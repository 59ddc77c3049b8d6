"""Decode speed of a Gemma-2B-shaped model (random weights) on CPU, batch 1, with its weights in
bfloat16, int8 (per-row scales), int4 (groups of 32 or 128, scale + min) and llama.cpp's Q4_K
(super-blocks of 256 weights, six-bit scales and minimums per 32), each against its own
memory-bandwidth floor, in one run.

    python benchmarks/quant_decode.py               # full 2B shape (~5 GB of bf16 weights)
    python benchmarks/quant_decode.py --layers 2    # quicker, same per-layer shapes

Every model is held in memory (about 11 GB for the five) and each round measures all of them in
turn with bf16 again after each, the read rate measured just before and after each run; the
table shows medians of each run's figures (the machine's read rate drifts within minutes, so
each run is set against the rates around it, and each ratio against the bf16 runs just before
and after it).

Floor: a decode step reads every weight once (the tied 256k x 2048 embedding as the output
head included), so tokens/s cannot beat read rate / weight bytes. bf16 reads its whole bf16
head (GEMMAKIT_NO_COARSE_HEAD=1), as sampling does; bf16-head8 is the same model decoding
greedily as gemmakit does by default, its head read as an int8 copy (model/coarse_head.py).
The read rate is torch's `sum` over a large float32 buffer, measured in the same run. Targets
(issue 14): bf16 at least 90% of its floor; int8 at least 1.8x bf16; int4 at least 3x bf16.
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import statistics

import torch

# benchmarks/decode.py, beside this script
from decode import best_of, gemmakit_decode, kernels_line

import gemmakit
from gemmakit.model.coarse_head import bytes_saved
from gemmakit.quant.model import quant_summary, quantize_model
from gemmakit.quant.modes import QUANT_MODES


def read_rate(gib: float = 2.0) -> float:
    """Bytes/s of torch's sum over a `gib` GiB float32 buffer (best of 3)."""
    buf = torch.ones(int(gib * 2**30) // 4)
    seconds = best_of(lambda: buf.sum(), 3)
    return buf.numel() * 4 / seconds


def weight_bytes(model) -> int:
    return sum(quant_summary(model).values())


def positive(text: str) -> int:
    """argparse type: an integer of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not at least 1")
    return value


MODES = ("bf16", *(m for m in QUANT_MODES if m != "keep"))  # random weights: nothing to keep
# bf16 layers with greedy decoding's int8 copy of the head (model/coarse_head.py), the default
# for greedy decoding; "bf16" runs with GEMMAKIT_NO_COARSE_HEAD=1, the whole bf16 head read
HEAD8 = "bf16-head8"


def parse_args(
    argv: list[str] | None = None,
    prog: str = "quant_decode.py",
    doc: str = __doc__,
    modes: str = f"bf16,{HEAD8},int8,int4,int4-g128,q4_k",
    rounds: int = 3,
    choices: tuple[str, ...] = (*MODES, HEAD8),
) -> tuple[argparse.Namespace, object, list[str]]:
    """(arguments, the model config, the modes): every bad value refused before a model is
    built (one line on stderr, exit status 2). benchmarks/hugepages.py takes the same options
    (its own name, description and defaults)."""
    ap = argparse.ArgumentParser(prog=prog, description=doc.splitlines()[0])
    ap.add_argument("--preset", default="gemma-2b")
    ap.add_argument("--layers", type=positive, default=None, help="fewer layers for a quick run")
    ap.add_argument("--new-tokens", type=positive, default=24)
    ap.add_argument("--rounds", type=positive, default=rounds)
    ap.add_argument("--modes", default=modes, help=f"comma-separated: {', '.join(choices)}")
    args = ap.parse_args(argv)
    try:
        cfg = gemmakit.get_config(args.preset)
    except ValueError as e:
        ap.error(f"--preset: {e}")
    if args.layers:
        cfg = cfg.replace(n_layers=args.layers)
    modes = args.modes.split(",")
    bad = [m for m in modes if m not in choices]
    if bad:
        ap.error(f"--modes: unknown {', '.join(map(repr, bad))}; choose from {', '.join(choices)}")
    if len(set(modes)) != len(modes):
        ap.error(f"--modes: {args.modes!r} names a mode twice")
    return args, cfg, modes


def main() -> None:
    args, cfg, modes = parse_args()
    prompt = [2] + list(range(1000, 1007))
    # every model in memory at once, measured in turn each round: the machine's read rate
    # drifts by a quarter within minutes here, so ratios only hold within a round
    base = gemmakit.build_model(cfg, dtype=torch.bfloat16)
    models = {}
    for mode in modes:
        plain = mode in ("bf16", HEAD8)  # the same model: the head8 runs read its int8 copy
        models[mode] = base if plain else quantize_model(copy.deepcopy(base), mode)
        gc.collect()
    del base
    nbytes = {mode: weight_bytes(m) for mode, m in models.items()}  # read per token
    if HEAD8 in modes:  # the bf16 head read as its int8 copy
        nbytes[HEAD8] -= bytes_saved(models[HEAD8].embedder.weight)
    # each round: bf16, then every other mode in turn with bf16 again after each, and the read
    # rate measured just before and after each run: a mode's % of floor is against the mean of
    # the two rates around its own run, its ratio to bf16 against the mean of the two bf16 runs
    # just around it (one mode's run apart, not the whole round's: the machine's read rate
    # swings 1.5x within minutes here), so that the drift cancels as far as it can. bf16's own
    # column: each bf16 run against the one before it, the noise the other ratios carry.
    tps = {mode: [] for mode in modes}
    floors = {mode: [] for mode in modes}  # tok/s over that run's floor
    ratios: dict[str, list[float | None]] = {mode: [] for mode in modes}  # aligned with tps
    rates = []

    def run(mode: str) -> float:
        os.environ["GEMMAKIT_NO_COARSE_HEAD"] = "1" if mode == "bf16" else "0"
        before = read_rate()
        tps[mode].append(gemmakit_decode(models[mode], prompt, args.new_tokens))
        after = read_rate()
        rates.extend((before, after))
        floors[mode].append(tps[mode][-1] * nbytes[mode] * 2 / (before + after))
        return tps[mode][-1]

    others = [mode for mode in modes if mode != "bf16"]
    for _ in range(args.rounds):
        if "bf16" not in modes:
            for mode in others:
                run(mode)
            continue
        last = run("bf16")
        ratios["bf16"].append(None)  # the round's first bf16 run has none before it
        for mode in others:
            speed = run(mode)
            ref = run("bf16")
            ratios[mode].append(speed / ((last + ref) / 2))
            ratios["bf16"].append(ref / last)
            last = ref
    print(
        f"\n{cfg.name} ({cfg.n_layers} layers), batch 1, {torch.get_num_threads()} threads, "
        f"{args.rounds} rounds (medians), streaming read (torch sum, 2 GiB float32, before and "
        f"after each run): median {statistics.median(rates) / 1e9:.1f} GB/s, "
        f"{min(rates) / 1e9:.1f}-{max(rates) / 1e9:.1f}"
    )
    print(kernels_line())
    print(
        f"{'weights':10}{'GB/token':>10}{'tok/s':>8}{'% floor':>9}{'vs bf16':>9}"
        "  runs: tok/s (% of that run's floor, x the bf16 runs around it; bf16: x the one before)"
    )
    for mode in modes:
        known = [q for q in ratios[mode] if q is not None]
        vs = f"{statistics.median(known):8.2f}x" if known else "       -"
        each = ", ".join(
            f"{t:.2f} ({f:.0%}" + (f", {q:.2f}x)" if q is not None else ")")
            for t, f, q in zip(tps[mode], floors[mode], ratios[mode] or [None] * len(tps[mode]))
        )
        cols = f"{nbytes[mode] / 1e9:10.2f}{statistics.median(tps[mode]):8.2f}"
        print(f"{mode:10}{cols}{statistics.median(floors[mode]):9.0%} {vs}  {each}")


if __name__ == "__main__":
    main()
