"""The small numeric pieces of a Gemma block: RMSNorm, rotary embedding, gated MLP, linear.

The math is written here in plain torch. Where a hand-written C kernel computes the same thing
faster (gemmakit/kernels: a float32 CPU training step, a bf16 CPU decode step), the modules
below call it instead; tests/test_train_ops.py and tests/test_kernels.py check it equals this.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gemmakit.kernels import gemv, train_ops
from gemmakit.quant.weight import QuantWeight

# --- the math ---------------------------------------------------------------------------------


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """y = x * rsqrt(mean(x^2) + eps) * (1 + w), in float32, cast back to x's dtype.

    x [..., D], weight [D] -> [..., D].
    """
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)  # [..., D]
    return (y * (1.0 + weight.float())).type_as(x)


def rope_angles(
    positions: torch.Tensor, head_dim: int, theta: float, scaling: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin for rotate-half RoPE, in float32.

    positions: [B, T] integer positions. Returns two [B, T, head_dim] tensors.
    """
    exponent = torch.arange(0, head_dim, 2, dtype=torch.int64, device=positions.device).float()
    inv_freq = 1.0 / (theta ** (exponent / head_dim)) / scaling  # [head_dim / 2]
    angles = positions.float()[..., None] * inv_freq  # [B, T, head_dim / 2]
    angles = torch.cat([angles, angles], dim=-1)  # rotate-half layout: both halves share angles
    return angles.cos(), angles.sin()


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, N, T, H] by cos/sin [B, T, H] (rotate-half layout, in x's dtype): each
    pair (x[i], x[i + H/2]) turns by its angle. Returns [B, N, T, H]."""
    cos, sin = cos[:, None], sin[:, None]  # [B, 1, T, H]: the same for every head
    x1, x2 = x.chunk(2, dim=-1)  # [B, N, T, H/2] each
    rotated = torch.cat([-x2, x1], dim=-1)  # [B, N, T, H]
    return x * cos + rotated * sin


def gelu_gate(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gelu_tanh(gate) * up, both [..., F]: the GELU acts on the gate branch only."""
    return F.gelu(gate, approximate="tanh") * up


# --- the modules: the math above, or the same in a C kernel where one applies ------------------


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """`rope(x, cos, sin)`; fused in C for a float32 CPU training step."""
    if train_ops.rope_applies(x, cos, sin):
        return train_ops.rope(x, cos, sin)
    return rope(x, cos, sin)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] @ weight [N, K]^T (+ bias) -> [..., N] in x's dtype, like F.linear.

    A bf16 CPU weight with at most gemv.MAX_ROWS rows of x (a decode step) runs the C GEMV at
    close to memory bandwidth; a float32 x with a bf16 weight means the upcast weight (F.linear
    would refuse the mixed dtypes). A gemmakit.quant QuantWeight (weights kept quantized) runs
    its own kernel.
    """
    if isinstance(weight, QuantWeight):  # kept quantized: its own kernel or torch fallback
        return weight.linear(x, bias)
    if gemv.applies(x, weight):
        return gemv.linear(x, weight, bias)
    if x.dtype == torch.float32 and weight.dtype == torch.bfloat16:
        weight = weight.float()
    return F.linear(x, weight, bias)


class RMSNorm(nn.Module):
    """`rms_norm` with a learned weight [dim]; `w` starts at zero, so a fresh norm is the
    identity scaling. Fused in C for a float32 CPU training step."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if train_ops.rms_norm_applies(x, self.weight):
            return train_ops.rms_norm(x, self.weight, self.eps)
        return rms_norm(x, self.weight, self.eps)


class Linear(nn.Linear):
    """nn.Linear (same parameters and state-dict keys) whose forward is `linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class GatedMLP(nn.Module):
    """Down(gelu_gate(Gate(x), Up(x))): x [..., D] -> [..., D] through width ffn_dim."""

    def __init__(self, d_model: int, ffn_dim: int) -> None:
        super().__init__()
        self.gate_proj = Linear(d_model, ffn_dim, bias=False)
        self.up_proj = Linear(d_model, ffn_dim, bias=False)
        self.down_proj = Linear(ffn_dim, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_proj(x), self.up_proj(x)  # [..., F] each
        if train_ops.gelu_mul_applies(gate, up):  # fused in C for a float32 CPU training step
            return self.down_proj(train_ops.gelu_mul(gate, up))
        return self.down_proj(gelu_gate(gate, up))
