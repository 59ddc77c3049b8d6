"""Reading quantized tensors at load: a `gemmakit quantize` folder (QuantizedSource) and the
blocks a GGUF file stores (kept_weight, for quant="keep"). The format is described in
gemmakit/quant/checkpoint.py, which writes it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from gemmakit.checkpoint.sources import GGUFSource, SafetensorsSource, TensorSource
from gemmakit.errors import CheckpointError
from gemmakit.quant.formats import FORMATS, GGUF_FORMATS, dequantize
from gemmakit.quant.weight import QuantWeight

CONFIG_KEY = "gemmakit_quantization"
PARTS = ("qdata", "scale", "minimum")
TAKES = {"int8": ("scale",), "int4": ("scale", "minimum")}  # the rest: their blocks hold them


def _logical_shape(fmt: str, qdata_shape: tuple[int, ...]) -> tuple[int, int]:
    f = FORMATS[fmt]
    n, rb = qdata_shape
    return n, rb // f.block_bytes * f.block


class QuantizedSource(TensorSource):
    """A `gemmakit quantize` folder's safetensors, with each quantized weight seen under its
    plain key: shape() its logical [N, K], get() its float32 dequantization."""

    def __init__(self, inner: SafetensorsSource, formats: dict[str, str]) -> None:
        self.inner, self.path, self.formats = inner, inner.path, formats
        for key, fmt in formats.items():
            if fmt not in FORMATS or f"{key}.qdata" not in inner.keys():
                raise CheckpointError(f"{self.path}: quantized tensor {key!r} ({fmt!r}) not found")

    def keys(self) -> list[str]:
        parts = {f"{k}.{p}" for k in self.formats for p in PARTS}
        return [k for k in self.inner.keys() if k not in parts] + list(self.formats)

    def file_of(self, key: str) -> Path:
        return self.inner.file_of(f"{key}.qdata" if key in self.formats else key)

    def shape(self, key: str) -> tuple[int, ...]:
        if key in self.formats:
            found = self.inner.shape(f"{key}.qdata")
            if len(found) != 2:
                raise CheckpointError(
                    f"{self.file_of(key)}: tensor {key!r}: qdata has shape {list(found)}, "
                    "not [rows, bytes per row]"
                )
            return _logical_shape(self.formats[key], found)
        return self.inner.shape(key)

    def _parts(self, key: str) -> list[torch.Tensor | None]:
        have = set(self.inner.keys())
        return [self.inner.get(f"{key}.{p}") if f"{key}.{p}" in have else None for p in PARTS]

    def get(self, key: str) -> torch.Tensor:
        if key in self.formats:
            return dequantize(self.formats[key], *self._parts(key))
        return self.inner.get(key)

    def quantized(self, key: str, dtype: torch.dtype) -> QuantWeight | None:
        if key not in self.formats:
            return None
        fmt = self.formats[key]
        qdata, scale, minimum = self._parts(key)
        for name, t in (("scale", scale), ("minimum", minimum)):
            if t is not None and name not in TAKES.get(fmt, ()):
                raise CheckpointError(
                    f"{self.file_of(key)}: tensor {key!r}: {fmt} takes no {name} "
                    f"(found {key}.{name})"
                )
        try:
            return QuantWeight(fmt, self.shape(key), qdata, scale, minimum, dtype)
        except (ValueError, AttributeError) as e:
            raise CheckpointError(f"{self.file_of(key)}: tensor {key!r}: {e}") from e


def wrap_quantized(source: TensorSource) -> TensorSource:
    """`source` itself, or a QuantizedSource when it is a safetensors checkpoint holding
    `.qdata` tensors (the format map read from the config.json beside it)."""
    if not isinstance(source, SafetensorsSource):
        return source
    if not any(k.endswith(".qdata") for k in source.keys()):
        return source
    config = source.path.parent / "config.json"
    try:
        formats = json.loads(config.read_text())[CONFIG_KEY]["tensors"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(
            f"{config}: quantized tensors need {CONFIG_KEY}.tensors here ({e})"
        ) from e
    if not isinstance(formats, dict):
        raise CheckpointError(f"{config}: {CONFIG_KEY}.tensors is not a mapping")
    return QuantizedSource(source, formats)


def kept_weight(
    source: TensorSource, key: str, shape: tuple[int, ...], dtype: torch.dtype
) -> QuantWeight | None:
    """Tensor `key` as the QuantWeight its file stores, or None when it is stored as floats
    (or in a GGML type without a kernel here)."""
    if isinstance(source, QuantizedSource):
        return source.quantized(key, dtype)
    if isinstance(source, GGUFSource):
        fmt = source.qtype(key).lower()
        if fmt not in GGUF_FORMATS:
            return None
        raw = torch.from_numpy(np.array(source.file.raw(key)))  # a copy: the map is read-only
        try:
            return QuantWeight(fmt, tuple(shape), raw.reshape(shape[0], -1), dtype=dtype)
        except ValueError as e:
            raise CheckpointError(f"{source.path}: tensor {key!r}: {e}") from e
    return None
