"""Write a model as an HF safetensors directory or a gemma_pytorch `.ckpt`, atomically."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from gemmakit.atomic import atomic_path
from gemmakit.checkpoint.hf_config import config_to_hf
from gemmakit.checkpoint.hf_tokenizer import write_hf_tokenizer_files
from gemmakit.checkpoint.layouts import Spec, gemma_pytorch_layout, hf_layout
from gemmakit.errors import CheckpointError
from gemmakit.model.transformer import Gemma


def export_state(model: Gemma, layout: dict[str, Spec]) -> dict[str, torch.Tensor]:
    """The model's tensors under the layout's keys, fused tensors assembled from their rows."""
    out: dict[str, torch.Tensor] = {}
    fused: dict[str, list[tuple[int, torch.Tensor]]] = {}
    for name, t in model.state_dict().items():
        spec = layout[name]
        if spec.transform is not None:
            raise CheckpointError(f"layout of {spec.key!r} cannot be written back")
        if spec.rows is None:
            out[spec.key] = t.detach().contiguous()
        else:
            fused.setdefault(spec.key, []).append((spec.rows[0], t.detach()))
    for key, parts in fused.items():
        out[key] = torch.cat([t for _, t in sorted(parts, key=lambda p: p[0])]).contiguous()
    return out


def _publish(tmp: Path, target: Path) -> None:
    """Move a finished temporary directory's files into place, each by an atomic rename."""
    if not target.exists():
        os.replace(tmp, target)
        return
    for f in tmp.iterdir():
        os.replace(f, target / f.name)
    shutil.rmtree(tmp)


def save_hf(
    model: Gemma,
    directory: str | Path,
    max_shard_bytes: int | None = None,
    dtype: torch.dtype | None = None,
    extra_files: dict[str, Path] | None = None,
) -> Path:
    """Write `directory/` as HF transformers writes it: config.json and model.safetensors, or
    shards plus model.safetensors.index.json when larger than `max_shard_bytes`."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    state = export_state(model, hf_layout(model.config))
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, t in state.items():
        nbytes = t.numel() * t.element_size()
        if max_shard_bytes and shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = t
        size += nbytes
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        hf = config_to_hf(model.config)
        hf["torch_dtype"] = hf["dtype"] = str(next(iter(state.values())).dtype).removeprefix(
            "torch."
        )
        (tmp / "config.json").write_text(json.dumps(hf, indent=2))
        if len(shards) == 1:
            save_file(shards[0], tmp / "model.safetensors", metadata={"format": "pt"})
        else:
            weight_map = {}
            total = sum(t.numel() * t.element_size() for t in state.values())
            for i, shard in enumerate(shards, 1):
                fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, tmp / fname, metadata={"format": "pt"})
                weight_map |= {k: fname for k in shard}
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        for name, src in (extra_files or {}).items():
            shutil.copyfile(src, tmp / name)
        if "tokenizer.model" in (extra_files or {}):  # what HF reads beside it
            write_hf_tokenizer_files(tmp, model.config)
        _publish(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def save_gemma_pytorch(model: Gemma, path: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Write a gemma_pytorch `.ckpt`: {"model_state_dict": ...} with fused qkv."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = export_state(model, gemma_pytorch_layout(model.config))
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
    with atomic_path(path) as tmp:
        torch.save({"model_state_dict": state}, tmp)
    return path
