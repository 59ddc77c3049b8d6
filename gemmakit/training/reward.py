"""Reward model training: the shared loop with the Bradley-Terry loss over preference pairs.

    loss = -log sigmoid(r(prompt + chosen) - r(prompt + rejected))     (mean over pairs)

r is a Gemma backbone with a scalar head read at the last token (gemmakit.model.reward); the
head is the loss's own parameter, always trained; the backbone trains fully or, with
recipe.lora, through adapters. Logged: loss, pairwise accuracy (r_chosen > r_rejected) and
margin, on training and held-out pairs (val_accuracy).

    recipe.data.train       JSONL files of preference pairs (gemmakit.training.preferences)
    recipe.data.valid       a held-out JSONL file, or recipe.reward.valid_fraction of train
    recipe.data.tokenizer   the vocabulary (default: the model checkpoint's own)

Checkpoints are HF's Gemma*ForSequenceClassification folders (a LoRA run's: the PEFT adapter
with the head as a module to save), read by `gemmakit.load_reward_model`.
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from gemmakit.config import GemmaConfig
from gemmakit.model.reward import HEAD_KEY, head_config, last_token_rewards
from gemmakit.tokenizer import load_tokenizer
from gemmakit.training import distributed
from gemmakit.training.loop import RunResult, train
from gemmakit.training.preferences import PreferenceData
from gemmakit.training.recipe import Recipe, as_recipe
from gemmakit.training.sft import base_config, prepare_lora, tokenizer_file


class BradleyTerryLoss(nn.Module):
    """The reward head and the pairwise loss: forward(model, batch) -> {"loss", "accuracy",
    "margin"}, batch as `collate_pairs` makes it (m chosen rows, then m rejected rows)."""

    def __init__(self, config: GemmaConfig, seed: int = 0) -> None:
        super().__init__()
        self.config = config
        self.head = nn.Linear(config.d_model, 1, bias=False)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():  # HF's initializer_range: a small start, rewards near 0
            self.head.weight.copy_(torch.randn(self.head.weight.shape, generator=gen) * 0.02)

    def forward(self, model: nn.Module, batch: dict) -> dict:
        r = last_token_rewards(model, self.head.weight, batch["tokens"], batch["lengths"])
        m = len(r) // 2
        diff = r[:m] - r[m:]
        return {
            "loss": -F.logsigmoid(diff).mean(),
            "accuracy": (diff > 0).float().mean(),
            "margin": diff.detach().mean(),
        }

    def checkpoint_head(self, params: dict) -> tuple[dict, dict, str]:
        """How the head is saved (gemmakit.training.state): HF's score.weight [1, d], the
        config.json of a one-label sequence classifier, PEFT's task type."""
        return {HEAD_KEY: params["head.weight"]}, head_config(self.config), "SEQ_CLS"


def reward(recipe: Recipe | dict | str | Path, resume: bool = False) -> RunResult:
    """Train a reward model as the recipe says (a Recipe, a nested dict or a YAML path);
    works alone or under torchrun. Returns the loop's RunResult (val_metrics hold the held-out
    accuracy); its checkpoint loads with gemmakit.load_reward_model."""
    recipe = copy.deepcopy(as_recipe(recipe))
    config = base_config(recipe)
    tok_path = tokenizer_file(recipe)
    recipe.data.tokenizer = str(tok_path)  # copied into every checkpoint
    tokenizer = load_tokenizer(tok_path)
    data = PreferenceData(recipe, tokenizer, config, recipe.reward.valid_fraction, targets=False)
    joined = torch.distributed.is_initialized()  # a caller's process group is left open
    env = distributed.init(recipe.training.device, recipe.distributed.backend)
    if env.is_main:
        print(data.summary("reward"), flush=True)
    prepare = functools.partial(prepare_lora, recipe.lora) if recipe.lora else None
    loss = BradleyTerryLoss(config, recipe.training.seed)
    make_eval = data.make_eval_batches if data.valid else None
    try:
        return train(recipe, loss, data.make_batches, make_eval, resume, env, adapt_model=prepare)
    finally:
        if not joined:
            distributed.close()
