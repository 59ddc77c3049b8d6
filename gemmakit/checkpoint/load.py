"""Build a model from a checkpoint, streaming one tensor at a time into a meta-device model."""

from __future__ import annotations

from pathlib import Path

import torch

from gemmakit.checkpoint.hf_config import infer_config, read_hf_config
from gemmakit.checkpoint.layouts import Spec, detect_layout, is_ignored
from gemmakit.checkpoint.sources import TensorSource, open_source
from gemmakit.config import GemmaConfig, get_config
from gemmakit.errors import CheckpointError
from gemmakit.model.transformer import Gemma
from gemmakit.quant.checkpoint import kept_weight
from gemmakit.quant.model import quantizable, swap_weight


def resolve_config(source: TensorSource, path: Path, config: GemmaConfig | str | None):
    if isinstance(config, str):
        return get_config(config)
    if config is not None:
        return config
    if hasattr(source, "config"):  # formats that carry their own config (GGUF)
        return source.config()
    try:
        found = read_hf_config(path if path.is_dir() else path.parent)
    except ValueError as e:
        raise CheckpointError(str(e)) from e
    if found is not None:
        return found
    keys = source.keys()
    embed = next((k for k in keys if k.endswith(("embed_tokens.weight", "embedder.weight"))), None)
    if embed is None:
        raise CheckpointError(f"{path}: no embedding table, cannot tell what model this is")
    try:
        return infer_config({k: source.shape(k) for k in keys}, embed)
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from e


def check_keys(source: TensorSource, layout: dict[str, Spec], config: GemmaConfig) -> None:
    """Every needed key present, nothing unknown, every shape as the config says."""
    keys = set(source.keys())
    needed = {spec.key for spec in layout.values()}
    missing = sorted(needed - keys)
    if missing:
        raise CheckpointError(
            f"{source.path}: missing key {missing[0]!r} for config {config.name!r}"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
        )
    unexpected = sorted(k for k in keys - needed if not is_ignored(k))
    if unexpected:
        raise CheckpointError(
            f"{source.file_of(unexpected[0])}: unexpected key {unexpected[0]!r} for config "
            f"{config.name!r} ({config.n_layers} layers)"
            + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else "")
        )


def _expected_source_shapes(model: Gemma, layout: dict[str, Spec]) -> dict[str, tuple]:
    shapes: dict[str, tuple] = {}
    for name, param in model.named_parameters():
        spec = layout[name]
        if spec.transform is not None:
            continue  # the format's own code checks what it transforms
        if spec.rows is None:
            shapes[spec.key] = tuple(param.shape)
        else:
            rows = max(spec.rows[1], shapes.get(spec.key, (0,))[0])
            shapes[spec.key] = (rows, *param.shape[1:])
    return shapes


def load_checkpoint(
    path: str | Path,
    config: GemmaConfig | str | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    keep: bool = False,
) -> Gemma:
    """A model with the weights of `path` (HF directory or `.safetensors`, index, `.ckpt`, `.gguf`).

    config: a preset name or GemmaConfig to check the file against; by default it comes from
    the checkpoint (config.json, GGUF metadata) or the preset its shapes match.
    dtype: by default the dtype of the stored embedding (float32 for quantized GGUF).
    Peak memory stays near the model's own size: tensors are read one at a time and moved
    straight into a model built on the meta device.
    keep: linear and embedding weights the file stores quantized (GGUF blocks, a `gemmakit
    quantize` folder) stay in their blocks as gemmakit.quant QuantWeights; `dtype` is then
    the compute dtype.
    """
    path = Path(path)
    source = open_source(path)
    config = resolve_config(source, path, config)
    try:
        fmt, layout = detect_layout(source.keys(), config)
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from e
    check_keys(source, layout, config)

    with torch.device("meta"):
        model = Gemma(config)
    for key, want in _expected_source_shapes(model, layout).items():
        found = source.shape(key)
        if found != want:
            raise CheckpointError(
                f"{source.file_of(key)}: key {key!r} has shape {list(found)}, expected "
                f"{list(want)} for config {config.name!r}"
            )
    if dtype is None:
        dtype = (
            getattr(source, "default_dtype", None)
            or source.get(layout["embedder.weight"].key).dtype
        )
        if not dtype.is_floating_point:
            dtype = torch.float32

    state: dict[str, torch.Tensor] = {}
    kept = {}
    last_key, last = None, None  # fused tensors are read once for their q, k and v rows
    for name, param in model.named_parameters():
        spec = layout[name]
        if keep and spec.rows is None and spec.transform is None and quantizable(name):
            q = kept_weight(source, spec.key, tuple(param.shape), dtype)
            if q is not None:
                kept[name] = q.to(device)
                state |= {f"{name}.{b}": t for b, t in kept[name].named_buffers()}
                continue
        if spec.key != last_key:
            last_key, last = spec.key, source.get(spec.key)
        t = last if spec.rows is None else last[spec.rows[0] : spec.rows[1]]
        if spec.transform is not None:
            t = spec.transform(t)
        if tuple(t.shape) != tuple(param.shape):
            raise CheckpointError(
                f"{source.file_of(spec.key)}: key {spec.describe()} gives shape {list(t.shape)}, "
                f"expected {list(param.shape)} for config {config.name!r}"
            )
        state[name] = t.to(device=device, dtype=dtype).contiguous()
    last = None
    for name, q in kept.items():
        swap_weight(model, name, q)
    model.load_state_dict(state, assign=True)
    model.source_format = fmt
    return model.eval()
