"""Lazy tensor readers over checkpoint files: one tensor in memory at a time."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch

from gemmakit.errors import CheckpointError


class TensorSource:
    """Read-only, lazy mapping of tensor name -> tensor for one checkpoint."""

    path: Path

    def keys(self) -> list[str]:
        raise NotImplementedError

    def shape(self, key: str) -> tuple[int, ...]:
        raise NotImplementedError

    def get(self, key: str) -> torch.Tensor:
        raise NotImplementedError

    def file_of(self, key: str) -> Path:
        return self.path

    def __contains__(self, key: str) -> bool:
        return key in self.keys()

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())


class SafetensorsSource(TensorSource):
    """One `.safetensors` file, or the shards listed by a `model.safetensors.index.json`."""

    def __init__(self, path: str | Path) -> None:
        from safetensors import safe_open

        self.path = Path(path)
        if self.path.name.endswith(".index.json"):
            try:
                weight_map = json.loads(self.path.read_text())["weight_map"]
            except (OSError, ValueError, KeyError) as e:
                raise CheckpointError(f"{self.path}: not a safetensors index ({e})") from e
            files = {k: self.path.parent / v for k, v in weight_map.items()}
        else:
            files = None
        self._handles = {}
        paths = sorted(set(files.values())) if files else [self.path]
        for p in paths:
            try:
                self._handles[p] = safe_open(str(p), framework="pt", device="cpu")
            except Exception as e:  # safetensors raises its own error types
                raise CheckpointError(f"{p}: cannot read as safetensors ({e})") from e
        self._file = {}
        for p, h in self._handles.items():
            for k in h.keys():
                self._file[k] = p
        if files:
            for k, p in files.items():
                if self._file.get(k) != p:
                    raise CheckpointError(f"{self.path}: key {k!r} is not in its shard {p.name}")

    def keys(self) -> list[str]:
        return list(self._file)

    def file_of(self, key: str) -> Path:
        return self._file[key]

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._handles[self._file[key]].get_slice(key).get_shape())

    def get(self, key: str) -> torch.Tensor:
        try:
            return self._handles[self._file[key]].get_tensor(key)
        except Exception as e:
            raise CheckpointError(f"{self._file[key]}: key {key!r} cannot be read ({e})") from e


class TorchSource(TensorSource):
    """A gemma_pytorch `.ckpt` (or any torch state dict): loaded with weights_only=True and
    memory-mapped, so tensors are read from disk only when used."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            obj = torch.load(self.path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:
            raise CheckpointError(f"{self.path}: cannot load as a torch checkpoint ({e})") from e
        if isinstance(obj, dict) and "model_state_dict" in obj:
            obj = obj["model_state_dict"]
        if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
            raise CheckpointError(f"{self.path}: expected a dict of tensors (model_state_dict)")
        self._sd = obj

    def keys(self) -> list[str]:
        return list(self._sd)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._sd[key].shape)

    def get(self, key: str) -> torch.Tensor:
        return self._sd[key]


def open_source(path: str | Path) -> TensorSource:
    """The right reader for a file or an HF checkpoint directory."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    if path.is_dir():
        index = path / "model.safetensors.index.json"
        if index.exists():
            return SafetensorsSource(index)
        single = path / "model.safetensors"
        if single.exists():
            return SafetensorsSource(single)
        found = sorted(path.glob("*.safetensors")) + sorted(path.glob("*.ckpt"))
        if len(found) == 1:
            return open_source(found[0])
        raise CheckpointError(
            f"{path}: no model.safetensors, model.safetensors.index.json or single .ckpt in it"
        )
    if path.name.endswith(".index.json") or path.suffix == ".safetensors":
        return SafetensorsSource(path)
    if path.suffix in (".ckpt", ".pt", ".pth", ".bin"):
        return TorchSource(path)
    if path.suffix == ".gguf":
        from gemmakit.checkpoint.gguf import GGUFSource

        return GGUFSource(path)
    raise CheckpointError(
        f"{path}: unknown checkpoint format (expected .safetensors, .ckpt, .gguf)"
    )
