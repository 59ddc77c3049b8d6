"""Everything GPU-related in one call: correctness on the device first, then speed, then a short
table. Made for a session lent a GPU for a few minutes (see the project brief).

    python benchmarks/gpu_suite.py                     # H100/H200: ~4-6 minutes
    python benchmarks/gpu_suite.py --device cpu --quick   # a smoke test of the script itself

Correctness (random weights, same checkpoint for both sides):
  * float32 and bf16 logits of a Gemma-2B-shaped model against HF transformers on the device,
  * 16 greedy tokens through gemmakit's KV cache against HF's full forward,
  * the chunked cross-entropy under bf16 autocast against full logits (loss and gradient).
Speed:
  * MFU of a Gemma-2B-shaped training step (benchmarks/train_gpu.py's measure), target 45%,
  * bf16 decode tokens/s, batch 1, gemmakit against HF on the same weights.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import gemmakit
from gemmakit.checkpoint import save_hf
from gemmakit.generation import generate, stream_generate
from gemmakit.training.losses import chunked_cross_entropy

sys.path.insert(0, str(Path(__file__).parent))
from train_gpu import measure  # noqa: E402


def hf_model(path: Path, dtype: torch.dtype, device: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()


def correctness(path: Path, device: str, vocab: int) -> list[tuple[str, str, bool]]:
    rows = []
    tokens = torch.randint(0, vocab, (2, 64), generator=torch.Generator().manual_seed(1))
    tokens = tokens.to(device)
    for dtype, bound in ((torch.float32, 1e-3), (torch.bfloat16, 0.25)):
        ours = gemmakit.load_model(path, dtype=dtype, device=device)
        hf = hf_model(path, dtype, device)
        with torch.no_grad():
            diff = (ours(tokens).float() - hf(tokens).logits.float()).abs().max().item()
        name = str(dtype).removeprefix("torch.")
        rows.append(
            (f"logits vs HF, {name}", f"max abs diff {diff:.2e} (bound {bound})", diff <= bound)
        )
        if dtype == torch.float32:
            prompt = tokens[0, :8].tolist()
            got = generate(ours, [prompt], max_new_tokens=16, stop_tokens=[])[0]
            ids = list(prompt)
            with torch.no_grad():
                for _ in range(16):
                    ids.append(int(hf(torch.tensor([ids], device=device)).logits[0, -1].argmax()))
            rows.append(("16 greedy tokens vs HF, float32", f"{got == ids[8:]}", got == ids[8:]))
            # chunked cross-entropy under bf16 autocast against full logits
            ours.train()
            targets = tokens.roll(-1, 1)
            dev = torch.device(device).type
            with torch.autocast(dev, dtype=torch.bfloat16):
                full = F.cross_entropy(ours(tokens).float().flatten(0, 1), targets.flatten())
            (g_full,) = torch.autograd.grad(full, [ours.embedder.weight])
            with torch.autocast(dev, dtype=torch.bfloat16):
                hidden = ours(tokens, return_hidden=True)
                chunked = chunked_cross_entropy(hidden, targets, ours.embedder.weight, None, 37)
            (g_chunk,) = torch.autograd.grad(chunked, [ours.embedder.weight])
            dl = abs(chunked.item() - full.item())
            rel = ((g_chunk - g_full).norm() / g_full.norm()).item()
            rows.append(
                (
                    "chunked CE vs full, bf16 autocast",
                    f"loss diff {dl:.1e}, grad rel {rel:.1e}",
                    dl < 2e-2 and rel < 5e-2,
                )
            )
        del ours, hf
    return rows


def decode_speed(path: Path, device: str, new_tokens: int) -> tuple[float, float]:
    """bf16 decode tokens/s (prefill excluded), batch 1: gemmakit, HF (greedy, its cache)."""
    prompt = list(range(2, 34))
    ours = gemmakit.load_model(path, dtype=torch.bfloat16, device=device)
    stamps = []
    for _ in range(2):  # the first pass warms up kernels
        stamps = [time.perf_counter()]
        for _ in stream_generate(ours, [prompt], new_tokens, stop_tokens=[]):
            if device == "cuda":
                torch.cuda.synchronize()
            stamps.append(time.perf_counter())
    ours_tps = (len(stamps) - 3) / (stamps[-1] - stamps[2])
    del ours
    hf = hf_model(path, torch.bfloat16, device)
    ids = torch.tensor([prompt], device=device)

    def hf_seconds(n: int) -> float:  # greedy generation of n tokens, after a warm-up run
        kw = {"max_new_tokens": n, "min_new_tokens": n, "do_sample": False}
        with torch.no_grad():
            hf.generate(ids, **kw)
            if device == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            hf.generate(ids, **kw)
            if device == "cuda":
                torch.cuda.synchronize()
        return time.perf_counter() - t

    # n + 1 tokens minus 1 token (the prefill and its token): the n decode steps alone
    hf_tps = new_tokens / (hf_seconds(new_tokens + 1) - hf_seconds(1))
    return ours_tps, hf_tps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true", help="tiny shapes (CPU smoke test)")
    ap.add_argument("--train-layers", type=int, default=None, help="default: all 18")
    ap.add_argument("--train-steps", type=int, default=6)
    ap.add_argument("--seq-len", type=int, default=8192)
    ap.add_argument("--new-tokens", type=int, default=64)
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device (use --device cpu --quick for a smoke test)")
    base = gemmakit.get_config("tiny" if args.quick else "gemma-2b")
    check_cfg = base.replace(n_layers=2)
    table: list[tuple[str, str, bool | None]] = []
    with tempfile.TemporaryDirectory() as tmp:
        model = gemmakit.build_model(check_cfg, dtype=torch.float32, seed=0)
        for p in model.parameters():  # non-zero norms, so the (1 + w) scale is exercised
            if p.dim() == 1:
                torch.nn.init.normal_(p, std=0.1)
        path = save_hf(model, Path(tmp) / "check")
        del model
        table += correctness(path, args.device, check_cfg.vocab_size)
        for row in table:
            print(f"{'ok  ' if row[2] else 'FAIL'} {row[0]}: {row[1]}", flush=True)

        decode_cfg = base if not args.quick else base.replace(n_layers=2)
        path = save_hf(
            gemmakit.build_model(decode_cfg, dtype=torch.bfloat16, seed=0), Path(tmp) / "decode"
        )
        ours_tps, hf_tps = decode_speed(path, args.device, args.new_tokens)
        table.append(
            (
                f"decode bf16 batch 1, {decode_cfg.name}",
                f"{ours_tps:,.1f} tok/s vs HF {hf_tps:,.1f} ({ours_tps / hf_tps:.2f}x)",
                None,
            )
        )
        print(table[-1][0], table[-1][1], flush=True)

    r = measure(
        "tiny" if args.quick else "gemma-2b",
        args.train_layers,
        256 if args.quick else args.seq_len,
        1,
        args.train_steps,
        compile=not args.quick,
        checkpointing=True,
        device=args.device,
    )
    mem = f", {r['memory_gib']:.1f} GiB" if r["memory_gib"] is not None else ""
    table.append(
        (
            f"training step, {r['model']}, {r['batch']}x{r['seq_len']}",
            f"MFU {r['mfu']:.1%} (target 45%), {r['tokens_per_s']:,.0f} tok/s, "
            f"{r['step_s'] * 1e3:.0f} ms{mem}",
            None,
        )
    )

    name = torch.cuda.get_device_name() if args.device == "cuda" else args.device
    print(f"\n| check on {name} | result | ok |\n|---|---|---|")
    for what, result, ok in table:
        print(f"| {what} | {result} | {'' if ok is None else ('yes' if ok else 'NO')} |")


if __name__ == "__main__":
    main()
