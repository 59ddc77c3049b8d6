"""Sampling semantics (greedy, temperature, top-k, top-p, seeds) and stopping."""

from __future__ import annotations

import subprocess
import sys

import torch

import gemmakit
from gemmakit.generation import generate, sample_next, stream_generate


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
    corpus.write_text("\n".join(f"the {w} sat on the mat number {i}" for i, w in
                                enumerate(["cat", "dog", "bird"] * 50)))  # fmt: skip
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(tmp_path / "tok"), vocab_size=40,
        pad_id=0, eos_id=1, bos_id=2, unk_id=3,
    )  # fmt: skip
    model = gemmakit.load_model("tiny")
    gemmakit.checkpoint.save_hf(
        model, tmp_path / "m", extra_files={"tokenizer.model": tmp_path / "tok.model"}
    )
    out = subprocess.run(
        [sys.executable, "-m", "gemmakit.cli", "generate", "--checkpoint", str(tmp_path / "m"),
         "--max-new-tokens", "8", "the cat"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert out.stdout.startswith("the cat") and len(out.stdout.strip()) > len("the cat")
