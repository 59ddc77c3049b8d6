"""The fused decode step (decode_step.c): a whole Gemma stack, one new token for each of up to
16 sequences, in one C call. `gemmakit.model.fast_decode` builds the `Model` record from a
`Gemma` and decides when the step applies; this module only loads the library.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

MAX_ROWS = 16  # sequences per step (decode_step.c's MAX_ROWS; GEMVs of <= 8 rows each)

_P, _I64, _INT, _F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
N_WEIGHTS = 7  # q, k, v, o, gate, up, down (the order of decode_step.c's enum)
N_NORMS = 6  # attn, post_attn, mlp, post_mlp, q_norm, k_norm


class Weight(ctypes.Structure):
    """decode_step.c's `Weight`: plain (`plain` GEMV) or quantized (`quant` GEMV, format code
    `fmt`, int4 `group`, and `tile` for int4 held in tiles)."""

    _fields_ = [
        ("data", _P),
        ("scale", _P),
        ("plain", _P),
        ("quant", _P),
        ("fmt", _I64),
        ("group", _I64),
        ("tile", _I64),
    ]


class Model(ctypes.Structure):
    """decode_step.c's `Model` (same fields, same order)."""

    _fields_ = [
        ("n_layers", _I64),
        ("d_model", _I64),
        ("n_heads", _I64),
        ("n_kv_heads", _I64),
        ("head_dim", _I64),
        ("ffn_dim", _I64),
        ("vocab", _I64),
        ("window", _I64),
        ("rope_rows", _I64),
        ("norm_eps", _F),
        ("query_scale", _F),
        ("attn_softcap", _F),
        ("final_softcap", _F),
        ("bf16", ctypes.c_int32),
        ("is_local", _P),
        ("weights", _P),
        ("norms", _P),
        ("final_norm", _P),
        ("embed", _P),
        ("cos_global", _P),
        ("sin_global", _P),
        ("cos_local", _P),
        ("sin_local", _P),
        ("quant_multi", _P),  # quant_gemv_multi of quant_gemv.c, or None
    ]


ERRORS = {
    -1: "bad sizes",
    -2: "a position past the RoPE tables",
    -3: "too little scratch memory",
    -4: "a GEMV refused its shapes",
}


def scratch_floats(
    d_model: int, n_heads: int, n_kv_heads: int, head_dim: int, ffn_dim: int, m: int, max_len: int
) -> int:
    """Floats of scratch a step of m sequences needs (decode_step.c's decode_scratch_floats)."""
    nh, kh = n_heads * head_dim, n_kv_heads * head_dim
    return m * (3 * d_model + 2 * nh + 2 * kh + 2 * ffn_dim + n_heads * max_len)


SOURCE = Path(__file__).with_name("decode_step.c")
SIGNATURES = {"decode_step": [_P, _P, _P, _I64, _P, _P, _I64, _I64, _P, _P, _P, _I64, _INT]}
# The library itself (a CLibrary with its self-test against the eager model) is defined in
# gemmakit.model.fast_decode: the self-test needs the model, and kernels never import models.
