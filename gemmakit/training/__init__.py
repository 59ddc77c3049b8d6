"""Training: one loop for every stage (a loss and a batch stream each: loop.py; the
pretraining stage: pretrain.py), recipes, checkpoints, FSDP2/DDP under torchrun.

Note: `gemmakit.training.pretrain` is the function; its module is
`sys.modules["gemmakit.training.pretrain"]` (`from gemmakit.training.pretrain import ...` works).
"""

from gemmakit.training.loop import RunResult, train
from gemmakit.training.pretrain import pretrain
from gemmakit.training.recipe import Recipe, build_recipe, load_recipe

__all__ = ["Recipe", "RunResult", "build_recipe", "load_recipe", "pretrain", "train"]
