"""A kernel change measured where it counts: the whole fused decode step of one model with its
GEMV library (quantized, or bf16 for --mode bf16) built from a git revision, against the same
library built from the working tree, alternated run by run in one process.

    python benchmarks/kernel_ab.py --rev HEAD~1 --mode int4            # Gemma-2B shape, int4
    python benchmarks/kernel_ab.py --rev HEAD~1 --mode keep            # the real 270M, kept
    python benchmarks/kernel_ab.py --rev HEAD~1 --mode bf16 --layers 4

One model, two fused decoders over the same weights, each holding one library; every round
decodes with each in turn, so the machine's drifting read rate (1.5x within minutes on shared
machines) hits both alike. Prints each side's median tok/s and the median of the per-round
ratios (working tree over --rev). Both libraries pass the kernel's own self-test first. The C
functions' signatures are the working tree's: a revision whose kernel took other arguments
cannot be compared this way.
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import subprocess
import tempfile
from pathlib import Path

import torch

# benchmarks/decode.py and quant_decode.py, beside this script
from batch_decode import step_seconds
from decode import kernels_line
from quant_decode import MODES, positive

import gemmakit
from gemmakit.kernels import gemv, quant_gemv
from gemmakit.kernels.build import build, cpu_isas
from gemmakit.kernels.decode_step import MAX_ROWS
from gemmakit.model import fast_decode
from gemmakit.quant.model import quantize_model
from gemmakit.resolve import checkpoint_path

ROOT = Path(__file__).resolve().parents[1]
KERNELS = "gemmakit/kernels"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The arguments, every bad value refused in one line (exit status 2) before any build."""
    ap = argparse.ArgumentParser(prog="kernel_ab.py", description=__doc__.splitlines()[0])
    ap.add_argument("--rev", required=True, help="git revision of the library to compare with")
    ap.add_argument("--mode", default="int4", help=f"{', '.join(MODES)}, or keep (real 270M)")
    ap.add_argument("--preset", default="gemma-2b")
    ap.add_argument("--layers", type=positive, default=None, help="fewer layers for a quick run")
    ap.add_argument("--new-tokens", type=positive, default=32)
    ap.add_argument("--rounds", type=positive, default=9)
    ap.add_argument("--batch", type=positive, default=1, help="prompts decoded at once (<= 16)")
    args = ap.parse_args(argv)
    if args.mode not in (*MODES, "keep"):
        ap.error(f"--mode: unknown {args.mode!r}; choose from {', '.join(MODES)}, keep")
    try:
        gemmakit.get_config(args.preset)
    except ValueError as e:
        ap.error(f"--preset: {e}")
    if args.new_tokens < 2:
        ap.error("--new-tokens: at least 2 (the first token includes the prefill)")
    if args.batch > MAX_ROWS:
        ap.error(f"--batch: {args.batch} is more than the fused step's {MAX_ROWS} rows")
    if not args.rev or args.rev.startswith("-"):  # never read by git as one of its options
        ap.error(f"--rev: {args.rev!r} is not a commit of {ROOT}")
    done = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--verify", "--quiet", f"{args.rev}^{{commit}}"],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        ap.error(f"--rev: {args.rev!r} is not a commit of {ROOT}")
    args.commit = done.stdout.strip()
    return args


def library_at(commit: str, module) -> ctypes.CDLL:
    """`module`'s library (quant_gemv or gemv) built from its source at `commit` for the
    variant the working tree's loaded, with the working tree's signatures set, after its
    self-test."""
    lib_def = module.LIBRARY
    with tempfile.TemporaryDirectory() as tmp:
        for name in (lib_def.source.name, "vmath.h"):
            text = subprocess.run(
                ["git", "-C", str(ROOT), "show", f"{commit}:{KERNELS}/{name}"],
                capture_output=True,
                check=True,
            ).stdout
            (Path(tmp) / name).write_bytes(text)
        # the build variant the working tree's library loaded as (library() has run)
        so = build(Path(tmp) / lib_def.source.name, f"ab-{lib_def.source.stem}", isa=lib_def.isa)
    lib = ctypes.CDLL(str(so))
    for fn_name, types in lib_def.signatures.items():
        fn = getattr(lib, fn_name)
        fn.argtypes, fn.restype = types, ctypes.c_int
    lib_def.self_test(lib)
    return lib


def main() -> None:
    args = parse_args()
    if not cpu_isas() or quant_gemv.library() is None or gemv.library() is None:
        raise SystemExit("kernel_ab.py: the C kernels are not available on this machine")
    if args.mode == "keep":
        model = gemmakit.load_model(checkpoint_path("gemma3-270m"), quant="keep")
    else:
        torch.manual_seed(0)
        cfg = gemmakit.get_config(args.preset)
        if args.layers:
            cfg = cfg.replace(n_layers=args.layers)
        model = gemmakit.build_model(cfg, dtype=torch.bfloat16)
        if args.mode != "bf16":
            model = quantize_model(model, args.mode)
    module = gemv if args.mode == "bf16" else quant_gemv
    step = fast_decode.library()
    decoders = {}
    for side, lib in (("rev", library_at(args.commit, module)), ("tree", module.library())):
        if module is gemv:
            decoders[side] = fast_decode.FastDecoder(model, step, lib)
        else:
            decoders[side] = fast_decode.FastDecoder(model, step, gemv.library(), lib)
    prompts = [[2] + list(range(1000, 1007 + 3 * i)) for i in range(args.batch)]
    speeds = {side: [] for side in decoders}
    for decoder in decoders.values():  # each makes its plan's buffers (and greedy's int8 head)
        fast_decode._plans[model] = decoder
        step_seconds(model, prompts[:1], 3)
    for _ in range(args.rounds):
        for side, decoder in decoders.items():
            fast_decode._plans[model] = decoder  # the decoder stream_generate will find
            seconds = step_seconds(model, prompts, args.new_tokens)  # per step of all rows
            speeds[side].append(args.batch / seconds)
    ratios = [t / r for r, t in zip(speeds["rev"], speeds["tree"])]
    print(
        f"\n{model.config.name}, {args.mode}, batch {args.batch}, "
        f"{torch.get_num_threads()} threads, {args.rounds} rounds of {args.new_tokens} tokens, "
        "alternated in one process"
    )
    print(kernels_line())
    print(f"--rev {args.rev} ({args.commit[:12]}): {statistics.median(speeds['rev']):.2f} tok/s")
    print(f"working tree: {statistics.median(speeds['tree']):.2f} tok/s")
    print(
        f"working tree / rev: {statistics.median(ratios):.3f}x "
        f"(rounds {', '.join(f'{q:.2f}' for q in ratios)})"
    )


if __name__ == "__main__":
    main()
