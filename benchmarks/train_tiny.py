"""CPU training throughput of the tiny preset: gemmakit's loop against an HF transformers
GemmaForCausalLM loop of the same shape, weights, data, batch, optimizer and dtype, in one run;
then the peak memory of one training step with and without the chunked cross-entropy, at a
256k-vocabulary shape where the full logits dominate.

    python benchmarks/train_tiny.py                  # ~3 minutes on 2 cores
    python benchmarks/train_tiny.py --steps 10 --rounds 3 --threads 1

Both loops do the same work per step: forward, next-token cross-entropy, backward, gradient
clipping at 1.0, AdamW (lr 1e-3, betas 0.9/0.95, weight decay 0.1), on the same synthetic
token windows (seed 0) from the same initial weights (seed 0), with the same fixed thread
count. gemmakit runs its real loop (`gemmakit.training.train` with the pretraining loss, no
logging to the terminal; per-step times from the run's metrics.jsonl). The two loops take
steps in turn, so load from other processes hits both alike; the first step of each (warm-up,
compile) is left out. tokens/s comes from the median step time over all rounds, the ratio
is the median of the per-round ratios, and their spread shows how far to trust it.
On a shared 2-core machine use --threads 1: two OpenMP threads, one of whose cores another
process takes, wait at every op's barrier (steps up to 10x slower, for both loops).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from gemmakit.config import get_config
from gemmakit.training.loop import compute_dtype, train
from gemmakit.training.losses import next_token_loss, windows_to_batch
from gemmakit.training.recipe import as_recipe
from gemmakit.training.samplers import SyntheticTokens

SEED = 0  # weights and data of both loops


def hf_stepper(args, hf_dir: Path):
    """One HF training step per call on the next synthetic batch; returns its seconds."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        hf_dir, dtype=torch.float32, attn_implementation="sdpa"
    ).train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
        lr=1e-3,
        betas=(0.9, 0.95),
    )
    dtype = compute_dtype(args.dtype, torch.device("cpu"))
    batches = SyntheticTokens(model.config.vocab_size).batches(args.seq_len, args.batch, seed=SEED)

    def step() -> float:
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
        return time.perf_counter() - start

    return step


def paired_step_times(args, run_dir: Path, hf_dir: Path) -> tuple[list, list, float]:
    """gemmakit's real loop (`train` with the pretraining loss) and the HF loop, one step each
    in turn, so each pair runs under the same load: HF's step runs while gemmakit's loop
    fetches its next batch, and is taken out of that gemmakit step's time.
    Returns (gemmakit step seconds, HF step seconds, gemmakit's first step seconds)."""
    hf_step = hf_stepper(args, hf_dir)
    hf_step()  # HF's warm-up
    hf_times = []

    def make_batches(env, start):
        windows = SyntheticTokens(get_config("tiny").vocab_size).batches(
            args.seq_len, args.batch, seed=SEED
        )
        for i, w in enumerate(windows):
            if i:  # after gemmakit's warm-up step
                hf_times.append(hf_step())
            yield windows_to_batch(torch.from_numpy(w))

    recipe = as_recipe(
        {
            "run_dir": str(run_dir),
            "model": {"preset": "tiny"},
            "data": {"synthetic": True},
            "training": {
                "steps": args.steps + 1,
                "seq_len": args.seq_len,
                "batch_size": args.batch,
                "micro_batch_size": args.batch,
                "dtype": args.dtype,
                "compile": args.compile,
                "seed": SEED,
            },
            "optimizer": {"lr": 1e-3, "min_lr": 1e-3, "warmup_steps": 0, "weight_decay": 0.1},
            "eval": {"interval": 0},
            "checkpoint": {"interval": 0, "keep": 1},
            "log": {"progress": False, "tensorboard": False, "interval": 10**9},
        }
    )
    train(recipe, next_token_loss, make_batches)
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    times = [r["step_s"] for r in map(json.loads, lines) if "step_s" in r]
    return [t - h for t, h in zip(times[1:], hf_times)], hf_times, times[0]


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
    out = subprocess.run(
        [sys.executable, "-c", MEMORY_CHILD, kind], capture_output=True, text=True, check=True
    )
    return int(out.stdout.split()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20, help="timed steps per round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument(
        "--threads",
        type=int,
        default=torch.get_num_threads(),
        help="torch threads of both loops (default: torch's, one per core)",
    )
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    ap.add_argument("--compile", action="store_true", help="torch.compile gemmakit's blocks")
    ap.add_argument("--skip-memory", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dtype = compute_dtype(args.dtype, torch.device("cpu"))

    from gemmakit.api import build_model
    from gemmakit.checkpoint import save_hf

    ours, theirs, ratios, warmups = [], [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        model = build_model(get_config("tiny"), dtype=torch.float32, seed=SEED)
        hf_dir = save_hf(model, Path(tmp) / "hf")
        for r in range(args.rounds):
            times, hf_times, warmup = paired_step_times(args, Path(tmp) / f"run{r}", hf_dir)
            ours += times
            theirs += hf_times
            warmups.append(warmup)
            ratios.append(statistics.median(hf_times) / statistics.median(times))
            print(
                f"round {r + 1}: median step gemmakit {statistics.median(times) * 1e3:.0f} ms, "
                f"HF {statistics.median(hf_times) * 1e3:.0f} ms ({ratios[-1]:.2f}x)",
                flush=True,
            )
    tokens = args.batch * args.seq_len
    ours_tps, theirs_tps = tokens / statistics.median(ours), tokens / statistics.median(theirs)
    print(
        f"\ntiny preset training, batch {args.batch} x {args.seq_len}, "
        f"{str(dtype).removeprefix('torch.')}, {args.threads} threads, "
        f"{args.rounds} rounds x {args.steps} steps"
        f"{', gemmakit compiled' if args.compile else ''}"
    )
    ratio = statistics.median(ratios)  # each round's pair ran under the same load
    print(f"{'':20}{'tokens/s':>10}{'vs HF':>8}")
    print(
        f"{'gemmakit':20}{ours_tps:10,.0f}{ratio:7.2f}x  (rounds: "
        f"{' '.join(f'{x:.2f}' for x in ratios)})"
    )
    print(f"{'HF transformers':20}{theirs_tps:10,.0f}{1.0:7.2f}x")
    print(
        f"gemmakit's first step (warm-up{', compile' if args.compile else ''}): "
        f"{warmups[0]:.1f} s in the first round, {statistics.median(warmups[1:] or warmups):.1f}"
        " s after"
    )
    figures = {
        "tokens_per_s": ours_tps,
        "hf_tokens_per_s": theirs_tps,
        "ratio": ratio,
        "round_ratios": ratios,
        "threads": args.threads,
    }

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
        figures.update(peak_full_bytes=full, peak_chunked_bytes=chunked)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
