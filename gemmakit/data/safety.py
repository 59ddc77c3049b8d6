"""Safety filtering by blocklist: drop documents that contain listed words or phrases, matched
case-insensitively on word boundaries (so a listed word never matches inside a longer word)."""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from pathlib import Path

from gemmakit.data.readers import Document, read_utf8
from gemmakit.data.summary import StageSummary
from gemmakit.errors import DataError, MissingFileError


class Blocklist:
    """Terms (words or phrases; whitespace inside a phrase matches any run of whitespace)."""

    def __init__(self, terms: Iterable[str]) -> None:
        self.terms = sorted({t.strip().lower() for t in terms if t.strip()}, key=len, reverse=True)
        if not self.terms:
            raise DataError("blocklist is empty")
        alternatives = "|".join(r"\s+".join(map(re.escape, t.split())) for t in self.terms)
        self.pattern = re.compile(rf"(?<!\w)(?:{alternatives})(?!\w)", re.IGNORECASE)

    @classmethod
    def from_file(cls, path: str | Path) -> Blocklist:
        """One term per line; blank lines and lines starting with '#' are skipped."""
        path = Path(path)
        if not path.is_file():
            raise MissingFileError(f"{path}: no blocklist file")
        lines = read_utf8(path).splitlines()
        terms = [ln for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
        if not terms:
            raise DataError(f"{path}: blocklist holds no terms")
        return cls(terms)

    def find(self, text: str) -> list[str]:
        """The listed terms found in `text`, lower-cased, whitespace normalised, in order."""
        return [" ".join(m.group(0).lower().split()) for m in self.pattern.finditer(text)]


def filter_safety(
    docs: Iterable[Document],
    blocklist: Blocklist,
    summary: StageSummary | None = None,
    max_hits: int = 0,
) -> Iterator[Document]:
    """Documents with at most `max_hits` blocklist matches; drops are recorded as
    "blocklist" with the terms found, and `counts` tallies matches per term."""
    summary = summary if summary is not None else StageSummary("safety")
    for doc in docs:
        hits = blocklist.find(doc.text)
        if len(hits) > max_hits:
            for term in hits:
                summary.count(f"term: {term}")
            summary.drop("blocklist", doc.id, ", ".join(sorted(set(hits))))
        else:
            summary.keep()
            yield doc
