"""What a stage kept and dropped, and why: printed as a table, written as JSON."""

from __future__ import annotations

from collections import Counter
from typing import Any

MAX_EXAMPLES = 5  # document ids kept per drop reason, so a summary stays readable
MAX_DETAILS = 1000  # per-document records (decontamination matches) kept in full


class StageSummary:
    """Counts for one stage over one stream of documents.

    `drop(reason, doc_id, detail)` attributes each dropped document to one rule; `count(kind, n)`
    records things changed without dropping (PII replaced); `details` holds per-document records
    the user must be able to audit (which document matched which eval set, on which n-gram)."""

    def __init__(self, stage: str, source: str | None = None) -> None:
        self.stage = stage
        self.source = source
        self.seen = 0
        self.kept = 0
        self.dropped: Counter[str] = Counter()
        self.examples: dict[str, list[Any]] = {}
        self.counts: Counter[str] = Counter()
        self.details: list[dict[str, Any]] = []
        self.details_total = 0
        self.info: dict[str, Any] = {}

    def keep(self) -> None:
        self.seen += 1
        self.kept += 1

    def drop(self, reason: str, doc_id: str, detail: str | None = None) -> None:
        self.seen += 1
        self.dropped[reason] += 1
        examples = self.examples.setdefault(reason, [])
        if len(examples) < MAX_EXAMPLES:
            examples.append(doc_id if detail is None else {"id": doc_id, "detail": detail})

    def count(self, kind: str, n: int = 1) -> None:
        self.counts[kind] += n

    def record(self, **detail: Any) -> None:
        self.details_total += 1
        if len(self.details) < MAX_DETAILS:
            self.details.append(detail)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"stage": self.stage}
        if self.source is not None:
            out["source"] = self.source
        out |= {
            "seen": self.seen,
            "kept": self.kept,
            "dropped": sum(self.dropped.values()),
            "dropped_by_reason": dict(self.dropped.most_common()),
            "examples": self.examples,
        }
        if self.counts:
            out["counts"] = dict(self.counts.most_common())
        if self.details_total:
            out["details"] = self.details
            out["details_total"] = self.details_total
        if self.info:
            out["info"] = self.info
        return out

    def format(self) -> str:
        """A few lines for the terminal: totals, then one line per drop reason and count."""
        where = f"[{self.source}] " if self.source else ""
        lines = [
            f"{where}{self.stage}: seen {self.seen}, kept {self.kept}, "
            f"dropped {sum(self.dropped.values())}"
        ]
        for reason, n in self.dropped.most_common():
            lines.append(f"    dropped {n:>6}  {reason}")
        for kind, n in self.counts.most_common():
            lines.append(f"    {kind:<14} {n:>6}")
        for d in self.details[:10]:
            lines.append("    " + ", ".join(f"{k}={v!r}" for k, v in d.items()))
        if self.details_total > 10:
            lines.append(f"    ... {self.details_total - 10} more in the JSON summary")
        return "\n".join(lines)
