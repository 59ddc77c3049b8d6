"""`gemmakit rlhf RECIPE [--set key=value ...] [--resume]`: RLHF with RLOO (k sampled answers
per prompt, a reward model, a KL penalty to the starting model), full or LoRA, from a YAML
recipe (see recipes/rlhf-*.yaml).

Under torchrun each process takes one device (distributed.mode: ddp).
"""

from __future__ import annotations

import argparse


def register(sub) -> None:
    p = sub.add_parser("rlhf", help="RLHF with RLOO against a reward model, from a recipe")
    p.add_argument("recipe", help="YAML recipe file (see recipes/rlhf-*.yaml)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a recipe value, e.g. --set rlhf.beta=0.1 (repeatable)",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue from the newest checkpoint in the recipe's run_dir",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from gemmakit.training import load_recipe
    from gemmakit.training.rlhf import rlhf

    recipe = load_recipe(args.recipe, args.overrides)
    result = rlhf(recipe, resume=args.resume)
    print(f"done: {result.steps} steps; checkpoint {result.checkpoint}")
    if recipe.lora is not None and result.checkpoint is not None:
        base = recipe.model.checkpoint or recipe.model.preset
        print(
            f"the checkpoint is a LoRA adapter (PEFT format): "
            f"gemmakit merge-lora {base} {result.checkpoint} OUT"
        )
    return 0
