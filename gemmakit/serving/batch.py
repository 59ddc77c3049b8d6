"""The KV cache of the running batch: rows joining (right-aligned, left padding masked through
`key_valid`) and leaving, on the model's own `KVCache`.

Every row's keys sit contiguously at the right end of the shared `length`: a row that joins
is placed so that it ends where the others end, and every decode step appends one key to every
row. So within a row the distance between two key columns equals the distance between their
positions (the sliding window of local layers stays right), padding is masked, and RoPE gets
each row's own positions; the batch runs with no change to the model.
"""

from __future__ import annotations

import torch

from gemmakit.config import GemmaConfig
from gemmakit.model.cache import KVCache


def empty_cache(config: GemmaConfig, batch: int, max_len: int, like: KVCache) -> KVCache:
    """A cache of `batch` rows and `max_len` positions, with `like`'s dtype and device."""
    k = like.k[0]
    return KVCache(config, batch, max_len, k.dtype, k.device)


def copy_prefix(config: GemmaConfig, cache: KVCache, n: int, max_len: int) -> KVCache:
    """A new one-row cache holding the first `n` positions of `cache` (one row, all valid), with
    room for `max_len`: a prompt that shares those `n` tokens continues from it."""
    out = empty_cache(config, 1, max(max_len, n), cache)
    for dst, src in zip(out.k + out.v, cache.k + cache.v):
        dst[:, :, :n] = src[:, :, :n]
    out.length = n
    return out


def join(config: GemmaConfig, batch: KVCache | None, row: KVCache, spare: int) -> KVCache:
    """`batch` (B rows, or None) with the one-row `row` appended as row B, both right-aligned
    to the longer of the two, in a new cache with `spare` free positions after it."""
    old = batch.length if batch is not None else 0
    B = batch.k[0].shape[0] if batch is not None else 0
    length = max(old, row.length)
    out = empty_cache(config, B + 1, length + spare, row)
    out.key_valid[:, :length] = False
    if batch is not None:
        for dst, src in zip(out.k + out.v, batch.k + batch.v):
            dst[:B, :, length - old : length] = src[:, :, :old]
        out.key_valid[:B, length - old : length] = batch.key_valid[:, :old]
    for dst, src in zip(out.k + out.v, row.k + row.v):
        dst[B, :, length - row.length : length] = src[0, :, : row.length]
    out.key_valid[B, length - row.length : length] = row.key_valid[0, : row.length]
    out.length = length
    return out


def keep_rows(config: GemmaConfig, batch: KVCache, rows: list[int]) -> KVCache | None:
    """A new cache of the given rows of `batch` (None for none), without the leading columns
    that are padding in every row kept (so the shared length shrinks to the longest row)."""
    if not rows:
        return None
    index = torch.tensor(rows, device=batch.key_valid.device)
    valid = batch.key_valid[index, : batch.length]
    used = valid.any(0).nonzero()
    first = int(used[0]) if len(used) else batch.length
    length = batch.length - first
    out = empty_cache(config, len(rows), batch.max_len - first, batch)
    for dst, src in zip(out.k + out.v, batch.k + batch.v):
        dst[:, :, :length] = src[index, :, first : batch.length]
    out.key_valid[:, :length] = valid[:, first:]
    out.length = length
    return out


def take_row(config: GemmaConfig, batch: KVCache, row: int, n: int) -> KVCache:
    """A new one-row cache of the last `n` positions of `row` of `batch` (its own keys)."""
    out = empty_cache(config, 1, n, batch)
    for dst, src in zip(out.k + out.v, batch.k + batch.v):
        dst[0, :, :n] = src[row, :, batch.length - n : batch.length]
    out.length = n
    return out


def grow(batch: KVCache, needed: int) -> None:
    """Make room for `needed` positions, doubling so that decoding reallocates rarely."""
    if needed > batch.max_len:
        batch.reserve(max(needed, 2 * batch.max_len))
