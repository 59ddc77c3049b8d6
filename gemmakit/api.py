"""The public entry points: load_model, load_tokenizer, generate."""

from __future__ import annotations

from pathlib import Path

import torch

from gemmakit.checkpoint import load_checkpoint
from gemmakit.checkpoint.peft import load_lora
from gemmakit.config import GemmaConfig
from gemmakit.errors import UsageError
from gemmakit.model.lora import merge_lora
from gemmakit.model.transformer import Gemma, init_weights
from gemmakit.quant.model import check_mode, quantize_model
from gemmakit.resolve import resolve_source


def build_model(
    config: GemmaConfig,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    seed: int | None = 0,
    init_std: float = 0.02,
) -> Gemma:
    """A model with random weights (normal with std init_std, zero norms); built on the meta
    device first so that a large preset allocates its weights once. device "meta": that bare
    structure, with no storage and no weights (for FSDP to shard before any weight exists)."""
    with torch.device("meta"):
        model = Gemma(config).to(dtype or torch.float32)
    if torch.device(device or "cpu").type == "meta":
        return model.eval()
    model = model.to_empty(device=device or "cpu")
    return init_weights(model, std=init_std, seed=seed).eval()


def load_model(
    source: str | Path | GemmaConfig,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    config: GemmaConfig | str | None = None,
    adapter: str | Path | None = None,
    merge: bool = False,
    quant: str | None = None,
) -> Gemma:
    """A Gemma model from a preset name (random weights), a GemmaConfig, a checkpoint path
    (HF directory, `.safetensors`, index json, `.ckpt`, `.gguf`) or an installed model name.

    adapter: a LoRA folder in PEFT's format (`adapter_config.json` + `adapter_model.safetensors`,
    e.g. a LoRA SFT checkpoint) put onto those weights; with `merge`, folded into them so the
    result is a plain model.
    quant: None (default): every weight dequantized to `dtype` (float32 for a quantized
    file), the exact path; "keep": weights the file stores quantized (GGUF Q8_0, Q4_0, Q5_0,
    Q4_K, Q6_K; a `gemmakit quantize` folder) stay in their blocks; "int8", "int4" (groups of
    32), "int4-g128", "q8_0", "q4_k": linear weights and the tied embedding quantized at load
    (see gemmakit/quant/). A LoRA adapter is merged before quantizing.
    Returns an nn.Module whose forward(tokens [B, T]) gives logits [B, T, V].
    """
    check_mode(quant)
    if quant == "keep" and adapter is not None:
        raise UsageError("a LoRA adapter cannot go onto kept quantized weights; use int8/int4")
    if quant is not None and adapter is not None:
        merge = True  # merged into the float weights, then quantized
    model = _load_base(source, dtype, device, config, keep=quant == "keep")
    if adapter is not None:
        load_lora(model, adapter)
        if merge:
            merge_lora(model)
        model.eval()
    if quant not in (None, "keep"):
        quantize_model(model, quant)
    return model


def _load_base(source, dtype, device, config, keep: bool = False) -> Gemma:
    found = source if isinstance(source, GemmaConfig) else resolve_source(source)
    if isinstance(found, GemmaConfig):
        return build_model(found, dtype, device)
    return load_checkpoint(found, config, dtype, device, keep=keep)
