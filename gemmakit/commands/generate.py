"""`gemmakit generate`: continue a prompt, streaming the text as it is produced."""

from __future__ import annotations

import argparse
import sys

from gemmakit.commands.common import (
    add_model_args,
    add_sampling_args,
    load_model_and_tokenizer,
    stream_text,
)


def register(sub) -> None:
    p = sub.add_parser("generate", help="continue a text prompt")
    add_model_args(p)
    p.add_argument("prompt")
    p.add_argument("--max-new-tokens", type=int, default=64)
    add_sampling_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from gemmakit.generation import stream_generate

    model, tokenizer = load_model_and_tokenizer(args)
    prompt = tokenizer.encode(args.prompt, bos=True)
    steps = stream_generate(
        model,
        [prompt],
        args.max_new_tokens,
        args.temperature,
        args.top_k,
        args.top_p,
        seed=args.seed,
    )
    sys.stdout.write(args.prompt)
    stream_text(tokenizer, steps)
    sys.stdout.write("\n")
    return 0
