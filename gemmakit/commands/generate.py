"""`gemmakit generate`: continue a prompt, streaming the text as it is produced."""

from __future__ import annotations

import argparse
import sys

from gemmakit.commands.common import (
    add_model_args,
    add_sampling_args,
    check_sampling_args,
    load_model_and_tokenizer,
    stream_text,
)


def register(sub) -> None:
    p = sub.add_parser("generate", help="continue a text prompt")
    add_model_args(p)
    p.add_argument("prompt")
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=64,
        help="at most this many (generation also stops when the model's context is full)",
    )
    p.add_argument(
        "--truncate",
        action="store_true",
        help="a prompt too long for the model's context keeps its last tokens (default: refused)",
    )
    add_sampling_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from gemmakit.generation import fit_prompts, stream_generate

    check_sampling_args(args)  # before the model loads: a bad option fails at once
    model, tokenizer = load_model_and_tokenizer(args)
    prompt = tokenizer.encode(args.prompt, bos=True)
    context = model.config.max_seq_len
    [fitted], n = fit_prompts([prompt], args.max_new_tokens, context, truncate=args.truncate)
    if len(fitted) < len(prompt):
        note = f"note: the prompt ({len(prompt)} tokens) keeps its last {len(fitted)} tokens"
        print(f"{note} to fit the {context}-token context", file=sys.stderr)
    if n < args.max_new_tokens:
        print(
            f"note: at most {n} new tokens: with the prompt's {len(fitted)} they fill the "
            f"{context}-token context",
            file=sys.stderr,
        )
    steps = stream_generate(
        model, [fitted], n, args.temperature, args.top_k, args.top_p, seed=args.seed
    )
    sys.stdout.write(args.prompt if len(fitted) == len(prompt) else tokenizer.decode(fitted))
    stream_text(tokenizer, steps)
    sys.stdout.write("\n")
    return 0
