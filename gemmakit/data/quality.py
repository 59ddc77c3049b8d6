"""Heuristic quality filters of the Gopher (Rae et al. 2021, appendix A) and C4 kind.

Each rule looks at one property of a document and names itself when the document fails it; a
dropped document is attributed to the first rule it fails, in the order of RULES. Thresholds
live in QualityConfig (None turns a rule off); presets tune them for web prose, maths and code.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gemmakit.data.readers import Document
from gemmakit.data.summary import StageSummary
from gemmakit.errors import ConfigError

STOP_WORDS = frozenset({"the", "be", "to", "of", "and", "that", "have", "with"})  # Gopher's
BULLETS = ("•", "-", "*", "‣", "▪", "●", "◦", "–", "·")
ELLIPSES = ("...", "…")
_ALPHA = re.compile(r"[^\W\d_]")


@dataclass(frozen=True)
class QualityConfig:
    """Thresholds; the defaults are Gopher's. Fractions are of words, lines or characters."""

    min_words: int | None = 50
    max_words: int | None = 100_000
    min_mean_word_length: float | None = 3.0
    max_mean_word_length: float | None = 10.0
    max_symbol_word_ratio: float | None = 0.1  # ('#', '...', '…') per word
    max_bullet_lines_fraction: float | None = 0.9  # lines starting with a bullet
    max_ellipsis_lines_fraction: float | None = 0.3  # lines ending with an ellipsis
    min_alpha_words_fraction: float | None = 0.8  # words holding a letter
    min_alpha_chars_fraction: float | None = 0.5  # letters among non-space characters
    min_stop_words: int | None = 2  # distinct Gopher stop words present
    max_duplicate_lines_fraction: float | None = 0.3
    max_duplicate_line_chars_fraction: float | None = 0.2
    max_duplicate_paragraphs_fraction: float | None = 0.3
    max_duplicate_paragraph_chars_fraction: float | None = 0.2
    # most frequent n-gram's characters / all characters, for n = 2, 3, 4
    max_top_ngram_chars_fraction: dict[int, float] | None = field(
        default_factory=lambda: {2: 0.20, 3: 0.18, 4: 0.16}
    )
    # characters in repeated n-grams / all characters, for n = 5 ... 10
    max_duplicate_ngram_chars_fraction: dict[int, float] | None = field(
        default_factory=lambda: {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10}
    )
    max_line_length: int | None = None  # characters; catches minified or generated code
    forbid_lorem_ipsum: bool = True  # C4: placeholder text

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> QualityConfig:
        """A config from `{preset: web|math|code, <field>: value, ...}`; unknown keys are errors."""
        d = dict(d or {})
        base = PRESETS.get(d.pop("preset", "web"))
        if base is None:
            raise ConfigError(f"quality: unknown preset (presets: {sorted(PRESETS)})")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ConfigError(
                f"quality: unknown setting(s) {sorted(unknown)} (settings: {sorted(names)})"
            )
        for k in ("max_top_ngram_chars_fraction", "max_duplicate_ngram_chars_fraction"):
            if d.get(k) is not None:
                d[k] = {int(n): float(v) for n, v in d[k].items()}
        return dataclasses.replace(base, **d)


_OFF = dict.fromkeys(
    [
        "min_mean_word_length",
        "max_mean_word_length",
        "max_symbol_word_ratio",
        "max_bullet_lines_fraction",
        "max_ellipsis_lines_fraction",
        "min_alpha_words_fraction",
        "max_top_ngram_chars_fraction",
        "max_duplicate_ngram_chars_fraction",
    ]
)
PRESETS = {
    "web": QualityConfig(),
    # worked problems: many numbers and symbols, short words, repeated phrasing is normal
    "math": dataclasses.replace(
        QualityConfig(), **_OFF, min_words=10, min_stop_words=1, min_alpha_chars_fraction=0.2
    ),
    # source files: prose rules do not apply; keep length, repetition and line-length checks
    "code": dataclasses.replace(
        QualityConfig(),
        **_OFF,
        min_words=10,
        min_stop_words=None,
        min_alpha_chars_fraction=0.25,
        max_duplicate_lines_fraction=0.5,
        max_duplicate_line_chars_fraction=0.4,
        max_line_length=1000,
        max_duplicate_paragraphs_fraction=None,
        max_duplicate_paragraph_chars_fraction=None,
    ),
}


class _Stats:
    """What the rules look at, computed once per document."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.chars = max(1, len(text))
        self.words = text.split()
        self.lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        self.paragraphs = [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]
        self._grams: dict[int, np.ndarray] = {}

    def gram_hashes(self, n: int) -> np.ndarray:
        """uint64 [len(words) - n + 1]: equal for equal word n-grams (64-bit polynomial hash;
        a collision between different n-grams has probability ~2^-64)."""
        if not self._grams:
            words = np.array([hash(w) for w in self.words], dtype=np.int64).view(np.uint64)
            self._grams[1] = words
            self.word_lens = np.array([len(w) for w in self.words], dtype=np.int64)
        have = max(j for j in self._grams if j <= n)
        h, k = self._grams[have], np.uint64(0x100000001B3)
        with np.errstate(over="ignore"):
            for j in range(have + 1, n + 1):  # extend (j-1)-grams by one word
                h = h[:-1] * k + self._grams[1][j - 1 :]
                self._grams[j] = h
        return h


def _duplicates(items: list[str]) -> tuple[int, int]:
    """(items equal to an earlier item, their characters)."""
    seen: set[str] = set()
    n = chars = 0
    for it in items:
        if it in seen:
            n += 1
            chars += len(it)
        else:
            seen.add(it)
    return n, chars


def _top_ngram_chars(s: _Stats, n: int) -> int:
    """Characters in all occurrences of the most frequent n-gram (0 when none repeats)."""
    if len(s.words) < n:
        return 0
    values, first, counts = np.unique(s.gram_hashes(n), return_index=True, return_counts=True)
    k = int(np.argmax(counts))
    if counts[k] < 2:
        return 0
    i = int(first[k])
    return (int(s.word_lens[i : i + n].sum()) + n - 1) * int(counts[k])


def _duplicate_ngram_chars(s: _Stats, n: int) -> int:
    """Characters of the words covered by n-grams that repeat an earlier n-gram (Gopher)."""
    if len(s.words) < n:
        return 0
    h = s.gram_hashes(n)
    _, first = np.unique(h, return_index=True)
    repeat = np.ones(len(h), dtype=bool)
    repeat[first] = False
    starts = np.flatnonzero(repeat)
    edges = np.zeros(len(s.words) + 1, dtype=np.int64)
    np.add.at(edges, starts, 1)
    np.add.at(edges, starts + n, -1)
    return int(s.word_lens[np.cumsum(edges)[:-1] > 0].sum())


def _rules(c: QualityConfig) -> list[tuple[str, Callable[[_Stats], str | None]]]:
    """(rule name, check) pairs; a check returns a short detail when the document fails."""
    rules: list[tuple[str, Callable[[_Stats], str | None]]] = []

    def add(name: str, active: bool, check: Callable[[_Stats], str | None]) -> None:
        if active:
            rules.append((name, check))

    def frac(n: float, d: float) -> float:
        return n / d if d else 0.0

    add(
        "too few words",
        c.min_words is not None,
        lambda s: f"{len(s.words)} < {c.min_words}" if len(s.words) < c.min_words else None,
    )
    add(
        "too many words",
        c.max_words is not None,
        lambda s: f"{len(s.words)} > {c.max_words}" if len(s.words) > c.max_words else None,
    )
    add(
        "lorem ipsum",
        c.forbid_lorem_ipsum,
        lambda s: "contains 'lorem ipsum'" if "lorem ipsum" in s.text.lower() else None,
    )

    def mean_len(s: _Stats) -> str | None:
        m = frac(sum(map(len, s.words)), len(s.words))
        if c.min_mean_word_length is not None and m < c.min_mean_word_length:
            return f"mean word length {m:.2f} < {c.min_mean_word_length}"
        if c.max_mean_word_length is not None and m > c.max_mean_word_length:
            return f"mean word length {m:.2f} > {c.max_mean_word_length}"
        return None

    add(
        "mean word length",
        c.min_mean_word_length is not None or c.max_mean_word_length is not None,
        mean_len,
    )

    def symbols(s: _Stats) -> str | None:
        n = s.text.count("#") + sum(s.text.count(e) for e in ELLIPSES)
        r = frac(n, len(s.words))
        return f"{r:.3f} > {c.max_symbol_word_ratio}" if r > c.max_symbol_word_ratio else None

    add("symbol-to-word ratio", c.max_symbol_word_ratio is not None, symbols)

    def bullets(s: _Stats) -> str | None:
        r = frac(sum(ln.startswith(BULLETS) for ln in s.lines), len(s.lines))
        return (
            f"{r:.2f} > {c.max_bullet_lines_fraction}" if r > c.max_bullet_lines_fraction else None
        )

    add("bullet lines", c.max_bullet_lines_fraction is not None, bullets)

    def ellipsis(s: _Stats) -> str | None:
        r = frac(sum(ln.endswith(ELLIPSES) for ln in s.lines), len(s.lines))
        lim = c.max_ellipsis_lines_fraction
        return f"{r:.2f} > {lim}" if r > lim else None

    add("ellipsis lines", c.max_ellipsis_lines_fraction is not None, ellipsis)

    def alpha_words(s: _Stats) -> str | None:
        r = frac(sum(bool(_ALPHA.search(w)) for w in s.words), len(s.words))
        lim = c.min_alpha_words_fraction
        return f"{r:.2f} < {lim}" if r < lim else None

    add("alphabetic words", c.min_alpha_words_fraction is not None, alpha_words)

    def alpha_chars(s: _Stats) -> str | None:
        non_space = sum(map(len, s.words))
        r = frac(len(_ALPHA.findall(s.text)), non_space)
        lim = c.min_alpha_chars_fraction
        return f"{r:.2f} < {lim}" if r < lim else None

    add("alphabetic characters", c.min_alpha_chars_fraction is not None, alpha_chars)

    def stop_words(s: _Stats) -> str | None:
        n = len(STOP_WORDS.intersection(w.lower().strip(".,;:!?\"'()") for w in s.words))
        return f"{n} < {c.min_stop_words}" if n < c.min_stop_words else None

    add("stop words", c.min_stop_words is not None, stop_words)

    def line_length(s: _Stats) -> str | None:
        m = max((len(ln) for ln in s.text.splitlines()), default=0)
        return f"{m} > {c.max_line_length}" if m > c.max_line_length else None

    add("line length", c.max_line_length is not None, line_length)

    def dup(kind: str, get, max_items: float | None, max_chars: float | None):
        def check(s: _Stats) -> str | None:
            items = get(s)
            n, chars = _duplicates(items)
            if max_items is not None and frac(n, len(items)) > max_items:
                return f"{kind}: {frac(n, len(items)):.2f} of {kind} repeated > {max_items}"
            if max_chars is not None and chars / s.chars > max_chars:
                return f"{kind}: {chars / s.chars:.2f} of characters repeated > {max_chars}"
            return None

        return check

    add(
        "duplicate lines",
        c.max_duplicate_lines_fraction is not None
        or c.max_duplicate_line_chars_fraction is not None,
        dup(
            "lines",
            lambda s: s.lines,
            c.max_duplicate_lines_fraction,
            c.max_duplicate_line_chars_fraction,
        ),
    )
    add(
        "duplicate paragraphs",
        c.max_duplicate_paragraphs_fraction is not None
        or c.max_duplicate_paragraph_chars_fraction is not None,
        dup(
            "paragraphs",
            lambda s: s.paragraphs,
            c.max_duplicate_paragraphs_fraction,
            c.max_duplicate_paragraph_chars_fraction,
        ),
    )

    for n, lim in sorted((c.max_top_ngram_chars_fraction or {}).items()):

        def top(s: _Stats, n=n, lim=lim) -> str | None:
            r = _top_ngram_chars(s, n) / s.chars
            return f"{r:.3f} > {lim}" if r > lim else None

        add(f"top {n}-gram", True, top)
    for n, lim in sorted((c.max_duplicate_ngram_chars_fraction or {}).items()):

        def rep(s: _Stats, n=n, lim=lim) -> str | None:
            r = _duplicate_ngram_chars(s, n) / s.chars
            return f"{r:.3f} > {lim}" if r > lim else None

        add(f"duplicate {n}-grams", True, rep)
    return rules


def quality_failure(text: str, config: QualityConfig | None = None) -> tuple[str, str] | None:
    """(rule, detail) of the first rule `text` fails, or None when it passes them all."""
    s = _Stats(text)
    for name, check in _rules(config or QualityConfig()):
        if (detail := check(s)) is not None:
            return name, detail
    return None


def filter_quality(
    docs: Iterable[Document],
    config: QualityConfig | None = None,
    summary: StageSummary | None = None,
) -> Iterator[Document]:
    """The documents that pass every rule; each drop goes to `summary` under its rule's name."""
    config = config or QualityConfig()
    rules = _rules(config)
    summary = summary if summary is not None else StageSummary("quality")
    for doc in docs:
        s = _Stats(doc.text)
        for name, check in rules:
            if (detail := check(s)) is not None:
                summary.drop(name, doc.id, detail)
                break
        else:
            summary.keep()
            yield doc
