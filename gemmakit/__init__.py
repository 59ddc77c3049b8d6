"""gemmakit: the Gemma report (arXiv 2403.08295) as a Python toolkit.

The public names are imported on first use (PEP 562), so `import gemmakit` and CLI commands
that need no model (tokenizer, data) start without importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "PRESETS": "gemmakit.config",
    "GemmaConfig": "gemmakit.config",
    "get_config": "gemmakit.config",
    "build_model": "gemmakit.api",
    "load_model": "gemmakit.api",
    "load_reward_model": "gemmakit.model.reward",
    "load_lora": "gemmakit.checkpoint.peft",
    "merge_lora": "gemmakit.model.lora",
    "generate": "gemmakit.generation",
    "stream_generate": "gemmakit.generation",
    "load_tokenizer": "gemmakit.tokenizer",
}
__all__ = [
    "PRESETS",
    "GemmaConfig",
    "build_model",
    "generate",
    "get_config",
    "load_lora",
    "load_model",
    "load_reward_model",
    "merge_lora",
    "load_tokenizer",
    "stream_generate",
]
__version__ = "0.1.0"

if TYPE_CHECKING:
    from gemmakit.api import build_model, load_model
    from gemmakit.checkpoint.peft import load_lora
    from gemmakit.config import PRESETS, GemmaConfig, get_config
    from gemmakit.generation import generate, stream_generate
    from gemmakit.model.lora import merge_lora
    from gemmakit.model.reward import load_reward_model
    from gemmakit.tokenizer import load_tokenizer


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'gemmakit' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
