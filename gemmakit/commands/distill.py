"""`gemmakit distill RECIPE [--set key=value ...] [--resume]`: train a student on a frozen
teacher's next-token distributions (knowledge distillation, as Gemma 2 and 3 are trained).

The recipe is a training recipe (recipes/distill-tiny.yaml) with a `distill:` section naming
the teacher; under torchrun the student is sharded or replicated as in `gemmakit pretrain`.
"""

from __future__ import annotations

import argparse

from gemmakit.commands.common import add_recipe_args, on_main_rank


def register(sub) -> None:
    p = sub.add_parser(
        "distill", help="train a student model on a frozen teacher's token distributions"
    )
    add_recipe_args(
        p, "YAML recipe file with a distill: section (see recipes/)", "distill.temperature=2"
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from gemmakit.training import load_recipe
    from gemmakit.training.distill import distill

    recipe = load_recipe(args.recipe, args.overrides)
    result = distill(recipe, resume=args.resume)
    if not on_main_rank():
        return 0
    if result.losses:
        print(
            f"done: {result.steps} steps, final loss {result.losses[-1]:.4f}, "
            f"{result.tokens_per_s:,.0f} tokens/s; checkpoint {result.checkpoint}"
        )
    return 0
