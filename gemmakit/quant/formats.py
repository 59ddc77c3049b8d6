"""The quantized weight formats gemmakit keeps in memory, and their reference dequantization.

A weight [N, K] is held as `qdata`, uint8 [N, row_bytes]: for the GGUF formats exactly the
file's blocks (llama.cpp's ggml-quants.c layouts), for gemmakit's own formats:

- int8: one int8 per weight, a float32 scale per output row (symmetric): w = s[n] * q.
- int4: blocks of 32 weights in 16 bytes (byte i holds q[i] in its low nibble and q[i + 16] in
  its high one, as Q4_0 does), q in 0..15, and per group of 32 or 128 weights a float16 scale
  d and minimum m (asymmetric, "scale + min" as Q4_1/Q4_K): w = d * q + m.

In memory (QuantWeight), an int4 weight is held packed (`int4_memory`): each row in chunks of 8
blocks, a chunk's 128 bytes of nibbles (in `lane_order`: the kernel's loads hold one block per
int32 lane) followed by its groups' float16 scales and then their minimums, so that the
kernel reads a row as one stream of memory where the row layout is three (one per tensor); rows
longer than INT4_TILE are also cut into tiles (`int4_tile`), [tiles, N, packed bytes of a
tile], so that each tile's rows are one stream while the kernel's activations for the tile stay
in its L1; within a tile, rows 2p and 2p + 1 are held chunk by chunk (`pair_rows`), since
decoding reads two rows at a time. A Q4_K weight is held the same way (`q4_k_memory`): each
super-block of 256 weights a chunk, its nibbles in int4's blocks (in lane order) followed by
its 16 bytes of scales, so that the kernel runs both through one inner loop. A Q5_0 weight is
held as Q8_0 blocks of the same values (`HELD_AS`). Files, state_dict and `dequantize` use the
row layout (`held_rows` gives it back).

`dequantize(fmt, qdata, scale, minimum, K)` is the torch reference every kernel is tested
against; it runs on any device (the fallback for machines without the C kernels and for GPUs).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from gemmakit.errors import CheckpointError


@dataclass(frozen=True)
class Format:
    name: str
    block: int  # weights per block
    block_bytes: int  # bytes per block in qdata
    code: int  # the C kernel's format number


FORMATS = {
    f.name: f
    for f in (
        Format("q8_0", 32, 34, 0),
        Format("q4_0", 32, 18, 1),
        Format("q5_0", 32, 22, 2),
        Format("q4_k", 256, 144, 3),
        Format("q6_k", 256, 210, 4),
        Format("int8", 1, 1, 5),
        Format("int4", 32, 16, 6),
    )
}
GGUF_FORMATS = ("q8_0", "q4_0", "q5_0", "q4_k", "q6_k")  # GGML type name, lower case
INT4_GROUPS = (32, 128)


def row_bytes(fmt: str, k: int) -> int:
    """Bytes of one row of K weights in format `fmt` (K a multiple of its block)."""
    f = FORMATS[fmt]
    if k % f.block:
        raise CheckpointError(
            f"a row of {k} weights is not a multiple of the {fmt} block {f.block}"
        )
    return k // f.block * f.block_bytes


INT4_TILE = 4096  # int4 rows longer than this are held in tiles of at most this many columns


def int4_tile(k: int, group: int) -> int:
    """Columns per tile for an int4 weight with rows of `k` (0: not tiled): rows longer than
    INT4_TILE split into the fewest equal tiles of at most INT4_TILE columns, each a multiple
    of 256 (the kernel's 8 blocks) and of the group, and at least a quarter of INT4_TILE
    (Gemma-2B's 16384-wide down projection: 4 tiles of 4096, whose activations are 8 KiB in the
    kernel where the row's are 32 KiB; 7B's 24576: 6 of 4096; Gemma 3 1B's 6912: 3 of 2304).
    Rows with no such tiles stay in rows."""
    if k <= INT4_TILE:
        return 0
    for t in range(-(-k // INT4_TILE), k // max(256, INT4_TILE // 4) + 1):
        c = k // t
        if k % t == 0 and c % 256 == 0 and c % group == 0:
            return c
    return 0


def to_tiles(t: torch.Tensor, tiles: int) -> torch.Tensor:
    """[N, C] in row layout -> [tiles, N, C / tiles] (a copy, contiguous)."""
    n, c = t.shape
    if c % tiles:
        raise ValueError(f"{c} columns do not split into {tiles} tiles")
    return t.reshape(n, tiles, c // tiles).transpose(0, 1).contiguous()


def from_tiles(t: torch.Tensor) -> torch.Tensor:
    """[T, N, c] -> [N, T * c] in row layout (a copy)."""
    return t.transpose(0, 1).reshape(t.shape[1], -1)


def _chunk_scales(group: int) -> int:
    """Scales (and minimums) per whole chunk of 8 int4 blocks: the group must divide 256."""
    per = group // 32
    if group % 32 or 8 % per:
        raise CheckpointError(f"int4 groups of {group} do not divide chunks of 256 weights")
    return 8 // per


def lane_order(nibbles: torch.Tensor, blocks: int) -> torch.Tensor:
    """uint8 [..., 16 blocks]: `blocks` int4 blocks' bytes in row layout -> the kernel's lane
    order (quant_gemv.c's nibbles4): four runs of 4 bytes per block, run k holding bytes 4k to
    4k + 3 of each block in turn, so that one 32-byte load of a chunk of 8 blocks has block l
    in its int32 lane l. `lane_order(t, blocks)` is a transpose: `block_order` undoes it."""
    lead = nibbles.shape[:-1]
    return nibbles.reshape(*lead, blocks, 4, 4).transpose(-3, -2).reshape(*lead, 16 * blocks)


def block_order(held: torch.Tensor, blocks: int) -> torch.Tensor:
    """lane_order's inverse: uint8 [..., 16 blocks] -> the blocks' bytes in row layout."""
    lead = held.shape[:-1]
    return held.reshape(*lead, 4, blocks, 4).transpose(-3, -2).reshape(*lead, 16 * blocks)


def _chunk_values(v: torch.Tensor, full: int, spc: int) -> torch.Tensor:
    """float16 [N, groups] -> the bytes [N, full, 2 spc] of its first `full` chunks' values."""
    return v[:, : spc * full].reshape(v.shape[0], full, spc).contiguous().view(torch.uint8)


def pack_int4(qdata: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor) -> torch.Tensor:
    """Row layout (qdata uint8 [N, K / 2], scale and minimum float16 [N, K / group]) -> packed
    rows uint8 [N, K / 2 + 4 K / group]: per chunk of 8 blocks (the last may be shorter) its
    16 bytes per block in lane order, then its groups' scales, then their minimums."""
    n, half = qdata.shape
    nb = half // 16
    spc = _chunk_scales(32 * nb // scale.shape[1])
    full = nb // 8
    d, m = scale.contiguous().view(torch.uint8), minimum.contiguous().view(torch.uint8)
    whole = torch.cat(
        [
            lane_order(qdata[:, : 128 * full].reshape(n, full, 128), 8),
            _chunk_values(scale, full, spc),
            _chunk_values(minimum, full, spc),
        ],
        dim=2,
    ).reshape(n, -1)
    if nb == 8 * full:
        return whole
    rest = [lane_order(qdata[:, 128 * full :], nb - 8 * full)]
    rest += [d[:, 2 * spc * full :], m[:, 2 * spc * full :]]
    return torch.cat([whole, *rest], dim=1)


def unpack_int4(packed: torch.Tensor, k: int, group: int) -> tuple[torch.Tensor, ...]:
    """pack_int4's inverse: packed rows uint8 [N, bytes] of K weights -> (qdata, scale,
    minimum) in row layout."""
    n, nb, spc = packed.shape[0], k // 32, _chunk_scales(group)
    cb, full = _int4_chunks(k, group)
    body = packed[:, : cb * full].reshape(n, full, cb)
    tail, r = packed[:, cb * full :], nb - 8 * full  # the last chunk's r blocks
    s, e = 16 * r, 16 * r + 2 * (r * 32 // group)  # where its scales start and end
    q = torch.cat([block_order(body[..., :128], 8).reshape(n, -1), block_order(tail[:, :s], r)], 1)

    def values(part: torch.Tensor, rest: torch.Tensor) -> torch.Tensor:
        return torch.cat([part.reshape(n, -1), rest], dim=1).contiguous().view(torch.float16)

    d = values(body[..., 128 : 128 + 2 * spc], tail[:, s:e])
    m = values(body[..., 128 + 2 * spc :], tail[:, e:])
    return q.contiguous(), d, m


def pair_rows(memory: torch.Tensor, chunk: int, chunks: int) -> torch.Tensor:
    """[T, N, bytes] held rows -> rows 2p and 2p + 1 of each tile chunk by chunk, so that the
    kernel's decode reads the two rows it takes at a time as one stream (quant_gemv.c's
    int4_tiled): their first `chunk` bytes each, their second, ... (`chunks` whole chunks), then
    the rest of each row (int4's last short chunk); an odd last row as it is."""
    t, n, nbytes = memory.shape
    p, whole = n // 2, chunk * chunks
    rows = memory[:, : 2 * p].reshape(t, p, 2, nbytes)
    body = rows[..., :whole].reshape(t, p, 2, chunks, chunk).transpose(2, 3)
    held = torch.cat(
        [body.reshape(t, p, 2 * whole), rows[..., whole:].reshape(t, p, 2 * (nbytes - whole))],
        dim=2,
    )
    return torch.cat([held.reshape(t, 2 * p, nbytes), memory[:, 2 * p :]], dim=1)


def is_row_index(rows: object) -> bool:
    """Whether `rows` is an integer index tensor of rows (not a mask, not floats)."""
    return (
        isinstance(rows, torch.Tensor)
        and rows.dtype != torch.bool
        and not rows.is_floating_point()
        and not rows.is_complex()
    )


def _row_indices(n: int, rows: slice | torch.Tensor | None) -> torch.Tensor:
    """The row numbers `rows` picks of n rows: an integer index tensor as it is (negatives
    counted from the end), without building all n numbers for it (a decode step embeds one
    token through this)."""
    if is_row_index(rows):
        idx = rows.reshape(-1).long()
        return torch.where(idx < 0, idx + n, idx)
    return torch.arange(n) if rows is None else torch.arange(n)[rows].reshape(-1)


def paired_rows(
    memory: torch.Tensor, chunk: int, chunks: int, rows: slice | torch.Tensor | None = None
) -> torch.Tensor:
    """pair_rows' inverse for rows `rows` (all when None): [T, len(rows), bytes] in row order,
    reading only their bytes: a run of rows by reshaping the pairs that hold it; picked rows (a
    decode step's embedding, exact_top's candidates) by one gather, each row's byte offsets
    being where its pair (or the odd last row) starts plus the pattern of its place in it."""
    t, n, nbytes = memory.shape
    if rows is None or isinstance(rows, slice) and rows.step in (None, 1):
        start, stop, _ = (rows or slice(None)).indices(n)
        lo, hi = start - start % 2, min(n, stop + stop % 2)  # the pairs that hold them
        return _unpair(memory[:, lo:hi], chunk, chunks)[:, start - lo : max(stop, start) - lo]
    idx = _row_indices(n, rows)
    paired = idx < n - n % 2
    place = torch.where(paired, idx % 2, 2)  # first or second of a pair, or the odd last row
    start = torch.where(paired, idx - idx % 2, idx) * nbytes
    at = start[:, None] + _pair_offsets(chunk, chunks, nbytes)[place]
    return memory.reshape(t, -1)[:, at]


def _unpair(memory: torch.Tensor, chunk: int, chunks: int) -> torch.Tensor:
    """pair_rows' inverse for whole pairs (and an odd last row), by reshaping: [T, N, bytes]."""
    t, n, nbytes = memory.shape
    p, whole = n // 2, chunk * chunks
    pairs = memory[:, : 2 * p].reshape(t, p, 2 * nbytes)
    body = pairs[..., : 2 * whole].reshape(t, p, chunks, 2, chunk).transpose(2, 3)
    rows = torch.cat(
        [body.reshape(t, p, 2, whole), pairs[..., 2 * whole :].reshape(t, p, 2, nbytes - whole)], 3
    )
    return torch.cat([rows.reshape(t, 2 * p, nbytes), memory[:, 2 * p :]], dim=1)


@functools.lru_cache(maxsize=64)
def _pair_offsets(chunk: int, chunks: int, nbytes: int) -> torch.Tensor:
    """long [3, nbytes]: the byte offsets of the first and second row of a pair from the pair's
    start (pair_rows' layout), and those of a row held as it is."""
    whole = chunk * chunks
    body = torch.arange(whole)
    body = body // chunk * 2 * chunk + body % chunk  # chunk c's byte j of the first row
    rest = 2 * whole + torch.arange(nbytes - whole)
    first = torch.cat([body, rest])
    second = torch.cat([body + chunk, rest + nbytes - whole])
    return torch.stack([first, second, torch.arange(nbytes)])


def int4_memory(
    qdata: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor, tile: int = 0
) -> torch.Tensor:
    """An int4 weight in row layout -> how QuantWeight holds it: packed rows, [T, N, packed
    bytes of a tile] with T = K / tile tiles (T = 1 when `tile` is 0)."""
    n, k = qdata.shape[0], 2 * qdata.shape[1]
    t = k // tile if tile else 1
    parts = [to_tiles(p, t).reshape(t * n, -1) for p in (qdata, scale, minimum)]
    return pair_rows(
        pack_int4(*parts).reshape(t, n, -1), *_int4_chunks(k // t, k // scale.shape[1])
    )


def _int4_chunks(k: int, group: int) -> tuple[int, int]:
    """(bytes of a whole chunk, whole chunks) of a packed int4 row of k weights."""
    return 128 + 4 * _chunk_scales(group), k // 256


def int4_rows(
    memory: torch.Tensor, k: int, group: int, rows: slice | torch.Tensor | None = None
) -> tuple[torch.Tensor, ...]:
    """int4_memory's inverse for rows `rows` (all when None): (qdata, scale, minimum) in row
    layout."""
    t = memory.shape[0]
    memory = paired_rows(memory, *_int4_chunks(k // t, group), rows)
    n = memory.shape[1]
    parts = unpack_int4(memory.reshape(t * n, -1), k // t, group)
    return tuple(from_tiles(p.reshape(t, n, -1)) for p in parts)


def q4_k_memory(qdata: torch.Tensor, tile: int = 0) -> torch.Tensor:
    """A Q4_K weight's blocks as the file holds them (uint8 [N, K / 256 * 144]: d, dmin, 12
    bytes of scales, then per 64 weights 32 bytes holding sub-block 2i in their low nibbles and
    2i + 1 in their high ones) -> how QuantWeight holds it: per super-block its 8 sub-blocks in
    int4's block layout (byte i: q[i] low, q[i + 16] high; 128 bytes), then its first 16 bytes,
    as [T, N, bytes of a tile] (T = K / tile, 1 when `tile` is 0). The same bytes reordered."""
    n = qdata.shape[0]
    b = qdata.reshape(n, -1, 144)
    nibbles = lane_order(_pack_nibbles(_q4_k_values(b[..., 16:])).reshape(n, -1, 128), 8)
    held = torch.cat([nibbles, b[..., :16]], dim=-1).reshape(n, -1)
    tiles = to_tiles(held, 256 * b.shape[1] // tile if tile else 1)
    return pair_rows(tiles, 144, tiles.shape[2] // 144)


def q4_k_rows(memory: torch.Tensor, rows: slice | torch.Tensor | None = None) -> torch.Tensor:
    """q4_k_memory's inverse for rows `rows` (all when None): [T, N, bytes of a tile] -> the
    file's blocks [len(rows), K / 256 * 144]."""
    held = from_tiles(paired_rows(memory, 144, memory.shape[2] // 144, rows))
    n = held.shape[0]
    b = held.reshape(n, -1, 144)
    q = _nibbles(block_order(b[..., :128], 8).reshape(n, -1, 4, 2, 16))  # [N, blocks, 4, 2, 32]
    qs = (q[..., 0, :] | (q[..., 1, :] << 4)).reshape(n, -1, 128)  # _q4_k_values' inverse
    return torch.cat([b[..., 128:], qs], dim=-1).reshape(n, -1)


def q5_0_as_q8_0(qdata: torch.Tensor) -> torch.Tensor:
    """Q5_0 blocks [..., K / 32 * 22] -> Q8_0 blocks [..., K / 32 * 34] of the same values: the
    same float16 scale d, and each q - 16 (-16..15) as an int8, so w = d * (q - 16) is exactly
    Q8_0's d * int8."""
    lead = qdata.shape[:-1]
    b = qdata.reshape(-1, 22)
    qh = b[:, 2:6].contiguous().view(torch.int32)  # bit j: value j's fifth bit
    bits = (qh >> torch.arange(32, device=b.device, dtype=torch.int32)) & 1
    q = (_nibbles(b[:, 6:]).int() | (bits << 4)) - 16
    out = torch.cat([b[:, :2], q.to(torch.int8).view(torch.uint8)], dim=1)
    return out.reshape(*lead, -1)


def q8_0_as_q5_0(qdata: torch.Tensor) -> torch.Tensor:
    """q5_0_as_q8_0's inverse: the Q5_0 blocks, byte for byte."""
    lead = qdata.shape[:-1]
    b = qdata.reshape(-1, 34)
    q = b[:, 2:].contiguous().view(torch.int8).int() + 16  # 0..31
    bits = (q >> 4) << torch.arange(32, device=b.device, dtype=torch.int32)
    qh = bits.sum(1, dtype=torch.int64).to(torch.int32).view(-1, 1)  # 32 distinct bits
    out = torch.cat([b[:, :2], qh.view(torch.uint8), _pack_nibbles(q & 0xF).to(torch.uint8)], dim=1)
    return out.reshape(*lead, -1)


HELD = ("int4", "q4_k", "q5_0")  # the formats QuantWeight holds otherwise than files do
TILED = ("int4", "q4_k")  # held in chunks and tiles (the kernel's int4 loop)
# Held in another format's blocks, value for value: the C kernel runs Q5_0's 5-bit values as
# Q8_0's int8 (1.55x the bytes, a memory-bound read where the fifth bits cost compute: the real
# Gemma 3 270M's Q5_0 projections took 3.9 ms of a 14 ms token, and its decode ran 1.055x
# faster with them held as Q8_0, alternated in one process)
HELD_AS = {"q5_0": "q8_0"}


def held_format(fmt: str) -> str:
    """The format whose blocks QuantWeight's buffer holds, and the C kernel reads, for fmt."""
    return HELD_AS.get(fmt, fmt)


def held_memory(
    fmt: str,
    qdata: torch.Tensor,
    scale: torch.Tensor | None,
    minimum: torch.Tensor | None,
    tile: int,
) -> torch.Tensor:
    """A weight in row layout -> the one tensor QuantWeight holds (fmt in HELD)."""
    if fmt == "q5_0":
        return q5_0_as_q8_0(qdata)
    return int4_memory(qdata, scale, minimum, tile) if fmt == "int4" else q4_k_memory(qdata, tile)


def held_rows(
    fmt: str, memory: torch.Tensor, k: int, group: int, rows: slice | torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """held_memory's inverse for rows `rows` (all when None): (qdata, scale, minimum) in row
    layout (scale and minimum None for q4_k and q5_0, whose blocks hold them)."""
    if fmt == "int4":
        return int4_rows(memory, k, group, rows)
    if fmt == "q5_0":
        return q8_0_as_q5_0(memory if rows is None else memory[rows]), None, None
    return q4_k_rows(memory, rows), None, None


def _f16(b: torch.Tensor) -> torch.Tensor:
    """uint8 [..., 2] -> float32 [..., 1] (little-endian float16)."""
    return b.contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """uint8 [..., 16] -> [..., 32]: low nibbles are values 0..15, high nibbles 16..31."""
    return torch.cat([qs & 0xF, qs >> 4], dim=-1)


def _pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """_nibbles' inverse: values 0..15 [..., 32] -> uint8 [..., 16]."""
    return q[..., :16] | (q[..., 16:] << 4)


def _q8_0(b: torch.Tensor) -> torch.Tensor:
    return b[:, 2:].view(torch.int8).float() * _f16(b[:, :2])


def _q4_0(b: torch.Tensor) -> torch.Tensor:
    return (_nibbles(b[:, 2:]).float() - 8.0) * _f16(b[:, :2])


def _q5_0(b: torch.Tensor) -> torch.Tensor:
    return _q8_0(q5_0_as_q8_0(b))  # the same d * (q - 16): q - 16 is exact as an int8 and a float


def _q4_k_scales(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The 12 packed bytes of a Q4_K super-block -> 8 six-bit scales and 8 mins, [B, 8] each."""
    d, m, md = s[:, 0:4].int(), s[:, 4:8].int(), s[:, 8:12].int()
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc.float(), mn.float()


def _q4_k_values(qs: torch.Tensor) -> torch.Tensor:
    """A Q4_K super-block's 128 bytes of nibbles [..., 128] -> its 8 sub-blocks' values 0..15
    [..., 8, 32]: per 32 bytes, sub-block 2i in the low nibbles and 2i + 1 in the high ones."""
    qs = qs.reshape(*qs.shape[:-1], 4, 1, 32)
    return torch.cat([qs & 0xF, qs >> 4], dim=-2).reshape(*qs.shape[:-3], 8, 32)


def _q4_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    d, dmin = _f16(b[:, 0:2]), _f16(b[:, 2:4])
    sc, mn = _q4_k_scales(b[:, 4:16])
    q = _q4_k_values(b[:, 16:]).float()
    return ((d * sc)[..., None] * q - (dmin * mn)[..., None]).reshape(n, 256)


def _q6_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    ql, qh = b[:, :128], b[:, 128:192]
    sc = b[:, 192:208].contiguous().view(torch.int8).float()  # [n, 16]
    d = _f16(b[:, 208:210])
    ql = ql.reshape(n, 2, 1, 64)
    low = torch.cat([ql & 0xF, ql >> 4], dim=2).reshape(n, 2, 4, 32)
    qh = qh.reshape(n, 2, 1, 32)
    shifts = torch.tensor([0, 2, 4, 6], device=b.device, dtype=torch.uint8).view(1, 1, 4, 1)
    high = (qh >> shifts) & 3  # [n, 2, 4, 32]
    q = (low.int() | (high.int() << 4)).float() - 32.0
    return ((d * sc).reshape(n, 16, 1) * q.reshape(n, 16, 16)).reshape(n, 256)


_BLOCK_DEQUANT = {"q8_0": _q8_0, "q4_0": _q4_0, "q5_0": _q5_0, "q4_k": _q4_k, "q6_k": _q6_k}


def dequantize(
    fmt: str,
    qdata: torch.Tensor,
    scale: torch.Tensor | None = None,
    minimum: torch.Tensor | None = None,
) -> torch.Tensor:
    """qdata uint8 [N, row_bytes] (+ scale/minimum for int8/int4) -> float32 [N, K]."""
    n = qdata.shape[0]
    f = FORMATS[fmt]
    if fmt == "int8":
        return qdata.view(torch.int8).float() * scale.float()[:, None]
    if fmt == "int4":
        q = _nibbles(qdata.reshape(-1, 16)).float().reshape(n, -1)  # [N, K]
        group = q.shape[1] // scale.shape[1]
        q = q.reshape(n, -1, group)
        return (q * scale.float()[..., None] + minimum.float()[..., None]).reshape(n, -1)
    blocks = qdata.reshape(-1, f.block_bytes)
    return _BLOCK_DEQUANT[fmt](blocks).reshape(n, -1)


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float [N, K] -> (qdata uint8 [N, K] holding int8, scale float32 [N]): symmetric per
    output row, s = max|w| / 127, q = round(w / s)."""
    w = w.float()
    scale = w.abs().amax(dim=1) / 127.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q.view(torch.uint8), scale


def quantize_int4(w: torch.Tensor, group: int = 32) -> tuple[torch.Tensor, ...]:
    """float [N, K] -> (qdata uint8 [N, K / 2], scale float16 [N, K / group], minimum float16
    [N, K / group]): per group, m = min(w), d = (max(w) - m) / 15, q = round((w - m) / d).
    d and m are rounded to float16 first and q computed from the rounded values."""
    if group not in INT4_GROUPS:
        raise ValueError(f"int4 group must be one of {INT4_GROUPS}, not {group}")
    n, k = w.shape
    if k % group:
        raise CheckpointError(f"a row of {k} weights is not a multiple of the int4 group {group}")
    g = w.float().reshape(n, k // group, group)
    lo, hi = g.amin(dim=-1), g.amax(dim=-1)
    d = ((hi - lo) / 15.0).half()
    m = lo.half()
    dd = torch.where(d.float() > 0, d.float(), torch.ones_like(d.float()))
    q = torch.round((g - m.float()[..., None]) / dd[..., None]).clamp(0, 15).to(torch.uint8)
    return _pack_nibbles(q.reshape(n, k // 32, 32)).reshape(n, k // 2), d, m
