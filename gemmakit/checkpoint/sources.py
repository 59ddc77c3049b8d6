"""Lazy tensor readers over checkpoint files (safetensors, torch `.ckpt`, GGUF): one tensor in
memory at a time, and `open_source`, which picks the reader for a path."""

from __future__ import annotations

import json
import zipfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

import torch

from gemmakit.checkpoint.dequant import dequantize
from gemmakit.checkpoint.gguf import config_from_gguf
from gemmakit.checkpoint.gguf_file import GGUFFile, GGUFFormatError
from gemmakit.config import GemmaConfig
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
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{self.path}: weight_map is not a mapping")
            files = {k: member(self.path.parent, v, self.path) for k, v in weight_map.items()}
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


def member(folder: Path, name: object, listed_in: Path) -> Path:
    """folder / name for a file name read from `listed_in` (a file we did not write), which
    must name a file inside `folder`: a relative path with no `..` (an absolute path or one
    that climbs out is a CheckpointError). Symlinks inside the folder are followed as they
    are, since the HF hub cache links every file to a blob outside its snapshot folder."""
    if not isinstance(name, str) or not name:
        raise CheckpointError(f"{listed_in}: {name!r} is not a file name")
    parts = PurePosixPath(name.replace("\\", "/"))
    if parts.is_absolute() or Path(name).is_absolute() or ".." in parts.parts:
        raise CheckpointError(f"{listed_in}: {name!r} is outside the folder {folder}")
    return folder / parts


class TorchSource(TensorSource):
    """A gemma_pytorch `.ckpt` (or any torch state dict): loaded with weights_only=True and,
    when it is a zip file (torch.save's format since 1.6), memory-mapped, so tensors are read
    from disk only when used; an older (legacy) file is read whole."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            mmap = zipfile.is_zipfile(self.path)  # the legacy format cannot be memory-mapped
            obj = torch.load(self.path, map_location="cpu", weights_only=True, mmap=mmap)
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


class GGUFSource(TensorSource):
    """A `.gguf` file (llama.cpp): keys are llama.cpp names (`blk.0.attn_q.weight`), shapes in
    PyTorch (out, in) order, and get(key) dequantizes to a float32 tensor. It carries its own
    config (`config()`, from the metadata) and vocabulary (checkpoint/gguf_vocab.py)."""

    default_dtype = torch.float32

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            self.file = GGUFFile(self.path)
        except GGUFFormatError as e:
            raise CheckpointError(str(e)) from e
        if int(self.file.metadata.get("split.count", 1) or 1) > 1:
            raise CheckpointError(
                f"{self.path}: one part of a split GGUF; merge the parts first "
                "(llama-gguf-split --merge)"
            )

    def keys(self) -> list[str]:
        return list(self.file.tensors)

    def shape(self, key: str) -> tuple[int, ...]:
        return self.file.tensors[key].shape

    def qtype(self, key: str) -> str:
        """The stored GGML type's name (F32, Q8_0, Q4_K, ...)."""
        return self.file.tensors[key].qtype.name

    def get(self, key: str) -> torch.Tensor:
        if key not in self.file.tensors:
            raise CheckpointError(f"{self.path}: no tensor {key!r}")
        info = self.file.tensors[key]
        try:
            return dequantize(self.file.raw(key), info.qtype, info.shape)
        except NotImplementedError as e:
            raise CheckpointError(f"{self.path}: tensor {key!r}: {e}") from e

    def config(self) -> GemmaConfig:
        if "token_embd.weight" not in self.file.tensors:
            raise CheckpointError(f"{self.path}: no tensor 'token_embd.weight'")
        try:
            return config_from_gguf(self.file.metadata, self.shape("token_embd.weight")[0])
        except (KeyError, ValueError, TypeError) as e:
            raise CheckpointError(f"{self.path}: {e}") from e


def _safetensors(path: Path) -> TensorSource:
    """A SafetensorsSource, seen through gemmakit.quant's reader when it holds quantized
    tensors (a `gemmakit quantize` folder)."""
    from gemmakit.quant.checkpoint import wrap_quantized

    return wrap_quantized(SafetensorsSource(path))


def open_source(path: str | Path) -> TensorSource:
    """The right reader for a file or an HF checkpoint directory."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    if path.is_dir():
        index = path / "model.safetensors.index.json"
        if index.exists():
            return _safetensors(index)
        single = path / "model.safetensors"
        if single.exists():
            return _safetensors(single)
        found = sorted(path.glob("*.safetensors")) + sorted(path.glob("*.ckpt"))
        if len(found) == 1:
            return open_source(found[0])
        raise CheckpointError(
            f"{path}: no model.safetensors, model.safetensors.index.json or single .ckpt in it"
        )
    if path.name.endswith(".index.json") or path.suffix == ".safetensors":
        return _safetensors(path)
    if path.suffix in (".ckpt", ".pt", ".pth", ".bin"):
        return TorchSource(path)
    if path.suffix == ".gguf":
        return GGUFSource(path)
    raise CheckpointError(
        f"{path}: unknown checkpoint format (expected .safetensors, .ckpt, .gguf)"
    )
