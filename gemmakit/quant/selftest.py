"""Random quantized weights of every format, and the check that a kernel computes what the
torch reference (dequantize, then matmul) computes: run as the C library's self-test on
first use and by tests/test_quant.py."""

from __future__ import annotations

from collections.abc import Callable

import torch

from gemmakit.quant.formats import (
    FORMATS,
    HELD,
    TILED,
    dequantize,
    held_format,
    held_memory,
    row_bytes,
)

# byte offsets of float16 scales inside one block, overwritten with sane values (random bytes
# there could be inf or NaN)
_SCALE_AT = {"q8_0": (0,), "q4_0": (0,), "q5_0": (0,), "q4_k": (0, 2), "q6_k": (208,)}


def random_weight(
    fmt: str, n: int, k: int, gen: torch.Generator, group: int = 32
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(qdata uint8 [N, row bytes], scale, minimum) of random values in format `fmt`."""
    f = FORMATS[fmt]
    rb = row_bytes(fmt, k)
    q = torch.randint(0, 256, (n, rb), generator=gen, dtype=torch.int32).to(torch.uint8)
    if fmt == "int8":
        return q, torch.rand(n, generator=gen) * 0.02 + 1e-3, None
    if fmt == "int4":
        scale = (torch.rand(n, k // group, generator=gen) * 0.02).half()
        minimum = (torch.rand(n, k // group, generator=gen) * -0.1).half()
        return q, scale, minimum
    blocks = q.view(-1, f.block_bytes)
    for at in _SCALE_AT[fmt]:
        d = (torch.rand(blocks.shape[0], generator=gen) * 0.01 + 1e-4).half()
        blocks[:, at : at + 2] = d.view(torch.uint8).view(-1, 2)
    return q, None, None


def reference(x: torch.Tensor, fmt: str, qdata, scale, minimum) -> torch.Tensor:
    """x [M, K] float32 @ dequantize(W)^T -> [M, N], in float64 for a tight comparison."""
    w = dequantize(fmt, qdata, scale, minimum).double()
    return (x.double() @ w.T).float()


ACTIVATION_LEVELS = 32767
"""The kernel rounds x per block of 32 to integers in [-L, L], L = this (int16; llama.cpp
rounds to int8, L = 127, 258 times coarser), against every format."""


def activation_steps(x: torch.Tensor) -> torch.Tensor:
    """[M, K // 32] the kernel's rounding step of each whole block of 32 of x [M, K]:
    max|x| of the block / ACTIVATION_LEVELS."""
    m, k = x.shape
    nb = k // 32
    return x[:, : nb * 32].abs().reshape(m, nb, 32).amax(-1) / float(ACTIVATION_LEVELS)


def round_activations(x: torch.Tensor) -> torch.Tensor:
    """x [M, K] float32 as the kernel rounds it: per block of 32, d = max|x| / ACTIVATION_LEVELS
    and x ~ d * round(x * (1 / d)) (ties to even, in float32 as the C code); a tail of K past
    the last whole block (int8 rows) stays as it is."""
    m, k = x.shape
    nb = k // 32
    b = x[:, : nb * 32].reshape(m, nb, 32)
    d = activation_steps(x).unsqueeze(-1)
    inv = torch.where(d > 0, 1.0 / d, torch.zeros_like(d))
    q = torch.round(b * inv)
    return torch.cat([(q * d).reshape(m, nb * 32), x[:, nb * 32 :]], dim=1)


def error_bound(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """[M, N] bound on |kernel - reference| for x [M, K] and dequantized w [N, K] (any format):
    the kernel rounds x per block of 32 (step max|x| / ACTIVATION_LEVELS of the block), so half
    a step of each x times |w|, plus 1e-5 of sum |x| |w| (float32 sums in another order)."""
    nb = x.shape[1] // 32
    half = (activation_steps(x) / 2).repeat_interleave(32, dim=1)  # [M, nb * 32]
    return 1e-5 * (x.abs() @ w.abs().T) + 1e-6 + half @ w[:, : nb * 32].abs().T


def _check(got: torch.Tensor, x: torch.Tensor, fmt: str, parts, what: str) -> None:
    want = reference(round_activations(x), fmt, *parts)
    w = dequantize(fmt, *parts)
    bound = 1e-5 * (x.abs() @ w.abs().T) + 1e-6
    if not bool(((got - want).abs() <= bound).all()):
        err = (got - want).abs().max().item()
        raise RuntimeError(f"self-test failed for {what}: max error {err:.3g}")


def check_all(
    kernel: Callable[..., torch.Tensor],
    rows: tuple[int, ...] = (1, 3, 4, 8),
    picked: Callable[..., torch.Tensor] | None = None,
) -> None:
    """Raise RuntimeError unless kernel(code, x, qdata, scale, N, group, n_threads, tile)
    equals `reference` of the rounded x (`round_activations`) up to float32 summation
    order (1e-5 of sum |x| |w|): the tight check, which a wrong block, scale or minimum fails
    (the looser `error_bound` against the unrounded x is what callers may rely on). int4
    and q4_k go in as QuantWeight holds them (formats.held_memory), in rows and in tiles.
    With `picked`, also unless picked(code, qdata, scale, N, K, group, tile, idx) (dequantized
    rows idx of the weight as held) equals `dequantize`'s rows bit for bit: the rows of
    pairs, the odd last row, repeats."""
    gen = torch.Generator().manual_seed(0)
    cases = [
        (fmt, 512 if f.block == 256 else (72 if fmt == "int8" else 96), 32, 0)
        for fmt, f in FORMATS.items()
        if fmt not in TILED
    ]
    # int4: chunks of 8 blocks, then a shorter last chunk (masked lanes: 5, 2 and 4 blocks),
    # in each group that divides a chunk (each decodes its scales its own way);
    # then 3 tiles of 512 columns, whose sums add up per row; q4_k the same way (whole
    # super-blocks only)
    cases += [
        ("int4", 2208, 32, 0),
        ("int4", 1088, 64, 0),
        ("int4", 2176, 128, 0),
        ("int4", 768, 256, 0),
        ("int4", 1536, 32, 512),
        ("int4", 1536, 128, 512),
        ("q4_k", 512, 32, 0),
        ("q4_k", 1536, 32, 512),
    ]
    for fmt, k, group, tile in cases:
        parts = random_weight(fmt, 13, k, gen, group)
        held = (held_memory(fmt, *parts, tile), None) if fmt in HELD else parts[:2]
        code = FORMATS[held_format(fmt)].code  # Q5_0 runs as the Q8_0 blocks it is held in
        for m in rows:
            x = torch.randn(m, k, generator=gen)
            got = kernel(code, x, *held, 13, group, 2, tile)
            where = f" in groups of {group}" if fmt == "int4" else ""
            where += f" in tiles of {tile}" if tile else ""
            _check(got, x, fmt, parts, f"{fmt} M={m}{where}")
        if picked is not None:
            idx = torch.tensor([12, 0, 5, 6, 5, 11])
            got = picked(code, *held, 13, k, group, tile, idx)
            if not torch.equal(got, dequantize(fmt, *parts)[idx]):
                raise RuntimeError(f"self-test failed for {fmt} rows{where}")
