"""Write a model as an HF safetensors directory or a gemma_pytorch `.ckpt`, atomically.

A writer owns its output: a folder is built beside the target and then replaces it whole, so no
file of an earlier checkpoint (a stale shard or index) survives in it; a folder that holds
anything but checkpoint files is refused rather than deleted.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from pathlib import Path

import torch

from gemmakit.atomic import atomic_path
from gemmakit.checkpoint.hf_config import config_to_hf
from gemmakit.checkpoint.hf_tokenizer import write_hf_tokenizer_files
from gemmakit.checkpoint.layouts import Spec, gemma_pytorch_layout, hf_layout
from gemmakit.errors import CheckpointError
from gemmakit.model.transformer import Gemma

# What an HF checkpoint folder holds: replacing a folder of only these loses nothing else.
CHECKPOINT_FILES = re.compile(
    r"config\.json|generation_config\.json|model(-\d+-of-\d+)?\.safetensors"
    r"|model\.safetensors\.index\.json|tokenizer\.(model|json)|tokenizer_config\.json"
    r"|special_tokens_map\.json"
)


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


def prepare_output(path: Path, folder: bool, source: Path | None = None) -> None:
    """Check that `path` can be written as a checkpoint folder (`folder`) or file, and create
    the folders above it. A CheckpointError names the problem: a file where a folder must be (above
    `path`, or at it), a folder where the file must be, a folder holding files that are not a
    checkpoint's (replacing it would delete them), the checkpoint being read (`source`: writing
    would replace what is being converted), or a folder that cannot be created."""
    if source is not None:
        src, out = Path(source).resolve(), Path(path).resolve()
        if src == out or out in src.parents:
            raise CheckpointError(
                f"{path}: is where the source {source} is; writing there would replace it: "
                "choose another output"
            )
    for above in path.parents:
        if above.exists():
            if not above.is_dir():
                raise CheckpointError(
                    f"{path}: cannot write there, {above} is a file, not a folder"
                )
            break
    if folder and path.exists():
        if not path.is_dir():
            raise CheckpointError(f"{path}: is a file; a checkpoint folder would replace it")
        foreign = sorted(p.name for p in path.iterdir() if not CHECKPOINT_FILES.fullmatch(p.name))
        if foreign:
            raise CheckpointError(
                f"{path}: holds {foreign[0]!r}"
                + (f" and {len(foreign) - 1} more" if len(foreign) > 1 else "")
                + ", which is not a checkpoint file; writing a checkpoint there would delete "
                "it: remove it or choose another folder"
            )
    if not folder and path.is_dir():
        raise CheckpointError(f"{path}: is a folder; give a file name")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CheckpointError(f"{path.parent}: cannot create the folder ({e.strerror})") from None


def _replace_folder(tmp: Path, target: Path) -> None:
    """Put the finished folder `tmp` at `target`, whose old content (if any) goes whole: each
    step a rename, and the old folder is deleted only once the new one is in place."""
    if not target.exists():
        os.replace(tmp, target)
        return
    old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:12]}")
    os.replace(target, old)
    try:
        os.replace(tmp, target)
    except BaseException:
        os.replace(old, target)
        raise
    shutil.rmtree(old)


def save_hf(
    model: Gemma,
    directory: str | Path,
    max_shard_bytes: int | None = None,
    dtype: torch.dtype | None = None,
    extra_files: dict[str, Path | bytes] | None = None,
    extra_tensors: dict[str, torch.Tensor] | None = None,
    config_updates: dict | None = None,
) -> Path:
    """Write `directory/` as HF transformers writes it: config.json and model.safetensors, or
    shards plus model.safetensors.index.json when larger than `max_shard_bytes`; plus
    `extra_files` (file name -> a file to copy or the bytes to write). extra_tensors (HF key ->
    tensor) and config_updates (config.json fields) make another HF class of the same
    backbone, e.g. a reward model's `score.weight` and `architectures`. An existing checkpoint
    folder is replaced whole (see `prepare_output` for what is refused)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    prepare_output(directory, folder=True)
    state = export_state(model, hf_layout(model.config))
    state |= {k: v.detach().contiguous() for k, v in (extra_tensors or {}).items()}
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
    # a fresh name (not mkdtemp, whose folders are private 0700) gets the usual permissions
    tmp = directory.with_name(f".{directory.name}.{uuid.uuid4().hex[:12]}.tmp")
    tmp.mkdir()
    try:
        hf = config_to_hf(model.config) | (config_updates or {})
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
            if isinstance(src, bytes):
                (tmp / name).write_bytes(src)
            else:
                shutil.copyfile(src, tmp / name)
        if "tokenizer.model" in (extra_files or {}):  # what HF reads beside it
            write_hf_tokenizer_files(tmp, model.config)
        _replace_folder(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def save_gemma_pytorch(model: Gemma, path: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Write a gemma_pytorch `.ckpt`: {"model_state_dict": ...} with fused qkv."""
    path = Path(path)
    prepare_output(path, folder=False)
    state = export_state(model, gemma_pytorch_layout(model.config))
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
    with atomic_path(path) as tmp:
        torch.save({"model_state_dict": state}, tmp)
    return path
