"""Decode speed of the real Gemma 3 270M (the Q4_K_M GGUF, dequantized) on CPU, batch 1:
gemmakit against HF transformers loading the same file, same prompt, same greedy tokens, in one
run, float32 and bfloat16.

    .venv/bin/python benchmarks/decode_270m.py                    # 32 tokens, float32 + bfloat16
    .venv/bin/python benchmarks/decode_270m.py --dtypes float32 --new-tokens 16 --threads 1

HF's GGUF loader takes minutes on 2 cores (it dequantizes with numpy and rebuilds the
tokenizer); that time is not measured, only decode steps (prefill excluded) are.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from decode import gemmakit_decode, hf_decode, profile_step  # noqa: E402

import gemmakit  # noqa: E402
from gemmakit.generation import generate  # noqa: E402
from gemmakit.installed import installed_model_path  # noqa: E402

PROMPT = "The capital of France is"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        # on a shared machine, 1 thread avoids waits on a descheduled second thread that make
        # every parallel op (SDPA above all) take a scheduler slice
        torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM

    path = installed_model_path("gemma3-270m")
    prompt = gemmakit.load_tokenizer("gemma3-270m").encode(PROMPT)
    t = time.perf_counter()
    ours32 = gemmakit.load_model(path)
    load_ours = time.perf_counter() - t
    t = time.perf_counter()
    hf32 = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    ).eval()
    load_hf = time.perf_counter() - t

    rows = []
    for name in args.dtypes:
        dtype = getattr(torch, name)
        # Module.to converts in place: float32 first, then bfloat16 (the default order)
        ours, hf = ours32.to(dtype), hf32.to(dtype)
        same = (
            generate(ours, [prompt], args.new_tokens, stop_tokens=[])[0]
            == hf.generate(
                torch.tensor([prompt]),
                max_new_tokens=args.new_tokens,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
            )[0, len(prompt) :].tolist()
        )
        a = max(gemmakit_decode(ours, prompt, args.new_tokens) for _ in range(2))
        b = hf_decode(hf, prompt, args.new_tokens)
        rows.append((name, a, b, same, profile_step(ours, prompt)))

    threads = torch.get_num_threads()
    print(
        f"\nGemma 3 270M (Q4_K_M GGUF, dequantized), batch 1, {threads} threads, "
        f"{args.new_tokens} greedy tokens after {len(prompt)} prompt tokens"
    )
    print(f"load: gemmakit {load_ours:.1f} s, HF transformers {load_hf:.1f} s")
    print(f"{'dtype':10}{'gemmakit tok/s':>16}{'HF tok/s':>10}{'ratio':>8}  same tokens")
    for name, a, b, same, _ in rows:
        print(f"{name:10}{a:16.1f}{b:10.1f}{a / b:7.2f}x  {same}")
    for name, *_, prof in rows:
        print(f"\nwhere a gemmakit decode step goes, {name} (torch.profiler, self time):")
        for op, share in prof:
            print(f"  {op:40}{share:6.0%}")


if __name__ == "__main__":
    main()
