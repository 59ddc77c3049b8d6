"""Personal-data scrubbing: e-mail addresses, phone numbers, IPv4/IPv6 addresses, payment-card
numbers (Luhn-checked) and US social security numbers are replaced with placeholder tags."""

from __future__ import annotations

import ipaddress
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence

from gemmakit.data.readers import Document
from gemmakit.data.summary import StageSummary
from gemmakit.errors import ConfigError

TAGS = {
    "email": "<EMAIL>",
    "ipv6": "<IP_ADDRESS>",
    "ipv4": "<IP_ADDRESS>",
    "credit_card": "<CREDIT_CARD>",
    "ssn": "<SSN>",
    "phone": "<PHONE>",
}

_EMAIL = re.compile(r"(?<![\w.+-])[\w.+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")
_IPV6 = re.compile(r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}(?:[0-9A-Fa-f]{1,4}|:)(?![\w:])")
_IPV4 = re.compile(r"(?<![\w.])(?:\d{1,3}\.){3}\d{1,3}(?![\w.]\d)")
_CARD = re.compile(r"(?<![\w-])\d(?:[ -]?\d){12,18}(?![\w-])")
_SSN = re.compile(r"(?<![\w-])(?!000|666|9\d\d)\d{3}-(?!00)\d{2}-(?!0000)\d{4}(?![\w-])")
_PHONE = re.compile(
    r"(?<![\w+])(?<!\d[ .-])"  # not inside a longer run of digit groups
    r"(?:\+\d{1,3}[ .-]?)?(?:\(\d{2,4}\)[ .-]?|\d{2,4}[ .-])\d{3,4}[ .-]?\d{3,4}"
    r"(?![\w-])(?![ .-]\d)"
)


def luhn_valid(digits: str) -> bool:
    """The Luhn checksum that payment-card numbers carry (so random digit runs are left alone)."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _ipv6(s: str) -> bool:
    # at least three groups with digits: keeps slices like a[::2] and times like 12:30:45 out
    if sum(bool(g) for g in s.split(":")) < 3:
        return False
    try:
        ipaddress.IPv6Address(s)
    except ValueError:
        return False
    return True


def _ipv4(s: str) -> bool:
    return all(int(p) <= 255 and (p == "0" or not p.startswith("0")) for p in s.split("."))


def _card(s: str) -> bool:
    digits = re.sub(r"\D", "", s)
    return 13 <= len(digits) <= 19 and luhn_valid(digits)


# (kind, pattern, validator): applied in this order, so a longer kind is taken before a shorter
# one can claim part of it (an e-mail's digits, a card number's groups as a phone number)
DETECTORS: list[tuple[str, re.Pattern[str], Callable[[str], bool] | None]] = [
    ("email", _EMAIL, None),
    ("ipv6", _IPV6, _ipv6),
    ("ipv4", _IPV4, _ipv4),
    ("credit_card", _CARD, _card),
    ("ssn", _SSN, None),
    ("phone", _PHONE, None),
]
KINDS = tuple(k for k, _, _ in DETECTORS)


def scrub_pii(text: str, kinds: Sequence[str] = KINDS) -> tuple[str, Counter[str]]:
    """(text with each detected item replaced by its kind's tag, count per kind)."""
    unknown = set(kinds) - set(KINDS)
    if unknown:
        raise ConfigError(f"pii: unknown kind(s) {sorted(unknown)} (kinds: {list(KINDS)})")
    counts: Counter[str] = Counter()
    for kind, pattern, valid in DETECTORS:
        if kind not in kinds:
            continue

        def sub(m: re.Match[str], kind=kind, valid=valid) -> str:
            if valid is not None and not valid(m.group(0)):
                return m.group(0)
            counts[kind] += 1
            return TAGS[kind]

        text = pattern.sub(sub, text)
    return text, counts


def scrub_documents(
    docs: Iterable[Document], summary: StageSummary | None = None, kinds: Sequence[str] = KINDS
) -> Iterator[Document]:
    """Every document, scrubbed; `summary.counts` holds replacements per kind and the number of
    documents changed. Nothing is dropped."""
    summary = summary if summary is not None else StageSummary("pii")
    for doc in docs:
        text, counts = scrub_pii(doc.text, kinds)
        summary.keep()
        if counts:
            summary.count("documents changed")
            for kind, n in counts.items():
                summary.count(kind, n)
            doc = Document(doc.id, text, doc.source)
        yield doc
