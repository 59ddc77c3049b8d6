"""`gemmakit reward RECIPE [--set key=value ...] [--resume]`: a reward model (Gemma backbone +
scalar head) trained on preference pairs (JSONL) with the Bradley-Terry loss, full or LoRA, from
a YAML recipe (see recipes/reward-*.yaml). Its checkpoints load with gemmakit.load_reward_model
and with HF transformers' Gemma*ForSequenceClassification.

Under torchrun each process takes one device, as with `gemmakit pretrain`.
"""

from __future__ import annotations

import argparse

from gemmakit.commands.common import add_recipe_args, on_main_rank


def register(sub) -> None:
    p = sub.add_parser(
        "reward",
        help="train a reward model on preference pairs (full or LoRA) from a recipe",
    )
    add_recipe_args(p, "YAML recipe file (see recipes/reward-*.yaml)", "training.steps=100")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from gemmakit.training import load_recipe
    from gemmakit.training.reward import reward

    recipe = load_recipe(args.recipe, args.overrides)
    result = reward(recipe, resume=args.resume)
    if not on_main_rank():
        return 0
    if result.losses:
        val = ""
        if result.val_metrics:
            val = f", held-out pairwise accuracy {result.val_metrics[-1][1]['accuracy']:.1%}"
        print(
            f"done: {result.steps} steps, final loss {result.losses[-1]:.4f}{val}; "
            f"checkpoint {result.checkpoint} (gemmakit.load_reward_model)"
        )
    return 0
