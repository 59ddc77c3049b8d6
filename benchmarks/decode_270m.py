"""Decode speed of the real Gemma 3 270M (the Q4_K_M GGUF) on CPU, batch 1, in one process, runs
alternated: gemmakit float32 and bfloat16 (the file dequantized) against HF transformers loading
the same file, same prompt, same greedy tokens; and gemmakit with the file's own quantization
kept (`quant="keep"`) against llama.cpp (llama-cpp-python) on the same file.

    .venv/bin/python benchmarks/decode_270m.py                   # 128 tokens, 2 threads, 3 rounds
    .venv/bin/python benchmarks/decode_270m.py --new-tokens 32 --rounds 1 --skip-hf

gemmakit decodes with the fused step (one C call per token for the whole stack,
gemmakit/model/fast_decode.py); "eager" rows are the same model with fast=False (one torch op
at a time, driven from Python). HF's GGUF loader takes minutes on 2 cores (it dequantizes with
numpy and rebuilds the tokenizer); that time is not measured, only decode steps (prefill
excluded) are. Each round measures every system once, in turn; the table shows medians.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from decode import hf_decode, kernels_line  # noqa: E402

import gemmakit  # noqa: E402
from gemmakit.generation import generate, stream_generate  # noqa: E402
from gemmakit.resolve import checkpoint_path  # noqa: E402

PROMPT = "The capital of France is"


def ours_decode(model, prompt, n, fast=True) -> float:
    """tokens/s of the decode steps (prefill and first token excluded)."""
    stamps = [time.perf_counter()]
    for _ in stream_generate(model, [prompt], n, stop_tokens=[], fast=fast):
        stamps.append(time.perf_counter())
    steps = stamps[2:]
    return (len(steps) - 1) / (steps[-1] - steps[0])


def llama_decode(llm, prompt_text, n) -> float:
    """tokens/s of llama.cpp's decode steps (first token, which includes the prefill, excluded);
    `generate` does not stop at EOS, so every run decodes n tokens."""
    llm.reset()
    ids = llm.tokenize(prompt_text.encode(), add_bos=True)
    stamps = []
    for i, _ in enumerate(llm.generate(ids, temp=0.0, top_k=1)):
        stamps.append(time.perf_counter())
        if i + 1 >= n:
            break
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


def python_calls_per_step(model, prompt, fast: bool) -> float:
    """Python function calls per decode step (sys.setprofile): the per-layer Python of the eager
    path against the constant handful of the fused one."""
    gen = stream_generate(model, [prompt], 8, stop_tokens=[], fast=fast)
    next(gen), next(gen)
    count = [0]

    def prof(frame, event, arg):
        if event == "call":
            count[0] += 1

    sys.setprofile(prof)
    try:
        for _ in range(4):
            next(gen)
    finally:
        sys.setprofile(None)
    return count[0] / 4


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--skip-llama", action="store_true")
    ap.add_argument(
        "--kept-only",
        action="store_true",
        help="only gemmakit kept Q4_K_M (fused) against llama.cpp: no float32/bf16/eager/HF rows",
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    n = args.new_tokens

    path = checkpoint_path("gemma3-270m")
    prompt = gemmakit.load_tokenizer("gemma3-270m").encode(PROMPT)
    ours = {}
    if not args.kept_only:
        ours["float32"] = gemmakit.load_model(path)
        ours["bfloat16"] = gemmakit.load_model(path).to(torch.bfloat16)
    try:
        ours["kept Q4_K_M"] = gemmakit.load_model(path, quant="keep")
    except TypeError:
        print("load_model has no quant= (gemmakit.quant not merged): no kept-quantization row")
    hf = {}
    if not (args.skip_hf or args.kept_only):
        from transformers import AutoModelForCausalLM

        for name in ("float32", "bfloat16"):
            hf[name] = AutoModelForCausalLM.from_pretrained(
                path.parent, gguf_file=path.name, dtype=getattr(torch, name)
            ).eval()
    llm = None
    if not args.skip_llama:
        try:
            from llama_cpp import Llama

            llm = Llama(model_path=str(path), n_threads=args.threads, n_ctx=512, verbose=False)
        except ImportError:
            print("llama_cpp not importable: no llama.cpp row")

    # greedy tokens: gemmakit fused vs eager vs HF, same dtype
    same = {}
    for name, model in ours.items():
        fused = generate(model, [prompt], n, stop_tokens=[])[0]
        if args.kept_only:
            continue
        same[name, "eager"] = fused == generate(model, [prompt], n, stop_tokens=[], fast=False)[0]
        if name in hf:
            theirs = (
                hf[name]
                .generate(
                    torch.tensor([prompt]),
                    max_new_tokens=n,
                    do_sample=False,
                    eos_token_id=None,
                    pad_token_id=0,
                )[0, len(prompt) :]
                .tolist()
            )
            same[name, "hf"] = fused == theirs

    systems = {}
    for name, model in ours.items():
        systems[f"gemmakit {name}"] = lambda m=model: ours_decode(m, prompt, n)
        if not args.kept_only:
            systems[f"gemmakit {name} eager"] = lambda m=model: ours_decode(
                m, prompt, n, fast=False
            )
    for name, model in hf.items():
        systems[f"HF {name}"] = lambda m=model: hf_decode(m, prompt, n)
    if llm is not None:
        systems["llama.cpp Q4_K_M"] = lambda: llama_decode(llm, PROMPT, n)
    rates: dict[str, list[float]] = {k: [] for k in systems}
    for _ in range(args.rounds):
        for key, fn in systems.items():
            rates[key].append(fn())
    med = {k: statistics.median(v) for k, v in rates.items()}

    print(
        f"\nGemma 3 270M (Q4_K_M GGUF), batch 1, {args.threads} threads, {n} greedy tokens "
        f"after {len(prompt)} prompt tokens, {args.rounds} alternated rounds"
    )
    print(kernels_line())
    print(f"{'system':28}{'tok/s median':>14}  {'all rounds':30}")
    for k, v in rates.items():
        print(f"{k:28}{med[k]:14.1f}  {', '.join(f'{r:.1f}' for r in v)}")
    print("\nratios (medians):")
    for name in ours:
        fused = med[f"gemmakit {name}"]
        if f"gemmakit {name} eager" in med:
            eager = med[f"gemmakit {name} eager"]
            print(f"  gemmakit {name}: fused / eager {fused / eager:.2f}x")
        if f"HF {name}" in med:
            print(f"  gemmakit {name} / HF {name}: {fused / med[f'HF {name}']:.2f}x")
    if "llama.cpp Q4_K_M" in med and "gemmakit kept Q4_K_M" in med:
        ratio = med["gemmakit kept Q4_K_M"] / med["llama.cpp Q4_K_M"]
        print(f"  gemmakit kept Q4_K_M / llama.cpp: {ratio:.2f}x")
    if same:
        print("\nsame greedy tokens:")
    for (name, other), ok in same.items():
        print(f"  gemmakit {name} fused vs {other}: {ok}")
    if not args.kept_only:
        print("\nPython function calls per decode step (sys.setprofile):")
    for name, model in ours.items():
        if args.kept_only:
            break
        eager = python_calls_per_step(model, prompt, fast=False)
        fused = python_calls_per_step(model, prompt, fast=True)
        print(f"  {name}: eager {eager:.0f}, fused {fused:.0f}")


if __name__ == "__main__":
    main()
