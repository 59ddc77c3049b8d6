"""The report's design trade-off, measured: KV-cache memory and decode speed of the Gemma-2B
shape (random weights, bfloat16) with multi-query attention (1 KV head, as released) against
the same shape with multi-head attention (8 KV heads), at several context lengths, batch 1.

    python benchmarks/mqa_vs_mha.py                       # contexts 512, 2048, 8192, 18 layers
    python benchmarks/mqa_vs_mha.py --layers 4 --contexts 512 2048

The cache is filled to the context with random keys and values (a real prefill of 8192 tokens
takes far longer than the decode steps measured, and attention's cost does not depend on what
the keys hold), then `--steps` fused decode steps (gemmakit/model/fast_decode.py) are timed.
MHA also has bigger k/v projections (2048 x 2048 instead of 2048 x 256), so its weights are
larger too: the table gives both, and the KV bytes a step reads.
"""

from __future__ import annotations

import argparse
import gc
import time

import torch

import gemmakit
from gemmakit.model import KVCache
from gemmakit.model.fast_decode import fast_decoder


def kv_bytes(cache: KVCache, length: int) -> int:
    """Bytes of keys and values held for `length` positions (what a decode step reads)."""
    k = cache.k[0]
    per_position = k.shape[0] * k.shape[1] * k.shape[3] * k.element_size()
    return 2 * len(cache.k) * per_position * length


@torch.inference_mode()
def step_rate(model, context: int, steps: int) -> tuple[float, int]:
    """(tokens/s of fused decode steps at `context` positions, KV-cache bytes at context)."""
    cache = KVCache(model.config, 1, context + steps, model.dtype)
    gen = torch.Generator().manual_seed(0)
    for t in (*cache.k, *cache.v):
        t[:, :, :context].normal_(0.0, 1.0, generator=gen)
    cache.length = context
    decoder = fast_decoder(model, cache)
    if decoder is None:
        raise SystemExit("the fused decode step is unavailable here")
    tok = torch.tensor([[1000]])
    decoder.step(tok, torch.tensor([[context]]), cache)  # warm-up
    t = time.perf_counter()
    for i in range(1, steps):
        decoder.step(tok, torch.tensor([[context + i]]), cache)
    return (steps - 1) / (time.perf_counter() - t), kv_bytes(cache, context)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=None, help="fewer layers for a quick run")
    ap.add_argument("--contexts", type=int, nargs="+", default=[512, 2048, 8192])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    base = gemmakit.get_config("gemma-2b")
    if args.layers:
        base = base.replace(n_layers=args.layers)
    base = base.replace(max_seq_len=max(args.contexts) + args.steps)
    rows = {}
    # one model at a time: the two 2B models together would not fit beside the other work
    for name, kv_heads in (("MQA (1 KV head)", 1), ("MHA (8 KV heads)", base.n_heads)):
        cfg = base.replace(n_kv_heads=kv_heads)
        model = gemmakit.build_model(cfg, dtype=torch.bfloat16).eval()
        weight_gb = sum(p.numel() * p.element_size() for p in model.parameters()) / 1e9
        rows[name] = (weight_gb, [step_rate(model, c, args.steps) for c in args.contexts])
        del model
        gc.collect()

    print(
        f"\n{base.name} shape, {base.n_layers} layers, bfloat16, batch 1, "
        f"{args.threads} threads, fused decode step, {args.steps - 1} timed steps"
    )
    print(f"{'':20}{'weights GB':>11}" + "".join(f"{'ctx ' + str(c):>22}" for c in args.contexts))
    print(f"{'':31}" + "".join(f"{'KV MB':>11}{'tok/s':>11}" for _ in args.contexts))
    for name, (gb, results) in rows.items():
        cells = "".join(f"{kv / 1e6:11.0f}{rate:11.2f}" for rate, kv in results)
        print(f"{name:20}{gb:11.2f}{cells}")
    (_, mqa), (_, mha) = rows.values()
    print(
        "\nMQA / MHA: "
        + ", ".join(
            f"ctx {c}: KV memory {b[1] / a[1]:.0f}x smaller, {a[0] / b[0]:.2f}x faster"
            for c, a, b in zip(args.contexts, mqa, mha)
        )
    )


if __name__ == "__main__":
    main()
