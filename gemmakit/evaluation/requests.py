"""What a benchmark asks of a language model, and what it gets back.

Three kinds of request, the same three lm-evaluation-harness uses, so one model runner serves
gemmakit's own tasks and lm-eval's:
- `Loglikelihood`: log p(continuation | context), for multiple choice;
- `Rolling`: the log-likelihood of a whole text, for perplexity;
- `Generate`: sampled or greedy text up to a stop sequence, for generation tasks.

A runner takes a list of one kind at once (`LanguageModel`), so it can sort by length, batch,
and share a context's KV cache between the continuations that follow it. BOS is always
prepended by the runner, never by the task.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class Loglikelihood:
    """log p(continuation | context). The text is split as lm-eval splits it: trailing
    whitespace of the context moves to the continuation, the context+continuation text is
    tokenized whole, and the continuation is the tokens after the context's."""

    context: str
    continuation: str


@dataclass(frozen=True)
class LoglikelihoodResult:
    logprob: float  # summed over the continuation's tokens
    greedy: bool  # every continuation token is the model's argmax
    tokens: int  # the continuation's length in tokens


@dataclass(frozen=True)
class Rolling:
    """The log-likelihood of all of `text` (BOS then every token of it), in windows of the
    model's context when longer."""

    text: str


@dataclass(frozen=True)
class Generate:
    """`n` answers to `prompt`, each cut before the first of `stop`; greedy when
    temperature == 0. `seed` makes sampled answers reproducible."""

    prompt: str
    max_new_tokens: int = 256
    stop: tuple[str, ...] = ()
    temperature: float = 0.0
    top_p: float = 1.0
    n: int = 1
    seed: int = 0


Request = Loglikelihood | Rolling | Generate


class LanguageModel(Protocol):
    """What the task framework needs from a model. `gemmakit.evaluation.runner.ModelRunner`
    is the implementation over gemmakit models; tests may pass any object with these three
    methods. Each returns one result per request, in the requests' order."""

    def loglikelihood(self, requests: Sequence[Loglikelihood]) -> list[LoglikelihoodResult]: ...

    def loglikelihood_rolling(self, requests: Sequence[Rolling]) -> list[float]: ...

    def generate(self, requests: Sequence[Generate]) -> list[list[str]]: ...
