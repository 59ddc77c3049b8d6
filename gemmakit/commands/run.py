"""`gemmakit run`: the whole recipe at tiny scale on the embedded corpus (the main job)."""

from __future__ import annotations

import argparse

# Unset step counts take run_all's defaults (gemmakit.main_job, not imported here: it pulls in
# torch, and every command registers at start-up).
STEP_FLAGS = {
    "steps": "pretraining steps (default 200)",
    "sft_steps": "SFT steps (default 100)",
    "reward_steps": "reward model steps (default 60)",
    "rlhf_steps": "RLHF steps (default 20)",
}


def register(sub) -> None:
    p = sub.add_parser("run", help="every stage of the report at tiny scale, with a report")
    p.add_argument("--out", default="runs/main", help="run folder (must not hold a run)")
    for flag, help in STEP_FLAGS.items():
        p.add_argument("--" + flag.replace("_", "-"), type=int, help=help)
    p.add_argument(
        "--no-instruct",
        dest="instruct",
        action="store_false",
        help="stop after pretraining's evaluation (no SFT, reward model, RLHF or their eval)",
    )
    p.add_argument(
        "--eval-limit", type=int, help="only the first N prompts of the instruction-following eval"
    )
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from gemmakit.errors import UsageError
    from gemmakit.main_job import run_all

    steps = {f: getattr(args, f) for f in STEP_FLAGS if getattr(args, f) is not None}
    for flag, n in steps.items():
        if n < 1:
            raise UsageError(f"--{flag.replace('_', '-')} must be >= 1, got {n}")
    if args.eval_limit is not None and args.eval_limit < 1:
        raise UsageError(f"--eval-limit must be >= 1, got {args.eval_limit}")

    run_all(
        args.out,
        vocab_size=args.vocab_size,
        seed=args.seed,
        instruct=args.instruct,
        eval_limit=args.eval_limit,
        **steps,
    )
    return 0
