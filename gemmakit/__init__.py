"""gemmakit: the Gemma report (arXiv 2403.08295) as a Python toolkit."""

from gemmakit.api import build_model, load_model
from gemmakit.config import PRESETS, GemmaConfig, get_config
from gemmakit.generation import generate, stream_generate
from gemmakit.tokenizer import load_tokenizer

__all__ = [
    "PRESETS",
    "GemmaConfig",
    "build_model",
    "generate",
    "get_config",
    "load_model",
    "load_tokenizer",
    "stream_generate",
]
__version__ = "0.1.0"
