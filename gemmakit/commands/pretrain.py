"""`gemmakit pretrain RECIPE [--set key=value ...] [--resume]`: train from a YAML recipe.

Alone it trains in one process; under torchrun each process takes one device and the model is
sharded with FSDP2 (or replicated with DDP: --set distributed.mode=ddp):
    torchrun --nproc-per-node 8 -m gemmakit.cli pretrain recipes/gemma-2b.yaml
"""

from __future__ import annotations

import argparse

from gemmakit.commands.common import add_recipe_args, on_main_rank


def register(sub) -> None:
    p = sub.add_parser("pretrain", help="pretrain a model from a YAML recipe (torchrun: sharded)")
    add_recipe_args(p, "YAML recipe file (see recipes/)", "optimizer.lr=1e-3")
    p.add_argument(
        "--peak-flops",
        type=float,
        default=None,
        help="per-device peak FLOP/s for MFU (default: GPU datasheet or measured)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from gemmakit.training import load_recipe, pretrain

    overrides = list(args.overrides)
    if args.peak_flops is not None:
        overrides.append(f"log.peak_flops={args.peak_flops}")
    recipe = load_recipe(args.recipe, overrides)
    result = pretrain(recipe, resume=args.resume)
    if not on_main_rank():
        return 0
    if result.losses:
        print(
            f"done: {result.steps} steps, final loss {result.losses[-1]:.4f}, "
            f"{result.tokens_per_s:,.0f} tokens/s, MFU {result.mfu:.1%}; "
            f"checkpoint {result.checkpoint}"
        )
    return 0
