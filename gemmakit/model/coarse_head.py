"""The coarse greedy head: greedy decoding reads an int8 copy of a plain output head, then
recomputes exactly the few logits that could be the maximum.

A decode step of a float32 or bfloat16 model reads every weight once, and the tied output head
is most of them for a small model (the 270M's 262144 x 640 table: 671 MB of its 1.07 GB in
float32). Greedy decoding needs only the argmax of the logits, so `CoarseHead` holds the table
also as int8 (a scale per row: a quarter of the float32 bytes), and the fused step
(`FastDecoder.step(..., greedy=True)`) runs the int8 kernel over it. Entry n of those logits is
off the exact x . W[n] by at most a l1[n] + |x|_2 d2[n]: the kernel's rounding of x (half an
int16 step per block, times the int8 row's L1 norm) and its float32 slop, plus the weight's own
rounding, |x . (W[n] - Wq[n])| <= |x|_2 |W[n] - Wq[n]|_2. Every entry that could be the row's
maximum under that bound (a few dozen of 262144) is recomputed from the table's own row in double
(kernels/quant_gemv.c `plain_exact_top`), so the argmax is that of the exact logits; the other
entries are left coarse, which is why only greedy picks use it.

The copy costs a quarter (float32) or half (bfloat16) of the table's memory more, made once per
model on the first greedy step, and again when the table's version counter says it changed in
place (an optimizer step; a write through `.data` is not seen).
"""

from __future__ import annotations

import ctypes

import torch

from gemmakit.kernels import quant_gemv
from gemmakit.quant.weight import QuantWeight


def bytes_saved(table: torch.Tensor) -> int:
    """Bytes a greedy step reads less through the copy than through `table` [N, K]: the
    table's bytes less the copy's (1 per weight, and its bounds l1 and d2, 8 per row)."""
    n, k = table.shape
    return n * k * (table.element_size() - 1) - 8 * n


class CoarseHead:
    """An int8 copy of `table` [N, K] (float32 or bfloat16, CPU) with the per-row bounds that
    let `rescore` find the exact argmax of x @ table^T from the copy's logits."""

    def __init__(self, table: torch.Tensor, lib: ctypes.CDLL) -> None:
        """`lib`: the quantized GEMV library (quant_gemv.library()), which makes the copy and
        its bounds in one pass over the table (0.3 s for the 270M's on 2 cores; torch took 0.8)."""
        self.table, self.lib = table.detach().contiguous(), lib  # int8_copy checks it
        q, scale, self.l1, self.d2 = quant_gemv.int8_copy(lib, self.table)
        self.weight = QuantWeight("int8", tuple(table.shape), q, scale, dtype=table.dtype)

    def rescore(self, x: torch.Tensor, y: torch.Tensor, softcap: float | None) -> torch.Tensor:
        """y [M, N] float32: the int8 kernel's x [M, K] @ Wq^T (soft-capped when `softcap`);
        the entries that could be a row's maximum of x @ table^T recomputed in place. The
        row's argmax is then the exact one. Returns y."""
        xf = x.float().contiguous()
        quant_gemv.plain_exact_top(self.lib, self.table, xf, y, self.l1, self.d2, softcap)
        return y
