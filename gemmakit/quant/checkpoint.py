"""Quantized checkpoints: what `gemmakit quantize` writes, and reading kept blocks at load.

The format is an HF checkpoint folder (config.json, model.safetensors, tokenizer.model), so the
usual reader, config and tokenizer code apply; each quantized weight `KEY` is stored as
`KEY.qdata` (uint8 blocks, exactly as QuantWeight holds them), plus `KEY.scale` and
`KEY.minimum` for int8/int4, and config.json's `gemmakit_quantization.tensors` maps KEY to its
format. Chosen over GGUF because GGUF has no type for gemmakit's int8 (per-row scale) and int4
(float16 scale + minimum per group) and one format serves all four `--to` choices; a q8_0
GGUF that llama.cpp reads is what `gemmakit convert --dtype q8_0` writes.

gemmakit.checkpoint.quantized.QuantizedSource reads such a folder: plain keys as they are, a
quantized KEY dequantized to float32 by get() (quant=None: the exact path) or as its blocks
by quantized() (quant="keep").
"""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path

import torch

from gemmakit.checkpoint.hf_config import config_to_hf
from gemmakit.checkpoint.layouts import hf_layout
from gemmakit.checkpoint.quantized import CONFIG_KEY
from gemmakit.checkpoint.save import _replace_folder, prepare_output
from gemmakit.quant.weight import QuantWeight


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
