"""The engine's continuous batching: requests that join and leave a running batch, with
chunked prefill and the prefix cache, answer exactly as each would alone."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from serving import tiny_model

from gemmakit.config import get_config
from gemmakit.generation import generate
from gemmakit.model import KVCache
from gemmakit.serving.batch import join, keep_rows
from gemmakit.serving.engine import Engine, Job, PrefixCache, QueueFull, SamplingParams


class Collect:
    """A job's events, and an Event set when it finishes."""

    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.finish: str | None = None
        self.done = threading.Event()

    def __call__(self, token, finish) -> None:
        if token is not None:
            self.tokens.append(token)
        if finish is not None:
            self.finish = finish
            self.done.set()


def run_jobs(engine, prompts, max_tokens, gaps=None, **params):
    """Submit one job per prompt (the i-th after gaps[i] s), wait for all; [(tokens, finish)]."""
    sinks = [Collect() for _ in prompts]
    jobs = [
        Job(list(p), SamplingParams(max_tokens=n, **params), s)
        for p, n, s in zip(prompts, max_tokens, sinks)
    ]
    for i, job in enumerate(jobs):
        if gaps:
            time.sleep(gaps[i])
        engine.submit([job])
    for s in sinks:
        assert s.done.wait(60), "a job never finished"
    return [(s.tokens, s.finish) for s in sinks], jobs


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def prompts_of(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [[2, *torch.randint(10, 4000, (n - 1,), generator=g).tolist()] for n in lengths]


def test_requests_joining_and_leaving_the_batch_answer_as_alone(model):
    engine = Engine(model, max_batch=4, prefill_chunk=16).start()
    try:
        lengths, budgets = [5, 40, 3, 70, 12, 9], [30, 6, 25, 12, 1, 18]
        prompts = prompts_of(lengths)
        # arrivals spread out: some join a running batch, some find rows freed by others
        results, _ = run_jobs(engine, prompts, budgets, gaps=[0, 0.0, 0.05, 0.1, 0, 0.2])
        for p, n, (tokens, finish) in zip(prompts, budgets, results):
            alone = generate(model, [p], n, stop_tokens=[])[0]
            assert tokens == alone and finish == "length"
        assert engine.most_rows > 1  # they did decode together
        assert engine.most_rows <= 4
    finally:
        engine.shutdown()


def test_decode_steps_take_the_fused_step_and_answer_as_the_eager_ones(model):
    # 10 rows at once (more than one GEMV call takes, 8; within the fused step's 16), queued
    # before the engine starts so that all are admitted together; prefilled 24 tokens per
    # step, they join the decoding batch one by one, several steps apart, and leave at
    # different steps
    lengths, budgets = [5, 33, 3, 60, 12, 9, 21, 2, 44, 7], [20, 14, 24, 12, 15, 18, 13, 22, 12, 16]
    prompts = prompts_of(lengths, seed=1)
    answers = {}
    for fast in (True, False):
        engine = Engine(model, max_batch=10, prefill_chunk=24, fast=fast)
        sinks = [Collect() for _ in prompts]
        engine.submit(
            [Job(p, SamplingParams(max_tokens=n), s) for p, n, s in zip(prompts, budgets, sinks)]
        )
        engine.start()
        try:
            assert all(s.done.wait(60) for s in sinks)
        finally:
            engine.shutdown()
        answers[fast] = [(s.tokens, s.finish) for s in sinks]
        assert engine.most_rows == 10
        assert engine.fused_steps == (engine.steps if fast else 0) and engine.steps > 0
    assert answers[True] == answers[False]
    assert [len(t) for t, _ in answers[True]] == budgets


def test_the_prefix_cache_prefills_only_what_is_new(model):
    engine = Engine(model, prefill_chunk=64).start()
    fed: list[int] = []
    real = model.forward

    def forward(tokens, **kwargs):
        fed.append(tokens.shape[1])
        return real(tokens, **kwargs)

    try:
        system = prompts_of([50])[0]
        a, b = system + [11, 12, 13], system + [14, 15]
        run_jobs(engine, [a], [3])
        model.forward = forward
        results, jobs = run_jobs(engine, [b], [5])
        assert jobs[0].reused == 50 and fed[0] == 2  # only the two new prompt tokens
        assert results[0][0] == generate(model, [b], 5, stop_tokens=[])[0]
    finally:
        model.forward = real
        engine.shutdown()


def test_a_finished_answer_is_kept_for_the_next_turn(model):
    engine = Engine(model).start()
    fed: list[int] = []
    real = model.forward

    def forward(tokens, **kwargs):
        fed.append(tokens.shape[1])
        return real(tokens, **kwargs)

    try:
        first = prompts_of([20])[0]
        (answer, _), *_ = run_jobs(engine, [first], [8])[0]
        follow = first + answer + [30, 31, 32]  # the conversation, re-sent with a new message
        model.forward = forward
        results, jobs = run_jobs(engine, [follow], [4])
        # all but the last answer token were fed back: 27 positions kept, 4 prefilled
        assert jobs[0].reused == 20 + 7 and fed[0] == 4
        assert results[0][0] == generate(model, [follow], 4, stop_tokens=[])[0]
    finally:
        model.forward = real
        engine.shutdown()


def test_stop_tokens_finish_with_stop_and_are_not_given(model):
    engine = Engine(model).start()
    try:
        p = prompts_of([6])[0]
        alone = generate(model, [p], 10, stop_tokens=[])[0]
        stop = alone[3]
        results, _ = run_jobs(engine, [p], [10], stop_ids=frozenset({stop}))
        tokens, finish = results[0]
        assert finish == "stop" and tokens == alone[: alone.index(stop)]
    finally:
        engine.shutdown()


def test_seeded_sampling_is_repeatable_and_matches_generate(model):
    engine = Engine(model).start()
    try:
        p = prompts_of([7])[0]
        params = dict(temperature=1.0, top_p=0.9, seed=5)
        (first, _), (second, _) = run_jobs(engine, [p, p], [12, 12], **params)[0]
        assert first == second == generate(model, [p], 12, stop_tokens=[], **params)[0]
    finally:
        engine.shutdown()


def test_cancelled_jobs_leave_and_the_queue_has_a_bound(model):
    engine = Engine(model, max_queue=2)
    sinks = [Collect() for _ in range(3)]
    jobs = [Job([2, 5, 6], SamplingParams(max_tokens=400), s) for s in sinks]
    engine.submit(jobs[:2])
    with pytest.raises(QueueFull):
        engine.submit(jobs[2:])
    engine.start()
    try:
        while engine.steps < 3:
            time.sleep(0.01)
        engine.cancel(jobs[0])
        engine.cancel(jobs[1])
        deadline = time.monotonic() + 10
        while engine.load()["running"] and time.monotonic() < deadline:
            time.sleep(0.01)
        assert engine.load() == {"waiting": 0, "running": 0}
        assert not sinks[0].done.is_set()  # a cancelled job is told nothing more
    finally:
        engine.shutdown()
    # after shutdown, queued jobs are told "abort"
    late = Engine(model)
    sink = Collect()
    late.submit([Job([2, 5], SamplingParams(max_tokens=3), sink)])
    late.start()
    late.shutdown()
    assert sink.finish in ("abort", "length")


def test_join_and_keep_rows_right_align_and_trim():
    cfg = get_config("tiny")
    rows = []
    for n in (3, 5):
        c = KVCache(cfg, 1, n, torch.float32)
        for t in c.k + c.v:
            t.normal_()
        c.length = n
        rows.append(c)
    batch = join(cfg, None, rows[0], spare=2)
    batch = join(cfg, batch, rows[1], spare=2)
    assert batch.length == 5 and batch.key_valid[:, :5].tolist() == [
        [False, False, True, True, True],
        [True] * 5,
    ]
    assert torch.equal(batch.k[0][0, :, 2:5], rows[0].k[0][0, :, :3])
    only_short = keep_rows(cfg, batch, [0])
    assert only_short.length == 3 and only_short.key_valid[0, :3].all()
    assert torch.equal(only_short.v[1][0, :, :3], rows[0].v[1][0, :, :3])


def test_prefix_cache_keeps_a_token_budget():
    cfg = get_config("tiny")
    cache = PrefixCache(budget=10)
    for ids in ([1, 2, 3, 4], [1, 2, 9], [5, 6, 7, 8]):
        cache.add(ids, KVCache(cfg, 1, len(ids), torch.float32))
    assert [ids for ids, _ in cache.entries] == [[1, 2, 9], [5, 6, 7, 8]]
    n, found = cache.lookup([1, 2, 9, 10])
    assert n == 3 and found is cache.entries[-1][1]
    assert cache.lookup([1, 2, 9])[0] == 2  # the last prompt token is always prefilled
