"""Multiple choice by log-likelihood, as lm-evaluation-harness scores it.

Each option is one `Loglikelihood` request; the answer is the option with the highest
log-likelihood (`acc`) or the highest log-likelihood per character of the option's text
(`acc_norm`, lm-eval's length normalization: by the characters of the answer choice, the
target delimiter not counted). Ties go to the first option, as numpy's argmax does.

Two layouts of the requests:
- the usual one: context = the prompt (`query`), continuation = " " + option;
- WinoGrande's partial scoring (`partial` set): each option completes the sentence up to the
  blank, and the continuation is the rest of the sentence, the same text for every option, so
  the scores compare the same tokens under different contexts.

A few-shot example is the example's prompt followed by its right answer; examples are joined
by a blank line and preceded by the task's `description` (MMLU's "The following are ...").
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from gemmakit.evaluation.requests import Loglikelihood, LoglikelihoodResult
from gemmakit.evaluation.task import Doc, Result, Task

TARGET_DELIMITER = " "  # between the prompt and an option (lm-eval's target_delimiter)
FEWSHOT_DELIMITER = "\n\n"  # between few-shot examples (lm-eval's fewshot_delimiter)


@dataclass(frozen=True)
class Choice:
    """One multiple-choice question.

    query: the prompt before the answer ("Question: ...\\nAnswer:"); unused when `partial` is
        set, where each option is its own context.
    options: the answer texts, without the delimiter; with `partial`, the contexts.
    gold: the index of the right option.
    partial: WinoGrande's shared continuation (the sentence after the blank), or None.
    where: the file and row it was read from, for messages and per-sample output.
    group: a subset name (MMLU's subject, AGIEval's exam), or "".
    """

    query: str
    options: tuple[str, ...]
    gold: int
    partial: str | None = None
    where: str = ""
    group: str = ""

    def example(self) -> str:
        """This question with its right answer, as a few-shot example."""
        if self.partial is not None:
            return self.options[self.gold] + TARGET_DELIMITER + self.partial
        return self.query + TARGET_DELIMITER + self.options[self.gold]

    def option_requests(self, prefix: str) -> list[Loglikelihood]:
        """One request per option, after `prefix` (description and few-shot examples)."""
        if self.partial is not None:
            cont = TARGET_DELIMITER + self.partial
            return [Loglikelihood(prefix + o, cont) for o in self.options]
        return [Loglikelihood(prefix + self.query, TARGET_DELIMITER + o) for o in self.options]


def argmax(values: Sequence[float]) -> int:
    """The index of the largest value, the first on ties."""
    return max(range(len(values)), key=lambda i: (values[i], -i))


def choice_scores(doc: Choice, results: Sequence[LoglikelihoodResult]) -> dict[str, float]:
    """acc and acc_norm of one question from its options' log-likelihoods (in option order).
    With `partial`, acc_norm equals acc: every option scores the same continuation."""
    if len(results) != len(doc.options):
        raise ValueError(f"{len(results)} results for {len(doc.options)} options")
    lls = [r.logprob for r in results]
    pick = argmax(lls)
    if doc.partial is not None:
        pick_norm = pick
    else:
        # lm-eval divides by len(choice); an empty option is counted as one character
        pick_norm = argmax([ll / max(1, len(o)) for ll, o in zip(lls, doc.options, strict=True)])
    return {"acc": float(pick == doc.gold), "acc_norm": float(pick_norm == doc.gold)}


class ChoiceTask(Task):
    """A multiple-choice benchmark over `Choice` documents.

    docs: the questions to evaluate, in a fixed order.
    fewshot: the pool examples are drawn from (a train or dev split); None: the evaluated
        questions themselves (never the one asked).
    description: the text before the examples, given the question (MMLU's subject line).
    metrics: the metrics reported, the headline first (a table shows the first).
    group_shots: draw a question's examples only from its own group (subject, exam).
    fewshot_order: "random" (seeded) or "first" (the pool's first examples, in order).
    """

    def __init__(
        self,
        name: str,
        docs: Sequence[Choice],
        num_fewshot: int = 0,
        fewshot: Sequence[Choice] | None = None,
        description: Callable[[Choice], str] | None = None,
        metrics: tuple[str, ...] = ("acc", "acc_norm"),
        group_shots: bool = False,
        fewshot_order: str = "random",
    ):
        self.name = name
        self.num_fewshot = num_fewshot
        self.metrics = metrics
        self.fewshot_order = fewshot_order
        self._docs = list(docs)
        self._shots = list(fewshot) if fewshot else None
        self._description = description
        self._group_shots = group_shots
        self._groups: dict[str, list[Choice]] = {}

    def shot_pool(self, doc: Doc) -> Sequence[Choice]:
        pool = self.fewshot_docs()
        if not self._group_shots:
            return pool
        assert isinstance(doc, Choice)
        if not self._groups:
            for d in pool:
                self._groups.setdefault(d.group, []).append(d)
        return self._groups.get(doc.group, [])

    def prefix(self, doc: Choice, shots: Sequence[Choice]) -> str:
        head = self._description(doc) if self._description else ""
        return head + "".join(s.example() + FEWSHOT_DELIMITER for s in shots)

    def requests(self, doc: Doc, shots: Sequence[Doc]) -> list[Loglikelihood]:
        assert isinstance(doc, Choice)
        return doc.option_requests(self.prefix(doc, shots))  # type: ignore[arg-type]

    def score(self, doc: Doc, results: Sequence[Result]) -> dict[str, float]:
        assert isinstance(doc, Choice)
        scores = choice_scores(doc, results)  # type: ignore[arg-type]
        return {m: scores[m] for m in self.metrics}
