"""The quantized GEMV of decoding (quant_gemv.c): x [M, K] @ W[N, K]^T for a weight kept in
its quantized blocks (gemmakit.quant.QuantWeight) and at most MAX_ROWS rows of x, each block
dequantized in registers; and the rest of a quantized decode step's per-token work on such a
weight: picked rows dequantized (an embedding lookup) and QuantWeight.exact_top in one call.
Built, verified and loaded by the same machinery as the bf16 GEMV (build.CLibrary); where it is
unavailable, QuantWeight falls back to torch.
"""

from __future__ import annotations

import ctypes
from pathlib import Path
from typing import NamedTuple

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
    n: int,
    group: int,
    n_threads: int,
    tile: int = 0,
) -> torch.Tensor:
    """x [M, K] float32 contiguous, qdata uint8 contiguous -> y [M, N] float32. qdata: the
    row layout [N, row bytes], but for int4 and q4_k as QuantWeight holds them
    (formats.held_memory: chunks, [K / tile, N, bytes]; `tile` its columns per tile, 0 for
    one tile). scale: int8's float32 [N], else None."""
    m, k = x.shape
    y = torch.empty(m, n, dtype=torch.float32)
    rc = lib.quant_gemv(
        code,
        x.data_ptr(),
        qdata.data_ptr(),
        _ptr(scale),
        y.data_ptr(),
        m,
        n,
        k,
        group,
        tile,
        n_threads,
    )
    if rc != 0:
        raise ValueError(f"quant_gemv rejected format {code} with x {tuple(x.shape)}, N {n}")
    return y


class Held(NamedTuple):
    """A weight as the library holds it, in the C functions' leading arguments: format code,
    blocks (the row layout, or for int4 and q4_k as QuantWeight holds them), int8's float32
    scales (else None), its shape n x k, int4's group and the tile (0: none)."""

    code: int
    qdata: torch.Tensor
    scale: torch.Tensor | None
    n: int
    k: int
    group: int
    tile: int

    def args(self) -> tuple:
        return (self.code, self.qdata.data_ptr(), _ptr(self.scale), *self[3:])


def picked_rows(lib: ctypes.CDLL, held: Held, idx: torch.Tensor) -> torch.Tensor:
    """Rows idx (integers in [-n, n), negatives counted from the end) of the weight,
    dequantized: float32 [len(idx), k], bit for bit formats.dequantize's rows. IndexError for
    a row out of range."""
    idx = idx.reshape(-1).to(torch.int64).contiguous()
    out = torch.empty(len(idx), held.k, dtype=torch.float32)
    rc = lib.quant_rows(*held.args(), idx.data_ptr(), len(idx), out.data_ptr())
    if rc == -2:
        raise IndexError(f"row index out of range for a weight of {held.n} rows")
    if rc != 0:
        raise ValueError(f"quant_rows rejected format {held.code} with rows {held.n} x {held.k}")
    return out


def exact_top(
    lib: ctypes.CDLL,
    held: Held,
    x: torch.Tensor,
    y: torch.Tensor,
    l1: torch.Tensor,
    l1b: torch.Tensor,
    softcap: float | None,
) -> None:
    """QuantWeight.exact_top in one call (quant_gemv.c's quant_exact_top): x [M, K] and y
    [M, N] float32 contiguous, y changed in place."""
    rc = lib.quant_exact_top(
        *held.args(),
        x.data_ptr(),
        y.data_ptr(),
        len(y),
        l1.data_ptr(),
        l1b.data_ptr(),
        float(softcap or 0.0),
        torch.get_num_threads(),
    )
    if rc != 0:
        raise ValueError(f"quant_exact_top rejected format {held.code} with x {tuple(x.shape)}")


def _check_table(fn: str, table: torch.Tensor) -> tuple[int, int]:
    """(N, K) of a plain head table as the C functions read it, else ValueError naming what
    is wrong (the C code trusts these sizes: a wrong one reads past the memory)."""
    if table.dtype not in (torch.float32, torch.bfloat16) or table.dim() != 2:
        got = f"{table.dtype} {list(table.shape)}"
        raise ValueError(f"{fn} takes a 2-D float32 or bfloat16 table, not {got}")
    if not table.is_contiguous() or table.device.type != "cpu":
        raise ValueError(f"{fn} takes a contiguous CPU table")
    n, k = table.shape
    if n < 1 or k < 1:
        raise ValueError(f"{fn} takes a table of at least one row and column, not [{n}, {k}]")
    return n, k


def int8_copy(lib: ctypes.CDLL, table: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """quant_gemv.c's int8_copy of a contiguous float32 or bfloat16 table [N, K]: (qdata
    uint8 [N, K] holding int8, scale float32 [N]) as formats.quantize_int8 makes them, and the
    coarse head's bounds l1 and d2 (float32 [N], rounded up)."""
    n, k = _check_table("int8_copy", table)
    q = torch.empty(n, k, dtype=torch.uint8)
    scale, l1, d2 = torch.empty(n), torch.empty(n), torch.empty(n)
    rc = lib.int8_copy(
        table.data_ptr(),
        int(table.dtype == torch.bfloat16),
        n,
        k,
        q.data_ptr(),
        scale.data_ptr(),
        l1.data_ptr(),
        d2.data_ptr(),
        torch.get_num_threads(),
    )
    if rc != 0:
        raise ValueError(f"int8_copy rejected a table of shape {tuple(table.shape)}")
    return q, scale, l1, d2


def plain_exact_top(
    lib: ctypes.CDLL,
    table: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor,
    l1: torch.Tensor,
    d2: torch.Tensor,
    softcap: float | None,
) -> None:
    """quant_gemv.c's plain_exact_top: y [M, N] (the int8 kernel's x @ Wq^T for an int8 copy Wq
    of `table` [N, K], float32 or bfloat16) gets, in place, every entry that could be its row's
    maximum of x @ table^T recomputed from `table` (l1 [N]: Wq's row L1 norms; d2 [N]:
    |table[n] - Wq[n]|_2). All float32 contiguous but `table`."""
    n, k = _check_table("plain_exact_top", table)
    m = x.shape[0] if x.dim() == 2 else -1
    want = {"x": (x, (m, k)), "y": (y, (m, n)), "l1": (l1, (n,)), "d2": (d2, (n,))}
    for name, (t, shape) in want.items():
        if tuple(t.shape) != shape or t.dtype != torch.float32 or not t.is_contiguous():
            got = f"{t.dtype} {list(t.shape)}"
            raise ValueError(
                f"plain_exact_top: {name} must be contiguous float32 {list(shape)}, not {got}"
            )
    rc = lib.plain_exact_top(
        table.data_ptr(),
        int(table.dtype == torch.bfloat16),
        table.shape[0],
        table.shape[1],
        x.data_ptr(),
        y.data_ptr(),
        len(y),
        l1.data_ptr(),
        d2.data_ptr(),
        float(softcap or 0.0),
        torch.get_num_threads(),
    )
    if rc != 0:
        raise ValueError(
            f"plain_exact_top failed ({rc}) with x {tuple(x.shape)}, y {tuple(y.shape)}"
        )


def candidates(
    lib: ctypes.CDLL,
    y: torch.Tensor,
    l1: torch.Tensor,
    l1b: torch.Tensor,
    half: torch.Tensor,
    slop: torch.Tensor,
    cap: int = 16384,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(rows, cols) of the entries of y [M, N] (float32, contiguous) that can be their row's
    maximum when entry n of row m may be off by e = half[m] . l1b[n] + slop[m] l1[n]
    (l1 [N] float32, l1b [N, nb] float16, half [M, nb], slop [M] float32): y + e >= the row's
    max of y - e. None when a row has more than `cap` coarse candidates. The self-test's
    window onto row_candidates, which quant_exact_top runs one row at a time."""
    m, n = y.shape
    idx = torch.empty(m, cap, dtype=torch.int64)
    count = torch.empty(m, dtype=torch.int64)
    half, slop = half.float().contiguous(), slop.float().contiguous()
    rc = lib.quant_candidates(
        y.data_ptr(),
        m,
        n,
        l1.data_ptr(),
        l1b.data_ptr(),
        l1b.shape[1],
        half.data_ptr(),
        slop.data_ptr(),
        idx.data_ptr(),
        count.data_ptr(),
        cap,
        torch.get_num_threads(),
    )
    if rc == -3:
        return None
    if rc != 0:
        raise ValueError(f"quant_candidates rejected y {tuple(y.shape)}")
    cols = torch.cat([idx[r, :c] for r, c in enumerate(count.tolist())])
    return torch.repeat_interleave(torch.arange(m), count), cols


def candidates_torch(
    y: torch.Tensor, l1: torch.Tensor, l1b: torch.Tensor, half: torch.Tensor, slop: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """`candidates` in torch (any device): the whole [M, N] bound at once."""
    e = half.float() @ l1b.float().T + slop.float()[:, None] * l1[None, :]  # [M, N]
    floor = (y - e).amax(-1, keepdim=True)
    return torch.nonzero(y + e >= floor, as_tuple=True)


def _self_test(lib: ctypes.CDLL) -> None:
    """Raise unless every format matches the torch dequantize-then-matmul reference, and the
    candidates are the torch ones."""
    check_all(
        lambda *args: call(lib, *args),
        picked=lambda *args: picked_rows(lib, Held(*args[:-1]), args[-1]),
    )
    check_candidates(lib)


def check_candidates(lib: ctypes.CDLL) -> None:
    """Raise unless the C candidates are the torch ones on fixed rows (the same every run)."""
    gen = torch.Generator().manual_seed(0)
    # three spans of the C passes and a tail; one row alone runs them on the threads. Every
    # number comes from `gen`: these rows keep 11, 133 and 3027 coarse candidates, under the
    # cap (a larger slop keeps more than the cap, and candidates() gives None)
    y, l1b = torch.randn(3, 20011, generator=gen), torch.rand(20011, 5, generator=gen).half()
    l1 = l1b.float().sum(-1) * 1.1
    half, slop = (
        torch.rand(3, 5, generator=gen) * torch.tensor([[0.0], [0.2], [1.0]]),
        torch.rand(3, generator=gen) / 4,
    )
    for r in (slice(None), slice(2, 3)):
        want = candidates_torch(y[r], l1, l1b, half[r], slop[r])
        got = candidates(lib, y[r].contiguous(), l1, l1b, half[r], slop[r])
        if got is None or not all(torch.equal(a, b) for a, b in zip(got, want)):
            raise RuntimeError("self-test failed for quant_candidates")


LIBRARY = CLibrary(
    "quantized GEMV",
    Path(__file__).with_name("quant_gemv.c"),
    {
        "quant_gemv": [_INT, _P, _P, _P, _P, _I64, _I64, _I64, _I64, _I64, _INT],
        # several weights sharing x (the fused decode step's q/k/v and gate/up)
        "quant_gemv_multi": [_INT, _P, _P, _P, _P, _P, _P, _I64, _I64, _P, _P, _INT],
        # the entries of logits that may be a row's maximum (QuantWeight.exact_top)
        "quant_candidates": [_P, _I64, _I64, _P, _P, _I64, _P, _P, _P, _P, _I64, _INT],
        # dequantized rows of a held weight (an embedding lookup, exact_top's candidates)
        "quant_rows": [_INT, _P, _P, _I64, _I64, _I64, _I64, _P, _I64, _P],
        "quant_exact_top": [
            *(_INT, _P, _P, _I64, _I64, _I64, _I64, _P, _P, _I64, _P, _P),
            ctypes.c_float,
            _INT,
        ],
        # the coarse greedy head's rescoring from a plain table (model/coarse_head.py)
        "plain_exact_top": [_P, _INT, _I64, _I64, _P, _P, _I64, _P, _P, ctypes.c_float, _INT],
        "int8_copy": [_P, _INT, _I64, _I64, _P, _P, _P, _P, _INT],
    },
    _self_test,
)


def library() -> ctypes.CDLL | None:
    """The loaded library, or None when it is unavailable (the reason warned once)."""
    return LIBRARY.get()


def cpu_library(qdata: torch.Tensor) -> ctypes.CDLL | None:
    """The library for work on CPU blocks `qdata` outside the GEMV (picked rows, exact_top):
    None on another device, under torch.compile, with kernels off or unavailable."""
    if qdata.device.type != "cpu" or torch.compiler.is_compiling() or not enabled():
        return None
    return library()


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
