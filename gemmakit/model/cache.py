"""A preallocated key/value cache for decoding, one buffer per layer."""

from __future__ import annotations

import torch

from gemmakit.config import GemmaConfig
from gemmakit.errors import UsageError


class KVCache:
    """Keys and values of every layer, [B, Nkv, max_len, head_dim] each.

    `length` is how many positions are filled; the model advances it after each forward.
    `key_valid` [B, max_len] marks real (non-padding) positions: left padding of prompts of
    different lengths is masked out through it.
    """

    def __init__(
        self,
        config: GemmaConfig,
        batch: int,
        max_len: int,
        dtype: torch.dtype,
        device: torch.device | str | None = None,
    ) -> None:
        shape = (batch, config.n_kv_heads, max_len, config.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.n_layers)]
        self.key_valid = torch.ones(batch, max_len, dtype=torch.bool, device=device)
        self.max_len = max_len
        self.length = 0

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v [B, Nkv, T, H] at the current length; return all keys and values so far."""
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise UsageError(f"KV cache full: {end} positions needed, {self.max_len} allocated")
        self.k[layer][:, :, self.length : end] = k
        self.v[layer][:, :, self.length : end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def truncate(self, length: int) -> None:
        """Forget every position from `length` on (the next update writes there)."""
        if not 0 <= length <= self.length:
            raise UsageError(f"cannot truncate a KV cache of length {self.length} to {length}")
        self.length = length
        self.key_valid[:, length:] = True  # left padding of an earlier prefill no longer applies

    def reserve(self, max_len: int) -> None:
        """Grow the buffers to hold `max_len` positions, keeping what is filled (no-op if they
        already do), so a cache that lives across calls need not be allocated at full context."""
        if max_len <= self.max_len:
            return
        k0 = self.k[0]
        shape = (k0.shape[0], k0.shape[1], max_len, k0.shape[3])

        def grown(old: torch.Tensor) -> torch.Tensor:
            new = old.new_zeros(shape)
            new[:, :, : self.length] = old[:, :, : self.length]
            return new

        self.k = [grown(k) for k in self.k]
        self.v = [grown(v) for v in self.v]
        valid = self.key_valid.new_ones(k0.shape[0], max_len)
        valid[:, : self.length] = self.key_valid[:, : self.length]
        self.key_valid = valid
        self.max_len = max_len

    def repeat_rows(self, n: int) -> None:
        """Each batch row repeated n times in place (row i becomes rows i*n .. i*n+n-1): one
        prefill of a prompt shared by n continuations sampled from it."""
        self.k = [k.repeat_interleave(n, dim=0) for k in self.k]
        self.v = [v.repeat_interleave(n, dim=0) for v in self.v]
        self.key_valid = self.key_valid.repeat_interleave(n, dim=0)

    def select_rows(self, index: torch.Tensor) -> None:
        """Keep the batch rows `index` [B'] (int64, on the cache's device), in that order, a
        row repeated as often as its index is: one prefill of several contexts, each shared
        by its own number of continuations."""
        self.k = [k.index_select(0, index) for k in self.k]
        self.v = [v.index_select(0, index) for v in self.v]
        self.key_valid = self.key_valid.index_select(0, index)
