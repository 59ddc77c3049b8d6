"""A reward model: a Gemma backbone and a scalar head read at the last non-pad token.

    r(x) = score . h_L(x)      h_L: final-normed hidden state of x's last token, score: [1, d]

Saved as HF transformers saves Gemma*ForSequenceClassification with one label (backbone under
`model.`, head `score.weight` [1, d], config.json `architectures` and `num_labels`), so HF's
class loads it and gives the same scores; a LoRA reward run saves its adapter in PEFT's format
with the head as a module to save (task SEQ_CLS). `load_reward_model` reads both.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from gemmakit.api import load_model
from gemmakit.chat import encode_chat
from gemmakit.checkpoint import save_hf
from gemmakit.checkpoint.peft import is_adapter_dir, read_adapter_config, saved_modules
from gemmakit.checkpoint.sources import open_source
from gemmakit.config import GemmaConfig
from gemmakit.errors import CheckpointError, UsageError
from gemmakit.model.transformer import Gemma
from gemmakit.resolve import checkpoint_path, tokenizer_beside
from gemmakit.tokenizer import load_tokenizer

HEAD_KEY = "score.weight"
# The HF class of a one-label reward model, by Gemma generation.
ARCHITECTURES = {
    1: "GemmaForSequenceClassification",
    2: "Gemma2ForSequenceClassification",
    3: "Gemma3TextForSequenceClassification",
}


def head_config(config: GemmaConfig) -> dict:
    """The config.json fields that make a Gemma checkpoint HF's sequence classifier."""
    return {
        "architectures": [ARCHITECTURES[config.generation]],
        "num_labels": 1,
        "id2label": {"0": "LABEL_0"},
        "label2id": {"LABEL_0": 0},
        "pad_token_id": config.tokens.pad,
    }


def last_token_rewards(
    model: Gemma, score_weight: torch.Tensor, tokens: torch.Tensor, lengths: torch.Tensor
) -> torch.Tensor:
    """Rewards [B] float32 of right-padded rows tokens [B, T] with lengths [B] (>= 1): the
    head applied, in float32, to each row's hidden state at position lengths - 1."""
    hidden = model(tokens, return_hidden=True)  # [B, T, D]
    last = hidden[torch.arange(len(tokens), device=tokens.device), lengths - 1]  # [B, D]
    with torch.autocast(tokens.device.type, enabled=False):  # a float32 score under autocast
        return F.linear(last.float(), score_weight.float())[:, 0]


class RewardModel(nn.Module):
    """backbone `model` (a Gemma) + `head` (nn.Linear(d_model, 1, bias=False), saved as HF's
    `score.weight`; the name `score` is the method that scores texts)."""

    def __init__(self, model: Gemma, head: nn.Linear | None = None) -> None:
        super().__init__()
        self.model = model
        d = model.config.d_model
        self.head = head or nn.Linear(d, 1, bias=False, device=model.embedder.weight.device)
        self.tokenizer = None  # set by load_reward_model when a tokenizer.model is beside

    @property
    def config(self) -> GemmaConfig:
        return self.model.config

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """tokens [B, T] (right-padded), lengths [B] -> rewards [B] float32."""
        return last_token_rewards(self.model, self.head.weight, tokens, lengths)

    @torch.no_grad()
    def score_ids(self, sequences: Sequence[Sequence[int]], batch_size: int = 8) -> torch.Tensor:
        """Rewards [N] float32 (on the CPU) of token sequences, in eval mode, right-padded with
        the pad id in batches of batch_size (as HF reads them: the last non-pad token)."""
        if any(len(s) == 0 for s in sequences):
            raise UsageError("score_ids: an empty sequence has no token to read a reward at")
        was_training = self.training
        self.eval()
        device = self.head.weight.device
        pad = self.config.tokens.pad
        out = []
        try:
            for i in range(0, len(sequences), batch_size):
                chunk = sequences[i : i + batch_size]
                T = max(len(s) for s in chunk)
                tokens = torch.full((len(chunk), T), pad, dtype=torch.long)
                for b, s in enumerate(chunk):
                    tokens[b, : len(s)] = torch.as_tensor(list(s), dtype=torch.long)
                lengths = torch.tensor([len(s) for s in chunk])
                out.append(self(tokens.to(device), lengths.to(device)).cpu())
        finally:
            self.train(was_training)
        return torch.cat(out) if out else torch.zeros(0)

    def encode(self, item: str | Sequence[dict], tokenizer=None) -> list[int]:
        """The ids a text (with BOS) or a conversation (encode_chat, no generation prompt) is
        scored on."""
        tok = tokenizer or self.tokenizer
        if tok is None:
            raise UsageError("score: pass tokenizer= (no tokenizer.model beside the checkpoint)")
        if isinstance(item, str):
            return tok.encode(item, bos=True, special=False)
        return encode_chat(tok, item, token_ids=self.config.tokens).ids

    def score(self, items: Sequence[str | Sequence[dict]], tokenizer=None) -> list[float]:
        """The reward of each text or conversation ([{"role", "content"}, ...])."""
        if isinstance(items, str):
            raise UsageError("score: pass a list of texts or conversations, not one string")
        ids = [self.encode(item, tokenizer) for item in items]
        return self.score_ids(ids).tolist()


def save_reward_model(
    rm: RewardModel, directory: str | Path, extra_files: dict[str, Path | bytes] | None = None
) -> Path:
    """Write the reward model as HF's Gemma*ForSequenceClassification folder (see save_hf)."""
    return save_hf(
        rm.model,
        directory,
        extra_files=extra_files,
        extra_tensors={HEAD_KEY: rm.head.weight.detach()},
        config_updates=head_config(rm.config),
    )


def load_reward_model(
    path: str | Path, dtype: torch.dtype | None = None, device: torch.device | str | None = None
) -> RewardModel:
    """A RewardModel from what `gemmakit reward` saves (or HF transformers'
    Gemma*ForSequenceClassification with one label): a checkpoint folder with config.json and
    `score.weight`, or a PEFT adapter folder (task SEQ_CLS, the head in modules_to_save) put
    onto its base_model_name_or_path. A tokenizer.model beside it is loaded for `score`."""
    path = checkpoint_path(path)
    if is_adapter_dir(path):
        _, cfg = read_adapter_config(path)
        base = cfg.get("base_model_name_or_path")
        if not base:
            raise CheckpointError(
                f"{path}: the adapter names no base_model_name_or_path to put it onto"
            )
        backbone = load_model(base, dtype=dtype, device=device, adapter=path)
        head = saved_modules(path).get(HEAD_KEY)
    else:
        _check_labels(path)
        backbone = load_model(path, dtype=dtype, device=device)
        source = open_source(path)
        head = source.get(HEAD_KEY) if HEAD_KEY in source.keys() else None
    if head is None:
        raise CheckpointError(f"{path}: no {HEAD_KEY!r} (not a reward model checkpoint)")
    d = backbone.config.d_model
    if tuple(head.shape) != (1, d):
        raise CheckpointError(f"{path}: {HEAD_KEY!r} has shape {list(head.shape)}, want [1, {d}]")
    weight = backbone.embedder.weight
    linear = nn.Linear(d, 1, bias=False, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(head)
    rm = RewardModel(backbone, linear).eval()
    tok = tokenizer_beside(path)
    if tok is not None:
        rm.tokenizer = load_tokenizer(tok)
    return rm


def _check_labels(path: Path) -> None:
    config = (path if path.is_dir() else path.parent) / "config.json"
    if not config.is_file():
        return
    try:
        hf = json.loads(config.read_text())
        n = len(hf["id2label"]) if "id2label" in hf else hf.get("num_labels", 1)
    except (OSError, ValueError, AttributeError, TypeError):
        return  # load_model reports a bad config.json
    if n != 1:
        raise CheckpointError(f"{config}: num_labels={n}; a reward model has one")
