"""Decode speed with the weights in 4 KiB pages against 2 MiB huge pages, in one run.

Two copies of the same Gemma-2B-shaped model (random weights) per weight mode: one whose
weights stay in torch's 4 KiB pages, one whose weights were moved into huge pages as `gemmakit
serve` does at start (gemmakit/kernels/hugepages.py). Their decodes
alternate, so that the machine's drift falls on both; the ratio is per round.

    .venv/bin/python benchmarks/hugepages.py                     # bf16 and int4, 18 layers
    .venv/bin/python benchmarks/hugepages.py --modes int4 --layers 6 --rounds 5

Options as benchmarks/quant_decode.py's.
"""

from __future__ import annotations

import copy
import os
import statistics
import time

import torch
from decode import gemmakit_decode, kernels_line
from quant_decode import MODES, parse_args

import gemmakit
from gemmakit.kernels import hugepages
from gemmakit.quant.model import quantize_model

PROMPT = [2, *range(1000, 1007)]


def huge_now() -> int:
    """Bytes of this process's memory in transparent huge pages."""
    with open("/proc/self/smaps_rollup") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("AnonHuge"))


def decoder_built(model, huge: bool) -> tuple[int, float]:
    """Move the model's weights into huge pages (as `gemmakit serve` does at start) or not, then
    build its decoder by a first short decode; the bytes moved and the seconds the move took."""
    before, start = huge_now(), time.perf_counter()
    if huge:
        hugepages.back_with_huge_pages([*model.parameters(), *model.buffers()])
    seconds = time.perf_counter() - start
    gemmakit_decode(model, PROMPT, 4)
    return huge_now() - before, seconds


def main() -> None:
    args, cfg, modes = parse_args(
        prog="hugepages.py", doc=__doc__, modes="bf16,int4", rounds=7, choices=MODES
    )
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    print(kernels_line())
    if not hugepages.enabled():
        print("huge pages are off here (not Linux, or GEMMAKIT_NO_HUGEPAGES=1): nothing to compare")
        return
    print(
        f"{cfg.name} ({cfg.n_layers} layers), batch 1, {torch.get_num_threads()} threads, "
        f"{args.new_tokens} new tokens, {args.rounds} rounds alternated (medians)"
    )
    print(
        f"{'weights':9}{'moved GB':>9}{'4 KiB tok/s':>13}{'huge tok/s':>12}{'ratio':>8}  per round"
    )
    for mode in modes:
        base = gemmakit.build_model(cfg, dtype=torch.bfloat16)
        small = base if mode == "bf16" else quantize_model(base, mode)
        huge = copy.deepcopy(small)
        decoder_built(small, False)
        moved, seconds = decoder_built(huge, True)
        runs: dict[str, list[float]] = {"4k": [], "huge": []}
        for _ in range(args.rounds):
            runs["4k"].append(gemmakit_decode(small, PROMPT, args.new_tokens))
            runs["huge"].append(gemmakit_decode(huge, PROMPT, args.new_tokens))
        ratios = [h / s for s, h in zip(runs["4k"], runs["huge"])]
        print(
            f"{mode:9}{moved / 1e9:9.2f}{seconds:8.1f}{statistics.median(runs['4k']):13.2f}"
            f"{statistics.median(runs['huge']):12.2f}{statistics.median(ratios):7.3f}x  "
            + " ".join(f"{r:.2f}" for r in ratios),
            flush=True,
        )
        del base, small, huge


if __name__ == "__main__":
    main()
