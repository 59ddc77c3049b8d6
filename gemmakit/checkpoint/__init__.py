"""Checkpoint formats: each is a layout (names and fusions) over a lazy tensor reader."""

from gemmakit.checkpoint.gguf_write import save_gguf
from gemmakit.checkpoint.load import load_checkpoint
from gemmakit.checkpoint.save import save_gemma_pytorch, save_hf
from gemmakit.checkpoint.sources import open_source
from gemmakit.errors import CheckpointError

__all__ = [
    "CheckpointError",
    "load_checkpoint",
    "open_source",
    "save_gemma_pytorch",
    "save_gguf",
    "save_hf",
]
