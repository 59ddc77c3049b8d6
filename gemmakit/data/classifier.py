"""Model-based quality filtering: a linear classifier over hashed n-grams, and its keep policies.

The Gemma report filters its pretraining data with "heuristics and model-based classifiers" to
remove harmful or low-quality content, and says no more. The public recipe it builds on is
GPT-3's (Brown et al. 2020, appendix A): a logistic-regression classifier learns to tell curated
reference text (positives) from raw web text (negatives), and its score keeps a document either
above a threshold or by a stochastic Pareto draw, `np.random.pareto(alpha) > 1 - score` with
alpha = 9, which keeps mostly high-scoring documents and a few low-scoring ones, for diversity.

What we do: word unigrams and bigrams (optionally character n-grams, taken over UTF-8 bytes)
hashed with a stable 64-bit hash (BLAKE2b per word, a splitmix64 mix per n-gram, never Python's
per-process `hash`) into 2^bits buckets; per document, log1p(counts), L2-normalised; logistic
regression trained by minibatch Adagrad with L2, deterministic for a seed, evaluated on a
stratified held-out split. A model is one .npz: float32 weights and a JSON metadata entry
(format version, hashing settings, training counts, held-out accuracy); never pickled.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import time
import zipfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from gemmakit.atomic import atomic_path
from gemmakit.data.readers import Document
from gemmakit.data.summary import StageSummary
from gemmakit.errors import DataError, MissingFileError

FORMAT = "gemmakit-quality-classifier"
VERSION = 1
POLICIES = ("threshold", "pareto")

_TOKEN = re.compile(r"\w+|[^\w\s]")  # words, and each punctuation mark on its own ("!!!" -> 3)
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_S30, _S27, _S31 = np.uint64(30), np.uint64(27), np.uint64(31)
_WORD_CACHE: dict[str, int] = {}  # words repeat (Zipf), so each is hashed about once
_WORD_CACHE_MAX = 1 << 20


def stable_hash(text: str) -> int:
    """64-bit BLAKE2b of `text`'s UTF-8 bytes: the same in every process and on every machine."""
    h = _WORD_CACHE.get(text)
    if h is None:
        digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
        h = int.from_bytes(digest, "little")
        if len(_WORD_CACHE) >= _WORD_CACHE_MAX:
            _WORD_CACHE.clear()
        _WORD_CACHE[text] = h
    return h


def _mix(h: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser (uint64, wrapping): every input bit moves every output bit."""
    h = (h ^ (h >> _S30)) * _M1
    h = (h ^ (h >> _S27)) * _M2
    return h ^ (h >> _S31)


class SparseRows(NamedTuple):
    """Feature rows in CSR form: row i is cols[indptr[i]:indptr[i+1]] with those vals."""

    indptr: np.ndarray  # int64 [N + 1]
    cols: np.ndarray  # int64 [nnz], sorted within a row
    vals: np.ndarray  # float32 [nnz]

    def take(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(local row 0..len(rows)-1, col, val) of every entry of the given rows."""
        starts = self.indptr[rows]
        lens = self.indptr[rows + 1] - starts
        local = np.repeat(np.arange(len(rows)), lens)
        at = np.repeat(starts - (np.cumsum(lens) - lens), lens) + np.arange(lens.sum())
        return local, self.cols[at], self.vals[at]


@dataclass(frozen=True)
class HashedFeatures:
    """Which n-grams become features, and into how many buckets they are hashed."""

    bits: int = 20  # 2^bits buckets
    word_ngrams: tuple[int, ...] = (1, 2)
    char_ngrams: tuple[int, ...] = ()  # e.g. (3, 4, 5): byte n-grams of the normalised text
    lowercase: bool = True

    def __post_init__(self) -> None:
        if not 8 <= self.bits <= 26:
            raise DataError(f"features: bits must be in 8..26, got {self.bits}")
        for name in ("word_ngrams", "char_ngrams"):
            orders = tuple(getattr(self, name))
            if any(not isinstance(n, int) or n < 1 for n in orders):
                raise DataError(f"features: {name} must be positive integers, got {orders}")
            object.__setattr__(self, name, orders)
        if not self.word_ngrams and not self.char_ngrams:
            raise DataError("features: no n-gram orders (word_ngrams and char_ngrams empty)")

    def to_dict(self) -> dict[str, Any]:
        return {"hash": "blake2b64-splitmix64", **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "features") -> HashedFeatures:
        d = dict(d)
        if d.pop("hash", "blake2b64-splitmix64") != "blake2b64-splitmix64":
            raise DataError(f"{where}: unknown 'hash' (this version reads blake2b64-splitmix64)")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise DataError(f"{where}: unknown key(s) {sorted(unknown)} (known: {sorted(names)})")
        for k in ("word_ngrams", "char_ngrams"):
            if k in d:
                d[k] = tuple(d[k])
        return cls(**d)

    def _salt(self, kind: str, n: int) -> np.uint64:
        return np.uint64(stable_hash(f"\x00{kind} {n}-gram"))  # so "a" the word != "a" the byte

    def buckets(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(document index, bucket) int64 [M] for every n-gram occurrence in `texts`."""
        if self.lowercase:
            texts = [t.lower() for t in texts]
        shift = np.uint64(64 - self.bits)
        docs: list[np.ndarray] = []
        buckets: list[np.ndarray] = []

        def add(kind: str, units: np.ndarray, owner: np.ndarray, orders: tuple[int, ...]) -> None:
            h = units
            for n in range(1, max(orders, default=0) + 1):
                if n > 1:  # extend (n-1)-grams by one unit: h_n[i] = mix(h_{n-1}[i]) ^ u[i+n-1]
                    h = _mix(h[:-1]) ^ units[n - 1 :]
                if n in orders and len(h):
                    same = owner[: len(h)] == owner[n - 1 :]  # first and last unit, same document
                    docs.append(owner[: len(h)][same])
                    buckets.append((_mix(h[same] ^ self._salt(kind, n)) >> shift).astype(np.int64))

        if self.word_ngrams:
            tokens = [_TOKEN.findall(t) for t in texts]
            flat = list(chain.from_iterable(tokens))
            table = {w: stable_hash(w) for w in dict.fromkeys(flat)}  # each distinct word once
            words = np.fromiter(map(table.__getitem__, flat), dtype=np.uint64, count=len(flat))
            owner = np.repeat(np.arange(len(texts)), [len(ws) for ws in tokens])
            add("word", words, owner, self.word_ngrams)
        if self.char_ngrams:
            raw = [(" " + " ".join(t.split()) + " ").encode("utf-8") for t in texts]
            units = np.frombuffer(b"".join(raw), dtype=np.uint8).astype(np.uint64)
            units = _mix(units + np.uint64(1))  # spread bytes over 64 bits before combining
            owner = np.repeat(np.arange(len(texts)), [len(r) for r in raw])
            add("char", units, owner, self.char_ngrams)
        if not docs:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        return np.concatenate(docs), np.concatenate(buckets)

    def transform(self, texts: Sequence[str]) -> SparseRows:
        """log1p(count) per bucket, each row scaled to unit L2 norm (an empty text: no entries)."""
        doc, bucket = self.buckets(texts)
        keys, counts = np.unique(doc * (1 << self.bits) + bucket, return_counts=True)
        row, cols = keys >> self.bits, keys & ((1 << self.bits) - 1)
        vals = np.log1p(counts).astype(np.float32)
        sq = np.bincount(row, weights=vals.astype(np.float64) ** 2, minlength=len(texts))
        vals /= np.sqrt(sq)[row].astype(np.float32)
        indptr = np.zeros(len(texts) + 1, dtype=np.int64)
        np.cumsum(np.bincount(row, minlength=len(texts)), out=indptr[1:])
        return SparseRows(indptr, cols, vals)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return np.exp(-np.logaddexp(0.0, -z))


def _linear(
    local: np.ndarray, cols: np.ndarray, vals: np.ndarray, n: int, w: np.ndarray, b: float
) -> np.ndarray:
    """b + x·w for n rows given as (row, col, val) entries; float64 [n]."""
    return np.bincount(local, weights=w[cols] * vals, minlength=n) + b


@dataclass
class QualityClassifier:
    """Logistic regression over HashedFeatures: score(texts) = P(high quality), float64 [N]."""

    weights: np.ndarray  # float32 [2^bits]
    bias: float
    features: HashedFeatures = field(default_factory=HashedFeatures)
    training: dict[str, Any] = field(default_factory=dict)  # counts, accuracy, settings

    def logits(self, texts: Iterable[str], batch_size: int = 1024) -> np.ndarray:
        out = []
        for batch in _batched(iter([texts] if isinstance(texts, str) else texts), batch_size):
            x = self.features.transform(batch)
            local = np.repeat(np.arange(len(batch)), np.diff(x.indptr))
            out.append(_linear(local, x.cols, x.vals, len(batch), self.weights, self.bias))
        return np.concatenate(out) if out else np.zeros(0)

    def score(self, texts: Iterable[str], batch_size: int = 1024) -> np.ndarray:
        """Probability that each text is high quality, float64 [N] (a str counts as one text)."""
        return _sigmoid(self.logits(texts, batch_size))

    def save(self, path: str | Path) -> Path:
        """Write the model as .npz (weights + JSON metadata), atomically."""
        meta = {
            "format": FORMAT,
            "version": VERSION,
            "features": self.features.to_dict(),
            "bias": float(self.bias),
            "training": self.training,
        }
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.savez_compressed(
                f, weights=self.weights.astype(np.float32), metadata=np.array(json.dumps(meta))
            )
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> QualityClassifier:
        """A model written by save(); a missing, foreign or damaged file is an error naming it."""
        path = Path(path)
        if not path.is_file():
            raise MissingFileError(f"{path}: no classifier file")
        what = f"not a {FORMAT} .npz"
        try:
            with np.load(path, allow_pickle=False) as z:
                if not hasattr(z, "files"):
                    raise DataError("a single .npy array")
                arrays = {k: z[k] for k in z.files}
        except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
            raise DataError(f"{path}: {what} ({e})") from None
        for key in ("weights", "metadata"):
            if key not in arrays:
                raise DataError(f"{path}: {what}: no {key!r} entry (entries: {sorted(arrays)})")
        try:
            meta = json.loads(str(arrays["metadata"]))
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: {what}: 'metadata' is not JSON ({e.msg})") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            got = meta.get("format") if isinstance(meta, dict) else meta
            raise DataError(f"{path}: {what}: metadata 'format' is {got!r}")
        if not isinstance(meta.get("version"), int) or meta["version"] > VERSION:
            raise DataError(
                f"{path}: metadata 'version' is {meta.get('version')!r}; this gemmakit reads "
                f"up to {VERSION}"
            )
        for key in ("features", "bias"):
            if key not in meta:
                raise DataError(f"{path}: metadata has no {key!r}")
        features = HashedFeatures.from_dict(meta["features"], f"{path}: metadata 'features'")
        weights = arrays["weights"]
        if weights.shape != (1 << features.bits,) or weights.dtype != np.float32:
            raise DataError(
                f"{path}: 'weights' is {weights.dtype}{list(weights.shape)}, expected "
                f"float32[{1 << features.bits}] for bits={features.bits}"
            )
        return cls(weights, float(meta["bias"]), features, meta.get("training", {}))


def _batched(items: Iterator, n: int) -> Iterator[list]:
    while batch := [x for _, x in zip(range(n), items)]:
        yield batch


def _split(n_pos: int, n_neg: int, holdout: float, rng: np.random.Generator) -> np.ndarray:
    """bool [n_pos + n_neg]: the held-out rows, `holdout` of each class (stratified)."""
    held = np.zeros(n_pos + n_neg, dtype=bool)
    for lo, n in ((0, n_pos), (n_pos, n_neg)):
        k = min(n - 1, int(round(holdout * n)))  # leave each class at least one training row
        if k > 0:
            held[lo + rng.choice(n, k, replace=False)] = True
    return held


def train_classifier(
    positive: Iterable[str],
    negative: Iterable[str],
    features: HashedFeatures | None = None,
    epochs: int = 5,
    batch_size: int = 32,
    lr: float = 0.5,
    l2: float = 1e-6,
    holdout: float = 0.1,
    balance: bool = True,
    seed: int = 0,
) -> QualityClassifier:
    """Logistic regression telling `positive` (high-quality) texts from `negative` ones.

    Minibatch Adagrad on the log loss plus `l2`/2 ||w||^2 (applied to the weights a batch
    touches); `balance` weighs the classes equally however many texts each has. `holdout` of
    each class is kept out of training and scored at the end (training["heldout_accuracy"],
    at score 0.5). The same inputs and seed give the same model, bit for bit."""
    t0 = time.perf_counter()
    if epochs < 1 or batch_size < 1:
        raise DataError(
            f"train_classifier: epochs and batch_size must be >= 1, got {epochs}, {batch_size}"
        )
    features = features or HashedFeatures()
    pos, neg = list(positive), list(negative)
    if not pos or not neg:
        raise DataError(
            f"train_classifier: need positive and negative texts (got {len(pos)} positive, "
            f"{len(neg)} negative)"
        )
    if not 0 <= holdout < 1:
        raise DataError(f"train_classifier: holdout must be in [0, 1), got {holdout}")
    rng = np.random.default_rng(seed)
    y = np.r_[np.ones(len(pos)), np.zeros(len(neg))]
    held = _split(len(pos), len(neg), holdout, rng)
    x = features.transform(pos + neg)
    train = np.flatnonzero(~held)
    n_pos = int(y[train].sum())
    n_neg = len(train) - n_pos
    sample_w = np.ones(len(y))
    if balance:
        sample_w[y == 1] = len(train) / (2 * n_pos)
        sample_w[y == 0] = len(train) / (2 * n_neg)

    w = np.zeros(1 << features.bits, dtype=np.float64)
    g2 = np.zeros_like(w)  # Adagrad's sum of squared gradients
    b = g2_b = 0.0
    for _ in range(epochs):
        order = rng.permutation(train)
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            local, cols, vals = x.take(rows)
            p = _sigmoid(_linear(local, cols, vals, len(rows), w, b))
            r = (p - y[rows]) * sample_w[rows] / len(rows)  # d(mean loss)/d(logit) [B]
            used, inv = np.unique(cols, return_inverse=True)
            g = np.bincount(inv, weights=r[local] * vals, minlength=len(used)) + l2 * w[used]
            g2[used] += g * g
            w[used] -= lr * g / (np.sqrt(g2[used]) + 1e-12)
            g_b = float(r.sum())
            g2_b += g_b * g_b
            b -= lr * g_b / (np.sqrt(g2_b) + 1e-12)

    model = QualityClassifier(w.astype(np.float32), b, features)

    def accuracy(mask: np.ndarray) -> float | None:
        rows = np.flatnonzero(mask)
        if not len(rows):
            return None
        local, cols, vals = x.take(rows)
        z = _linear(local, cols, vals, len(rows), model.weights, model.bias)
        return round(float(((z >= 0) == (y[rows] == 1)).mean()), 6)

    model.training = {
        "positive": len(pos),
        "negative": len(neg),
        "train": {"positive": n_pos, "negative": n_neg},
        "heldout": {"positive": int(y[held].sum()), "negative": int((y[held] == 0).sum())},
        "train_accuracy": accuracy(~held),
        "heldout_accuracy": accuracy(held),
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": lr,
        "l2": l2,
        "balance": balance,
        "seed": seed,
        "seconds": round(time.perf_counter() - t0, 3),
    }
    return model


def pareto_draws(ids: Sequence[str], alpha: float = 9.0, seed: int = 0) -> np.ndarray:
    """One draw of numpy's `pareto(alpha)` (Lomax) per document id, float64 [N]: the inverse
    CDF of a uniform hashed from (seed, id), so a document gets the same draw in any order,
    process or run."""
    h = np.array([stable_hash(f"{seed}\x00{i}") for i in ids], dtype=np.uint64)
    u = ((h >> np.uint64(11)).astype(np.float64) + 1.0) / 2.0**53  # uniform in (0, 1]
    return u ** (-1.0 / alpha) - 1.0


@dataclass(frozen=True)
class KeepPolicy:
    """Which scored documents stay: `threshold` keeps score >= threshold; `pareto` (GPT-3)
    keeps a document when its pareto(alpha) draw exceeds 1 - score."""

    policy: str = "threshold"
    threshold: float = 0.5
    alpha: float = 9.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise DataError(f"classifier: policy must be one of {POLICIES}, got {self.policy!r}")
        if not 0 <= self.threshold <= 1:
            raise DataError(f"classifier: threshold must be in [0, 1], got {self.threshold}")
        if not self.alpha > 0:
            raise DataError(f"classifier: alpha must be positive, got {self.alpha}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None, where: str = "classifier") -> KeepPolicy:
        """A policy from `{policy, threshold, alpha, seed}`; unknown or misplaced keys are
        errors naming the key."""
        d = dict(d or {})
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise DataError(f"{where}: unknown key(s) {sorted(unknown)} (known: {sorted(names)})")
        policy = d.get("policy", "threshold")
        if policy == "pareto" and "threshold" in d:
            raise DataError(f"{where}: threshold applies to policy threshold, not pareto")
        if policy == "threshold" and "alpha" in d:
            raise DataError(f"{where}: alpha applies to policy pareto, not threshold")
        try:
            return cls(**d)
        except (TypeError, ValueError) as e:  # TypeError: a string where a number belongs
            raise DataError(f"{where}: {str(e).removeprefix('classifier: ')}") from None

    @property
    def reason(self) -> str:
        """The drop reason summaries attribute to this policy."""
        if self.policy == "threshold":
            return f"classifier<{self.threshold:g}"
        return f"classifier pareto(alpha={self.alpha:g})"

    def keep(self, scores: np.ndarray, ids: Sequence[str]) -> np.ndarray:
        """bool [N]: which of the documents with these scores and ids are kept."""
        if self.policy == "threshold":
            return scores >= self.threshold
        return pareto_draws(ids, self.alpha, self.seed) > 1.0 - scores


def filter_classifier(
    docs: Iterable[Document],
    classifier: QualityClassifier,
    policy: KeepPolicy | None = None,
    summary: StageSummary | None = None,
    batch_size: int = 256,
) -> Iterator[Document]:
    """The documents `policy` keeps given the classifier's scores (scored `batch_size` at a
    time); each drop goes to `summary` under policy.reason with its score."""
    policy = policy or KeepPolicy()
    summary = summary if summary is not None else StageSummary("classifier")
    summary.info["policy"] = dataclasses.asdict(policy)
    for batch in _batched(iter(docs), batch_size):
        scores = classifier.score([d.text for d in batch])
        for doc, score, kept in zip(batch, scores, policy.keep(scores, [d.id for d in batch])):
            if kept:
                summary.keep()
                yield doc
            else:
                summary.drop(policy.reason, doc.id, f"score {score:.3f}")
