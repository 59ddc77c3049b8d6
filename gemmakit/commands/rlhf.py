"""`gemmakit rlhf RECIPE [--set key=value ...] [--resume]`: RLHF with RLOO (k sampled answers
per prompt, a reward model, a KL penalty to the starting model), full or LoRA, from a YAML
recipe (see recipes/rlhf-*.yaml).

Under torchrun each process takes one device (distributed.mode: ddp).
"""

from __future__ import annotations

import argparse

from gemmakit.commands.common import add_recipe_args, on_main_rank


def register(sub) -> None:
    p = sub.add_parser("rlhf", help="RLHF with RLOO against a reward model, from a recipe")
    add_recipe_args(p, "YAML recipe file (see recipes/rlhf-*.yaml)", "rlhf.beta=0.1")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from gemmakit.training import load_recipe
    from gemmakit.training.rlhf import rlhf

    recipe = load_recipe(args.recipe, args.overrides)
    result = rlhf(recipe, resume=args.resume)
    if not on_main_rank():
        return 0
    print(f"done: {result.steps} steps; checkpoint {result.checkpoint}")
    if recipe.lora is not None and result.checkpoint is not None:
        base = recipe.model.checkpoint or recipe.model.preset
        print(
            f"the checkpoint is a LoRA adapter (PEFT format): "
            f"gemmakit merge-lora {base} {result.checkpoint} OUT"
        )
    return 0
