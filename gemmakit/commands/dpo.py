"""`gemmakit dpo RECIPE [--set key=value ...] [--resume]`: direct preference optimization of a
policy on preference pairs (JSONL), full or LoRA, from a YAML recipe (see recipes/dpo-*.yaml).
The reference log-probabilities are computed once and cached in the run folder.

Under torchrun each process takes one device, as with `gemmakit pretrain`.
"""

from __future__ import annotations

import argparse

from gemmakit.commands.common import add_recipe_args, on_main_rank


def register(sub) -> None:
    p = sub.add_parser(
        "dpo",
        help="direct preference optimization (full or LoRA) from a recipe",
    )
    add_recipe_args(p, "YAML recipe file (see recipes/dpo-*.yaml)", "training.steps=100")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from gemmakit.training import load_recipe
    from gemmakit.training.dpo import dpo

    recipe = load_recipe(args.recipe, args.overrides)
    result = dpo(recipe, resume=args.resume)
    if not on_main_rank():
        return 0
    if result.losses:
        val = ""
        if result.val_metrics:
            m = result.val_metrics[-1][1]
            val = f", held-out margin {m['margin']:.3f}, accuracy {m['accuracy']:.1%}"
        print(
            f"done: {result.steps} steps, final loss {result.losses[-1]:.4f}{val}; "
            f"checkpoint {result.checkpoint}"
        )
    return 0
