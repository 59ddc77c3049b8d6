"""A staged data mixture: several shard directories sampled with weights that change at given
fractions of training (the report: more weight on high-quality data late in training).

    stages = [{"until": 0.8, "weights": {"web": 0.7, "code": 0.2, "math": 0.1}},
              {"until": 1.0, "weights": {"web": 0.4, "code": 0.3, "math": 0.3}}]

Step s uses the first stage with s < until * total_steps (steps past the end use the last).
Each row of a global batch (draw d, numbered as in TokenShards.batches) picks its source from
a uniform number hashed from (seed, d), against the stage's cumulative weights; a source's k-th
draw reads window k of that source's own epoch-permuted order. All of it is a pure function of
(seed, step, rank, world_size, batch_size): resuming at step k replays the per-source draw counts
of steps < k (vectorized) and continues exactly as an uninterrupted run.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from gemmakit.data.shards import (
    TokenShards,
    _check_rank,
    _draws,
    mix64,
    seed_key,
    window_order,
)
from gemmakit.errors import DataError, MissingFileError
from gemmakit.paths import confined

MIXTURE_FILE = "mixture.json"
_REPLAY_CHUNK = 1 << 20  # draws per vectorized replay chunk


def check_stages(stages: Sequence[Mapping[str, Any]], names: Sequence[str]) -> list[dict]:
    """Validated stages: `until` increasing in (0, 1], weights >= 0 over known sources with a
    positive sum, normalised to sum 1."""
    if not stages:
        raise DataError("mixture: stages is empty")
    out, last = [], 0.0
    for i, st in enumerate(stages):
        where = f"mixture stage {i}"
        if not isinstance(st, Mapping) or set(st) - {"until", "weights"} or "weights" not in st:
            raise DataError(
                f"{where}: expected {{until: FRACTION, weights: {{SOURCE: W}}}}, got {st!r}"
            )
        until = float(st.get("until", 1.0))
        if not last < until <= 1.0:
            raise DataError(f"{where}: until={until} must be in ({last}, 1.0]")
        unknown = set(st["weights"]) - set(names)
        if unknown:
            raise DataError(f"{where}: unknown source(s) {sorted(unknown)} (sources: {names})")
        w = np.array([float(st["weights"].get(n, 0.0)) for n in names])
        if (w < 0).any() or w.sum() <= 0:
            raise DataError(f"{where}: weights must be >= 0 with a positive sum, got {w}")
        out.append({"until": until, "weights": dict(zip(names, (w / w.sum()).tolist()))})
        last = until
    return out


class MixtureSampler:
    """Batches drawn from several TokenShards by a staged schedule; the same batch API as
    TokenShards: batches(...) -> int64 [batch_size, seq_len + 1], eval_batches(...)."""

    def __init__(
        self,
        sources: Mapping[str, str | Path | TokenShards],
        stages: Sequence[Mapping[str, Any]],
        total_steps: int,
    ) -> None:
        if not sources:
            raise DataError("mixture: no sources")
        if total_steps < 1:
            raise DataError(f"mixture: total_steps must be >= 1, got {total_steps}")
        self.names = list(sources)
        self.sources = {
            n: s if isinstance(s, TokenShards) else TokenShards(s) for n, s in sources.items()
        }
        self.stages = check_stages(stages, self.names)
        self.total_steps = total_steps
        self._bounds = [math.ceil(st["until"] * total_steps) for st in self.stages]
        self._cum = [np.cumsum([st["weights"][n] for n in self.names]) for st in self.stages]

    @classmethod
    def from_dir(cls, directory: str | Path, total_steps: int) -> MixtureSampler:
        """The mixture `gemmakit data prepare` wrote: directory/mixture.json naming source
        shard folders (relative to directory) and the stages."""
        path = Path(directory) / MIXTURE_FILE
        if not path.exists():
            raise MissingFileError(f"{path}: no mixture file")
        try:
            spec = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(f"{path}: not valid JSON ({e})") from None
        if (
            not isinstance(spec, dict)
            or not isinstance(spec.get("sources"), dict)
            or not isinstance(spec.get("stages"), list)
        ):
            raise DataError(f"{path}: expected {{sources: {{NAME: FOLDER}}, stages: [...]}}")
        # the folders it names must lie inside `directory` (the file may come from anyone)
        sources = {n: confined(directory, p, path) for n, p in spec["sources"].items()}
        try:
            return cls(sources, spec["stages"], total_steps)
        except DataError as e:
            raise DataError(f"{path}: {e}") from None

    def stage_at(self, step: int) -> int:
        """Index of the stage that step uses."""
        for i, bound in enumerate(self._bounds):
            if step < bound:
                return i
        return len(self.stages) - 1

    def weights_at(self, step: int) -> dict[str, float]:
        return dict(self.stages[self.stage_at(step)]["weights"])

    def _choose(self, draws: np.ndarray, stage: int, seed: int) -> np.ndarray:
        """Source index of each draw (uniform from a hash of (seed, draw) vs cumulative weights)."""
        u = (mix64(draws.astype(np.uint64) ^ seed_key(seed, -1)) >> np.uint64(11)) * 2.0**-53
        return np.minimum(np.searchsorted(self._cum[stage], u, side="right"), len(self.names) - 1)

    def _counts_before(self, step: int, global_batch: int, seed: int) -> np.ndarray:
        """Per-source draws made by all ranks in steps [0, step)."""
        counts = np.zeros(len(self.names), dtype=np.int64)
        lo = 0
        for stage, bound in enumerate(self._bounds + [None]):
            hi = step if bound is None else min(step, bound)
            if stage == len(self.stages):  # steps past the last bound use the last stage
                stage -= 1
            for a in range(lo * global_batch, max(lo, hi) * global_batch, _REPLAY_CHUNK):
                b = min(a + _REPLAY_CHUNK, hi * global_batch)
                c = self._choose(np.arange(a, b, dtype=np.int64), stage, seed)
                counts += np.bincount(c, minlength=len(self.names))
            lo = max(lo, hi)
        return counts

    def batches(
        self,
        seq_len: int,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        start_step: int = 0,
    ) -> Iterator[np.ndarray]:
        """Endless batches for this rank, int64 [batch_size, seq_len + 1], from `start_step`."""
        _check_rank(rank, world_size, batch_size)
        sizes = [self.sources[n].num_windows(seq_len) for n in self.names]
        g = world_size * batch_size
        counts = self._counts_before(start_step, g, seed)
        step = start_step
        while True:
            stage = self.stage_at(step)
            everyone = self._choose(_draws(step, 0, 1, g), stage, seed)
            mine = everyone[rank * batch_size : (rank + 1) * batch_size]
            # a row's draw number within its source: draws of that source before this row
            order = np.empty(batch_size, dtype=np.int64)
            before = everyone[: rank * batch_size]
            for i in np.unique(mine):
                sel = mine == i
                first = counts[i] + int((before == i).sum())
                if sizes[i] == 0:
                    raise DataError(
                        f"mixture source {self.names[i]!r} has no window of {seq_len + 1} tokens"
                    )
                order[sel] = window_order(first + np.arange(sel.sum()), sizes[i], (seed, i + 1))
            rows = [
                self.sources[self.names[i]].windows(order[j : j + 1], seq_len)[0]
                for j, i in enumerate(mine)
            ]
            counts += np.bincount(everyone, minlength=len(self.names))
            yield np.stack(rows)
            step += 1

    def batch_sources(
        self, step: int, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0
    ) -> list[str]:
        """Which source each row of rank's batch at `step` comes from (for per-source logging)."""
        g = world_size * batch_size
        c = self._choose(_draws(step, 0, 1, g), self.stage_at(step), seed)
        return [self.names[i] for i in c[rank * batch_size : (rank + 1) * batch_size]]

    def held_out(self) -> list[TokenShards]:
        """Every source's val split, in source order."""
        return [TokenShards(s.directory, "val") for s in self.sources.values()]

    def eval_batches(
        self, seq_len: int, batch_size: int, rank: int = 0, world_size: int = 1
    ) -> Iterator[tuple[str, np.ndarray]]:
        """(source name, batch) over every source's held-out split, source by source."""
        for name, shards in self.sources.items():
            val = TokenShards(shards.directory, "val")
            if val.num_windows(seq_len):
                for batch in val.eval_batches(seq_len, batch_size, rank, world_size):
                    yield name, batch
