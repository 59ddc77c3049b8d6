"""GGML tensor types -> float32 torch tensors.

The block formats (Q8_0, Q5_0, Q4_K, Q6_K, ...) are decoded by `gguf.quants.dequantize`, the
numpy reference that ships with llama.cpp's gguf-py; tests/test_gguf.py checks it against the
formulas of ggml-quants.c written out independently. F32, F16 and BF16 are plain views. Q8_0
(the embedding table of most GGUF files, 70% of Gemma 3 270M's bytes) is decoded in torch here
instead: gguf's numpy path takes ~5 s for it, this one ~0.3 s.
"""

from __future__ import annotations

import numpy as np
import torch
from gguf import quants
from gguf.constants import GGMLQuantizationType as Q

FLOAT_TYPES = {Q.F32: torch.float32, Q.F16: torch.float16, Q.BF16: torch.bfloat16}


def dequantize(raw: np.ndarray, qtype: Q, shape: tuple[int, ...]) -> torch.Tensor:
    """raw: uint8 [rows, bytes per row] as stored; returns float32 of `shape` (PyTorch order)."""
    if qtype in FLOAT_TYPES:
        # reinterpret the bytes; bf16 has no numpy dtype, so go through int16
        view = raw.view({Q.F32: np.float32, Q.F16: np.float16, Q.BF16: np.int16}[qtype])
        t = torch.from_numpy(np.array(view))  # a copy: the file's map is read-only
        if qtype == Q.BF16:
            t = t.view(torch.bfloat16)
        return t.reshape(shape).float()
    if qtype == Q.Q8_0:
        return _dequantize_q8_0(raw).reshape(shape)
    try:
        values = quants.dequantize(np.ascontiguousarray(raw), qtype)
    except NotImplementedError as e:
        raise NotImplementedError(f"GGML type {qtype.name} cannot be dequantized ({e})") from e
    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).reshape(shape)


def _dequantize_q8_0(raw: np.ndarray) -> torch.Tensor:
    """Blocks of 34 bytes: a float16 scale d, then 32 int8 values q; x = d * q."""
    blocks = torch.from_numpy(np.array(raw)).reshape(-1, 34)
    d = blocks[:, :2].contiguous().view(torch.float16).float()  # [n, 1]
    return blocks[:, 2:].view(torch.int8).float() * d
