"""Memorization scoring: edit distance and the exact/approximate thresholds."""

from __future__ import annotations

import torch

import gemmakit
from gemmakit.evaluation.memorization import edit_distance, memorization


def test_edit_distance_by_hand():
    assert edit_distance([1, 2, 3], [1, 2, 3]) == 0
    assert edit_distance([1, 2, 3], [1, 3]) == 1
    assert edit_distance([1, 2, 3], [4, 2, 3, 5]) == 2
    assert edit_distance([], [7, 8]) == 2


def test_memorized_and_unmemorized_documents():
    """A model that always predicts token 9: a document of all 9s is memorized exactly, one
    with 5 changed tokens in its continuation approximately (10% of 50), one with 6 not at all."""
    model = gemmakit.load_model("tiny")
    with torch.no_grad():
        for block in model.blocks:
            block.attn.o_proj.weight.zero_()
            block.mlp.down_proj.weight.zero_()
        model.embedder.weight.abs_()
        model.embedder.weight[9] = 1.0
    base = [9] * 100
    five = base[:50] + [10] * 5 + [9] * 45
    six = base[:50] + [10] * 6 + [9] * 44
    short = [9] * 99  # too short to test
    result = memorization(model, [base, five, six, short])
    assert (result.documents, result.exact, result.approximate) == (3, 1, 2)
    assert abs(result.approximate_rate - 2 / 3) < 1e-9
