"""Supervised fine-tuning: the shared loop with the next-token loss on model turns only, over
packed chat conversations, as full fine-tuning or LoRA.

    recipe.data.train       JSONL files of conversations (gemmakit.training.conversations)
    recipe.data.valid       a held-out JSONL file, or recipe.sft.valid_fraction of train
    recipe.data.tokenizer   the vocabulary (default: the model checkpoint's own)
    recipe.lora             null: every weight trains; else adapters on lora.targets, base frozen

A LoRA run's checkpoints hold the adapter alone in PEFT's format (plus the train state), for
`gemmakit.load_model(base, adapter=checkpoint)` or `gemmakit merge-lora`.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from gemmakit.atomic import atomic_path
from gemmakit.checkpoint import open_source
from gemmakit.checkpoint.gguf_vocab import sentencepiece_proto_from_gguf
from gemmakit.checkpoint.load import resolve_config
from gemmakit.checkpoint.peft import is_adapter_dir, load_lora
from gemmakit.config import GemmaConfig
from gemmakit.model.lora import LoRASpec, apply_lora
from gemmakit.resolve import TOKENIZER_FILE, checkpoint_path, find_tokenizer
from gemmakit.tokenizer import load_tokenizer
from gemmakit.training import distributed
from gemmakit.training.conversations import (
    PackedRows,
    encode_conversations,
    eval_batches,
    read_conversations,
)
from gemmakit.training.distributed import DistEnv
from gemmakit.training.loop import RunResult, model_config, train
from gemmakit.training.losses import IGNORE, LOSS_TERMS, next_token_loss
from gemmakit.training.recipe import LoRASection, Recipe, RecipeError, as_recipe


def base_config(recipe: Recipe) -> GemmaConfig:
    """The config of the model the recipe starts from, read without loading its weights."""
    if not recipe.model.checkpoint:
        return model_config(recipe)
    path = checkpoint_path(recipe.model.checkpoint)
    return resolve_config(open_source(path), path, None)


def tokenizer_file(recipe: Recipe) -> Path:
    """The SentencePiece file of data.tokenizer, else of model.checkpoint (a `.model` file, a
    folder holding tokenizer.model, a `.gguf` or an installed model), copied into checkpoints.
    A GGUF's vocabulary is written once into the run folder as tokenizer.model."""
    source = recipe.data.tokenizer or recipe.model.checkpoint
    if not source:
        raise RecipeError("recipe: set data.tokenizer (the model is a preset with no tokenizer)")
    path = checkpoint_path(source)
    if path.suffix != ".gguf":
        return find_tokenizer(path)
    out = Path(recipe.run_dir) / TOKENIZER_FILE
    with atomic_path(out) as tmp:
        tmp.write_bytes(sentencepiece_proto_from_gguf(path))
    return out


def prepare_lora(section: LoRASection, model: torch.nn.Module, resume_from: Path | None) -> None:
    """Adapters on the model (from the resumed checkpoint if any), the base frozen."""
    if resume_from is not None and is_adapter_dir(resume_from):
        load_lora(model, resume_from)
    else:
        spec = LoRASpec(section.rank, section.alpha, section.dropout, tuple(section.targets))
        apply_lora(model, spec)
    model.train()  # adapter dropout acts in training steps (never under no_grad)


def sft_loss(model: torch.nn.Module, batch: dict, chunk_tokens: int = 0) -> dict:
    """next_token_loss (the mean over the batch's target tokens: model turns) and, as
    LOSS_TERMS, how many there are: rows hold different numbers of them, so the loop weighs
    each micro-batch by its count and any split of a step (micro-batches, ranks) gives the
    mean over the whole step's targets."""
    loss = next_token_loss(model, batch, chunk_tokens)
    return {"loss": loss, LOSS_TERMS: (batch["targets"] != IGNORE).sum()}


class SFTData:
    """The recipe's conversations, encoded: the training stream and the held-out batches."""

    def __init__(self, recipe: Recipe, tokenizer, config: GemmaConfig) -> None:
        t = recipe.training
        self.recipe, self.pad_id = recipe, tokenizer.token_ids(config.tokens).pad
        convs = [c for f in recipe.data.train for c in read_conversations(f)]
        valid = read_conversations(recipe.data.valid) if recipe.data.valid else []
        if not valid and recipe.sft.valid_fraction > 0:
            # A seeded split, the same on every rank and every resume.
            n = max(1, round(len(convs) * recipe.sft.valid_fraction))
            held = set(np.random.default_rng([t.seed, 1]).permutation(len(convs))[:n].tolist())
            valid = [c for i, c in enumerate(convs) if i in held]
            convs = [c for i, c in enumerate(convs) if i not in held]
        encode = functools.partial(
            encode_conversations,
            tokenizer=tokenizer,
            token_ids=config.tokens,
            seq_len=t.seq_len,
            vocab_size=config.vocab_size,
        )
        self.train_examples, self.stats = encode(convs)
        self.valid_examples, _ = encode(valid) if valid else ([], None)
        self.rows = PackedRows(self.train_examples, t.seq_len, t.seed, recipe.sft.pack)

    def summary(self) -> str:
        s = self.stats
        return (
            f"sft data: {s.conversations} training conversations ({s.truncated} cut to "
            f"{self.recipe.training.seq_len} tokens, {s.dropped} dropped), {s.target_tokens:,} "
            f"target tokens, rows {self.rows.fill():.0%} full; "
            f"{len(self.valid_examples)} held out"
        )

    def make_batches(self, env: DistEnv, start: int) -> Iterator[dict]:
        m = self.recipe.training.micro_batch_size
        return self.rows.batches(m, self.pad_id, env.rank, env.world_size, start)

    def make_eval_batches(self, env: DistEnv) -> Iterator[dict]:
        r = self.recipe
        return eval_batches(
            self.valid_examples,
            r.training.seq_len,
            r.training.micro_batch_size,
            self.pad_id,
            env.rank,
            env.world_size,
            r.eval.batches,
            r.sft.pack,
        )


def sft(recipe: Recipe | dict | str | Path, resume: bool = False) -> RunResult:
    """Fine-tune as the recipe says (a Recipe, a nested dict or a YAML path); works alone or
    under torchrun. Returns the loop's RunResult (its checkpoint: a full model, or with LoRA
    the adapter folder)."""
    recipe = copy.deepcopy(as_recipe(recipe))
    config = base_config(recipe)
    tok_path = tokenizer_file(recipe)
    recipe.data.tokenizer = str(tok_path)  # copied into every checkpoint
    data = SFTData(recipe, load_tokenizer(tok_path), config)
    joined = torch.distributed.is_initialized()  # a caller's process group is left open
    env = distributed.init(recipe.training.device, recipe.distributed.backend)
    if env.is_main:
        print(data.summary(), flush=True)
    prepare = functools.partial(prepare_lora, recipe.lora) if recipe.lora else None
    loss_fn = functools.partial(sft_loss, chunk_tokens=recipe.training.loss_chunk_tokens)
    make_eval = data.make_eval_batches if data.valid_examples else None
    try:
        return train(
            recipe, loss_fn, data.make_batches, make_eval, resume, env, adapt_model=prepare
        )
    finally:
        if not joined:
            distributed.close()
