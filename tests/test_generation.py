"""Sampling semantics (greedy, temperature, top-k, top-p, seeds) and stopping."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import gemmakit
from gemmakit.api import build_model
from gemmakit.config import get_config
from gemmakit.generation import Session, generate, sample_next, stream_generate
from gemmakit.model import KVCache


def test_greedy_is_argmax_and_temperature_zero():
    logits = torch.tensor([[0.1, 3.0, 2.9], [5.0, 0.0, 1.0]])
    assert sample_next(logits, 0.0).tolist() == [1, 0]
    assert sample_next(logits, None).tolist() == [1, 0]


def test_top_k_one_and_tiny_top_p_are_greedy():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    greedy = logits.argmax(-1)
    g = torch.Generator().manual_seed(1)
    assert torch.equal(sample_next(logits, 1.0, top_k=1, generator=g), greedy)
    assert torch.equal(sample_next(logits, 1.0, top_p=1e-6, generator=g), greedy)


def test_sampling_follows_the_filtered_distribution():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log()[None].expand(20_000, 4)
    g = torch.Generator().manual_seed(0)
    counts = torch.bincount(sample_next(logits, 1.0, generator=g), minlength=4) / 20_000
    assert torch.allclose(counts, probs, atol=0.015)
    # top-p 0.6: 0.5 alone is below 0.6, so the token that crosses it (0.3) stays -> 5/8, 3/8
    counts = torch.bincount(sample_next(logits, 1.0, top_p=0.6, generator=g), minlength=4) / 20_000
    assert torch.allclose(counts, torch.tensor([0.625, 0.375, 0, 0]), atol=0.015)
    # top-k 3 renormalises the three most likely
    counts = torch.bincount(sample_next(logits, 1.0, top_k=3, generator=g), minlength=4) / 20_000
    assert torch.allclose(counts, torch.tensor([0.5, 0.3, 0.15, 0]) / 0.95, atol=0.015)
    # a temperature of 0.5 squares the odds
    sq = probs**2 / (probs**2).sum()
    counts = torch.bincount(sample_next(logits, 0.5, generator=g), minlength=4) / 20_000
    assert torch.allclose(counts, sq, atol=0.015)


def test_seed_makes_sampling_repeatable():
    model = gemmakit.load_model("tiny")
    prompts = [[2, 10, 11], [2, 12]]
    a = generate(model, prompts, 10, temperature=1.0, top_p=0.9, seed=7, stop_tokens=[])
    b = generate(model, prompts, 10, temperature=1.0, top_p=0.9, seed=7, stop_tokens=[])
    c = generate(model, prompts, 10, temperature=1.0, top_p=0.9, seed=8, stop_tokens=[])
    assert a == b and a != c and all(len(x) == 10 for x in a)


def test_stops_at_eos_and_end_of_turn_per_prompt():
    model = gemmakit.load_model("tiny")
    with torch.no_grad():  # blocks add nothing, and row 107 dominates every dot product
        for block in model.blocks:
            block.attn.o_proj.weight.zero_()
            block.mlp.down_proj.weight.zero_()
        model.embedder.weight.abs_()
        model.embedder.weight[107] = 1.0
    prompts = [[2, 50], [2, 51]]
    out = generate(model, prompts, 5)
    assert out == [[], []]  # the stop token is not included
    steps = list(stream_generate(model, prompts, 5, stop_tokens=[]))
    assert len(steps) == 5 and all(s == [107, 107] for s in steps)


def test_cli_generate_streams_a_continuation(tmp_path):
    import sentencepiece as spm

    corpus = tmp_path / "c.txt"
    corpus.write_text(
        "\n".join(
            f"the {w} sat on the mat number {i}" for i, w in enumerate(["cat", "dog", "bird"] * 50)
        )
    )
    spm.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(tmp_path / "tok"),
        vocab_size=40,
        pad_id=0,
        eos_id=1,
        bos_id=2,
        unk_id=3,
    )
    model = gemmakit.load_model("tiny")
    gemmakit.checkpoint.save_hf(
        model, tmp_path / "m", extra_files={"tokenizer.model": tmp_path / "tok.model"}
    )
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "gemmakit.cli",
            "generate",
            "--checkpoint",
            str(tmp_path / "m"),
            "--max-new-tokens",
            "8",
            "the cat",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.startswith("the cat") and len(out.stdout.strip()) > len("the cat")


def varied_model():
    """Tiny random weights large enough that greedy answers depend on the whole context."""
    return build_model(get_config("tiny"), seed=0, init_std=0.2)


def test_generation_continues_a_padded_batch_in_its_cache():
    model = varied_model()
    a, b = [2, 10, 11, 12], [2, 13]
    cache = KVCache(model.config, 2, 0, model.dtype)
    first = generate(model, [a, b], 3, stop_tokens=[], cache=cache)
    assert cache.length == 4 + 2  # the prompts (b left-padded) and the two tokens fed back
    # New tokens of different lengths: padding now sits in the middle of each row's keys.
    more = [[first[0][-1], 20], [first[1][-1], 21, 22]]
    second = generate(model, more, 4, stop_tokens=[], cache=cache)
    fresh = generate(model, [a + first[0] + [20], b + first[1] + [21, 22]], 4, stop_tokens=[])
    assert second == fresh and first != [[], []]


def test_session_prefills_only_what_its_cache_lacks(monkeypatch):
    from gemmakit.model.fast_decode import FastDecoder

    model = varied_model()
    fed: list[int] = []  # tokens of each forward call (a fused decode step counts as one)
    real_forward, real_step = model.forward, FastDecoder.step

    def forward(tokens, **kwargs):
        fed.append(tokens.shape[1])
        return real_forward(tokens, **kwargs)

    def step(self, tokens, positions, cache, greedy=False):
        if model.forward is forward and self.embedder is model.embedder:  # not a self-test
            fed.append(1)
        return real_step(self, tokens, positions, cache, greedy)

    monkeypatch.setattr(FastDecoder, "step", step)
    model.forward = forward
    session = Session(model)

    def answer(prompt: list[int], n: int = 5) -> list[int]:
        fed.clear()
        out = [s[0] for s in session.stream(prompt, n, stop_tokens=[])]
        model.forward = real_forward  # the reference runs uncounted, with a fresh cache
        assert out == generate(model, [prompt], n, stop_tokens=[])[0]
        model.forward = forward
        return out

    p1 = [2, 10, 11, 12]
    out1 = answer(p1)
    assert fed == [4, 1, 1, 1, 1] and session.reused == 0
    assert session.ids == p1 + out1[:-1]  # the last token is yielded, never fed
    p2 = p1 + out1 + [20, 21]
    out2 = answer(p2)
    assert fed[0] == 3 and session.reused == len(p2) - 3  # out1[-1], 20, 21
    p3 = p2[:6] + [30, 31, 32]  # an edit in the middle: back to the common prefix
    answer(p3)
    assert fed[0] == 3 and session.reused == 6
    answer(p3)  # the same prompt again: its last token is prefilled again for its logits
    assert fed[0] == 1
    # A stream left after two tokens (as Ctrl-C leaves it), then the next prompt
    steps = session.stream(p2, 5, stop_tokens=[])
    t1, t2 = next(steps)[0], next(steps)[0]
    assert [t1, t2] == out2[:2] and session.ids == p2 + [t1]
    answer(p2 + [t1, t2, 40])
    assert fed[0] == 2
    with pytest.raises(StopIteration):
        next(steps)  # the new stream ended the old one
    session.reset()
    assert session.ids == [] and answer(p1) == out1 and fed[0] == 4
