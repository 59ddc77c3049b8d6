"""The quantized GEMV of decoding (quant_gemv.c): x [M, K] @ W[N, K]^T for a weight kept in
its quantized blocks (gemmakit.quant.QuantWeight) and at most MAX_ROWS rows of x, each block
dequantized in registers. Built, verified and loaded by the same machinery as the bf16 GEMV
(build.CLibrary); where it is unavailable, QuantWeight falls back to torch.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from gemmakit.kernels.build import CLibrary, enabled
from gemmakit.quant.selftest import check_all

MAX_ROWS = 8

_P, _I64, _INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def call(
    lib: ctypes.CDLL,
    code: int,
    x: torch.Tensor,
    qdata: torch.Tensor,
    scale: torch.Tensor | None,
    minimum: torch.Tensor | None,
    n: int,
    group: int,
    n_threads: int,
) -> torch.Tensor:
    """x [M, K] float32 contiguous, qdata uint8 [N, row bytes] contiguous -> y [M, N] float32."""
    m, k = x.shape
    y = torch.empty(m, n, dtype=torch.float32)
    rc = lib.quant_gemv(
        code,
        x.data_ptr(),
        qdata.data_ptr(),
        _ptr(scale),
        _ptr(minimum),
        y.data_ptr(),
        m,
        n,
        k,
        group,
        n_threads,
    )
    if rc != 0:
        raise ValueError(f"quant_gemv rejected format {code} with x {tuple(x.shape)}, N {n}")
    return y


def _self_test(lib: ctypes.CDLL) -> None:
    """Raise unless every format matches the torch dequantize-then-matmul reference."""
    check_all(lambda *args: call(lib, *args))


LIBRARY = CLibrary(
    "quantized GEMV",
    Path(__file__).with_name("quant_gemv.c"),
    {
        "quant_gemv": [_INT, _P, _P, _P, _P, _P, _I64, _I64, _I64, _I64, _INT],
        # several weights sharing x (the fused decode step's q/k/v and gate/up)
        "quant_gemv_multi": [_INT, _P, _P, _P, _P, _P, _P, _P, _I64, _I64, _P, _INT],
    },
    _self_test,
)


def library() -> ctypes.CDLL | None:
    """The loaded library, or None when it is unavailable (the reason warned once)."""
    return LIBRARY.get()


def applies(x: torch.Tensor, qdata: torch.Tensor) -> bool:
    """True when the kernel can run x [..., K] against CPU blocks `qdata`: at most MAX_ROWS
    rows, no gradient, not under torch.compile, kernels enabled and built."""
    return (
        qdata.device.type == "cpu"
        and x.device.type == "cpu"
        and x.dtype in (torch.float32, torch.bfloat16, torch.float16)
        and 0 < x.numel() <= MAX_ROWS * x.shape[-1]
        and not (torch.is_grad_enabled() and x.requires_grad)
        and not torch.compiler.is_compiling()
        and enabled()
        and library() is not None
    )
