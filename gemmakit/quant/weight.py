"""QuantWeight: a linear weight [N, K] kept in its quantized blocks, and QuantEmbedding, the
tied embedding table held the same way.

`gemmakit.model.layers.linear(x, weight)` dispatches on a QuantWeight: up to 8 rows of x (a
decode step) run the C kernel (gemmakit/kernels/quant_gemv.c), which dequantizes in registers;
more rows, a GPU, or a machine without the kernel dequantize a tile of rows at a time in torch
and matmul it. An embedding lookup dequantizes only the rows it looks up.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gemmakit.kernels import quant_gemv
from gemmakit.quant.formats import (
    FORMATS,
    HELD,
    TILED,
    dequantize,
    held_format,
    held_memory,
    held_rows,
    int4_tile,
    is_row_index,
    row_bytes,
)
from gemmakit.quant.selftest import activation_steps

TILE_ELEMENTS = 1 << 22  # the fallback dequantizes at most this many weights (16 MB) at once
KERNEL_ROWS = 64  # up to this many rows of x go through the kernel, 8 at a time


class QuantWeight(nn.Module):
    """A weight [N, K] in format `fmt` (see gemmakit/quant/formats.py).

    Takes the row layout: qdata uint8 [N, row bytes]; scale (int8: float32 [N]; int4: float16
    [N, K / group]); minimum (int4: float16 [N, K / group]). Buffers (so `.to(device)` and
    state_dict carry them): int8 and the GGUF formats but Q4_K and Q5_0 keep those; int4 and
    Q4_K (formats.TILED) are held as one buffer, `qdata`, in chunks and tiles
    (formats.held_memory: [K / tile, N, bytes], `tile` columns per tile, `tile` = 0 for rows
    of at most 4096), one stream of memory per tile's rows for the kernel; Q5_0 as Q8_0 blocks
    of the same values (formats.HELD_AS, `held_fmt`). state_dict gives and takes the row
    layout whatever the memory layout, so files never see it. `dtype` is
    the compute dtype: what the dequantized values and the outputs are cast to.
    """

    def __init__(
        self,
        fmt: str,
        shape: tuple[int, int],
        qdata: torch.Tensor,
        scale: torch.Tensor | None = None,
        minimum: torch.Tensor | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        if fmt not in FORMATS:
            raise ValueError(f"unknown quantized format {fmt!r}")
        n, k = shape
        want = (n, row_bytes(fmt, k))
        if tuple(qdata.shape) != want or qdata.dtype != torch.uint8:
            raise ValueError(f"{fmt} blocks of a [{n}, {k}] weight are uint8 {list(want)}")
        self.fmt, self.shape, self.compute_dtype = fmt, (n, k), dtype
        self._group, self.tile = 32, 0
        if fmt == "int4":
            g = scale.shape[-1] if scale is not None and scale.dim() == 2 else 0
            for name, t in (("scale", scale), ("minimum", minimum)):
                if t is None or t.dtype != torch.float16 or tuple(t.shape) != (n, g) or not g:
                    raise ValueError(f"int4 {name} of a [{n}, {k}] weight is float16 [{n}, groups]")
            if k % g:
                raise ValueError(f"int4 rows of {k} weights do not split into {g} groups")
            self._group = k // g
        if fmt in TILED:
            self.tile = int4_tile(k, self._group)
        if fmt in HELD:
            qdata = held_memory(fmt, qdata, scale, minimum, self.tile)
        self.register_buffer("qdata", qdata.contiguous())
        if fmt == "int8":
            self.register_buffer("scale", scale.contiguous())

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        """The row layout, whatever the memory layout: what files and other models hold."""
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.fmt in HELD:
            for name, t in zip(("qdata", "scale", "minimum"), self._parts(None)):
                if t is not None:
                    destination[prefix + name] = t

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """Takes the row layout (state_dict's: 2-D qdata), held as the buffer is
        (formats.HELD); a held buffer (3-D) as it is."""
        names = ("qdata", "scale", "minimum") if self.fmt == "int4" else ("qdata",)
        if (
            self.fmt in HELD
            and all(prefix + p in state_dict for p in names)
            and state_dict[prefix + "qdata"].dim() == 2
            and state_dict[prefix + "qdata"].shape[-1] == row_bytes(self.fmt, self.shape[1])
        ):
            state_dict = dict(state_dict)
            parts = [state_dict.pop(prefix + p) for p in names] + [None] * (3 - len(names))
            state_dict[prefix + "qdata"] = held_memory(self.fmt, *parts, self.tile)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @property
    def dtype(self) -> torch.dtype:
        return self.compute_dtype

    def _apply(self, fn, recurse=True):
        """`.to(device)` moves the buffers; `.to(dtype)` / `.half()` change only the compute
        dtype: the blocks, scales and minimums keep their stored types."""
        for name, b in self._buffers.items():
            if b is not None:
                probe = fn(torch.empty(0, dtype=b.dtype, device=b.device))
                self._buffers[name] = b.to(probe.device)
        probe = fn(torch.empty(0, dtype=self.compute_dtype, device=self.device))
        if probe.dtype.is_floating_point:
            self.compute_dtype = probe.dtype
        return self

    @property
    def device(self) -> torch.device:
        return self.qdata.device

    @property
    def group(self) -> int:
        """Weights per int4 scale (32 or 128); 32 for the other formats (unused by them)."""
        return self._group

    @property
    def nbytes(self) -> int:
        """Bytes read per full pass over the weight (blocks plus scales)."""
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def extra_repr(self) -> str:
        g = f", group={self.group}" if self.fmt == "int4" else ""
        held = f", held as {self.held_fmt}" if self.held_fmt != self.fmt else ""
        return f"{self.fmt}, shape={list(self.shape)}{g}{held}"

    def _parts(self, rows) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(qdata, scale, minimum) of rows `rows` (all when None) in row layout."""
        if self.fmt in HELD:
            return held_rows(self.fmt, self.qdata, self.shape[1], self._group, rows)
        scale = getattr(self, "scale", None)
        pick = (lambda t: None if t is None else t[rows]) if rows is not None else (lambda t: t)
        return pick(self.qdata), pick(scale), None

    def dequantize(self, rows: slice | torch.Tensor | None = None) -> torch.Tensor:
        """float32 [N, K] (or [len(rows), K] for a slice or index tensor of rows). Picked rows
        (an embedding lookup, exact_top's candidates) of a weight on the CPU come from the C
        library in one call, the same floats as the torch way's many small ops."""
        lib = quant_gemv.cpu_library(self.qdata)
        if lib is None or not is_row_index(rows):
            if self.held_fmt != self.fmt:  # blocks of another format, rows as they are
                return dequantize(self.held_fmt, self.qdata if rows is None else self.qdata[rows])
            return dequantize(self.fmt, *self._parts(rows))
        return quant_gemv.picked_rows(lib, self._held(), rows)

    @property
    def held_fmt(self) -> str:
        """The format of the blocks the buffer holds and the kernel reads (formats.HELD_AS)."""
        return held_format(self.fmt)

    @property
    def code(self) -> int:
        """The C kernel's format number for the held blocks."""
        return FORMATS[self.held_fmt].code

    def _held(self) -> quant_gemv.Held:
        """The weight as the C library's leading arguments take it."""
        n, k = self.shape
        scale = getattr(self, "scale", None)
        return quant_gemv.Held(self.code, self.qdata, scale, n, k, self._group, self.tile)

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """x [..., K] @ W^T (+ bias) -> [..., N] in x's dtype."""
        n, k = self.shape
        if x.shape[-1] != k:
            raise ValueError(f"x has {x.shape[-1]} features, the weight {k}")
        flat = x.reshape(-1, k)
        step = quant_gemv.MAX_ROWS
        if self.uses_kernel(flat):
            # a short prompt's prefill too: the kernel in pieces of 8 rows reads the blocks
            # once per piece, cheaper than dequantizing the whole weight up to about 64 rows
            xf = flat.to(torch.float32).contiguous()
            lib, code = quant_gemv.library(), self.code
            parts = (self.qdata, getattr(self, "scale", None))
            threads = torch.get_num_threads()
            pieces = [
                quant_gemv.call(
                    lib, code, xf[i : i + step], *parts, n, self.group, threads, self.tile
                )
                for i in range(0, len(xf), step)
            ]  # one piece when decoding: no copy through cat
            y = (pieces[0] if len(pieces) == 1 else torch.cat(pieces)).to(x.dtype)
        else:
            # float32 on a CPU (like the kernel; bf16 matmul is no faster there), x's dtype
            # on a GPU
            dt = torch.float32 if x.device.type == "cpu" else x.dtype
            rows = max(1, TILE_ELEMENTS // k)
            xd = flat.to(dt)
            y = torch.cat(
                [
                    F.linear(xd, self.dequantize(slice(i, i + rows)).to(dt))
                    for i in range(0, n, rows)
                ],
                dim=-1,
            ).to(x.dtype)
        y = y.view(*x.shape[:-1], n)
        return y if bias is None else y + bias

    def uses_kernel(self, x: torch.Tensor) -> bool:
        """Whether `linear` runs x [M, K] through the C kernel (int16-rounded activations)
        rather than the torch fallback (dequantized weights, x as it is)."""
        return len(x) <= KERNEL_ROWS and quant_gemv.applies(x[: quant_gemv.MAX_ROWS], self.qdata)

    def block_l1(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(float16 [N, K // 32]: sum of |W[n, k]| (dequantized) over each whole block of 32
        columns; float32 [N]: over the whole row), both rounded up (x (1 + 2^-10): float16
        rounds to nearest) so that they stay upper bounds. Computed once and kept, not
        buffers: derived, never saved."""
        if getattr(self, "_l1", None) is None or self._l1[0].device != self.device:
            n, k = self.shape
            nb, rows = k // 32, max(1, TILE_ELEMENTS // k)
            blocks, whole = [], []
            for i in range(0, n, rows):
                w = self.dequantize(slice(i, i + rows)).abs()
                blocks.append(w[:, : nb * 32].reshape(len(w), nb, 32).sum(-1))
                whole.append(w.sum(-1))
            up = 1 + 2**-10
            self._l1 = ((torch.cat(blocks) * up).half(), torch.cat(whole) * up)
        return self._l1

    def exact_top(
        self, x: torch.Tensor, y: torch.Tensor, softcap: float | None = None
    ) -> torch.Tensor:
        """y [M, N]: the kernel's x [M, K] @ W^T (soft-capped when `softcap`). The kernel
        rounds x per block b of 32 to int16 (step s_b = max|x_b| / 32767:
        selftest.ACTIVATION_LEVELS), which moves entry n by at most
        sum_b s_b / 2 * |W[n, block b]|_1, plus float32 summation slop (1e-5 of sum |x||w|):
        quant/selftest.error_bound, here in per-block L1 norms. Every entry that
        could be its row's maximum under that bound is recomputed from the unrounded x and the
        dequantized row, in place, so the argmax (greedy decoding) and the values at the top
        are those of the dequantized weight; the rest stay within the bound. A soft cap only
        shrinks differences, so the bound holds after it. Returns y.

        Cheap: on a CPU one C call (quant_gemv.exact_top) makes two passes over y with a
        coarse bound, which keeps a few thousand of 262144 entries, then the per-block bound
        keeps about 10, which are recomputed (in double); elsewhere the same in torch."""
        xf = x.float()
        l1b, l1 = self.block_l1()  # [N, nb] float16, [N]
        lib = quant_gemv.cpu_library(self.qdata)
        if lib is not None and y.device.type == "cpu":
            # the same in one C call (candidates, dequantized rows, dot products, soft cap):
            # the torch ops below cost a small model's decode step a tenth of its time, and
            # a 2B prefill's bfloat16 logits 40 ms (the float32 copy of the block norms).
            # Other logits (bfloat16, a view) go through a float32 copy, rounded back after
            yf = y if y.is_contiguous() and y.dtype == torch.float32 else y.float().contiguous()
            quant_gemv.exact_top(lib, self._held(), xf.contiguous(), yf, l1, l1b, softcap)
            if yf is not y:
                y.copy_(yf)
            return y
        # half a rounding step per block (a tail past the last whole block is not rounded)
        half = activation_steps(xf) / 2  # [M, nb]
        slop = 1e-5 * xf.abs().amax(-1) + 1e-6  # [M]
        rows, cols = quant_gemv.candidates_torch(y, l1, l1b, half, slop)
        exact = (self.dequantize(cols) * xf[rows]).sum(-1)
        if softcap:
            exact = torch.tanh(exact / softcap) * softcap
        y[rows, cols] = exact.to(y.dtype)
        return y

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` [...] of the table, dequantized -> [..., K] in the compute dtype."""
        flat = ids.reshape(-1)
        return self.dequantize(flat).to(self.compute_dtype).view(*ids.shape, self.shape[1])


class QuantEmbedding(nn.Module):
    """nn.Embedding's forward over a QuantWeight table (`.weight`)."""

    def __init__(self, weight: QuantWeight) -> None:
        super().__init__()
        self.weight = weight

    @property
    def num_embeddings(self) -> int:
        return self.weight.shape[0]

    @property
    def embedding_dim(self) -> int:
        return self.weight.shape[1]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.weight.embed(ids)
