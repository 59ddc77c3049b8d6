"""Log-probabilities of given next tokens under a model's output head, without the full
[N, V] logits: what log-likelihood scoring needs (gemmakit.evaluation.runner).

A 262144-word head is most of a small model's work per scored token. One matmul of N hidden
states against the whole [V, D] table runs at a third of the CPU's matmul rate (the table
streams through once per call while the [N, V] output is written and read back by
log_softmax and argmax). Here the table goes through in tiles of TILE words: each tile's
[N, TILE] logits stay in cache, and the C kernel folds them into each row's running max,
its id, the sum of exponentials and the target's logit (train_ops.softmax_stats). Where that
kernel does not apply (a GPU, a bf16 or quantized table, no compiler), chunks of positions go
through `Gemma.logits` and torch's logsumexp.
"""

from __future__ import annotations

import torch

from gemmakit.kernels import train_ops
from gemmakit.model.attention import soft_cap

TILE = 2048  # words per tile: [N, 2048] float32 logits stay in L2/L3 for N up to a few hundred
ROWS = 512  # positions per pass over the table (bounds the tile to 4 MiB)
LOGIT_CHUNK = 64  # positions per full-vocabulary logits chunk on the torch path (64 MiB)


@torch.inference_mode()
def token_logprobs(
    model: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden [N, D] final-normed hidden states (`model(..., return_hidden=True)`), targets
    [N] token ids -> (log p(target) [N] float32, whether target is the argmax [N] bool), both
    on the CPU."""
    if len(hidden) == 0:
        return torch.zeros(0), torch.zeros(0, dtype=torch.bool)
    weight = model.embedder.weight
    cap = model.config.final_logit_softcap
    lib = None
    if (
        isinstance(weight, torch.Tensor)
        and not isinstance(weight, torch.nn.Module)
        and weight.dtype == torch.float32
        and weight.device.type == "cpu"
        and hidden.device.type == "cpu"
        and weight.is_contiguous()
    ):
        lib = train_ops.library() if train_ops.enabled() else None
    if lib is None:
        return _torch_path(model, hidden, targets)
    hidden = hidden.float().contiguous()
    targets = targets.to(torch.int64).contiguous()
    V = weight.shape[0]
    if bool((targets < 0).any() or (targets >= V).any()):
        raise ValueError(f"a target id is outside the vocabulary of {V}")
    lps, hits = [], []
    for s in range(0, len(hidden), ROWS):
        h, t = hidden[s : s + ROWS], targets[s : s + ROWS]
        n = len(h)
        picked = torch.zeros(n)
        mx = torch.full((n,), float("-inf"))
        arg = torch.zeros(n, dtype=torch.int64)
        total = torch.zeros(n)
        for start in range(0, V, TILE):
            z = torch.mm(h, weight[start : start + TILE].T)  # [n, TILE]
            if cap is not None:
                z = soft_cap(z, cap)
            train_ops.softmax_stats(lib, z, start, t, picked, mx, arg, total)
        lps.append(picked - (mx + total.log()))
        hits.append(arg == t)
    return torch.cat(lps), torch.cat(hits)


def _torch_path(
    model: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The same from full logits of LOGIT_CHUNK positions at a time (any device, any
    weight)."""
    lps, hits = [], []
    for s in range(0, len(hidden), LOGIT_CHUNK):
        logits = model.logits(hidden[s : s + LOGIT_CHUNK]).float()
        t = targets[s : s + LOGIT_CHUNK].to(logits.device)
        lps.append(logits.gather(-1, t[:, None])[:, 0] - torch.logsumexp(logits, -1))
        hits.append(logits.argmax(-1) == t)
    return torch.cat(lps).cpu(), torch.cat(hits).cpu()
