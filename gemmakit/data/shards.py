"""Packed token shards: the tokenized corpus as one stream of uint32 ids, and the sampler that
hands every rank exactly the windows of that stream a step calls for.

Layout of a shard directory (written by `ShardWriter`, read by `TokenShards`):
    index.json                  {"format", "version", "dtype": "uint32", "bos_id", "eos_id",
                                 "splits": {"train": {"tokens", "documents", "shards": [...]},
                                            "val": {...}}}
    train-00000-<run>.bin       raw little-endian uint32 token ids of the stream, in order
    train-00000-<run>.docs.npy  int64 global offsets (in the split's stream) of the documents
                                that start in that shard
Each document is stored as BOS ids... EOS, the documents back to back, so a document may run
across a shard boundary; a window may too. Documents are assigned to the held-out "val" split
by a hash of their id, so the split does not depend on the order documents arrive in.

Sampling (`TokenShards.batches`): the split is cut into `(tokens - 1) // seq_len` windows, window
i being tokens [i*seq_len, i*seq_len + seq_len + 1) (inputs and shifted targets). Draw number d
of the run (step s, rank r, row j: d = (s*world_size + r)*batch_size + j) reads window
perm_e(d mod n) of epoch e = d // n, where perm_e is a seeded pseudo-random permutation
(a Feistel network, so it needs no memory however many windows there are). Batches therefore
depend only on (seed, step, rank, world_size, batch_size): resuming at step k reads exactly
what an uninterrupted run reads at step k, and the ranks of one step read disjoint windows.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from gemmakit.atomic import atomic_path, write_json
from gemmakit.errors import DataError, MissingFileError
from gemmakit.paths import confined

INDEX = "index.json"
SHARD_KEYS = ("file", "docs")  # the file names each shard entry of an index holds
FORMAT = "gemmakit-token-shards"
VERSION = 1
SPLITS = ("train", "val")
DTYPE = np.dtype("<u4")

_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def mix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finalizer, elementwise on uint64: a fast bijective scrambler of integers."""
    x = np.asarray(x, dtype=np.uint64)
    with np.errstate(over="ignore"):
        x = x ^ (x >> np.uint64(30))
        x = x * np.uint64(0xBF58476D1CE4E5B9)
        x = x ^ (x >> np.uint64(27))
        x = x * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def seed_key(*parts: int) -> np.uint64:
    """One 64-bit key from a tuple of integers (seed, epoch, source...)."""
    h = hashlib.blake2b(repr(tuple(int(p) for p in parts)).encode(), digest_size=8).digest()
    return np.uint64(int.from_bytes(h, "little"))


def permute(index: np.ndarray, n: int, key: np.uint64, rounds: int = 4) -> np.ndarray:
    """A pseudo-random permutation of range(n) applied to `index` (int64 array of values < n):
    a balanced Feistel network over the smallest even power of two >= n, cycle-walking values
    that land outside range(n) back through the network (each walk ends: it is a permutation)."""
    if n <= 0:
        raise DataError("permute needs n > 0")
    half = max(1, (int(n - 1).bit_length() + 1) // 2)
    mask = np.uint64((1 << half) - 1)
    keys = [mix64(np.uint64(key) + np.uint64(i + 1)) for i in range(rounds)]

    def once(x: np.ndarray) -> np.ndarray:
        left, right = x >> np.uint64(half), x & mask
        for k in keys:
            with np.errstate(over="ignore"):
                left, right = right, left ^ (mix64(right ^ k) & mask)
        return (left << np.uint64(half)) | right

    x = once(np.asarray(index, dtype=np.uint64))
    while (out := x >= np.uint64(n)).any():
        x[out] = once(x[out])
    return x.astype(np.int64)


def is_validation(key: str, fraction: float) -> bool:
    """Whether the document with this id belongs to the held-out split (a stable hash test)."""
    if fraction <= 0:
        return False
    h = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")
    return h < fraction * 2.0**64


# ---------------------------------------------------------------------------------- writing


class _SplitWriter:
    """Accumulates one split's stream and writes it in shards of `shard_tokens` ids."""

    def __init__(self, directory: Path, split: str, run: str, shard_tokens: int) -> None:
        self.directory, self.split, self.run = directory, split, run
        self.shard_tokens = shard_tokens
        self.buffer: list[np.ndarray] = []
        self.buffered = 0
        self.flushed = 0  # tokens already in finished shards
        self.pending_starts: list[int] = []
        self.documents = 0
        self.shards: list[dict[str, Any]] = []
        self.files: list[Path] = []

    def add(self, ids: np.ndarray) -> None:
        self.pending_starts.append(self.flushed + self.buffered)
        self.buffer.append(ids)
        self.buffered += len(ids)
        self.documents += 1
        if self.buffered >= self.shard_tokens:
            self.flush(final=False)

    def flush(self, final: bool) -> None:
        if not self.buffered:
            return
        stream = np.concatenate(self.buffer)
        starts = np.asarray(self.pending_starts, dtype=np.int64)
        pos = 0
        while len(stream) - pos >= self.shard_tokens or (final and pos < len(stream)):
            n = min(self.shard_tokens, len(stream) - pos)
            lo = self.flushed
            mine = starts[(starts >= lo) & (starts < lo + n)]
            self._write_shard(stream[pos : pos + n], mine)
            pos += n
            self.flushed += n
        rest = stream[pos:]
        self.buffer = [rest] if len(rest) else []
        self.buffered = len(rest)
        self.pending_starts = [int(s) for s in starts if s >= self.flushed]

    def _write_shard(self, tokens: np.ndarray, doc_starts: np.ndarray) -> None:
        stem = f"{self.split}-{len(self.shards):05d}-{self.run}"
        bin_path = self.directory / f"{stem}.bin"
        docs_path = self.directory / f"{stem}.docs.npy"
        for path in (bin_path, docs_path):
            self.files.append(path)
        with atomic_path(bin_path) as tmp:
            tokens.astype(DTYPE, copy=False).tofile(tmp)
        with atomic_path(docs_path) as tmp, open(tmp, "wb") as f:
            np.save(f, doc_starts.astype(np.int64))
        self.shards.append(
            {
                "file": bin_path.name,
                "docs": docs_path.name,
                "tokens": int(len(tokens)),
                "documents": int(len(doc_starts)),
            }
        )

    def info(self) -> dict[str, Any]:
        return {"tokens": self.flushed, "documents": self.documents, "shards": self.shards}


class ShardWriter:
    """Pack tokenized documents into uint32 shards. Use as a context manager:

        with ShardWriter(out_dir, eos_id=1, bos_id=2, val_fraction=0.01) as w:
            for doc in docs:
                w.add(tokenizer.encode(doc.text, bos=True), key=doc.id)

    `add` takes one document's ids (BOS first, as `encode(text, bos=True)` gives them) and
    appends EOS. On a clean exit the index is written last, atomically, and shards of an earlier
    run in the folder are removed; on an exception every file this writer made is deleted and
    the folder keeps its earlier index and shards, if any."""

    def __init__(
        self,
        directory: str | Path,
        eos_id: int,
        bos_id: int | None = None,
        shard_tokens: int = 1 << 26,
        val_fraction: float = 0.0,
        meta: dict[str, Any] | None = None,
    ) -> None:
        if shard_tokens <= 0:
            raise DataError(f"shard_tokens must be positive, got {shard_tokens}")
        if not 0.0 <= val_fraction < 1.0:
            raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
        self.directory = Path(directory)
        self.eos_id, self.bos_id = int(eos_id), bos_id
        self.val_fraction = val_fraction
        self.meta = dict(meta or {})
        run = uuid.uuid4().hex[:8]
        self._splits = {s: _SplitWriter(self.directory, s, run, shard_tokens) for s in SPLITS}
        self._eos = np.array([self.eos_id], dtype=np.int64)

    def __enter__(self) -> ShardWriter:
        if self.directory.exists() and not self.directory.is_dir():
            raise DataError(f"{self.directory}: not a folder (shards need an output folder)")
        # the earlier run's shards, to remove once the new index is in place; read (and its
        # names confined to the folder) before anything is written, so a bad index stops here
        self._old = _referenced_files(self.directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        return self

    def add(self, ids: Sequence[int] | np.ndarray, key: str = "") -> str:
        """Append one document; returns the split it went to ("train" or "val")."""
        arr = np.asarray(ids, dtype=np.int64)
        if arr.ndim != 1:
            raise DataError(f"document {key!r}: ids must be a flat sequence, got shape {arr.shape}")
        if len(arr) and (arr.min() < 0 or arr.max() > 0xFFFFFFFF):
            raise DataError(f"document {key!r}: token ids must be in [0, 2**32)")
        split = "val" if is_validation(key, self.val_fraction) else "train"
        self._splits[split].add(np.concatenate([arr, self._eos]))
        return split

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self._remove(self._files())
            return
        try:
            for w in self._splits.values():
                w.flush(final=True)
            index = {
                "format": FORMAT,
                "version": VERSION,
                "dtype": "uint32",
                "bos_id": self.bos_id,
                "eos_id": self.eos_id,
                **self.meta,
                "splits": {s: w.info() for s, w in self._splits.items()},
            }
            write_json(self.directory / INDEX, index)
        except BaseException:
            self._remove(self._files())
            raise
        self.index = index
        self._remove(self._old - {f.resolve() for f in self._files()})

    def _files(self) -> list[Path]:
        return [f for w in self._splits.values() for f in w.files]

    @staticmethod
    def _remove(files) -> None:
        for f in files:
            if not Path(f).is_dir():  # an old index may name a folder: never ours to remove
                Path(f).unlink(missing_ok=True)


def _referenced_files(directory: Path) -> set[Path]:
    """The shard files an existing index in `directory` lists (resolved), none when there is no
    readable index. A name that leads outside the folder (or to the index itself) is refused:
    the caller deletes these files."""
    path = directory / INDEX
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
        entries = [
            s[k] for sp in index["splits"].values() for s in sp["shards"] for k in SHARD_KEYS
        ]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return set()  # no index, or not one we wrote: nothing of ours to remove
    files = {confined(directory, name, path) for name in entries}
    if (directory / INDEX).resolve() in files:
        raise DataError(f"{path}: a shard entry names the index itself")
    return files


def _check_index(index: Any, path: Path) -> None:
    """Raise DataError naming `path` and the entry when the index is not shaped as we write it,
    or one of its file names leads outside its folder."""
    if not isinstance(index, dict):
        raise DataError(f"{path}: expected a JSON object, got {type(index).__name__}")
    if index.get("format") != FORMAT or index.get("dtype") != "uint32":
        raise DataError(f"{path}: not a {FORMAT} index with dtype uint32")
    if not isinstance(index.get("eos_id"), int) or isinstance(index.get("eos_id"), bool):
        raise DataError(f"{path}: eos_id must be an integer, got {index.get('eos_id')!r}")
    splits = index.get("splits")
    if not isinstance(splits, dict):
        raise DataError(f"{path}: splits must be an object, got {splits!r}")
    for name, info in splits.items():
        where = f"splits.{name}"
        if not isinstance(info, dict) or not isinstance(info.get("shards"), list):
            raise DataError(f"{path}: {where} must be an object with a shards list")
        if not _count(info.get("documents")):
            raise DataError(f"{path}: {where}.documents must be a count >= 0")
        for i, shard in enumerate(info["shards"]):
            if not isinstance(shard, dict) or not _count(shard.get("tokens")):
                raise DataError(f"{path}: {where}.shards[{i}] needs tokens: a count >= 0")
            for key in SHARD_KEYS:
                confined(path.parent, shard.get(key), path)


def _count(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


# ---------------------------------------------------------------------------------- reading


def load_index(directory: str | Path) -> dict[str, Any]:
    """The parsed index.json of a shard directory, checked for format."""
    path = Path(directory) / INDEX
    if not path.exists():
        raise MissingFileError(f"{path}: no shard index (is {directory} a token-shard folder?)")
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None
    _check_index(index, path)
    return index


class TokenShards:
    """One split ("train" or "val") of a shard directory, as one addressable token stream.

    read(offset, length) -> uint32 [length]; batches(...) -> int64 [batch_size, seq_len + 1]
    (inputs are row[:, :-1], targets row[:, 1:]); eval_batches(...) walks the split in order.
    Shards are memory-mapped; nothing is read until asked for."""

    def __init__(self, directory: str | Path, split: str = "train") -> None:
        self.directory = Path(directory)
        self.index = load_index(self.directory)
        if split not in self.index["splits"]:
            raise DataError(
                f"{self.directory / INDEX}: no split {split!r} "
                f"(splits: {sorted(self.index['splits'])})"
            )
        self.split = split
        info = self.index["splits"][split]
        self._shards = info["shards"]
        sizes = np.array([s["tokens"] for s in self._shards], dtype=np.int64)
        self._starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.num_tokens = int(self._starts[-1])
        self.num_documents = int(info["documents"])
        self.bos_id: int | None = self.index.get("bos_id")
        self.eos_id: int = self.index["eos_id"]
        self._maps: list[np.ndarray | None] = [None] * len(self._shards)
        self._doc_starts: np.ndarray | None = None

    def __repr__(self) -> str:
        return (
            f"TokenShards({str(self.directory)!r}, split={self.split!r}: "
            f"{self.num_tokens} tokens, {self.num_documents} documents)"
        )

    def _map(self, i: int) -> np.ndarray:
        if self._maps[i] is None:
            path = confined(self.directory, self._shards[i]["file"], self.directory / INDEX)
            want = self._shards[i]["tokens"] * DTYPE.itemsize
            if not path.exists():
                raise MissingFileError(f"{path}: shard listed in {INDEX} is missing")
            if path.stat().st_size != want:
                raise DataError(f"{path}: {path.stat().st_size} bytes, index says {want}")
            self._maps[i] = np.memmap(path, dtype=DTYPE, mode="r")
        return self._maps[i]

    def read(self, offset: int, length: int) -> np.ndarray:
        """Tokens [offset, offset + length) of the split's stream (uint32, a copy)."""
        if offset < 0 or length < 0 or offset + length > self.num_tokens:
            raise IndexError(
                f"{self.directory}: window [{offset}, {offset + length}) outside "
                f"the {self.split} stream of {self.num_tokens} tokens"
            )
        out = np.empty(length, dtype=DTYPE)
        i = int(np.searchsorted(self._starts, offset, side="right")) - 1
        done = 0
        while done < length:
            lo = offset + done - int(self._starts[i])
            n = min(length - done, int(self._starts[i + 1]) - (offset + done))
            out[done : done + n] = self._map(i)[lo : lo + n]
            done += n
            i += 1
        return out

    def doc_starts(self) -> np.ndarray:
        """int64 [num_documents]: where each document (its BOS) starts in the stream."""
        if self._doc_starts is None:
            index = self.directory / INDEX
            parts = [_load_docs(confined(self.directory, s["docs"], index)) for s in self._shards]
            self._doc_starts = np.concatenate(parts) if parts else np.zeros(0, np.int64)
        return self._doc_starts

    def document(self, i: int) -> np.ndarray:
        """Document i's ids, BOS through EOS (uint32)."""
        starts = self.doc_starts()
        if not 0 <= i < len(starts):
            raise IndexError(f"{self.directory}: document {i} of {len(starts)}")
        end = int(starts[i + 1]) if i + 1 < len(starts) else self.num_tokens
        return self.read(int(starts[i]), end - int(starts[i]))

    def num_windows(self, seq_len: int) -> int:
        """How many distinct windows of seq_len + 1 tokens (stride seq_len) the split holds."""
        if seq_len <= 0:
            raise DataError(f"seq_len must be positive, got {seq_len}")
        return max(0, (self.num_tokens - 1) // seq_len)

    def windows(self, index: np.ndarray, seq_len: int) -> np.ndarray:
        """int64 [len(index), seq_len + 1]: the windows with these indices."""
        return np.stack([self.read(int(i) * seq_len, seq_len + 1) for i in index]).astype(np.int64)

    def _need_windows(self, seq_len: int) -> int:
        n = self.num_windows(seq_len)
        if n == 0:
            raise DataError(
                f"{self.directory} ({self.split}): {self.num_tokens} tokens, too "
                f"few for one window of seq_len + 1 = {seq_len + 1}"
            )
        return n

    def batches(
        self,
        seq_len: int,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        start_step: int = 0,
    ) -> Iterator[np.ndarray]:
        """Endless batches for this rank, int64 [batch_size, seq_len + 1], from step
        `start_step` on. The global batch of a step is world_size * batch_size windows; rank r
        gets rows [r * batch_size, (r + 1) * batch_size) of it. Epochs repeat the windows in a
        fresh order each (a permutation keyed by seed and epoch)."""
        _check_rank(rank, world_size, batch_size)
        n = self._need_windows(seq_len)
        step = start_step
        while True:
            draws = _draws(step, rank, world_size, batch_size)
            yield self.windows(window_order(draws, n, (seed,)), seq_len)
            step += 1

    def held_out(self) -> list[TokenShards]:
        """The directory's val split (what training on this split is measured against)."""
        return [TokenShards(self.directory, "val")]

    def eval_batches(
        self, seq_len: int, batch_size: int, rank: int = 0, world_size: int = 1
    ) -> Iterator[np.ndarray]:
        """Every window of the split once, in stream order, int64 [<= batch_size, seq_len + 1]
        (the last batch may be short); rank r takes batches r, r + world_size, ..."""
        _check_rank(rank, world_size, batch_size)
        n = self._need_windows(seq_len)
        for b, lo in enumerate(range(0, n, batch_size)):
            if b % world_size == rank:
                yield self.windows(np.arange(lo, min(lo + batch_size, n)), seq_len)


def _load_docs(path: Path) -> np.ndarray:
    """A shard's document offsets (int64 [n]); never unpickles (allow_pickle=False)."""
    if not path.exists():
        raise MissingFileError(f"{path}: document offsets listed in {INDEX} are missing")
    try:
        starts = np.load(path, allow_pickle=False)
    except ValueError as e:
        raise DataError(f"{path}: not a .npy array of document offsets ({e})") from None
    if starts.ndim != 1 or starts.dtype.kind not in "iu":
        raise DataError(f"{path}: expected a 1-d integer array, got {starts.dtype} {starts.shape}")
    return starts.astype(np.int64, copy=False)


def _check_rank(rank: int, world_size: int, batch_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise DataError(f"rank {rank} is not in a world of size {world_size}")
    if batch_size < 1:
        raise DataError(f"batch_size must be positive, got {batch_size}")


def _draws(step: int, rank: int, world_size: int, batch_size: int) -> np.ndarray:
    """Global draw numbers of rank's rows at a step: (step * world + rank) * batch + row."""
    return (step * world_size + rank) * batch_size + np.arange(batch_size, dtype=np.int64)


def window_order(draws: np.ndarray, n: int, seed: tuple[int, ...]) -> np.ndarray:
    """Window index of each draw: draw d is position d % n of epoch d // n's permutation."""
    draws = np.asarray(draws, dtype=np.int64)
    out = np.empty_like(draws)
    epochs = draws // n
    for e in np.unique(epochs):
        sel = epochs == e
        out[sel] = permute(draws[sel] % n, n, seed_key(*seed, int(e)))
    return out
