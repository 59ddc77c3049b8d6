"""The pretraining data stream: the recipe's shard dirs (gemmakit.data.shards) as batches.

Every source has the sampler API of `TokenShards.batches(seq_len, batch_size, rank,
world_size, seed, start_step)` -> int64 [batch_size, seq_len + 1] per step, where step s of
rank r reads draws (s * world_size + r) * batch_size + row of one global order. The loop asks
for micro-batches, so with accumulation a and world w the global batch of optimizer step k is
draws [k*a*w*m, (k+1)*a*w*m): the same windows for any split of a*w, and a resumed run reads
what the uninterrupted one did.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from gemmakit.training.recipe import DataSection


class SyntheticTokens:
    """A learnable token stream for tests and benchmarks, with the shard sampler's API.

    Each window starts at a random token and counts up by `stride` (mod vocab), restarting at
    a random token with probability `restart` per position: a model can learn the rule, and
    the floor of the loss is about restart * ln(vocab). Window d is a function of (seed, d).
    """

    def __init__(self, vocab_size: int, stride: int = 7, restart: float = 0.1) -> None:
        self.vocab_size, self.stride, self.restart = vocab_size, stride, restart

    def window(self, draw: int, seq_len: int, seed: int) -> np.ndarray:
        rng = np.random.default_rng([seed, draw])
        n = seq_len + 1
        restarts = rng.random(n) < self.restart
        restarts[0] = True
        starts = rng.integers(0, self.vocab_size, n)
        pos = np.arange(n)
        last = np.maximum.accumulate(np.where(restarts, pos, 0))  # last restart at or before t
        return (starts[last] + self.stride * (pos - last)) % self.vocab_size

    def batches(
        self,
        seq_len: int,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        start_step: int = 0,
    ) -> Iterator[np.ndarray]:
        step = start_step
        while True:
            first = (step * world_size + rank) * batch_size
            rows = [self.window(first + j, seq_len, seed) for j in range(batch_size)]
            yield np.stack(rows).astype(np.int64)
            step += 1

    def eval_batches(
        self, seq_len: int, batch_size: int, rank: int = 0, world_size: int = 1
    ) -> Iterator[np.ndarray]:
        """Held-out windows (another seed), endless; rank r takes batches r, r + world, ..."""
        yield from self.batches(seq_len, batch_size, rank, world_size, seed=-1 % 2**31)


def train_source(data: DataSection, vocab_size: int):
    """The sampler for the recipe's training data (one shard dir, or a weighted mixture)."""
    if data.synthetic:
        return SyntheticTokens(vocab_size)
    from gemmakit.data.shards import TokenShards

    shards = [TokenShards(d, "train") for d in data.train]
    if len(shards) == 1 and data.weights is None:
        return shards[0]
    from gemmakit.data.shards import MixtureSampler

    weights = data.weights or [1.0] * len(shards)
    return MixtureSampler(shards, weights)


def valid_source(data: DataSection, vocab_size: int, seq_len: int):
    """The validation sampler: data.valid's "val" split, else the first train dir's when it
    holds a window; None when there is nothing to validate on."""
    if data.synthetic:
        return SyntheticTokens(vocab_size)
    from gemmakit.data.shards import TokenShards

    directory = data.valid or (data.train[0] if data.train else None)
    if directory is None:
        return None
    shards = TokenShards(directory, "val")
    if shards.num_windows(seq_len) == 0:
        if data.valid:
            raise ValueError(
                f"{data.valid}: the val split holds {shards.num_tokens} tokens, fewer than one "
                f"window of {seq_len + 1}"
            )
        return None
    return shards
