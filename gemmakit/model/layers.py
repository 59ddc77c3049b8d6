"""The small numeric pieces of a Gemma block: RMSNorm, rotary embedding, gated MLP."""

from __future__ import annotations

import torch
from torch import nn

from gemmakit import kernels


class RMSNorm(nn.Module):
    """y = x * rsqrt(mean(x^2) + eps) * (1 + w), in float32, cast back to x's dtype.

    `w` starts at zero, so a fresh norm is the identity scaling.
    """

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.rms_norm(x, self.weight, self.eps)  # fused C kernel in CPU training


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


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, N, T, H] by cos/sin [B, T, H] (already in x's dtype)."""
    return kernels.rope(x, cos, sin)  # fused C kernel in CPU training


class Linear(nn.Linear):
    """nn.Linear (same parameters and state-dict keys) whose forward is `kernels.linear`: the
    bf16 CPU decode step runs the C GEMV kernel, everything else F.linear."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.linear(x, self.weight, self.bias)


class GatedMLP(nn.Module):
    """Down(gelu_tanh(Gate(x)) * Up(x)); the GELU acts on the gate branch only."""

    def __init__(self, d_model: int, ffn_dim: int) -> None:
        super().__init__()
        self.gate_proj = Linear(d_model, ffn_dim, bias=False)
        self.up_proj = Linear(d_model, ffn_dim, bias=False)
        self.down_proj = Linear(ffn_dim, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(kernels.gelu_mul(self.gate_proj(x), self.up_proj(x)))
