"""Training: one loop for every stage (a loss and a batch stream each), recipes, checkpoints,
FSDP2/DDP under torchrun."""

from gemmakit.training.loop import RunResult, pretrain, train
from gemmakit.training.recipe import Recipe, build_recipe, load_recipe

__all__ = ["Recipe", "RunResult", "build_recipe", "load_recipe", "pretrain", "train"]
