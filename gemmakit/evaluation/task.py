"""A benchmark task: its documents, how each becomes requests (with few-shot examples drawn
under a fixed seed), and how the model's answers become per-sample scores. `evaluate` runs a
task: it gathers every request of every document, sends each kind to the model in one call
(so the runner batches and sorts them as it likes), scores each document and aggregates.
"""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from gemmakit.evaluation.metrics import mean_stderr
from gemmakit.evaluation.requests import (
    Generate,
    LanguageModel,
    Loglikelihood,
    LoglikelihoodResult,
    Request,
    Rolling,
)

Doc = Mapping[str, Any]
Result = LoglikelihoodResult | float | list[str]


class Task(ABC):
    """Subclasses set `name`, `num_fewshot` and the metrics they report (`metrics`, the keys of
    `score`'s dict, in the order a table shows them), store their documents in `_docs` (and a
    separate few-shot pool, if any, in `_shots`), and implement `requests` and `score`.
    `fewshot_docs` is the pool shots are drawn from (a train or dev split); when `_shots` is
    None, the evaluation docs themselves, never the document being asked about."""

    name: str = ""
    num_fewshot: int = 0
    metrics: tuple[str, ...] = ("acc",)
    # "random": shots drawn from the pool under the seed; "first": the pool's first examples in
    # order (lm-eval's first_n sampler, which MMLU uses with its dev split)
    fewshot_order: str = "random"
    # set by each subclass's constructor; no default, so a task that forgets fails loudly
    _docs: Sequence[Doc]
    _shots: Sequence[Doc] | None = None  # None: shots come from `_docs`; [] means no shots

    def docs(self) -> Sequence[Doc]:
        """The documents to evaluate, in a fixed order."""
        return self._docs

    def fewshot_docs(self) -> Sequence[Doc]:
        return self.docs() if self._shots is None else self._shots

    def shot_pool(self, doc: Doc) -> Sequence[Doc]:
        """The examples `doc`'s shots come from: `fewshot_docs()` by default; a task whose
        subsets each have their own examples (MMLU's subjects) narrows it to `doc`'s."""
        return self.fewshot_docs()

    @abstractmethod
    def requests(self, doc: Doc, shots: Sequence[Doc]) -> list[Request]:
        """The requests that answer `doc`, given its few-shot examples (all of one kind)."""

    @abstractmethod
    def score(self, doc: Doc, results: Sequence[Result]) -> dict[str, float]:
        """Per-sample metric values from the results of `requests(doc, ...)`, in that order."""

    def score_all(
        self, docs: Sequence[Doc], results: Sequence[Sequence[Result]]
    ) -> list[dict[str, float]]:
        """`score` of every document, in order; a task whose scoring is slow (running
        model-written code) overrides this to score the documents in parallel."""
        return [self.score(doc, res) for doc, res in zip(docs, results, strict=True)]

    def aggregate(self, metric: str, values: Sequence[float]) -> tuple[float, float]:
        """(value, standard error) of a metric over the samples; the mean by default."""
        return mean_stderr(values)


def draw_shots(task: Task, index: int, doc: Doc, seed: int) -> list[Doc]:
    """`task.num_fewshot` examples for document `index`, drawn from its few-shot pool by a
    generator seeded with (seed, index), so a document's shots do not depend on `--limit` or on
    which other documents run (or the pool's first ones, for `fewshot_order == "first"`); the
    document itself is never its own example."""
    if task.num_fewshot == 0:
        return []
    pool = task.shot_pool(doc)
    k = min(len(pool), task.num_fewshot + 1)
    if task.fewshot_order == "first":
        picks = list(range(k))
    else:
        picks = random.Random(f"{seed}:{index}").sample(range(len(pool)), k)
    shots = [pool[i] for i in picks if pool[i] is not doc and pool[i] != doc]
    return shots[: task.num_fewshot]


@dataclass
class TaskResult:
    name: str
    num_fewshot: int
    metrics: dict[str, tuple[float, float]]  # metric -> (value, stderr)
    samples: list[dict[str, Any]] = field(default_factory=list)  # one row per document

    def to_dict(self) -> dict[str, Any]:
        return {
            "task": self.name,
            "num_fewshot": self.num_fewshot,
            "samples": len(self.samples),
            "metrics": {k: {"value": v, "stderr": s} for k, (v, s) in self.metrics.items()},
        }


def _run(lm: LanguageModel, requests: list[Request]) -> list[Result]:
    """Every request answered, in order, with one model call per request kind."""
    results: list[Result | None] = [None] * len(requests)
    kinds: list[tuple[type, Callable[[list[Any]], list[Any]]]] = [
        (Loglikelihood, lm.loglikelihood),
        (Rolling, lm.loglikelihood_rolling),
        (Generate, lm.generate),
    ]
    for kind, call in kinds:
        idx = [i for i, r in enumerate(requests) if isinstance(r, kind)]
        if idx:
            for i, out in zip(idx, call([requests[i] for i in idx]), strict=True):
                results[i] = out
    return results  # type: ignore[return-value]


def evaluate(
    task: Task,
    lm: LanguageModel,
    limit: int | None = None,
    seed: int = 1234,
    progress: Callable[[str], None] | None = None,
) -> TaskResult:
    """Run `task` on its first `limit` documents (all when None) and aggregate each metric
    with its standard error. `samples` holds each document's requests, results and scores."""
    docs = list(task.docs())[:limit]  # a None limit slices nothing off
    per_doc: list[list[Request]] = []
    for i, doc in enumerate(docs):
        per_doc.append(task.requests(doc, draw_shots(task, i, doc, seed)))
    flat = [r for reqs in per_doc for r in reqs]
    if progress is not None:
        progress(f"{task.name}: {len(docs)} documents, {len(flat)} requests")
    answers = _run(lm, flat)
    per_doc_results: list[list[Result]] = []
    at = 0
    for reqs in per_doc:
        per_doc_results.append(answers[at : at + len(reqs)])
        at += len(reqs)
    samples: list[dict[str, Any]] = []
    values: dict[str, list[float]] = {m: [] for m in task.metrics}
    all_scores = task.score_all(docs, per_doc_results)
    for i, (reqs, res, scores) in enumerate(zip(per_doc, per_doc_results, all_scores)):
        for m in task.metrics:
            values[m].append(float(scores[m]))
        samples.append({"doc_id": i, "requests": reqs, "results": res, "scores": scores})
    metrics = {m: task.aggregate(m, v) for m, v in values.items() if v}
    return TaskResult(task.name, task.num_fewshot, metrics, samples)
