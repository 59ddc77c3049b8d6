"""ModelRunner: shared-context log-likelihoods equal scoring each request in full and a plain
forward + log_softmax; lm-eval's tokenization split; truncation; rolling windows; batched
generation with stop sequences, n answers and seeded sampling; the chat wrapping."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from helpers import multilingual_texts

from gemmakit.api import build_model
from gemmakit.chat import encode_chat
from gemmakit.config import get_config
from gemmakit.evaluation.requests import Generate, Loglikelihood, Rolling
from gemmakit.evaluation.runner import ModelRunner, TokenRequest, cut_at_stop, rolling_windows
from gemmakit.generation import generate
from gemmakit.tokenizer import train_tokenizer


@pytest.fixture(autouse=True)
def _one_thread():
    # tiny models: one thread is as fast, and far faster on a machine shared with other jobs
    # (conftest restores the thread count after each test)
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tok"
    return train_tokenizer(multilingual_texts(1500), vocab_size=1000, output=path)


def model_of(preset: str, vocab: int = 1000):
    # the tokenizer's vocabulary (generated ids decode); larger weights than the default init:
    # peaked distributions, so argmax checks mean something
    config = dataclasses.replace(get_config(preset), vocab_size=vocab)
    return build_model(config, seed=0, init_std=0.08)


CONTEXTS = [
    "the quick brown fox jumps over a lazy dog while models learn from data and the dog",
    "models learn ",  # trailing whitespace: moves to the continuation
    "привет мир модель данные обучение слово, the quick brown fox",
]
ENDINGS = [" jumps", " sleeps over a lazy dog", "data", " fox fox fox", "x"]
REQUESTS = [Loglikelihood(c, e) for c in CONTEXTS for e in ENDINGS] + [
    Loglikelihood("", "the quick brown fox")
]


def reference(model, ids_ctx, ids_cont) -> tuple[float, bool]:
    """log p(cont | ctx) from one plain forward over ctx + cont and log_softmax."""
    ids = torch.tensor([list(ids_ctx) + list(ids_cont)])
    with torch.no_grad():
        logp = model(ids)[0].float().log_softmax(-1)
    n = len(ids_ctx)
    total, greedy = 0.0, True
    for j, t in enumerate(ids_cont):
        total += float(logp[n - 1 + j, t])
        greedy &= int(logp[n - 1 + j].argmax()) == t
    return total, greedy


@pytest.mark.parametrize("preset", ["tiny-gemma3", "tiny-gemma2"])
def test_shared_context_scores_equal_full_scoring_and_plain_forward(tok, preset):
    model = model_of(preset)
    shared = ModelRunner(model, tok, batch_size=8).loglikelihood(REQUESTS)
    alone = ModelRunner(model, tok, batch_size=1).loglikelihood(REQUESTS)
    runner = ModelRunner(model, tok)
    for req, a, b in zip(REQUESTS, shared, alone):
        split = runner.split(req)
        want, want_greedy = reference(model, split.context, split.continuation)
        assert a.logprob == pytest.approx(want, abs=1e-4)
        assert b.logprob == pytest.approx(want, abs=1e-4)
        assert a.greedy == b.greedy == want_greedy
        assert a.tokens == len(split.continuation) > 0
    # the greedy flag: true for the model's own greedy continuation, false for another
    ctx = runner.split(REQUESTS[0]).context
    [own] = generate(model, [list(ctx)], 4, stop_tokens=[])
    other = [own[0], own[1], (own[2] + 1) % 50 + 10, own[3]]
    mine, theirs = runner.score_tokens(
        [TokenRequest(ctx, tuple(own)), TokenRequest(ctx, tuple(other))]
    )
    assert mine.greedy and not theirs.greedy
    assert mine.logprob == pytest.approx(reference(model, ctx, own)[0], abs=1e-4)


def test_split_follows_lm_eval(tok):
    runner = ModelRunner(model_of("tiny"), tok)
    bos = runner.tokens.bos
    s = runner.split(Loglikelihood("models learn ", "data"))
    # the context's trailing space joins the continuation; both encoded whole
    assert list(s.context) == [bos, *tok.encode("models learn", bos=False)]
    whole = tok.encode("models learn data", bos=False)
    assert list(s.context + s.continuation) == [bos, *whole]
    # an empty continuation has log-probability 0, next to others in the same batch
    empty, other = runner.loglikelihood(
        [Loglikelihood("the fox", ""), Loglikelihood("the fox", " ran")]
    )
    assert (empty.logprob, empty.greedy, empty.tokens) == (0.0, True, 0)
    assert other.tokens > 0 and other.logprob < 0
    # special names are plain text
    s = runner.split(Loglikelihood("a <eos>", " b"))
    assert tok.eos_id not in s.context


def test_left_truncation_keeps_the_last_tokens(tok):
    model = model_of("tiny-gemma3")
    long = Loglikelihood(CONTEXTS[0] * 3, " the lazy dog")
    runner = ModelRunner(model, tok, max_length=24)
    full = ModelRunner(model, tok).split(long)
    cut = runner.split(long)
    ids = full.context + full.continuation
    assert cut.context + cut.continuation == ids[-25:]
    assert cut.continuation == full.continuation
    [res] = runner.loglikelihood([long])
    assert res.logprob == pytest.approx(
        reference(model, cut.context, cut.continuation)[0], abs=1e-4
    )


def test_rolling_is_the_whole_text_and_windows_cover_each_token_once(tok):
    model = model_of("tiny-gemma3")
    text = CONTEXTS[0]
    runner = ModelRunner(model, tok)
    [whole] = runner.loglikelihood_rolling([Rolling(text)])
    ids = tok.encode(text, bos=False)
    assert whole == pytest.approx(reference(model, [runner.tokens.bos], ids)[0], abs=1e-4)

    windows = rolling_windows(list(range(10, 60)), prefix=2, max_length=16)
    assert [t for _, cont in windows for t in cont] == list(range(10, 60))
    assert windows[0] == ([2], list(range(10, 26)))
    for ctx, cont in windows[1:]:
        assert len(ctx) + len(cont) - 1 == 16  # each later window sees a full context
        assert ctx[-1] + 1 == cont[0]
    short = ModelRunner(model, tok, max_length=16)
    [windowed] = short.loglikelihood_rolling([Rolling(text)])
    expect = sum(
        reference(model, ctx, cont)[0] for ctx, cont in rolling_windows(ids, runner.tokens.bos, 16)
    )
    assert windowed == pytest.approx(expect, abs=1e-4)
    assert len(ids) > 16 and windowed != pytest.approx(whole, abs=1e-3)


def test_generate_batched_greedy_equals_one_by_one_and_cuts_stops(tok):
    model = model_of("tiny-gemma3")
    calls = []
    runner = ModelRunner(model, tok, batch_size=4, progress=lambda *a: calls.append(a))
    prompts = [CONTEXTS[0], "the", CONTEXTS[2], "data", "fox jumps"]
    reqs = [Generate(p, max_new_tokens=6 + i) for i, p in enumerate(prompts)]
    got = runner.generate(reqs)
    # at the start, then after each batch of 4
    assert calls == [("generate", 0, 5), ("generate", 4, 5), ("generate", 5, 5)]
    for r, out in zip(reqs, got):
        ids = [runner.tokens.bos, *tok.encode(r.prompt, bos=False)]
        [alone] = generate(model, [ids], r.max_new_tokens)
        assert out == [tok.decode(alone)]
    # a stop sequence taken from the greedy text itself cuts the answer before it
    text = got[0][0]
    assert len(text) > 3
    stop = text[2:4]
    [[cut]] = runner.generate([Generate(prompts[0], max_new_tokens=6, stop=(stop, "zzz"), n=1)])
    assert cut == text[: text.find(stop)]
    [three] = runner.generate([Generate(prompts[0], max_new_tokens=6, n=3)])
    assert three == [text] * 3


def test_sampling_is_seeded_and_independent_of_other_requests(tok):
    model = model_of("tiny-gemma3")
    runner = ModelRunner(model, tok, batch_size=3)
    r = Generate("the quick", max_new_tokens=5, temperature=1.0, n=4, seed=7)
    [a] = runner.generate([r])
    _, b = runner.generate([Generate("data", max_new_tokens=3), r])
    assert a == b and len(a) == 4
    assert len(set(a)) > 1  # samples differ
    [c] = runner.generate([Generate("the quick", max_new_tokens=5, temperature=1.0, n=4, seed=8)])
    assert c != a


def test_chat_wraps_the_prompt_as_a_user_turn(tok):
    model = model_of("tiny-gemma3")
    runner = ModelRunner(model, tok, chat=True)
    want = encode_chat(tok, [{"role": "user", "content": "Hi there"}], True, model.config.tokens)
    assert runner.prompt_ids("Hi there") == want.ids
    s = runner.split(Loglikelihood("Hi there ", " Hello"))
    assert list(s.context) == want.ids
    assert list(s.continuation) == tok.encode("Hello", bos=False)


def test_cut_at_stop_takes_the_earliest():
    assert cut_at_stop("a. b\n\nc", ["\n\n", "."]) == "a"
    assert cut_at_stop("abc", []) == "abc"


@pytest.mark.parametrize("preset", ["tiny-gemma3", "tiny-gemma2"])  # Gemma 2: the final soft-cap
def test_token_logprobs_tiled_head_equals_float64_log_softmax(preset, monkeypatch):
    """The head in vocabulary tiles (the C statistics kernel where it builds) gives each
    target's log-probability and argmax flag as a float64 log_softmax of the full logits."""
    from gemmakit.kernels import train_ops
    from gemmakit.model import head
    from gemmakit.model.attention import soft_cap

    model = model_of(preset, vocab=5003)  # tiles of 2048 and a ragged last one
    monkeypatch.setattr(head, "TILE", 2048)
    calls = []
    stats = train_ops.softmax_stats
    monkeypatch.setattr(train_ops, "softmax_stats", lambda *a: calls.append(1) or stats(*a))
    gen = torch.Generator().manual_seed(0)
    hidden = model.final_norm(torch.randn(37, model.config.d_model, generator=gen) * 4)
    w = model.embedder.weight.detach().double()
    z = hidden.detach().double() @ w.T
    if model.config.final_logit_softcap is not None:
        z = soft_cap(z, model.config.final_logit_softcap)
    targets = torch.randint(0, 5003, (37,), generator=gen)
    targets[:10] = z[:10].argmax(-1)  # some targets are the argmax, in a tile of their own
    want = z.log_softmax(-1).gather(-1, targets[:, None])[:, 0]
    got, hit = head.token_logprobs(model, hidden.detach(), targets)
    assert torch.allclose(got.double(), want, atol=2e-5, rtol=0)
    assert hit.tolist() == (z.argmax(-1) == targets).tolist()
    assert hit[:10].all() and not hit[10:].all()
    assert len(calls) == (3 if train_ops.library() is not None else 0)  # the kernel ran
    for bad in (5003, -1):  # past the vocabulary, negative
        with pytest.raises(ValueError, match="outside the vocabulary"):
            head.token_logprobs(model, hidden[:1].detach(), torch.tensor([bad]))
    lp, hit = head.token_logprobs(model, hidden[:0].detach(), targets[:0])  # nothing to score
    assert lp.shape == hit.shape == (0,)
