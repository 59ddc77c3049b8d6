"""The public entry points: load_model, load_tokenizer, generate."""

from __future__ import annotations

from pathlib import Path

import torch

from gemmakit.checkpoint import load_checkpoint
from gemmakit.config import PRESETS, GemmaConfig, get_config
from gemmakit.errors import MissingFileError
from gemmakit.model.transformer import Gemma, init_weights


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
        from gemmakit.checkpoint.peft import load_lora
        from gemmakit.model.lora import merge_lora

        load_lora(model, adapter)
        if merge:
            merge_lora(model)
        model.eval()
    return model


def _load_base(source, dtype, device, config) -> Gemma:
    if isinstance(source, GemmaConfig):
        return build_model(source, dtype, device)
    from gemmakit.installed import installed_model_path

    installed = installed_model_path(str(source))
    if installed is not None:
        return load_checkpoint(installed, config, dtype, device)
    path = Path(source)
    if path.exists():
        return load_checkpoint(path, config, dtype, device)
    if str(source) in PRESETS:
        return build_model(get_config(str(source)), dtype, device)
    raise MissingFileError(
        f"{source}: not a checkpoint path, an installed model or a preset "
        f"(presets: {', '.join(PRESETS)})"
    )
