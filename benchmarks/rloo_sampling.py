"""RLOO sampling throughput (answers/s): the RLHF stage's sampler (one prefill per prompt, its
KV cache repeated k times, one batched decode) against plain `gemmakit.generate` on the same
prompts each repeated k times, same model, lengths and sampling settings, in one run.

    python benchmarks/rloo_sampling.py                        # tiny preset
    python benchmarks/rloo_sampling.py --preset gemma3-270m --prompts 4 --prompt-len 256

Random weights and no stop tokens, so every answer runs to --new tokens in both (the same work
per answer); the gain is the k-1 prefills of each prompt that the stage does not repeat.
"""

from __future__ import annotations

import argparse
import time

import torch

import gemmakit
from gemmakit.config import get_config
from gemmakit.training.rollouts import sample_answers


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    cfg = get_config(args.preset)
    model = gemmakit.build_model(cfg, dtype=torch.float32, device=args.device, seed=0)
    gen = torch.Generator().manual_seed(0)
    prompts = [
        [
            cfg.tokens.bos,
            *torch.randint(10, cfg.vocab_size, (args.prompt_len - 1,), generator=gen).tolist(),
        ]
        for _ in range(args.prompts)
    ]
    repeated = [p for p in prompts for _ in range(args.k)]
    n = len(repeated)

    def stage():
        g = torch.Generator(device=args.device).manual_seed(1)
        sample_answers(model, prompts, args.k, args.new, 1.0, generator=g, stop_tokens=[])

    def plain():
        gemmakit.generate(model, repeated, args.new, temperature=1.0, seed=1, stop_tokens=[])

    stage(), plain()  # warm-up
    t_stage, t_plain = best_of(stage, args.repeats), best_of(plain, args.repeats)
    print(
        f"{cfg.name} on {args.device}: {args.prompts} prompts x k={args.k}, prompt "
        f"{args.prompt_len} + {args.new} new tokens, threads {torch.get_num_threads()}"
    )
    print(f"  rlhf sampler     {n / t_stage:8.1f} answers/s  ({t_stage:.3f} s)")
    print(f"  plain generate   {n / t_plain:8.1f} answers/s  ({t_plain:.3f} s)")
    print(f"  ratio            {t_plain / t_stage:8.2f}x")


if __name__ == "__main__":
    main()
