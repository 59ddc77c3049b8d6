"""bf16 GEMV on CPU: gemmakit's C kernel vs torch F.linear (bf16 and float32), Gemma-2B shapes.

Prints, per projection of a Gemma-2B decode step, the best-of-N time and the weight-read
bandwidth of each path, the kernel's speedup over torch, and the kernel's bandwidth as a
fraction of the streaming-read floor (torch sum and copy of a large float32 tensor).

    .venv/bin/python benchmarks/gemv.py                 # batch 1, all shapes (needs ~4 GB RAM)
    .venv/bin/python benchmarks/gemv.py --rows 1 4 8 --no-logits --reps 5
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from gemmakit.kernels import gemv

COLD_BYTES = 128 * 1024 * 1024  # bf16 weight bytes per timed round, 4x the L3 cache
# (name, in_features K, out_features N, uses per decode step of the 18-layer 2B model)
SHAPES = [
    ("q_proj", 2048, 2048, 18),
    ("k_proj/v_proj", 2048, 256, 36),
    ("o_proj", 2048, 2048, 18),
    ("gate/up_proj", 2048, 16384, 36),
    ("down_proj", 16384, 2048, 18),
    ("logits", 2048, 256000, 1),
]


def best_time(fn: Callable[[int], object], reps: int, copies: int = 1) -> float:
    """Best wall time of one call fn(i), over `reps` rounds of fn(0) .. fn(copies - 1) after a
    warm-up round: on shared cores the undisturbed call is the one that measures the code."""
    for i in range(copies):
        fn(i)
    best = float("inf")
    for _ in range(reps):
        for i in range(copies):
            t = time.perf_counter()
            fn(i)
            best = min(best, time.perf_counter() - t)
    return best


def time_shape(m: int, n: int, k: int, reps: int, gen: torch.Generator) -> dict[str, float]:
    """Best seconds per call of x[m, k] @ W[n, k]^T for the kernel, torch bf16, torch f32."""
    # A decode step streams 5 GB of distinct weights: cycle through enough copies that no
    # weight is still in the 32 MB L3 when it is read again.
    copies = max(1, -(-COLD_BYTES // (n * k * 2)))
    w32 = [torch.randn(n, k, generator=gen) for _ in range(copies)]
    w16 = [w.to(torch.bfloat16) for w in w32]
    x16 = torch.randn(m, k, generator=gen).to(torch.bfloat16)
    x32 = x16.float()
    with torch.inference_mode():
        return {
            "kernel": best_time(lambda i: gemv.linear(x16, w16[i]), reps, copies),
            "bf16": best_time(lambda i: F.linear(x16, w16[i]), reps, copies),
            "f32": best_time(lambda i: F.linear(x32, w32[i]), reps, copies),
        }


def stream_floor(reps: int) -> tuple[float, float]:
    """(sum GB/s, copy GB/s counting read + write) over a 512 MiB float32 tensor."""
    src = torch.randn(128 * 1024 * 1024)
    dst = torch.empty_like(src)
    nbytes = src.numel() * 4
    t_sum = best_time(lambda _: src.sum(), reps)
    t_copy = best_time(lambda _: dst.copy_(src), reps)
    return nbytes / t_sum / 1e9, 2 * nbytes / t_copy / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[1], help="M: rows of x (batch)")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--no-logits", action="store_true", help="skip the 1 GB [256000, 2048]")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if gemv.library() is None:
        raise SystemExit("the C kernel is unavailable here (the warning above says why)")

    read_sum, read_copy = stream_floor(args.reps)
    floor = max(read_sum, read_copy)
    print(
        f"threads {args.threads}; streaming floor: sum {read_sum:.1f} GB/s, "
        f"copy {read_copy:.1f} GB/s (read+write)"
    )
    shapes = [s for s in SHAPES if not (args.no_logits and s[0] == "logits")]
    head = (
        f"{'M':>2} {'shape':<14} {'N x K':>13} | {'kernel':>15} | {'torch bf16':>15} | "
        f"{'torch f32':>15} | {'vs bf16':>7} {'vs f32':>7} {'of floor':>8}"
    )
    print(head)
    print("-" * len(head))
    gen = torch.Generator().manual_seed(0)
    for m in args.rows:
        step = {"kernel": 0.0, "bf16": 0.0, "f32": 0.0}
        for name, k, n, uses in shapes:
            t = time_shape(m, n, k, args.reps, gen)
            for key in step:
                step[key] += uses * t[key]
            gbs = {key: n * k * (4 if key == "f32" else 2) / t[key] / 1e9 for key in t}
            cells = " | ".join(f"{t[key] * 1e3:6.2f}ms {gbs[key]:5.1f}GB/s" for key in t)
            print(
                f"{m:>2} {name:<14} {f'{n}x{k}':>13} | {cells} | "
                f"{t['bf16'] / t['kernel']:6.2f}x {t['f32'] / t['kernel']:6.2f}x "
                f"{gbs['kernel'] / floor:7.0%}"
            )
        cells = " | ".join(f"{step[key] * 1e3:8.1f}ms    " for key in step)
        print(
            f"{m:>2} {'decode step':<14} {'(all above)':>13} | {cells} | "
            f"{step['bf16'] / step['kernel']:6.2f}x {step['f32'] / step['kernel']:6.2f}x"
        )


if __name__ == "__main__":
    main()
