"""Log-likelihood requests/s of the real Gemma 3 270M (the Q4_K_M GGUF, dequantized, float32 on
CPU): gemmakit's evaluation runner (through its lm-eval adapter) against lm-evaluation-harness's
own `hf` backend on HF transformers loading the same file, on the same HellaSwag-shaped requests
(a context of a few sentences, four one-sentence endings), in one run, alternating.

    .venv/bin/python benchmarks/eval_loglikelihood.py                        # 64 items x 4
    .venv/bin/python benchmarks/eval_loglikelihood.py --items 100 --rounds 3 --threads 1

The requests are built from the shipped corpus (gemmakit/data/corpus/web.jsonl): an item's
context is a run of sentences of one document, its gold ending the next sentence, and three
other endings sentences of other documents. Loading is not timed. Each round times both
backends on all requests; the ratio printed is the median over rounds. Both must agree per
request (float32), which is checked and printed too.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import statistics
import time
from pathlib import Path

import torch
from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM

from gemmakit.evaluation.lm_eval_adapter import GemmakitLM
from gemmakit.evaluation.requests import Loglikelihood
from gemmakit.evaluation.runner import ModelRunner
from gemmakit.installed import installed_model_path

CORPUS = Path(__file__).resolve().parents[1] / "gemmakit" / "data" / "corpus" / "web.jsonl"


def hellaswag_like(n_items: int, seed: int = 0) -> list[tuple[str, str]]:
    """n_items x 4 (context, ending) pairs, each item's four sharing its context."""
    rng = random.Random(seed)
    docs = [json.loads(line)["text"] for line in CORPUS.read_text().splitlines()]
    sentences = [
        [s.strip() for s in re.split(r"(?<=[.!?])\s+", d.replace("\n", " ")) if s.strip()]
        for d in docs
    ]
    sentences = [s for s in sentences if len(s) >= 6]
    pool = [x for s in sentences for x in s]
    pairs = []
    for _ in range(n_items):
        doc = rng.choice(sentences)
        start = rng.randrange(0, len(doc) - 4)
        n = rng.randint(2, 4)
        context = " ".join(doc[start : start + n])
        endings = [doc[start + n], *rng.sample(pool, 3)]
        pairs += [(context, " " + e) for e in endings]
    return pairs


def timed(lm, instances) -> tuple[float, list[tuple[float, bool]]]:
    t = time.perf_counter()
    out = lm.loglikelihood(instances, disable_tqdm=True)
    return time.perf_counter() - t, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, default=64, help="4 requests each")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=16, help="both backends")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = installed_model_path("gemma3-270m")
    pairs = hellaswag_like(args.items)
    instances = [
        Instance("loglikelihood", doc={}, arguments=pair, idx=i) for i, pair in enumerate(pairs)
    ]
    ours = GemmakitLM(runner=ModelRunner.load(path, dtype="float32", batch_size=args.batch_size))
    hf_model = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    ).eval()
    hf_tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    hf = HFLM(
        pretrained=hf_model,
        tokenizer=hf_tok,
        device="cpu",
        add_bos_token=True,
        batch_size=args.batch_size,
    )
    tokens = sum(len(ours.runner.split(Loglikelihood(c, e)).continuation) for c, e in pairs)
    print(
        f"{len(pairs)} requests ({args.items} items x 4), {tokens} continuation tokens, "
        f"batch {args.batch_size}, {torch.get_num_threads()} threads"
    )
    ratios = []
    for r in range(args.rounds):
        t_ours, a = timed(ours, instances)
        t_hf, b = timed(hf, instances)
        diff = max(abs(x[0] - y[0]) for x, y in zip(a, b))
        same_greedy = all(x[1] == y[1] for x, y in zip(a, b))
        ratios.append(t_hf / t_ours)
        print(
            f"round {r + 1}: gemmakit {len(pairs) / t_ours:7.1f} req/s ({t_ours:6.1f} s)   "
            f"lm-eval hf {len(pairs) / t_hf:7.1f} req/s ({t_hf:6.1f} s)   "
            f"ratio {t_hf / t_ours:5.2f}x   max |dlogp| {diff:.2e}   greedy flags equal "
            f"{same_greedy}"
        )
    print(f"median speedup over lm-eval's hf backend: {statistics.median(ratios):.2f}x")


if __name__ == "__main__":
    main()
