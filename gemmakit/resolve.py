"""What a model name given by a user stands for ("a preset, a path or an installed model"), and
the tokenizer file that travels with a checkpoint. Every command and API call that takes a model
name resolves it here. No torch: the tokenizer commands use this too."""

from __future__ import annotations

from pathlib import Path

from gemmakit.config import PRESETS, GemmaConfig, get_config
from gemmakit.errors import MissingFileError, UsageError
from gemmakit.installed import installed_model_path

TOKENIZER_FILE = "tokenizer.model"  # the SentencePiece model's name in a checkpoint folder
# A file with one of these suffixes holds weights (`.json`: a safetensors index)
CHECKPOINT_SUFFIXES = (".safetensors", ".json", ".ckpt", ".pt", ".pth", ".bin", ".gguf")


def model_path(source: str | Path) -> Path:
    """An installed model's file (`gemma3-270m`), or `source` as a path (which may not exist)."""
    return installed_model_path(str(source)) or Path(source)


def resolve_source(source: str | Path) -> Path | GemmaConfig:
    """The file of an installed model (`gemma3-270m`), an existing checkpoint path (file or
    folder) as it is, or a preset's config (random weights), tried in that order.

    A name that is none of them is a MissingFileError naming the presets.
    """
    path = model_path(source)
    if path.exists():
        return path
    if str(source) in PRESETS:
        return get_config(str(source))
    raise MissingFileError(
        f"{source}: not a checkpoint path, an installed model or a preset "
        f"(presets: {', '.join(PRESETS)})"
    )


def checkpoint_path(source: str | Path) -> Path:
    """`resolve_source` where weights are needed: an installed model's file or an existing
    path; a preset (which has no weights) is a UsageError."""
    found = resolve_source(source)
    if isinstance(found, GemmaConfig):
        raise UsageError(
            f"{source}: a preset has random weights, not a checkpoint; give a checkpoint path "
            "or an installed model"
        )
    return found


def tokenizer_beside(path: Path) -> Path | None:
    """The SentencePiece file for `path`: `path` itself when it is one (any file that is not a
    checkpoint), else `tokenizer.model` in the checkpoint's folder (a checkpoint folder, or
    the folder of a checkpoint file). None when there is none. (A `.gguf` carries its
    vocabulary inside: see gemmakit.checkpoint.gguf_vocab.)"""
    if not path.exists():
        return None  # not the folder of a mistyped name: its tokenizer would be a wrong guess
    if path.is_file() and path.suffix not in CHECKPOINT_SUFFIXES:
        return path
    folder = path if path.is_dir() else path.parent
    found = folder / TOKENIZER_FILE
    return found if found.is_file() else None


def find_tokenizer(path: Path) -> Path:
    """`tokenizer_beside(path)`, or a MissingFileError naming what was looked for."""
    found = tokenizer_beside(path)
    if found is not None:
        return found
    if not path.exists():
        raise MissingFileError(f"{path}: no such tokenizer file")
    folder = path if path.is_dir() else path.parent
    raise MissingFileError(f"{folder / TOKENIZER_FILE}: no tokenizer file beside {path}")
