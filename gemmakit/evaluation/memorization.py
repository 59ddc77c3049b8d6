"""Memorization as the report measures it: prompt with the first 50 tokens of a training
document, greedy-decode 50 tokens, and compare them with the document's true next 50.

"Exact" when identical; "approximate" when the token edit distance is within 10% of the
continuation length.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

from gemmakit.generation import generate
from gemmakit.model.transformer import Gemma


def edit_distance(a: Sequence[int], b: Sequence[int]) -> int:
    """Levenshtein distance between two token sequences."""
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i]
        for j, y in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y)))
        prev = cur
    return prev[-1]


@dataclass
class MemorizationResult:
    documents: int  # documents long enough to test
    exact: int
    approximate: int  # includes the exact ones
    examples: list[dict]  # a few memorized (prompt, continuation) pairs, as token ids

    @property
    def exact_rate(self) -> float:
        return self.exact / self.documents if self.documents else 0.0

    @property
    def approximate_rate(self) -> float:
        return self.approximate / self.documents if self.documents else 0.0

    def to_dict(self) -> dict:
        return {
            **asdict(self),
            "exact_rate": self.exact_rate,
            "approximate_rate": self.approximate_rate,
        }


def memorization(
    model: Gemma,
    documents: Sequence[Sequence[int]],
    prompt_len: int = 50,
    continuation_len: int = 50,
    approx_fraction: float = 0.1,
    batch_size: int = 16,
) -> MemorizationResult:
    """Test each document of at least prompt_len + continuation_len tokens."""
    docs = [list(d) for d in documents if len(d) >= prompt_len + continuation_len]
    exact = approx = 0
    examples: list[dict] = []
    budget = int(approx_fraction * continuation_len)
    for start in range(0, len(docs), batch_size):
        batch = docs[start : start + batch_size]
        prompts = [d[:prompt_len] for d in batch]
        outs = generate(model, prompts, continuation_len, stop_tokens=[])
        for doc, prompt, out in zip(batch, prompts, outs):
            truth = doc[prompt_len : prompt_len + continuation_len]
            dist = edit_distance(out, truth)
            exact += dist == 0
            approx += dist <= budget
            if dist <= budget and len(examples) < 3:
                examples.append({"prompt": prompt, "generated": out, "edit_distance": dist})
    return MemorizationResult(len(docs), exact, approx, examples)
