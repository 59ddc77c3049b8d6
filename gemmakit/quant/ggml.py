"""llama.cpp's reference quantizers for Q8_0 and Q4_K (ggml-quants.c `quantize_row_q8_0_ref`,
`quantize_row_q4_K_ref` with `make_qkx2_quants`), from float weights to the file's blocks.

Q8_0 is gguf-py's numpy port of the reference. Q4_K is written here in torch, vectorized over
all sub-blocks of 32 at once, following the C step by step: per sub-block, weights
|x| + rms(x), a first guess scale/min from max - min, then 21 trial scales whose weighted
least-squares fit is kept when its weighted error is lower; then the 8 scales and mins of a
super-block rounded to 6 bits against the block's largest, and every weight requantized with
the rounded values. Rounding is to nearest, ties to even (llama.cpp's nearest_int).
"""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGMLQuantizationType, quants


def quantize_q8_0(w: torch.Tensor) -> torch.Tensor:
    """float [N, K] (K % 32 == 0) -> uint8 [N, K / 32 * 34] Q8_0 blocks."""
    out = quants.quantize(w.detach().float().cpu().numpy(), GGMLQuantizationType.Q8_0)
    return torch.from_numpy(np.ascontiguousarray(out))


def _make_qkx2(
    x: torch.Tensor,
    weights: torch.Tensor,
    nmax: int = 15,
    rmin: float = -1.0,
    rdelta: float = 0.1,
    nstep: int = 20,
) -> tuple[torch.Tensor, ...]:
    """x, weights [B, 32] -> (L uint8 [B, 32], scale [B], min [B]) with x ~ scale * L - min."""
    lo = x.amin(dim=1).clamp(max=0.0)
    hi = x.amax(dim=1)
    flat = hi == lo
    span = torch.where(flat, torch.ones_like(hi), hi - lo)
    sum_w = weights.sum(dim=1)
    sum_x = (weights * x).sum(dim=1)

    def levels(iscale: torch.Tensor) -> torch.Tensor:
        return torch.round(iscale[:, None] * (x - lo[:, None])).clamp(0, nmax)

    iscale = nmax / span
    scale = 1.0 / iscale
    best_l = levels(iscale)
    mn = lo.clone()
    best_err = (weights * (scale[:, None] * best_l + mn[:, None] - x) ** 2).sum(dim=1)
    for step in range(nstep + 1):
        l_aux = levels((rmin + rdelta * step + nmax) / span)
        sum_l = (weights * l_aux).sum(dim=1)
        sum_l2 = (weights * l_aux * l_aux).sum(dim=1)
        sum_xl = (weights * l_aux * x).sum(dim=1)
        det = sum_w * sum_l2 - sum_l * sum_l
        ok = det > 0
        safe = torch.where(ok, det, torch.ones_like(det))
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / safe
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / safe
        pos = this_min > 0
        this_scale = torch.where(pos, sum_xl / sum_l2.clamp(min=1e-30), this_scale)
        this_min = torch.where(pos, torch.zeros_like(this_min), this_min)
        err = (weights * (this_scale[:, None] * l_aux + this_min[:, None] - x) ** 2).sum(dim=1)
        better = ok & (err < best_err)
        best_l = torch.where(better[:, None], l_aux, best_l)
        best_err = torch.where(better, err, best_err)
        scale = torch.where(better, this_scale, scale)
        mn = torch.where(better, this_min, mn)
    scale = torch.where(flat, torch.zeros_like(scale), scale)
    best_l = torch.where(flat[:, None], torch.zeros_like(best_l), best_l)
    return best_l, scale, -mn


def quantize_q4_k(w: torch.Tensor) -> torch.Tensor:
    """float [N, K] (K % 256 == 0) -> uint8 [N, K / 256 * 144] Q4_K blocks (rows in chunks of
    about 1M weights, so the trial levels of a 262144-row embedding never all exist at once)."""
    n, k = w.shape
    rows = max(1, (1 << 20) // k)
    if n > rows:
        return torch.cat([quantize_q4_k(w[i : i + rows]) for i in range(0, n, rows)])
    x = w.detach().float().cpu().reshape(-1, 8, 32)  # [S, 8, 32]: super-blocks of 8 x 32
    s = x.shape[0]
    sub = x.reshape(-1, 32)
    av = torch.sqrt((sub * sub).mean(dim=1, keepdim=True))
    levels, scales, mins = _make_qkx2(sub, av + sub.abs())
    scales, mins = scales.view(s, 8), mins.view(s, 8)
    max_scale, max_min = scales.amax(dim=1), mins.amax(dim=1)
    inv_scale = torch.where(max_scale > 0, 63.0 / max_scale, torch.zeros_like(max_scale))
    inv_min = torch.where(max_min > 0, 63.0 / max_min, torch.zeros_like(max_min))
    ls = torch.round(inv_scale[:, None] * scales).clamp(max=63).to(torch.uint8)  # [S, 8]
    lm = torch.round(inv_min[:, None] * mins).clamp(max=63).to(torch.uint8)
    d = (max_scale / 63.0).half()
    dmin = (max_min / 63.0).half()
    # requantize every weight with the rounded scale and min of its sub-block
    dd = d.float()[:, None] * ls.float()  # [S, 8]
    dm = dmin.float()[:, None] * lm.float()
    safe = torch.where(dd != 0, dd, torch.ones_like(dd))
    requant = torch.round((x + dm[..., None]) / safe[..., None]).clamp(0, 15)
    levels = torch.where((dd != 0)[..., None], requant, levels.view(s, 8, 32)).to(torch.uint8)
    packed_scales = torch.cat(
        [
            ls[:, :4] | ((ls[:, 4:] >> 4) << 6),
            lm[:, :4] | ((lm[:, 4:] >> 4) << 6),
            (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4),
        ],
        dim=1,
    )  # [S, 12]
    pairs = levels.view(s, 4, 2, 32)  # sub-blocks 2c (low nibbles) and 2c + 1 (high nibbles)
    qs = (pairs[:, :, 0] | (pairs[:, :, 1] << 4)).reshape(s, 128)
    blocks = torch.cat(
        [d.view(torch.uint8).view(s, 2), dmin.view(torch.uint8).view(s, 2), packed_scales, qs],
        dim=1,
    )
    return blocks.reshape(n, k // 256 * 144).contiguous()
