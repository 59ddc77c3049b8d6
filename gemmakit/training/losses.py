"""Losses: a cross-entropy that never holds the whole batch's logits, and the wrapper that
makes "a model plus a loss" one module for DDP/FSDP."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from gemmakit.kernels import train_ops

IGNORE = -100  # target id that contributes no loss (padding, prompt tokens in SFT)
# The entry of a loss_fn's dict saying how many terms its loss is the mean of (training.loop).
LOSS_TERMS = "loss_terms"
# The entry of a micro-batch giving the model FLOPs spent on it outside the trained model
# (sampling, a reference, a reward model, a teacher), which MFU counts (training.loop).
FLOPS = "flops"
CHUNK_BYTES = 2**29  # auto chunk size: at most this many bytes of float32 logits per chunk


def auto_chunk_tokens(vocab_size: int) -> int:
    return max(64, CHUNK_BYTES // (4 * vocab_size))


class _Workspace:
    """One reusable CPU buffer for a chunk of logits. A fresh [chunk, V] tensor each step
    costs a page fault per 4 KiB (glibc maps blocks of 32 MiB and more straight from the
    kernel): on the tiny preset that was 8k faults, 20 ms of a 400 ms step. CUDA's caching
    allocator already reuses its blocks, so GPU chunks are plain allocations."""

    def __init__(self) -> None:
        self.buffer: torch.Tensor | None = None

    def get(self, rows: int, cols: int, dtype: torch.dtype, device: torch.device):
        if device.type != "cpu":
            return torch.empty(rows, cols, dtype=dtype, device=device)
        n = rows * cols
        b = self.buffer
        if b is None or b.dtype != dtype or b.numel() < n:
            self.buffer = b = torch.empty(n, dtype=dtype)
        return b[:n].view(rows, cols)

    def release(self) -> None:
        self.buffer = None


WORKSPACE = _Workspace()


ChunkLoss = Callable[[torch.Tensor, slice, bool], tuple[torch.Tensor, torch.Tensor | None]]


class _ChunkedHeadLoss(torch.autograd.Function):
    """A summed loss of logits = softcap(hidden @ weight^T) whose gradients are computed
    chunk by chunk during the forward.

    chunk_loss(logits [C, V], rows, want_grad) -> (summed loss of those rows (a slice of the
    positions), its float gradient wrt the logits [C, V] or None): the cross-entropy here,
    the KL to a teacher in distillation. It may overwrite the logits it gets.

    Each chunk's logits live only while that chunk is processed: its loss and its gradients
    (for the hidden states and the weight) are taken at once, with plain matmuls into
    preallocated outputs, so backward only scales them and nothing is recomputed. Peak
    memory: one [chunk, V] block of logits (plus what chunk_loss holds for it) and gradients
    the size of the hidden states and of the weight. Under autocast the matmuls run in the
    autocast dtype, as F.linear would.
    """

    @staticmethod
    def forward(ctx, hidden, weight, softcap, chunk_tokens, chunk_loss):
        dev = hidden.device
        cdt = hidden.dtype
        if torch.is_autocast_enabled(dev.type):
            cdt = torch.get_autocast_dtype(dev.type)
        want_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        w = weight.detach().to(cdt)
        acc = torch.promote_types(weight.dtype, torch.float32)  # the weight gradient's sums
        total = torch.zeros((), dtype=acc, device=dev)
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros_like(weight, dtype=acc) if want_grad else None
        with torch.autocast(dev.type, enabled=False):
            for i in range(0, hidden.shape[0], chunk_tokens):
                rows = slice(i, i + chunk_tokens)
                hc = hidden[rows].detach().to(cdt)
                logits = torch.mm(hc, w.t(), out=WORKSPACE.get(len(hc), len(w), cdt, dev))
                capped = None
                if softcap is not None:
                    capped = torch.tanh(logits / softcap)  # kept for the chain rule
                    logits = capped * softcap
                loss, grad = chunk_loss(logits, rows, want_grad)
                total += loss
                if not want_grad:
                    continue
                if capped is not None:
                    grad.mul_(1.0 - capped.square())
                grad = grad.to(cdt)
                if grad_hidden is not None:
                    grad_hidden[rows] = grad @ w
                if ctx.needs_input_grad[1]:
                    if cdt == acc:
                        grad_weight.addmm_(grad.t(), hc)
                    else:
                        grad_weight += (grad.t() @ hc).to(acc)
        if want_grad:
            ctx.save_for_backward(grad_hidden, grad_weight)
            ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_hidden, grad_weight = ctx.saved_tensors
        gh = gw = None
        if ctx.needs_input_grad[0]:
            gh = grad_hidden * grad_out.to(grad_hidden.dtype)
        if ctx.needs_input_grad[1]:
            gw = (grad_weight * grad_out).to(ctx.weight_dtype)
        return gh, gw, None, None, None


def chunked_head_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    softcap: float | None,
    chunk_tokens: int,
    chunk_loss: ChunkLoss,
) -> torch.Tensor:
    """The summed `chunk_loss` over the logits softcap(hidden @ weight^T), one chunk of
    positions at a time (see _ChunkedHeadLoss). hidden [N, D], weight [V, D] -> scalar."""
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"head weight {tuple(weight.shape)} does not match hidden size {hidden.shape[-1]}"
        )
    return _ChunkedHeadLoss.apply(hidden, weight, softcap, chunk_tokens, chunk_loss)


def _chunk_loss(logits: torch.Tensor, targets: torch.Tensor, want_grad: bool = False):
    """Summed cross-entropy of logits [C, V] against targets [C] (IGNORE: skipped), in
    float32; with want_grad also its gradient wrt the logits, softmax - one_hot, computed in
    place in one float32 [C, V] buffer (fewer passes over it than log_softmax + its backward).
    Float32 logits are overwritten, not copied (40 ms of a 600 ms tiny-preset CPU step): the
    head's backward reads only its inputs (an op that saved its output would raise)."""
    z = logits.detach() if logits.dtype == torch.float32 else logits.float()
    lib = train_ops.xent_rows_kernel(z)
    if lib is not None:  # the same in one C pass per row (train_ops.c)
        return train_ops.xent_rows(lib, z, targets, want_grad).sum(), (z if want_grad else None)
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
    hidden: torch.Tensor,
    targets: torch.Tensor,
    weight: torch.Tensor,
    softcap: float | None = None,
    chunk_tokens: int = 1024,
) -> torch.Tensor:
    """Mean cross-entropy of logits = softcap(hidden @ weight^T) against `targets`, one chunk
    of positions at a time.

    hidden [..., D] (e.g. [B, T, D] final-normed states), targets [...] int64 with IGNORE
    where no loss is wanted, weight [V, D] the output head (Gemma's tied embedding), softcap
    the final-logit soft-cap (Gemma 2) or None: the same logits as `Gemma.logits`. Never holds
    more than one [chunk_tokens, V] block of logits, and computes the head once (no
    recomputation in backward); positions without a target (IGNORE) skip the head altogether.
    The result and its gradients equal the plain full-logits mean cross-entropy.
    """
    h = hidden.reshape(-1, hidden.shape[-1])  # [N, D]
    t = targets.reshape(-1)  # [N]
    if h.shape[0] != t.shape[0]:
        raise ValueError(f"hidden has {h.shape[0]} positions but targets has {t.shape[0]}")
    valid = t != IGNORE
    n = valid.sum()
    if int(n) < len(t):  # SFT: logits only where there is a target (not on prompt tokens)
        h, t = h[valid], t[valid]
    total = chunked_head_loss(
        h, weight, softcap, chunk_tokens, lambda z, rows, g: _chunk_loss(z, t[rows], g)
    )
    return total / n.clamp(min=1)


def next_token_loss(model: nn.Module, batch: dict, chunk_tokens: int = 0) -> torch.Tensor:
    """Pretraining loss: mean next-token cross-entropy.

    batch: {"tokens": [B, T] int64 inputs, "targets": [B, T] int64 (the inputs shifted by one;
    IGNORE to skip a position), optionally "segment_ids": [B, T] for packed sequences (see
    Gemma.forward)}. chunk_tokens: positions per logits chunk (0: auto).
    """
    hidden = model(batch["tokens"], segment_ids=batch.get("segment_ids"), return_hidden=True)
    cfg = model.config
    chunk_tokens = chunk_tokens or auto_chunk_tokens(cfg.vocab_size)
    return chunked_cross_entropy(
        hidden, batch["targets"], model.embedder.weight, cfg.final_logit_softcap, chunk_tokens
    )


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
