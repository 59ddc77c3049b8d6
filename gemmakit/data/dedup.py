"""Duplicate removal: exact (a hash of the normalised text) and near-duplicate (MinHash
signatures of word shingles, LSH banding for candidates, kept when the estimated Jaccard
similarity to every earlier kept document is below the threshold). The first occurrence wins.

MinHash (Broder 1997): for each of `num_perm` hash functions h_i(x) = (a_i x + b_i) mod p
(a, b < p = 2^61 - 1) over the 32-bit hashes x of a document's word `shingle`-grams,
the signature keeps the minimum of each; two documents agree on a signature entry with
probability equal to the Jaccard similarity of their shingle sets. Banding (b bands of r
rows, b * r <= num_perm) makes a pair a candidate with probability 1 - (1 - J^r)^b; b and r
are chosen (`lsh_params`) so a pair at the threshold is a candidate with probability >= 0.95,
with the fewest false candidates below it. Candidates are then verified on the full
signature. Defaults: Jaccard 0.8 over 5-word shingles, 128 hashes (17 bands of 7 rows).
"""

from __future__ import annotations

import hashlib
import re
import zlib
from collections.abc import Iterable, Iterator

import numpy as np

from gemmakit.data.readers import Document
from gemmakit.data.summary import StageSummary
from gemmakit.errors import ConfigError

_PRIME = np.uint64((1 << 61) - 1)  # Mersenne prime > every 32-bit shingle hash
_WORD = re.compile(r"\w+")


def normalize(text: str) -> str:
    """Lower case, words only, single spaces: the text the exact hash and shingles see."""
    return " ".join(_WORD.findall(text.lower()))


class ExactDedup:
    """Remembers a 16-byte hash of each normalised text seen."""

    def __init__(self) -> None:
        self.seen: dict[bytes, str] = {}

    def check(self, doc: Document) -> str | None:
        """The id of an earlier document with the same normalised text, else None (and records
        this one)."""
        key = hashlib.blake2b(normalize(doc.text).encode(), digest_size=16).digest()
        first = self.seen.get(key)
        if first is None:
            self.seen[key] = doc.id
        return first


def lsh_params(threshold: float, num_perm: int, recall: float = 0.95) -> tuple[int, int]:
    """(bands, rows), bands * rows <= num_perm: the split with the least false-positive area
    below the threshold among those that make a pair at the threshold a candidate with
    probability >= `recall` (candidates are verified afterwards, so misses cost more than
    false candidates)."""
    best, best_fp = (num_perm, 1), float("inf")
    s = np.linspace(0.0, threshold, 200)
    for b in range(1, num_perm + 1):
        r = num_perm // b
        if 1 - (1 - threshold**r) ** b < recall:
            continue
        fp = float(np.trapezoid(1 - (1 - s**r) ** b, s))
        if fp < best_fp:
            best, best_fp = (b, r), fp
    return best


class MinHashDedup:
    """Near-duplicate detector over a stream: `check(doc)` returns (id, estimated Jaccard) of an
    earlier kept document at or above `threshold`, else None (and indexes this document)."""

    def __init__(
        self, threshold: float = 0.8, shingle: int = 5, num_perm: int = 128, seed: int = 1
    ) -> None:
        if not 0.0 < threshold <= 1.0:
            raise ConfigError(f"near-dup threshold must be in (0, 1], got {threshold}")
        if shingle < 1 or num_perm < 2:
            raise ConfigError("shingle must be >= 1 and num_perm >= 2")
        self.threshold, self.shingle, self.num_perm = threshold, shingle, num_perm
        self.bands, self.rows = lsh_params(threshold, num_perm)
        rng = np.random.default_rng(seed)
        self.a = rng.integers(1, int(_PRIME), num_perm, dtype=np.uint64)
        self.b = rng.integers(0, int(_PRIME), num_perm, dtype=np.uint64)
        self.tables: list[dict[bytes, list[int]]] = [{} for _ in range(self.bands)]
        self.signatures: list[np.ndarray] = []
        self.ids: list[str] = []

    def signature(self, text: str) -> np.ndarray:
        """uint64 [num_perm]: the MinHash signature of the text's word shingles."""
        words = normalize(text).split()
        n = self.shingle
        grams = [" ".join(words[i : i + n]) for i in range(max(1, len(words) - n + 1))]
        x = np.fromiter((zlib.crc32(g.encode()) for g in grams), np.uint64, len(grams))
        h = (_mulmod(self.a[:, None], x[None, :]) + self.b[:, None]) % _PRIME
        return h.min(axis=1)

    def check(self, doc: Document) -> tuple[str, float] | None:
        sig = self.signature(doc.text)
        keys = [sig[i * self.rows : (i + 1) * self.rows].tobytes() for i in range(self.bands)]
        candidates = {j for t, k in zip(self.tables, keys) for j in t.get(k, ())}
        best: tuple[str, float] | None = None
        for j in sorted(candidates):
            jac = float((self.signatures[j] == sig).mean())
            if jac >= self.threshold and (best is None or jac > best[1]):
                best = (self.ids[j], jac)
        if best is None:
            idx = len(self.ids)
            self.signatures.append(sig)
            self.ids.append(doc.id)
            for t, k in zip(self.tables, keys):
                t.setdefault(k, []).append(idx)
        return best


def _mulmod(a: np.ndarray, x: np.ndarray) -> np.ndarray:
    """(a * x) mod p for a < p = 2^61 - 1 and x < 2^32, exactly in uint64 arithmetic.
    (A narrower `a` would avoid this, but then a * x wraps around p only a few times and the
    minimum follows the smallest x: the permutations stop being random.)"""
    a_hi, a_lo = a >> np.uint64(32), a & np.uint64(0xFFFFFFFF)  # a_hi < 2^29
    y = (a_hi * x) % _PRIME  # < 2^61
    # y * 2^32 with y = yh * 2^29 + yl: yh * 2^61 + yl * 2^32 = yh + yl * 2^32 (mod p)
    y = ((y >> np.uint64(29)) + ((y & np.uint64((1 << 29) - 1)) << np.uint64(32))) % _PRIME
    return (y + (a_lo * x) % _PRIME) % _PRIME


def dedup_documents(
    docs: Iterable[Document],
    summary: StageSummary | None = None,
    exact: ExactDedup | None = None,
    near: MinHashDedup | None = None,
) -> Iterator[Document]:
    """Documents that are neither an exact nor a near duplicate of an earlier one. Pass the same
    ExactDedup / MinHashDedup to several calls to deduplicate across sources."""
    summary = summary if summary is not None else StageSummary("dedup")
    if near is not None:
        summary.info["near"] = {
            "jaccard_threshold": near.threshold,
            "shingle_words": near.shingle,
            "num_perm": near.num_perm,
            "bands": near.bands,
            "rows": near.rows,
        }
    for doc in docs:
        if exact is not None and (first := exact.check(doc)) is not None:
            summary.drop("exact duplicate", doc.id, f"same text as {first}")
            continue
        if near is not None and (hit := near.check(doc)) is not None:
            summary.drop("near duplicate", doc.id, f"Jaccard ~{hit[1]:.2f} with {hit[0]}")
            continue
        summary.keep()
        yield doc
