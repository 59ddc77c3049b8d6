"""Peak memory of one distillation step (student forward + teacher forward + KL + backward)
with the chunked KL of gemmakit.training.distill against the plain full-logits KL, at a
256k vocabulary where the logits dominate. Each runs in a fresh process; the figure is the
peak resident memory above what the two models and the student's gradients already hold.

    python benchmarks/distill_memory.py              # ~4 minutes on 2 cores, ~6 GB of RAM
    python benchmarks/distill_memory.py --tokens 512 # half the memory of the full version
"""

from __future__ import annotations

import argparse
import subprocess
import sys

CHILD = """
import resource, sys, torch
from gemmakit.api import build_model
from gemmakit.config import get_config
from gemmakit.training.distill import DistillLoss
from gemmakit.training.recipe import DistillSection
kind, n_tokens, top_k = sys.argv[1], int(sys.argv[2]), sys.argv[3]
top_k = None if top_k == "none" else int(top_k)
torch.set_num_threads(2)
torch.manual_seed(0)  # the same tokens in every child
cfg = get_config("tiny").replace(vocab_size=256_000, n_layers=2)
student = build_model(cfg, dtype=torch.float32, seed=0)
teacher = build_model(cfg.replace(d_model=256, ffn_dim=1024), dtype=torch.float32, seed=1)
teacher.requires_grad_(False)
tokens = torch.randint(0, cfg.vocab_size, (1, n_tokens + 1))
batch = {"tokens": tokens[:, :-1], "targets": tokens[:, 1:]}
for p in student.parameters():  # gradients exist before the baseline, as in any later step
    p.grad = torch.zeros_like(p)
base = int(open("/proc/self/statm").read().split()[1]) * 4096  # resident bytes now
if kind == "chunked":
    loss = DistillLoss(teacher, DistillSection(teacher="-", top_k=top_k))(student, batch)
else:  # both models' whole [T, V] logits, log-softmaxes and the KL by autograd
    with torch.no_grad():
        log_p = torch.log_softmax(teacher(batch["tokens"])[0], -1)
    log_q = torch.log_softmax(student(batch["tokens"])[0], -1)
    if top_k is not None:
        top = log_p.topk(top_k, -1).indices
        rest = torch.zeros_like(log_p, dtype=torch.bool).scatter(1, top, True)
        bucket = lambda lp: torch.cat(
            [lp.gather(1, top), lp.masked_fill(rest, -torch.inf).logsumexp(-1, True)], 1
        )
        log_p, log_q = bucket(log_p), bucket(log_q)
    loss = (log_p.exp() * (log_p - log_q)).sum(-1).mean()
loss.backward()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(peak - base, loss.item())
"""


def peak(kind: str, tokens: int, top_k: str) -> tuple[int, float]:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, kind, str(tokens), top_k],
        capture_output=True,
        text=True,
        check=True,
    )
    nbytes, loss = out.stdout.split()[-2:]
    return int(nbytes), float(loss)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=1024, help="positions in the batch")
    args = ap.parse_args()
    logits_mb = args.tokens * 256_000 * 4 / 2**20
    print(
        f"one distillation step, {args.tokens} positions, vocabulary 256,000 "
        f"(one model's float32 logits: {logits_mb:,.0f} MiB); peak memory above the models:"
    )
    for top_k in ["none", "64"]:
        full, full_loss = peak("full", args.tokens, top_k)
        chunked, chunked_loss = peak("chunked", args.tokens, top_k)
        what = "whole vocabulary" if top_k == "none" else f"top-{top_k} + rest"
        print(
            f"  KL over {what:17s} full logits {full / 2**20:7,.0f} MiB   chunked "
            f"{chunked / 2**20:7,.0f} MiB   ({full / chunked:.1f}x less; KL "
            f"{full_loss:.6f} vs {chunked_loss:.6f})"
        )


if __name__ == "__main__":
    main()
