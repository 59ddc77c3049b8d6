"""CPU training throughput of the tiny preset: gemmakit's loop against an HF transformers
GemmaForCausalLM loop of the same shape, weights, batch, optimizer and dtype, in one run; then
the peak memory of one training step with and without the chunked cross-entropy, at a
256k-vocabulary shape where the full logits dominate.

    python benchmarks/train_tiny.py                  # ~2 minutes on 2 cores
    python benchmarks/train_tiny.py --steps 20 --rounds 3

Both loops do the same work per step: forward, next-token cross-entropy, backward, gradient
clipping at 1.0, AdamW (lr 1e-3, betas 0.9/0.95, weight decay 0.1). gemmakit runs its real
loop (`gemmakit.training.pretrain`, synthetic tokens, no logging to the terminal); the first
step of each round is left out of both timings. The rounds alternate, so load from other
processes hits both alike; the best round of each counts.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from gemmakit.training import pretrain
from gemmakit.training.data import SyntheticTokens
from gemmakit.training.loop import compute_dtype


def gemmakit_tokens_per_s(args, run_dir: Path) -> float:
    recipe = {
        "run_dir": str(run_dir),
        "model": {"preset": "tiny"},
        "data": {"synthetic": True},
        "training": {"steps": args.steps + 1, "seq_len": args.seq_len,
                     "batch_size": args.batch, "micro_batch_size": args.batch,
                     "dtype": args.dtype, "compile": args.compile},
        "optimizer": {"lr": 1e-3, "min_lr": 1e-3, "warmup_steps": 0, "weight_decay": 0.1},
        "eval": {"interval": 0},
        "checkpoint": {"interval": 0, "keep": 1},
        "log": {"progress": False, "tensorboard": False, "interval": 10**9},
    }  # fmt: skip
    return pretrain(recipe).tokens_per_s


def hf_tokens_per_s(args, hf_dir: Path) -> float:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        hf_dir, dtype=torch.float32, attn_implementation="sdpa"
    ).train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
        lr=1e-3, betas=(0.9, 0.95),
    )  # fmt: skip
    dtype = compute_dtype(args.dtype, torch.device("cpu"))
    batches = SyntheticTokens(model.config.vocab_size).batches(args.seq_len, args.batch)
    elapsed = 0.0
    for step in range(args.steps + 1):
        start = time.perf_counter()
        w = torch.from_numpy(next(batches))
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            # labels shifted inside HF's loss; inputs are the first T tokens of the window
            loss = model(input_ids=w[:, :-1], labels=w[:, :-1]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()
        if step:
            elapsed += time.perf_counter() - start
    return args.steps * args.batch * args.seq_len / elapsed


# --- peak memory of one step, in a fresh process each --------------------------------------

MEMORY_CHILD = """
import resource, sys, torch, torch.nn.functional as F
from gemmakit.api import build_model
from gemmakit.config import get_config
from gemmakit.training.losses import next_token_loss
chunked = sys.argv[1] == "chunked"
cfg = get_config("tiny").replace(vocab_size=256_000, n_layers=2)
model = build_model(cfg, dtype=torch.float32)
tokens = torch.randint(0, cfg.vocab_size, (2, 513))
batch = {"tokens": tokens[:, :-1], "targets": tokens[:, 1:]}
for p in model.parameters():  # gradients exist before the baseline, as in any later step
    p.grad = torch.zeros_like(p)
base = int(open("/proc/self/statm").read().split()[1]) * 4096  # resident bytes now
if chunked:
    loss = next_token_loss(model, batch, chunk_tokens=256)
else:
    logits = model(batch["tokens"]).float()
    loss = F.cross_entropy(logits.flatten(0, 1), batch["targets"].flatten())
loss.backward()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(peak - base)
"""


def step_peak_bytes(kind: str) -> int:
    out = subprocess.run([sys.executable, "-c", MEMORY_CHILD, kind], capture_output=True,
                         text=True, check=True)  # fmt: skip
    return int(out.stdout.split()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10, help="timed steps per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    ap.add_argument("--compile", action="store_true", help="torch.compile gemmakit's blocks")
    ap.add_argument("--skip-memory", action="store_true")
    args = ap.parse_args()
    dtype = compute_dtype(args.dtype, torch.device("cpu"))

    from gemmakit.api import build_model
    from gemmakit.checkpoint import save_hf
    from gemmakit.config import get_config

    ours, theirs = [], []
    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = save_hf(build_model(get_config("tiny"), dtype=torch.float32), Path(tmp) / "hf")
        for r in range(args.rounds):
            ours.append(gemmakit_tokens_per_s(args, Path(tmp) / f"run{r}"))
            theirs.append(hf_tokens_per_s(args, hf_dir))
            print(f"round {r + 1}: gemmakit {ours[-1]:,.0f} tok/s, HF {theirs[-1]:,.0f} tok/s",
                  flush=True)  # fmt: skip
    best_ours, best_theirs = max(ours), max(theirs)
    print(f"\ntiny preset training, batch {args.batch} x {args.seq_len}, "
          f"{str(dtype).removeprefix('torch.')}, {torch.get_num_threads()} threads"
          f"{', gemmakit compiled' if args.compile else ''}")  # fmt: skip
    print(f"{'':20}{'tokens/s':>10}{'vs HF':>8}")
    print(f"{'gemmakit':20}{best_ours:10,.0f}{best_ours / best_theirs:7.2f}x")
    print(f"{'HF transformers':20}{best_theirs:10,.0f}{1.0:7.2f}x")

    if not args.skip_memory:
        full, chunked = step_peak_bytes("full"), step_peak_bytes("chunked")
        print(
            "\npeak memory of one training step above the model, its gradients and the "
            "batch\n(vocab 256000, d_model 128, 2 layers, batch 2 x 512, float32):"
        )
        print(f"  full-vocabulary logits   {full / 2**20:8.0f} MiB")
        print(
            f"  chunked cross-entropy    {chunked / 2**20:8.0f} MiB  "
            f"({full / max(chunked, 1):.1f}x less)"
        )
        print(json.dumps({"tokens_per_s": best_ours, "hf_tokens_per_s": best_theirs,
                          "peak_full_bytes": full, "peak_chunked_bytes": chunked}))  # fmt: skip


if __name__ == "__main__":
    main()
