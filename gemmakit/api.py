"""The public entry points: load_model, load_tokenizer, generate."""

from __future__ import annotations

from pathlib import Path

import torch

from gemmakit.checkpoint import load_checkpoint
from gemmakit.checkpoint.peft import load_lora
from gemmakit.config import GemmaConfig
from gemmakit.model.lora import merge_lora
from gemmakit.model.transformer import Gemma, init_weights
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
) -> Gemma:
    """A Gemma model from a preset name (random weights), a GemmaConfig, a checkpoint path
    (HF directory, `.safetensors`, index json, `.ckpt`, `.gguf`) or an installed model name.

    adapter: a LoRA folder in PEFT's format (`adapter_config.json` + `adapter_model.safetensors`,
    e.g. a LoRA SFT checkpoint) put onto those weights; with `merge`, folded into them so the
    result is a plain model.
    Returns an nn.Module whose forward(tokens [B, T]) gives logits [B, T, V].
    """
    model = _load_base(source, dtype, device, config)
    if adapter is not None:
        load_lora(model, adapter)
        if merge:
            merge_lora(model)
        model.eval()
    return model


def _load_base(source, dtype, device, config) -> Gemma:
    found = source if isinstance(source, GemmaConfig) else resolve_source(source)
    if isinstance(found, GemmaConfig):
        return build_model(found, dtype, device)
    return load_checkpoint(found, config, dtype, device)
