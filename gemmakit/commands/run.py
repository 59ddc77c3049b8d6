"""`gemmakit run`: the whole recipe at tiny scale on the embedded corpus (the main job)."""

from __future__ import annotations

import argparse


def register(sub) -> None:
    p = sub.add_parser("run", help="every stage of the report at tiny scale, with a report")
    p.add_argument("--out", default="runs/main", help="run folder (must not hold a run)")
    p.add_argument("--steps", type=int, default=200, help="pretraining steps")
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from gemmakit.errors import UsageError
    from gemmakit.main_job import run_all

    if args.steps < 1:
        raise UsageError(f"--steps must be >= 1, got {args.steps}")

    run_all(args.out, args.steps, args.vocab_size, args.seed)
    return 0
