"""Losses: a cross-entropy that never holds the whole batch's logits, and the wrapper that
makes "a model plus a loss" one module for DDP/FSDP."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

IGNORE = -100  # target id that contributes no loss (padding, prompt tokens in SFT)


def _chunk_loss_sum(
    logits_fn: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor:
    logits = logits_fn(hidden).float()  # [C, V]
    return F.cross_entropy(logits, targets, ignore_index=IGNORE, reduction="sum")


def chunked_cross_entropy(
    logits_fn: Callable[[torch.Tensor], torch.Tensor],
    hidden: torch.Tensor,
    targets: torch.Tensor,
    chunk_tokens: int = 1024,
) -> torch.Tensor:
    """Mean cross-entropy of `logits_fn(hidden)` against `targets`, one chunk at a time.

    hidden [..., D] (e.g. [B, T, D] final-normed states), targets [...] int64 with IGNORE
    where no loss is wanted; logits_fn maps [C, D] -> [C, V] (`model.logits`: the tied
    embedding and any final soft-cap). Each chunk's logits are freed after its forward and
    recomputed in backward (checkpointing), so peak memory holds one [chunk, V] block instead
    of the whole [B*T, V]. The result equals the plain full-logits mean cross-entropy.
    """
    h = hidden.reshape(-1, hidden.shape[-1])  # [N, D]
    t = targets.reshape(-1)  # [N]
    if h.shape[0] != t.shape[0]:
        raise ValueError(f"hidden has {h.shape[0]} positions but targets has {t.shape[0]}")
    total = h.new_zeros((), dtype=torch.float32)
    for i in range(0, h.shape[0], chunk_tokens):
        hc, tc = h[i : i + chunk_tokens], t[i : i + chunk_tokens]
        if torch.is_grad_enabled() and h.requires_grad:
            total = total + checkpoint(_chunk_loss_sum, logits_fn, hc, tc, use_reentrant=False)
        else:
            total = total + _chunk_loss_sum(logits_fn, hc, tc)
    return total / (t != IGNORE).sum().clamp(min=1)


def next_token_loss(model: nn.Module, batch: dict, chunk_tokens: int = 1024) -> torch.Tensor:
    """Pretraining loss: mean next-token cross-entropy.

    batch: {"tokens": [B, T] int64 inputs, "targets": [B, T] int64 (the inputs shifted by one;
    IGNORE to skip a position)}.
    """
    hidden = model(batch["tokens"], return_hidden=True)  # [B, T, D]
    return chunked_cross_entropy(model.logits, hidden, batch["targets"], chunk_tokens)


def windows_to_batch(windows: torch.Tensor) -> dict:
    """Token windows [B, T+1] from a shard sampler -> {"tokens", "targets"} of [B, T] int64."""
    windows = torch.as_tensor(windows).long()
    return {"tokens": windows[:, :-1], "targets": windows[:, 1:]}


LossFn = Callable[[nn.Module, dict], torch.Tensor]


class LossModule(nn.Module):
    """A model and the loss the loop minimizes, as one module: forward(batch) -> scalar loss.

    This is what DDP or FSDP wrap, so the whole loss (the logits included, which use the tied
    embedding) runs inside the wrapped forward where every parameter is gathered. A loss with
    trainable parts of its own (a reward head) is an nn.Module: it is registered here, so its
    parameters are optimized, sharded and checkpointed with the model's.
    """

    def __init__(self, model: nn.Module, loss_fn: LossFn) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch: dict) -> torch.Tensor:
        return self.loss_fn(self.model, batch)
