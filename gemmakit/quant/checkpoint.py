"""Quantized checkpoints: what `gemmakit quantize` writes, and reading kept blocks at load.

The format is an HF checkpoint folder (config.json, model.safetensors, tokenizer.model), so the
usual reader, config and tokenizer code apply; each quantized weight `KEY` is stored as
`KEY.qdata` (uint8 blocks, exactly as QuantWeight holds them), plus `KEY.scale` and
`KEY.minimum` for int8/int4, and config.json's `gemmakit_quantization.tensors` maps KEY to its
format. Chosen over GGUF because GGUF has no type for gemmakit's int8 (per-row scale) and int4
(float16 scale + minimum per group) and one format serves all four `--to` choices; a q8_0
GGUF that llama.cpp reads is what `gemmakit convert --dtype q8_0` writes.

`QuantizedSource` reads such a folder: plain keys as they are, a quantized KEY dequantized to
float32 by get() (quant=None: the exact path) or as its blocks by quantized() (quant="keep").
"""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path

import numpy as np
import torch

from gemmakit.checkpoint.hf_config import config_to_hf
from gemmakit.checkpoint.layouts import hf_layout
from gemmakit.checkpoint.save import _replace_folder, prepare_output
from gemmakit.checkpoint.sources import GGUFSource, SafetensorsSource, TensorSource
from gemmakit.errors import CheckpointError
from gemmakit.quant.formats import FORMATS, GGUF_FORMATS, dequantize
from gemmakit.quant.weight import QuantWeight

CONFIG_KEY = "gemmakit_quantization"
PARTS = ("qdata", "scale", "minimum")


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
            return _logical_shape(self.formats[key], self.inner.shape(f"{key}.qdata"))
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
        try:
            return QuantWeight(fmt, self.shape(key), qdata, scale, minimum, dtype)
        except (ValueError, AttributeError) as e:
            raise CheckpointError(f"{self.file_of(key)}: tensor {key!r}: {e}") from e


def wrap_quantized(source: SafetensorsSource) -> TensorSource:
    """`source` itself, or a QuantizedSource when it holds `.qdata` tensors (the format map
    read from the config.json beside it)."""
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


def save_quantized(model, directory: str | Path, tokenizer: bytes | None = None) -> Path:
    """Write `model` (quantized by gemmakit.quant.model) as a quantized HF folder."""
    from safetensors.torch import save_file

    directory = Path(directory)
    prepare_output(directory, folder=True)
    layout = hf_layout(model.config)
    quantized = {
        name.removesuffix(".weight") + ".weight": m
        for name, m in model.named_modules()
        if isinstance(m, QuantWeight)
    }
    state: dict[str, torch.Tensor] = {}
    formats: dict[str, str] = {}
    for name, t in model.state_dict().items():
        base, _, part = name.rpartition(".")
        if base in quantized:
            key = layout[base].key
            formats[key] = quantized[base].fmt
            state[f"{key}.{part}"] = t.detach().contiguous().cpu()
        else:
            state[layout[name].key] = t.detach().contiguous().cpu()
    tmp = directory.with_name(f".{directory.name}.{uuid.uuid4().hex[:12]}.tmp")
    tmp.mkdir()
    try:
        hf = config_to_hf(model.config)
        hf[CONFIG_KEY] = {"tensors": formats}
        (tmp / "config.json").write_text(json.dumps(hf, indent=2))
        save_file(state, tmp / "model.safetensors", metadata={"format": "pt"})
        if tokenizer is not None:
            (tmp / "tokenizer.model").write_bytes(tokenizer)
        _replace_folder(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory
