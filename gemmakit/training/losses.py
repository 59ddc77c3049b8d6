"""Losses: a cross-entropy that never holds the whole batch's logits, and the wrapper that
makes "a model plus a loss" one module for DDP/FSDP."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

IGNORE = -100  # target id that contributes no loss (padding, prompt tokens in SFT)
CHUNK_BYTES = 2**29  # auto chunk size: at most this many bytes of float32 logits per chunk


def auto_chunk_tokens(vocab_size: int) -> int:
    return max(64, CHUNK_BYTES // (4 * vocab_size))


class _ChunkedCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy whose gradients are computed chunk by chunk during the forward.

    Each chunk's logits live only while that chunk is processed: its loss and its gradients
    (for the hidden states and the head's parameters) are taken at once, so backward only
    scales them and nothing is recomputed. Peak memory: one [chunk, V] block of logits (and
    its softmax) plus gradients the size of the hidden states and of the head.
    """

    @staticmethod
    def forward(ctx, hidden, targets, chunk_tokens, logits_fn, *params):
        want_grad = any(ctx.needs_input_grad[i] for i in (0, *range(4, 4 + len(params))))
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.zeros_like(hidden) if want_grad else None
        grad_params = [torch.zeros_like(p, dtype=torch.float32) for p in params]
        for i in range(0, hidden.shape[0], chunk_tokens):
            tc = targets[i : i + chunk_tokens]
            if not want_grad:
                total += _chunk_loss(logits_fn(hidden[i : i + chunk_tokens]), tc)[0]
                continue
            with torch.enable_grad():
                hc = hidden[i : i + chunk_tokens].detach().requires_grad_()
                logits = logits_fn(hc)  # [C, V], with the graph back to hc and params
            loss, grad_logits = _chunk_loss(logits.detach(), tc, want_grad=True)
            grads = torch.autograd.grad(
                logits, [hc, *params], grad_logits.to(logits.dtype), allow_unused=True
            )
            total += loss
            grad_hidden[i : i + chunk_tokens] = grads[0]
            for acc, g in zip(grad_params, grads[1:]):
                if g is not None:
                    acc += g
        if want_grad:
            ctx.save_for_backward(grad_hidden, *grad_params)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_hidden, *grad_params = ctx.saved_tensors
        scaled = [g * grad_out.to(g.dtype) for g in grad_params]
        return (grad_hidden * grad_out.to(grad_hidden.dtype), None, None, None, *scaled)


def _chunk_loss(logits: torch.Tensor, targets: torch.Tensor, want_grad: bool = False):
    """Summed cross-entropy of logits [C, V] against targets [C] (IGNORE: skipped), in
    float32; with want_grad also its gradient wrt the logits, softmax - one_hot, computed in
    place in one float32 [C, V] buffer (fewer passes over it than log_softmax + its backward).
    Float32 logits are overwritten, not copied (40 ms of a 600 ms tiny-preset CPU step): the
    head's backward reads only its inputs (an op that saved its output would raise)."""
    z = logits.detach() if logits.dtype == torch.float32 else logits.float()
    valid = targets != IGNORE
    safe = torch.where(valid, targets, 0)
    target_logit = z.gather(1, safe[:, None])[:, 0]  # [C]
    top = z.amax(-1)  # [C]
    z.sub_(top[:, None]).exp_()
    norm = z.sum(-1)  # [C]
    loss = torch.where(valid, top + norm.log() - target_logit, 0.0).sum()
    if not want_grad:
        return loss, None
    z.div_(norm[:, None])  # softmax
    rows = valid.nonzero()[:, 0]
    z[rows, targets[rows]] -= 1.0
    if not bool(valid.all()):
        z.mul_(valid[:, None])
    return loss, z


def chunked_cross_entropy(
    logits_fn: Callable[[torch.Tensor], torch.Tensor],
    hidden: torch.Tensor,
    targets: torch.Tensor,
    params: Sequence[torch.Tensor],
    chunk_tokens: int = 1024,
) -> torch.Tensor:
    """Mean cross-entropy of `logits_fn(hidden)` against `targets`, one chunk at a time.

    hidden [..., D] (e.g. [B, T, D] final-normed states), targets [...] int64 with IGNORE
    where no loss is wanted; logits_fn maps [C, D] -> [C, V] (`model.logits`: the tied
    embedding and any final soft-cap) using the tensors `params` (the embedding), which get
    their gradients through this function. Never holds more than one [chunk_tokens, V] block
    of logits, and computes the head once (no recomputation in backward). The result and its
    gradients equal the plain full-logits mean cross-entropy.
    """
    h = hidden.reshape(-1, hidden.shape[-1])  # [N, D]
    t = targets.reshape(-1)  # [N]
    if h.shape[0] != t.shape[0]:
        raise ValueError(f"hidden has {h.shape[0]} positions but targets has {t.shape[0]}")
    total = _ChunkedCrossEntropy.apply(h, t, chunk_tokens, logits_fn, *params)
    return total / (t != IGNORE).sum().clamp(min=1)


def next_token_loss(model: nn.Module, batch: dict, chunk_tokens: int = 0) -> torch.Tensor:
    """Pretraining loss: mean next-token cross-entropy.

    batch: {"tokens": [B, T] int64 inputs, "targets": [B, T] int64 (the inputs shifted by one;
    IGNORE to skip a position)}. chunk_tokens: positions per logits chunk (0: auto).
    """
    hidden = model(batch["tokens"], return_hidden=True)  # [B, T, D]
    head = [model.embedder.weight]  # what model.logits uses
    chunk_tokens = chunk_tokens or auto_chunk_tokens(model.config.vocab_size)
    return chunked_cross_entropy(model.logits, hidden, batch["targets"], head, chunk_tokens)


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
