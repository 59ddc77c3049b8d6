"""The Gemma model: small modules, one idea each."""

from gemmakit.model.cache import KVCache
from gemmakit.model.transformer import Block, Gemma, init_weights

__all__ = ["Block", "Gemma", "KVCache", "init_weights"]
