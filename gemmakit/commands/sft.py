"""`gemmakit sft RECIPE [--set key=value ...] [--resume]`: supervised fine-tuning on chat
conversations (JSONL), full or LoRA, from a YAML recipe (see recipes/sft-*.yaml).

Under torchrun each process takes one device, as with `gemmakit pretrain`.
"""

from __future__ import annotations

import argparse

from gemmakit.commands.common import add_recipe_args, on_main_rank


def register(sub) -> None:
    p = sub.add_parser("sft", help="fine-tune on chat conversations (full or LoRA) from a recipe")
    add_recipe_args(p, "YAML recipe file (see recipes/sft-*.yaml)", "lora.rank=16")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from gemmakit.training import load_recipe
    from gemmakit.training.sft import sft

    recipe = load_recipe(args.recipe, args.overrides)
    result = sft(recipe, resume=args.resume)
    if not on_main_rank():
        return 0
    if result.losses:
        val = f", held-out loss {result.val_losses[-1][1]:.4f}" if result.val_losses else ""
        print(
            f"done: {result.steps} steps, final loss {result.losses[-1]:.4f}{val}, "
            f"{result.tokens_per_s:,.0f} tokens/s; checkpoint {result.checkpoint}"
        )
        if recipe.lora is not None:
            base = recipe.model.checkpoint or recipe.model.preset
            print(
                f"the checkpoint is a LoRA adapter (PEFT format): "
                f"gemmakit merge-lora {base} {result.checkpoint} OUT"
            )
    return 0
