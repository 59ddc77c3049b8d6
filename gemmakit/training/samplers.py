"""Token samplers, and the recipe's data section as one.

A sampler (`TokenSampler`) hands each rank its rows of each step's global batch:
`batches(seq_len, batch_size, rank, world_size, seed, start_step)` -> int64
[batch_size, seq_len + 1] per step, where step s of rank r reads draws
(s * world_size + r) * batch_size + row of one global order. The loop asks for micro-batches,
so with accumulation a and world w the global batch of optimizer step k is draws
[k*a*w*m, (k+1)*a*w*m): the same windows for any split of a*w, and a resumed run reads what
the uninterrupted one did. Samplers: `TokenShards` (gemmakit.data.shards), `MixtureSampler`
(gemmakit.data.mixture), and `SyntheticTokens` below (tests, benchmarks).
"""

from __future__ import annotations

from collections.abc import Iterator
from itertools import islice
from pathlib import Path
from typing import Protocol

import numpy as np

from gemmakit.data.mixture import MIXTURE_FILE, MixtureSampler
from gemmakit.data.shards import TokenShards
from gemmakit.errors import DataError
from gemmakit.training.recipe import DataSection

ENDLESS = 2**62  # num_windows of a stream that makes windows on demand


class HeldOut(Protocol):
    """A held-out split to measure the validation loss on."""

    def num_windows(self, seq_len: int) -> int:
        """Distinct windows of seq_len + 1 tokens it holds (ENDLESS: made on demand)."""
        ...

    def eval_batches(
        self, seq_len: int, batch_size: int, rank: int = 0, world_size: int = 1
    ) -> Iterator[np.ndarray]:
        """int64 [<= batch_size, seq_len + 1] batches; rank r takes r, r + world_size, ..."""
        ...


class TokenSampler(Protocol):
    """A training token stream, resumable at any step (see the module docstring)."""

    def batches(
        self,
        seq_len: int,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        start_step: int = 0,
    ) -> Iterator[np.ndarray]:
        """Endless int64 [batch_size, seq_len + 1] batches of this rank from `start_step`."""
        ...

    def held_out(self) -> list[HeldOut]:
        """The held-out splits that go with this stream (maybe holding no window)."""
        ...


class SyntheticTokens:
    """A learnable token stream for tests and benchmarks (a TokenSampler and a HeldOut).

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

    def num_windows(self, seq_len: int) -> int:
        return ENDLESS

    def held_out(self) -> list[HeldOut]:
        return [self]


def train_source(data: DataSection, vocab_size: int, total_micro_steps: int) -> TokenSampler:
    """The sampler for the recipe's training data: one shard dir, a dir holding a mixture.json
    (as `gemmakit data` writes it), or a weighted / staged mixture of several dirs.
    vocab_size: the model's (the synthetic stream's ids stay below it).
    total_micro_steps: sampler steps of the whole run (a staged mixture's schedule)."""
    if data.synthetic:
        return SyntheticTokens(vocab_size)
    dirs = [Path(d) for d in data.train]
    if len(dirs) == 1 and data.weights is None and data.stages is None:
        if (dirs[0] / MIXTURE_FILE).exists():
            return MixtureSampler.from_dir(dirs[0], total_micro_steps)
        return TokenShards(dirs[0], "train")
    names = [d.name for d in dirs]
    if len(set(names)) != len(names):
        names = [f"{i}:{d.name}" for i, d in enumerate(dirs)]
    stages = data.stages or [
        {"until": 1.0, "weights": dict(zip(names, data.weights or [1.0] * len(dirs)))}
    ]
    return MixtureSampler(dict(zip(names, dirs)), stages, total_micro_steps)


def valid_splits(data: DataSection, train: TokenSampler, seq_len: int) -> list[HeldOut]:
    """The splits to measure the validation loss on: data.valid's val split, else the held-out
    splits of the training stream that hold at least one window (maybe none)."""
    if data.valid and not data.synthetic:
        val = TokenShards(data.valid, "val")
        if val.num_windows(seq_len) == 0:
            raise DataError(
                f"{data.valid}: the val split holds {val.num_tokens} tokens, fewer than one "
                f"window of {seq_len + 1}"
            )
        return [val]
    return [v for v in train.held_out() if v.num_windows(seq_len)]


def eval_windows(
    vals: list[HeldOut], seq_len: int, batch_size: int, rank: int, world_size: int, max_batches: int
) -> Iterator[np.ndarray]:
    """This rank's share of `max_batches` validation batches (over all ranks), spread over the
    val splits: rank r takes batches r, r + world, ..., so any world size measures the same
    windows. Every rank gets the same number (each forward is collective under FSDP)."""
    per_source = max(1, max_batches // max(1, len(vals)))
    for val in vals:
        # at most every window once (a finite split's last batch may be short)
        n = min(per_source, -(-val.num_windows(seq_len) // batch_size))
        yield from islice(val.eval_batches(seq_len, batch_size, rank, world_size), n // world_size)
