"""SFT: packed conversations are kept apart (the same losses and gradients as alone), the
JSONL formats and their errors, the seeded packed stream, and a tiny model taught a format."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from gemmakit.api import build_model
from gemmakit.config import get_config
from gemmakit.model.transformer import segment_positions

SMALL = dict(vocab_size=64, d_model=32, n_layers=3, n_heads=2, head_dim=16, ffn_dim=64)


def small_model(preset: str):
    cfg = get_config(preset).replace(**SMALL)
    if cfg.sliding_window:
        cfg = cfg.replace(sliding_window=5)  # shorter than the conversations: windows matter
    return build_model(cfg, dtype=torch.float32, seed=1)


def test_segment_positions_restart_in_each_segment():
    seg = torch.tensor([[1, 1, 1, 2, 2, 3, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1]])
    want = torch.tensor([[0, 1, 2, 0, 1, 0, 0, 1], [0, 1, 2, 3, 4, 5, 6, 7]])
    assert torch.equal(segment_positions(seg), want)


@pytest.mark.parametrize("preset", ["tiny", "tiny-gemma2", "tiny-gemma3"])
def test_packed_row_gives_each_conversations_losses_and_gradients(preset):
    """Three conversations packed in one row (then padding) give, per conversation, the
    per-token losses and the gradients it gives alone: nothing leaks through attention or
    positions, on global and sliding-window layers alike."""
    model = small_model(preset)
    gen = torch.Generator().manual_seed(0)
    lengths = [13, 9, 17]
    convs = [torch.randint(4, 64, (n,), generator=gen) for n in lengths]
    targets = [torch.randint(4, 64, (n,), generator=gen) for n in lengths]
    T = sum(lengths) + 6
    tokens = torch.zeros(1, T, dtype=torch.long)
    seg = torch.zeros(1, T, dtype=torch.long)
    at = 0
    for k, c in enumerate(convs, 1):
        tokens[0, at : at + len(c)] = c
        seg[0, at : at + len(c)] = k
        at += len(c)

    def grads(loss):
        model.zero_grad()
        loss.backward(retain_graph=True)
        return [p.grad.clone() for p in model.parameters()]

    packed = model(tokens, segment_ids=seg)[0]  # [T, V]
    at = 0
    for c, t in zip(convs, targets):
        n = len(c)
        alone_logits = model(c[None])[0]
        alone = F.cross_entropy(alone_logits, t, reduction="none")
        inside = F.cross_entropy(packed[at : at + n], t, reduction="none")
        torch.testing.assert_close(inside, alone, rtol=1e-5, atol=1e-5)
        for a, b in zip(grads(inside.sum()), grads(alone.sum())):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
        at += n
    # Without the segments the later conversations do see the earlier ones.
    leaky = model(tokens)[0]
    assert not torch.allclose(leaky[13:22], packed[13:22], atol=1e-3)
