"""Decontamination: remove training documents that share a long n-gram of normalised words
with any evaluation item, so evaluation measures generalisation, not recall (the report filters
all evaluation sets out of the pretraining mix). An item shorter than n words is matched as a
whole when it has at least `min_words` words; shorter items are too generic to match on."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from gemmakit.data.dedup import normalize
from gemmakit.data.readers import Document, read_documents
from gemmakit.data.summary import StageSummary
from gemmakit.errors import DataError


@dataclass(frozen=True)
class Match:
    """Where a document met an evaluation set: the set's name, the item's id, the n-gram."""

    eval_set: str
    item: str
    ngram: str


class EvalIndex:
    """Every `n`-gram (of normalised words) of every evaluation item, mapped to its origin."""

    def __init__(self, n: int = 13, min_words: int = 8) -> None:
        if n < 1 or min_words < 1:
            raise DataError("decontaminate: n and min_words must be >= 1")
        self.n, self.min_words = n, min_words
        self.grams: dict[str, Match] = {}
        self.lengths: set[int] = set()
        self.items = 0
        self.skipped_short = 0
        self.sets: dict[str, int] = {}

    def add(self, eval_set: str, item_id: str, text: str) -> None:
        words = normalize(text).split()
        if len(words) < min(self.n, self.min_words):
            self.skipped_short += 1
            return
        size = min(self.n, len(words))
        self.lengths.add(size)
        for i in range(len(words) - size + 1):
            gram = " ".join(words[i : i + size])
            self.grams.setdefault(gram, Match(eval_set, item_id, gram))
        self.items += 1
        self.sets[eval_set] = self.sets.get(eval_set, 0) + 1

    @classmethod
    def from_files(
        cls, paths: Iterable[str | Path], n: int = 13, min_words: int = 8, text_field: str = "*"
    ) -> EvalIndex:
        """Index evaluation files (jsonl: `text_field`, "*" = all string fields of an item;
        txt: one item per blank-line-separated block); each file's stem names its set."""
        index = cls(n, min_words)
        for path in paths:
            path = Path(path)
            name = path.name.split(".")[0]
            for item in read_documents(path, text_field=text_field, split="paragraph"):
                index.add(name, item.id, item.text)
        if not index.grams:
            raise DataError(
                f"decontaminate: no evaluation item of >= {min_words} words in "
                f"{[str(p) for p in paths]}"
            )
        return index

    def find(self, text: str) -> Match | None:
        """The first evaluation n-gram found in `text`, or None."""
        words = normalize(text).split()
        for size in sorted(self.lengths, reverse=True):
            for i in range(len(words) - size + 1):
                if (m := self.grams.get(" ".join(words[i : i + size]))) is not None:
                    return m
        return None


def decontaminate(
    docs: Iterable[Document], index: EvalIndex, summary: StageSummary | None = None
) -> Iterator[Document]:
    """Documents sharing no indexed n-gram; each removal is recorded in `summary.details` with
    the document, the evaluation set and item, and the n-gram."""
    summary = summary if summary is not None else StageSummary("decontaminate")
    summary.info |= {
        "ngram": index.n,
        "eval_items": index.items,
        "eval_sets": index.sets,
        "eval_items_too_short": index.skipped_short,
    }
    for doc in docs:
        m = index.find(doc.text)
        if m is None:
            summary.keep()
            yield doc
            continue
        summary.drop(f"contains {m.eval_set}", doc.id, m.ngram)
        summary.record(document=doc.id, eval_set=m.eval_set, item=m.item, ngram=m.ngram)
