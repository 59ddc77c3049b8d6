"""Decode speed of a Gemma-2B-shaped model on CPU, batch 1: gemmakit against HF transformers on the
same weights, and against the memory-bandwidth floor, in one run.

    python benchmarks/decode.py                 # full 2B shape, bfloat16 (~5 GB of weights)
    python benchmarks/decode.py --layers 4      # quicker, same per-layer shapes

Floor: one decode step reads every weight once (the tied 256k x 2048 embedding as the output
projection included), so tokens/s can't beat bandwidth / weight bytes. Bandwidth is measured in the
same run by a streaming read of exactly those bytes (summing them viewed as float32). The
"int8 greedy head" row is gemmakit's default greedy decoding, which reads the head as an int8
copy (gemmakit/model/coarse_head.py); its floor counts those bytes. The first row reads the
whole head (GEMMAKIT_NO_COARSE_HEAD=1), as sampling does.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import gemmakit
from gemmakit.checkpoint import save_hf
from gemmakit.generation import stream_generate
from gemmakit.model.coarse_head import bytes_saved


def kernels_line() -> str:
    """Which C kernels this run uses (built and self-tested here), for a benchmark's header: a
    kernel that turned itself off makes every figure after it torch's fallback."""
    from gemmakit.kernels import gemv, quant_gemv
    from gemmakit.model import fast_decode

    parts = []
    for lib in (gemv.LIBRARY, quant_gemv.LIBRARY, fast_decode.LIBRARY):
        parts.append(f"{lib.name} {lib.isa.name if lib.get() is not None else 'OFF'}")
    return "C kernels: " + ", ".join(parts)


def best_of(fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def streaming_read_seconds(model) -> float:
    """Seconds to read every weight byte once (as float32 words: a vectorised pure read)."""
    views = [p.detach().view(-1).view(torch.float32) for p in model.parameters()]
    return best_of(lambda: [v.sum() for v in views])


def gemmakit_decode(model, prompt, n) -> float:
    """tokens/s of the decode steps (prefill excluded)."""
    stamps = [time.perf_counter()]
    for _ in stream_generate(model, [prompt], n, stop_tokens=[]):
        stamps.append(time.perf_counter())
    steps = stamps[2:]  # after the first token, which includes the prefill
    return (len(steps) - 1) / (steps[-1] - steps[0])


def hf_decode(hf, prompt, n) -> float:
    ids = torch.tensor([prompt])

    def run(k):
        with torch.inference_mode():
            hf.generate(ids, max_new_tokens=k, min_new_tokens=k, do_sample=False)

    t1 = best_of(lambda: run(1), 2)
    tn = best_of(lambda: run(n), 2)
    return (n - 1) / (tn - t1)


def profile_step(model, prompt) -> list[tuple[str, float]]:
    """Share of a decode step's wall time per torch op (torch.profiler self time); the rest is
    time outside torch ops: the bf16 GEMV kernel (called through ctypes) and Python."""
    from torch.profiler import ProfilerActivity, profile

    gen = stream_generate(model, [prompt], 6, stop_tokens=[])
    next(gen), next(gen)
    t = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(4):
            next(gen)
    wall_us = (time.perf_counter() - t) * 1e6
    rows = [(e.key, e.self_cpu_time_total / wall_us) for e in prof.key_averages()]
    top = sorted(rows, key=lambda r: -r[1])[:8]
    return [("outside torch ops (GEMV kernel, Python)", 1 - sum(r for _, r in rows)), *top]


def matvec_table(cfg, dtype) -> list[tuple[str, float, float]]:
    """GB/s of F.linear on one token for each weight shape of a block, bf16 vs float32."""
    shapes = {
        "q_proj": (cfg.n_heads * cfg.head_dim, cfg.d_model),
        "k/v_proj": (cfg.n_kv_heads * cfg.head_dim, cfg.d_model),
        "gate/up": (cfg.ffn_dim, cfg.d_model),
        "down": (cfg.d_model, cfg.ffn_dim),
        "logits": (cfg.vocab_size, cfg.d_model),
    }
    out = []
    for name, (n, k) in shapes.items():
        row = [name]
        for dt in (dtype, torch.float32):
            w = torch.randn(n, k).to(dt)
            x = torch.randn(1, k).to(dt)
            t = best_of(lambda w=w, x=x: F.linear(x, w), 5)
            row.append(w.numel() * w.element_size() / t / 1e9)
        out.append(tuple(row))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="gemma-2b")
    ap.add_argument("--layers", type=int, default=None, help="fewer layers for a quick run")
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--skip-hf", action="store_true")
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    cfg = gemmakit.get_config(args.preset)
    if args.layers:
        cfg = cfg.replace(n_layers=args.layers)
    prompt = [2] + list(range(1000, 1007))

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model"
        save_hf(gemmakit.build_model(cfg, dtype=dtype), path)
        model = gemmakit.load_model(path)
        weight_gb = sum(p.numel() * p.element_size() for p in model.parameters()) / 1e9
        read_s = streaming_read_seconds(model)
        floor = 1.0 / read_s
        # the whole head read (as sampling does), then greedy decoding's default int8 copy
        os.environ["GEMMAKIT_NO_COARSE_HEAD"] = "1"
        ours = max(gemmakit_decode(model, prompt, args.new_tokens) for _ in range(2))
        os.environ["GEMMAKIT_NO_COARSE_HEAD"] = "0"
        head8 = max(gemmakit_decode(model, prompt, args.new_tokens) for _ in range(2))
        # its floor: the head read as its int8 copy
        weights = weight_gb * 1e9
        floor8 = floor * weights / (weights - bytes_saved(model.embedder.weight))
        theirs = None
        if not args.skip_hf:
            from transformers import AutoModelForCausalLM

            hf = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
            theirs = hf_decode(hf, prompt, args.new_tokens)
            del hf
        prof = profile_step(model, prompt)

    print(
        f"\n{cfg.name} ({cfg.n_layers} layers), {args.dtype}, batch 1, "
        f"{torch.get_num_threads()} threads, weights {weight_gb:.2f} GB"
    )
    print(f"streaming read of the weights: {weight_gb / read_s:.1f} GB/s, floor {floor:.2f} tok/s")
    print(f"{'':28}{'tok/s':>8}{'vs floor':>10}{'vs HF':>8}")
    for name, tps, fl in (("gemmakit", ours, floor), ("gemmakit, int8 greedy head", head8, floor8)):
        print(
            f"{name:28}{tps:8.2f}{tps / fl:10.0%}{(tps / theirs if theirs else float('nan')):8.2f}x"
        )
    if theirs:
        print(f"{'HF transformers':28}{theirs:8.2f}{theirs / floor:10.0%}{1.0:8.2f}x")
    print("\nwhere a gemmakit decode step goes (torch.profiler, self time):")
    for name, share in prof:
        print(f"  {name:40}{share:6.0%}")
    print(f"\nF.linear alone, one token, GB/s ({args.dtype} vs float32 weights):")
    for name, a, b in matvec_table(cfg, dtype):
        print(f"  {name:12}{a:8.1f}{b:8.1f}")


if __name__ == "__main__":
    main()
