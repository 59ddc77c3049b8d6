"""The bf16 GEMV of decoding (bf16_gemv.c): x [M, K] @ weight [N, K]^T for a bfloat16 CPU
weight and a few rows of x, at close to memory bandwidth, where torch has no fast path. The
library also has `f32_gemv`, the same loops for float32 weights, which the fused decode step
(decode_step.py) calls from C.

`gemmakit.model.layers.linear` runs it when `applies(x, weight)`; everything else, and every
machine where the library cannot be built, stays on F.linear.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from gemmakit.kernels.build import CLibrary, enabled

MAX_ROWS = 8  # the kernel's largest M (decode of a batch of up to 8 sequences)

_P, _I64, _INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int


def _call(lib: ctypes.CDLL, x: torch.Tensor, weight: torch.Tensor, n_threads: int) -> torch.Tensor:
    """x [M, K] float32 contiguous, weight [N, K] bf16 contiguous -> [M, N] float32."""
    (m, k), n = x.shape, weight.shape[0]
    y = torch.empty(m, n, dtype=torch.float32)
    rc = lib.bf16_gemv(x.data_ptr(), weight.data_ptr(), y.data_ptr(), m, n, k, n_threads)
    if rc != 0:
        shapes = f"x {tuple(x.shape)}, weight {tuple(weight.shape)}"
        raise ValueError(f"bf16_gemv rejected the shapes {shapes}")
    return y


def _self_test(lib: ctypes.CDLL) -> None:
    """Raise unless the kernel matches float32 matmul on shapes with K and N tails."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(29, 45, generator=gen).to(torch.bfloat16)
    w32 = torch.randn(29, 45, generator=gen)
    for m in (1, 2, 3, 6, 8):  # every kernel path: 1, the 256-bit blocks, the 512-bit ones
        x = torch.randn(m, 45, generator=gen)
        got = _call(lib, x, w, n_threads=2)
        want = x @ w.float().T
        if not torch.allclose(got, want, rtol=1e-5, atol=1e-5):
            raise RuntimeError(f"self-test failed for M={m}: max error {(got - want).abs().max()}")
        got = torch.empty(m, 29)
        lib.f32_gemv(x.data_ptr(), w32.data_ptr(), got.data_ptr(), m, 29, 45, 2)
        if not torch.allclose(got, x @ w32.T, rtol=1e-5, atol=1e-5):
            raise RuntimeError(f"f32 self-test failed for M={m}")


LIBRARY = CLibrary(
    "bf16 GEMV",
    Path(__file__).with_name("bf16_gemv.c"),
    {
        "bf16_gemv": [_P, _P, _P, _I64, _I64, _I64, _INT],
        "f32_gemv": [_P, _P, _P, _I64, _I64, _I64, _INT],
    },
    _self_test,
)


def library() -> ctypes.CDLL | None:
    """The loaded GEMV library, or None when it is unavailable (the reason warned once)."""
    return LIBRARY.get()


def applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """True when `linear(x, weight)` can run the C kernel: a bf16 CPU weight, at most MAX_ROWS
    rows of x, no gradient wanted, not under torch.compile, kernels enabled and built."""
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


def bf16_matmul(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [M, K] (M <= MAX_ROWS) @ weight[N, K]^T for a bf16 CPU weight, in float32 -> [M, N].

    Requires `library()` to be non-None; x is converted once to contiguous float32.
    """
    lib = library()
    if lib is None:
        raise RuntimeError("the bf16 GEMV kernel is unavailable on this machine")
    x = x.to(torch.float32).contiguous()
    return _call(lib, x, weight, torch.get_num_threads())


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x [..., K], weight [N, K], bias) -> [..., N] in x's dtype, through the kernel
    (float32 accumulation, one rounding to x's dtype at the end). Only where `applies`."""
    y = bf16_matmul(x.reshape(-1, x.shape[-1]), weight)
    y = y.view(*x.shape[:-1], weight.shape[0])
    if bias is not None:
        y = y + bias
    return y.to(x.dtype)
