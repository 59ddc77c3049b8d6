"""The pretraining stage: next-token cross-entropy over the recipe's token shards.

The pattern every stage follows: a loss (`next_token_loss`) and a batch stream
(`PretrainData.batches`, `.eval_batches`) handed to `gemmakit.training.loop.train`. The stream
learns the model's vocabulary from the model train builds (`adapt_model`), so the checkpoint
is opened once.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from pathlib import Path

import torch

from gemmakit.errors import ConfigError
from gemmakit.model.transformer import Gemma
from gemmakit.training import distributed
from gemmakit.training.distributed import DistEnv
from gemmakit.training.loop import RunResult, train
from gemmakit.training.losses import next_token_loss, windows_to_batch
from gemmakit.training.recipe import Recipe, as_recipe
from gemmakit.training.samplers import (
    HeldOut,
    eval_windows,
    train_source,
    valid_splits,
)


def pretrain(recipe: Recipe | dict | str | Path, resume: bool = False) -> RunResult:
    """Pretrain as the recipe says (a Recipe, a nested dict, or a YAML path): next-token
    cross-entropy over the recipe's token shards. Works alone or under torchrun."""
    recipe = as_recipe(recipe)
    data = PretrainData(recipe)  # opens the shard folders now: a wrong path fails at once
    loss_fn = functools.partial(next_token_loss, chunk_tokens=recipe.training.loss_chunk_tokens)
    joined = torch.distributed.is_initialized()  # a caller's process group is left open
    env = distributed.init(recipe.training.device, recipe.distributed.backend)
    try:
        evals = data.eval_batches if data.has_validation else None
        return train(recipe, loss_fn, data.batches, evals, resume, env, adapt_model=data.use_model)
    finally:
        if not joined:
            distributed.close()


class PretrainData:
    """The recipe's token stream as the loop's micro-batches {tokens, targets}: int64
    [micro_batch_size, seq_len] each."""

    def __init__(self, recipe: Recipe) -> None:
        self.recipe = recipe
        self.vocab: int | None = None  # the model's, from use_model
        self.vals: list[HeldOut] = []
        self.has_validation = recipe.data.synthetic  # the synthetic stream holds its own
        if not recipe.data.synthetic:  # shard samplers need no vocabulary
            source = train_source(recipe.data, 0, recipe.training.steps)
            self.vals = valid_splits(recipe.data, source, recipe.training.seq_len)
            self.has_validation = bool(self.vals)

    def use_model(self, model: Gemma, resume_from: Path | None = None) -> None:
        """Called by train with the model it built: its vocabulary bounds the token ids."""
        self.vocab = model.config.vocab_size
        if self.recipe.data.synthetic:
            source = train_source(self.recipe.data, self.vocab, self.recipe.training.steps)
            self.vals = valid_splits(self.recipe.data, source, self.recipe.training.seq_len)

    def batches(self, env: DistEnv, start: int) -> Iterator[dict]:
        """This rank's micro-batches from micro-step `start`; a token id beyond the model's
        vocabulary is a ConfigError naming the shard folders."""
        t = self.recipe.training
        # the sampler counts micro-steps: a staged mixture's schedule is over all of them
        accum = t.batch_size // (t.micro_batch_size * env.world_size)
        source = train_source(self.recipe.data, self.vocab, t.steps * accum)
        windows = source.batches(
            t.seq_len, t.micro_batch_size, env.rank, env.world_size, t.seed, start
        )
        for w in windows:
            if w.max() >= self.vocab:
                raise ConfigError(
                    f"{', '.join(self.recipe.data.train)}: token id {int(w.max())} is "
                    f"outside the model's vocabulary of {self.vocab}"
                )
            yield windows_to_batch(torch.from_numpy(w))

    def eval_batches(self, env: DistEnv) -> Iterator[dict]:
        """This rank's share of eval.batches validation micro-batches."""
        t = self.recipe.training
        windows = eval_windows(
            self.vals,
            t.seq_len,
            t.micro_batch_size,
            env.rank,
            env.world_size,
            self.recipe.eval.batches,
        )
        return (windows_to_batch(torch.from_numpy(w)) for w in windows)
