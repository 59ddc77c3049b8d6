"""The task framework: few-shot draws, request dispatch, aggregation and standard errors."""

import math

import pytest

from gemmakit.evaluation.metrics import mean_stderr, pass_at_k
from gemmakit.evaluation.requests import Generate, Loglikelihood, LoglikelihoodResult
from gemmakit.evaluation.task import Task, draw_shots, evaluate


class Pick(Task):
    """Two-way choice: the answer is the option whose text the fake model likes best."""

    name = "pick"
    num_fewshot = 2
    metrics = ("acc",)

    def __init__(self, rows):
        self.rows = rows

    def docs(self):
        return self.rows

    def requests(self, doc, shots):
        prefix = "".join(f"{s['q']} {s['options'][s['gold']]}\n" for s in shots)
        return [Loglikelihood(prefix + doc["q"], " " + o) for o in doc["options"]]

    def score(self, doc, results):
        best = max(range(len(results)), key=lambda i: results[i].logprob)
        return {"acc": float(best == doc["gold"])}


class FakeLM:
    def __init__(self):
        self.calls = []

    def loglikelihood(self, requests):
        self.calls.append(("ll", len(requests)))
        return [LoglikelihoodResult(-len(r.continuation), True, 1) for r in requests]

    def loglikelihood_rolling(self, requests):
        raise AssertionError("not asked")

    def generate(self, requests):
        self.calls.append(("gen", len(requests)))
        return [[r.prompt.upper()] * r.n for r in requests]


ROWS = [
    {"q": "q0", "options": ["a", "bb"], "gold": 0},
    {"q": "q1", "options": ["ccc", "d"], "gold": 1},
    {"q": "q2", "options": ["e", "ff"], "gold": 1},
    {"q": "q3", "options": ["g", "hh"], "gold": 0},
]


def test_evaluate_scores_every_doc_in_one_call_and_aggregates_with_stderr():
    lm = FakeLM()
    result = evaluate(Pick(ROWS), lm)
    assert lm.calls == [("ll", 8)]  # all requests of all docs at once
    # The fake picks the shorter option: right on docs 0, 1, 3, wrong on 2.
    assert [s["scores"]["acc"] for s in result.samples] == [1.0, 1.0, 0.0, 1.0]
    value, stderr = result.metrics["acc"]
    assert value == 0.75
    assert stderr == pytest.approx(math.sqrt(0.25 / 4))  # sample var 0.25, n = 4
    assert evaluate(Pick(ROWS), FakeLM(), limit=2).metrics["acc"] == (1.0, 0.0)


def test_shots_are_seeded_per_document_and_never_the_document_itself():
    task = Pick(ROWS)
    for i, doc in enumerate(ROWS):
        shots = draw_shots(task, i, doc, seed=7)
        assert len(shots) == 2 and doc not in shots
        assert shots == draw_shots(task, i, doc, seed=7)
    draws = {tuple(d["q"] for d in draw_shots(task, 0, ROWS[0], s)) for s in range(20)}
    assert len(draws) > 1  # the seed matters


def test_generate_requests_are_dispatched_to_generate():
    class Echo(Pick):
        num_fewshot = 0
        metrics = ("em",)

        def requests(self, doc, shots):
            return [Generate(doc["q"], n=2)]

        def score(self, doc, results):
            return {"em": float(results[0] == [doc["q"].upper()] * 2)}

    lm = FakeLM()
    assert evaluate(Echo(ROWS), lm).metrics["em"] == (1.0, 0.0)
    assert lm.calls == [("gen", 4)]


def test_mean_stderr_and_pass_at_k_by_hand():
    assert mean_stderr([1.0, 0.0]) == (0.5, pytest.approx(0.5))
    with pytest.raises(ValueError):
        mean_stderr([])
    # n=5, c=2, k=1: 2/5. k=2: 1 - C(3,2)/C(5,2) = 1 - 3/10.
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4)
    assert pass_at_k(5, 2, 2) == pytest.approx(0.7)
    assert pass_at_k(5, 4, 2) == 1.0 and pass_at_k(5, 0, 3) == 0.0
    with pytest.raises(ValueError):
        pass_at_k(3, 4, 1)
