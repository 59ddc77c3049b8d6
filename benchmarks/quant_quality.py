"""Quality of the real Gemma 3 270M (the installed Q4_K_M GGUF) with its weights held each way:
held-out perplexity on text the project ships (gemmakit/data/corpus/web.jsonl) and greedy ids
of each quantized path against its own dequantized reference.

    python benchmarks/quant_quality.py                       # 8 windows of 256 tokens
    python benchmarks/quant_quality.py --windows 4 --greedy 16

Paths: float32 (the file dequantized: the exact path), bfloat16, keep (the file's own Q8_0 /
Q5_0 / Q4_K / Q6_K blocks), int8 (per row), int4 (groups of 32, scale + min), int4-g128.
Perplexity runs whole windows (more than 8 rows: the torch fallback, weight-only quantization);
the greedy check decodes token by token (the C kernels). The reference of keep is the float32
model itself (the same values); of int8/int4, the quantized model's weights dequantized.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import gemmakit
from gemmakit.generation import generate
from gemmakit.quant.model import dequantize_model
from gemmakit.resolve import checkpoint_path
from gemmakit.tokenizer import load_tokenizer

CORPUS = Path(gemmakit.__file__).parent / "data" / "corpus" / "web.jsonl"


def windows(tokenizer, n: int, length: int) -> torch.Tensor:
    """[n, length] token ids: the corpus documents (each with BOS) concatenated, cut up."""
    ids: list[int] = []
    for line in CORPUS.read_text().splitlines():
        ids += tokenizer.encode(json.loads(line)["text"], bos=True)
        if len(ids) >= n * length:
            break
    return torch.tensor(ids[: n * length]).view(n, length)


@torch.no_grad()
def perplexity(model, data: torch.Tensor) -> float:
    nll, count = 0.0, 0
    for row in data:
        logits = model(row[None]).float()[0, :-1]
        nll += F.cross_entropy(logits, row[1:], reduction="sum").item()
        count += row.numel() - 1
    return math.exp(nll / count)


def prompts(tokenizer, n: int = 3) -> list[list[int]]:
    """The first 12 words of the first n corpus documents."""
    lines = CORPUS.read_text().splitlines()[:n]
    texts = [" ".join(json.loads(line)["text"].split()[:12]) for line in lines]
    return [tokenizer.encode(t, bos=True) for t in texts]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--length", type=int, default=256)
    ap.add_argument("--greedy", type=int, default=16, help="greedy tokens per prompt")
    ap.add_argument("--modes", default="float32,bfloat16,keep,int8,int4,int4-g128")
    args = ap.parse_args()
    path = checkpoint_path("gemma3-270m")
    tokenizer = load_tokenizer(path)
    data = windows(tokenizer, args.windows, args.length)
    starts = prompts(tokenizer)
    exact = gemmakit.load_model(path)  # float32 dequantization: the reference of keep
    rows = []
    for mode in args.modes.split(","):
        t = time.perf_counter()
        if mode == "float32":
            model, ref = exact, None
        elif mode == "bfloat16":
            model, ref = gemmakit.load_model(path, dtype=torch.bfloat16), None
        elif mode == "keep":
            model, ref = gemmakit.load_model(path, quant="keep"), exact
        else:
            model = gemmakit.load_model(path, quant=mode)
            ref = dequantize_model(copy.deepcopy(model))
        ppl = perplexity(model, data)
        same = "-"
        if ref is not None:
            got = generate(model, starts, args.greedy, stop_tokens=[])
            want = generate(ref, starts, args.greedy, stop_tokens=[])
            same = " ".join(
                str(next((i for i, (a, b) in enumerate(zip(g, w)) if a != b), len(g)))
                for g, w in zip(got, want)
            )
            with torch.no_grad():
                a, b = model(data[:1, :64]), ref(data[:1, :64])
            same += f" (logits max |diff| {(a - b).abs().max().item():.2g})"
        rows.append((mode, ppl, same, time.perf_counter() - t))
        print(rows[-1], flush=True)
    base = rows[0][1]
    print(f"\nGemma 3 270M Q4_K_M file, {data.numel()} held-out tokens ({CORPUS.name})")
    print(f"{'weights':11}{'ppl':>8}{'vs f32':>8}  greedy ids equal to the reference (per prompt)")
    for mode, ppl, same, _ in rows:
        print(f"{mode:11}{ppl:8.3f}{ppl / base - 1:+8.2%}  {same}")


if __name__ == "__main__":
    main()
