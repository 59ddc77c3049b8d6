"""Hand-written CPU kernels where torch has no fast path: the bfloat16 GEMV of decoding, and
fused RMSNorm, RoPE, GELU gating and cross-entropy rows for training steps (train_ops).

`linear(x, weight)` is F.linear, except that a few-row product with a bf16 CPU weight (the
decode step) runs in bf16_gemv.c at close to memory bandwidth. Everything else, and every
machine where the kernel cannot be built, goes to torch. GEMMAKIT_NO_KERNELS=1 turns it off.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gemmakit.kernels.cpu import MAX_ROWS, bf16_matmul, enabled, library
from gemmakit.kernels.train_ops import gelu_mul, rms_norm, rope

__all__ = ["MAX_ROWS", "enabled", "gelu_mul", "kernel_applies", "linear", "rms_norm", "rope"]


def kernel_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """True when `linear(x, weight)` will run the C kernel rather than torch."""
    return (
        weight.dtype == torch.bfloat16
        and x.dtype in (torch.bfloat16, torch.float32)
        and weight.device.type == "cpu"
        and x.device.type == "cpu"
        and weight.dim() == 2
        and weight.is_contiguous()
        and x.dim() >= 1
        and x.shape[-1] == weight.shape[1]
        and 0 < x.numel() <= MAX_ROWS * weight.shape[1]
        # the kernel has no backward, and a traced/compiled graph can't see through ctypes
        and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
        and not torch.compiler.is_compiling()
        and enabled()
        and library() is not None
    )


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] @ weight[N, K]^T (+ bias) -> [..., N] in x's dtype, like F.linear.

    A bf16 CPU weight with at most MAX_ROWS rows of x runs the C kernel (float32 accumulation,
    one rounding to x's dtype at the end); a float32 x with a bf16 weight means the upcast
    weight (F.linear would refuse the mixed dtypes, so torch gets weight.float()).
    """
    if not kernel_applies(x, weight):
        if x.dtype == torch.float32 and weight.dtype == torch.bfloat16:
            weight = weight.float()
        return F.linear(x, weight, bias)
    y = bf16_matmul(x.reshape(-1, x.shape[-1]), weight)
    y = y.view(*x.shape[:-1], weight.shape[0])
    if bias is not None:
        y = y + bias
    return y.to(x.dtype)
