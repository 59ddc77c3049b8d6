"""MFU of a Gemma-2B-shaped training step on one GPU (bf16 autocast, float32 weights and AdamW
state), through gemmakit's own loop, against the device's dense bf16 peak.

    python benchmarks/train_gpu.py                      # gemma-2b, seq 8192, H100: ~3 minutes
    python benchmarks/train_gpu.py --layers 4           # quicker, same per-layer shapes
    python benchmarks/train_gpu.py --preset tiny --device cpu --steps 3   # a smoke test

FLOPs per token follow PaLM's MFU: 6 * (non-embedding params + the tied output projection)
+ 12 * layers * heads * head_dim * seq_len (`gemmakit.training.metrics.train_flops_per_token`).
The first steps (compilation, allocator warm-up) are left out; the target is 45% MFU. A 2B model
in float32 with AdamW holds ~40 GB of weights, gradients and moments, so it fits an 80 GB
H100 with activation checkpointing and the chunked cross-entropy (the full [8192, 256000]
logits would be 8 GB in float32 alone).
"""

from __future__ import annotations

import argparse
import tempfile

import torch

from gemmakit.config import get_config
from gemmakit.training import pretrain
from gemmakit.training.metrics import peak_flops, read_metrics, train_flops_per_token


def measure(
    preset: str = "gemma-2b",
    layers: int | None = None,
    seq_len: int = 8192,
    batch: int = 1,
    steps: int = 8,
    compile: bool = True,
    checkpointing: bool = True,
    device: str = "cuda",
    peak: float | None = None,
) -> dict:
    """Run gemmakit's loop for 2 warm-up + `steps` steps; returns the figures of the median
    step (MFU against `peak` FLOP/s, or the device's datasheet/measured peak)."""
    cfg = get_config(preset)
    overrides = {"n_layers": layers} if layers else {}
    if layers:
        cfg = cfg.replace(n_layers=layers)
    warmup = 2
    with tempfile.TemporaryDirectory() as tmp:
        recipe = {
            "run_dir": tmp,
            "model": {"preset": preset, "config_overrides": overrides},
            "data": {"synthetic": True},
            "training": {
                "steps": warmup + steps,
                "seq_len": seq_len,
                "batch_size": batch,
                "micro_batch_size": batch,
                "dtype": "bfloat16" if device == "cuda" else "auto",
                "compile": compile,
                "activation_checkpointing": checkpointing,
                "device": device,
            },
            "optimizer": {"lr": 1e-4, "min_lr": 1e-5, "warmup_steps": 2},
            "eval": {"interval": 0},
            "checkpoint": {"interval": 0, "keep": 1},
            "log": {"progress": False, "tensorboard": False, "interval": 1, "peak_flops": peak},
        }
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        pretrain(recipe)  # its final checkpoint goes to the temporary run dir and away
        step_times = [r["step_s"] for r in read_metrics(tmp) if "step_s" in r][warmup:]
    tokens_per_step = batch * seq_len
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    peak = peak_flops(torch.device(device), dtype, peak)
    flops = train_flops_per_token(cfg, seq_len) * tokens_per_step
    step_s = sorted(step_times)[len(step_times) // 2]  # the median step
    return {
        "model": f"{cfg.name} ({cfg.n_layers} layers)",
        "batch": batch,
        "seq_len": seq_len,
        "dtype": str(dtype).removeprefix("torch."),
        "compiled": compile,
        "checkpointing": checkpointing,
        "peak_flops": peak,
        "flops_per_step": flops,
        "step_s": step_s,
        "steps": len(step_times),
        "tokens_per_s": tokens_per_step / step_s,
        "mfu": flops / step_s / peak,
        "memory_gib": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="gemma-2b")
    ap.add_argument("--layers", type=int, default=None, help="fewer layers for a quick run")
    ap.add_argument("--seq-len", type=int, default=8192)
    ap.add_argument("--batch", type=int, default=1, help="sequences per step")
    ap.add_argument("--steps", type=int, default=8, help="timed steps (after 2 warm-up steps)")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--no-checkpointing", action="store_true", help="keep all activations")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--peak-flops", type=float, default=None)
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device (use --device cpu --preset tiny for a smoke test)")
    r = measure(
        args.preset,
        args.layers,
        args.seq_len,
        args.batch,
        args.steps,
        not args.no_compile,
        not args.no_checkpointing,
        args.device,
        args.peak_flops,
    )
    print(
        f"\n{r['model']}, batch {r['batch']} x {r['seq_len']}, "
        f"{'compiled, ' if r['compiled'] else ''}"
        f"{'activation checkpointing, ' if r['checkpointing'] else ''}{r['dtype']}"
    )
    if args.device == "cuda":
        print(
            f"device {torch.cuda.get_device_name()}, peak {r['peak_flops'] / 1e12:.0f} "
            f"TFLOP/s, memory high-water {r['memory_gib']:.1f} GiB"
        )
    print(
        f"{r['flops_per_step'] / 1e12:.2f} TFLOP per step, median step "
        f"{r['step_s'] * 1e3:.0f} ms over {r['steps']} steps, {r['tokens_per_s']:,.0f} tokens/s"
    )
    print(f"MFU {r['mfu']:.1%} (target 45%)")


if __name__ == "__main__":
    main()
