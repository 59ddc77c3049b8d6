"""The coarse greedy head (gemmakit/model/coarse_head.py): an int8 copy of a plain head whose
logits' argmax, once the entries that could be the maximum are recomputed, is the exact one;
near ties the copy alone gets wrong are got right, and greedy decoding through it gives the
tokens of the exact step."""

from __future__ import annotations

import pytest
import torch

from gemmakit.kernels import quant_gemv
from gemmakit.model import KVCache, fast_decode
from gemmakit.model.coarse_head import CoarseHead
from gemmakit.model.fast_decode import fast_decoder
from gemmakit.quant.formats import quantize_int8

pytestmark = pytest.mark.skipif(
    fast_decode.library() is None or quant_gemv.library() is None,
    reason="the fused decode step or the quantized GEMV kernel is not built here",
)
DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])


@DTYPES
def test_int8_copy_is_quantize_int8_with_upper_bounds(dtype):
    gen = torch.Generator().manual_seed(0)
    table = (torch.randn(300, 96, generator=gen) * torch.rand(300, 1, generator=gen)).to(dtype)
    table[7] = 0  # a zero row: scale 1, as quantize_int8 sets it
    head = CoarseHead(table, quant_gemv.library())
    q, s = quantize_int8(table.float())
    assert torch.equal(head.weight.qdata, q) and torch.equal(head.weight.scale, s)
    deq = q.view(torch.int8).float() * s[:, None]
    l1, d2 = deq.abs().sum(-1), (table.float() - deq).norm(dim=-1)
    for got, want in ((head.l1, l1), (head.d2, d2)):
        assert (got >= want).all() and (got <= want * 1.002 + 1e-30).all()
    assert head.d2[7] == 0 and s[7] == 1


def near_ties(gen: torch.Generator, dtype: torch.dtype, rows: int = 4096, k: int = 256):
    """A table whose rows come in pairs (2i, 2i + 1) a hair apart, and x with the pairs' exact
    logits a few units apart from other pairs: within a pair, the exact difference is far below
    the int8 copy's error, so its argmax alone is often the pair's wrong row."""
    base = torch.randn(rows // 2, k, generator=gen) * 0.05
    hair = torch.randn(rows // 2, k, generator=gen) * 1e-5
    table = torch.stack([base, base + hair], 1).reshape(rows, k).to(dtype)
    x = torch.randn(3, k, generator=gen)
    return table, x


@DTYPES
def test_rescored_argmax_is_the_exact_one_where_the_copy_alone_is_not(dtype):
    lib = quant_gemv.library()
    gen = torch.Generator().manual_seed(1)
    wrong, trials = 0, 12
    for trial in range(trials):
        table, x = near_ties(gen, dtype)
        head = CoarseHead(table, lib)
        exact = (x.double() @ table.double().T).float()
        softcap = 30.0 if trial % 2 else None
        y = head.weight.linear(x.to(dtype)).float()  # the int8 kernel's logits
        if softcap:
            y = torch.tanh(y / softcap) * softcap
            exact = torch.tanh(exact / softcap) * softcap
        wrong += int((y.argmax(-1) != exact.argmax(-1)).any())
        coarse = y.clone()
        head.rescore(x, y, softcap)
        assert torch.equal(y.argmax(-1), exact.argmax(-1)), (dtype, trial)
        top = exact.argmax(-1, keepdim=True)
        assert torch.allclose(y.gather(-1, top), exact.gather(-1, top), rtol=1e-6, atol=1e-6)
        # the copy's logits are within the stated bound of the exact ones, and only entries
        # that could be the maximum were changed
        amax = x.abs().amax(-1, keepdim=True)
        a = x.reshape(3, -1, 32).abs().amax(-1).amax(-1, keepdim=True) / 32767 / 2 + 1e-5 * amax
        e = (a + 1e-6) * head.l1 + x.norm(dim=-1, keepdim=True) * head.d2
        assert ((coarse - exact).abs() <= e).all()
        changed = y != coarse
        assert (
            changed.sum() < 0.05 * y.numel()
            and (coarse + e >= (coarse - e).amax(-1, keepdim=True))[changed].all()
        )
    assert wrong > 0, "the near ties never fooled the copy: the test checks nothing"


@pytest.mark.parametrize("preset", ["tiny", "tiny-gemma2"])  # Gemma 2: a final soft cap
@DTYPES
def test_greedy_steps_pick_the_exact_steps_tokens(preset, dtype):
    """The fused step with greedy=True (the int8 copy, rescored) against greedy=False (the
    plain head), step by step from the same cache contents, batch 2: the same argmax each
    step, the same value there."""
    from test_fast_decode import PROMPTS, model_for

    model = model_for(preset, dtype)
    with torch.no_grad():
        caches = [KVCache(model.config, 2, 40, model.dtype) for _ in range(2)]
        dec = fast_decoder(model, caches[0])
        assert dec is not None
        tokens = torch.tensor([PROMPTS[0][:2], PROMPTS[1][:2]])
        pos = torch.arange(2)[None].expand(2, 2)
        for c in caches:
            model(tokens, positions=pos, cache=c, last_only=True)
        nxt, pos = torch.tensor([5, 9]), torch.tensor([[2], [2]])
        for _ in range(20):
            exact = dec.step(nxt, pos, caches[0], greedy=False)
            greedy = dec.step(nxt, pos, caches[1], greedy=True)
            top = exact.argmax(-1)
            assert torch.equal(greedy.argmax(-1), top)
            assert torch.allclose(greedy.gather(-1, top[:, None]), exact.gather(-1, top[:, None]))
            nxt, pos = top, pos + 1
    assert dec._coarse is not None  # the copy was made and used
    assert dec.record.embed != __import__("ctypes").addressof(dec._coarse[1])  # restored


def test_only_greedy_decoding_uses_it_and_the_switch_turns_it_off(monkeypatch):
    """generate() asks for the copy only when greedy (sampling needs every logit exact), and
    GEMMAKIT_NO_COARSE_HEAD=1 keeps greedy steps on the plain head without making a copy."""
    from test_fast_decode import PROMPTS, model_for

    from gemmakit.generation import generate
    from gemmakit.model.fast_decode import FastDecoder

    model = model_for("tiny", torch.float32)
    asked, real_step = [], FastDecoder.step

    def step(self, tokens, positions, cache, greedy=False):
        asked.append(greedy)
        return real_step(self, tokens, positions, cache, greedy)

    monkeypatch.setattr(FastDecoder, "step", step)
    monkeypatch.setenv("GEMMAKIT_NO_COARSE_HEAD", "1")
    generate(model, [PROMPTS[0]], 4, stop_tokens=[])
    plan = fast_decode._plans[model]
    assert asked == [True] * 3 and plan._coarse is None
    generate(model, [PROMPTS[0]], 4, stop_tokens=[], temperature=0.8, seed=1)
    assert asked[3:] == [False] * 3 and plan._coarse is None
    monkeypatch.setenv("GEMMAKIT_NO_COARSE_HEAD", "0")
    with_copy = generate(model, [PROMPTS[0]], 6, stop_tokens=[])
    assert plan._coarse is not None
    monkeypatch.setenv("GEMMAKIT_NO_COARSE_HEAD", "1")
    assert generate(model, [PROMPTS[0]], 6, stop_tokens=[]) == with_copy


def test_a_head_changed_in_place_gets_a_new_copy():
    """An optimizer step (in place: the plan and its pointers still apply) between two greedy
    generations: the second uses a copy of the new weights, so its tokens are the plain
    head's, not those of the stale copy."""
    from test_fast_decode import PROMPTS, model_for

    from gemmakit.generation import generate

    model = model_for("tiny", torch.float32)
    generate(model, [PROMPTS[0]], 4, stop_tokens=[])
    plan = fast_decode._plans[model]
    first = plan._coarse[0]
    table = model.embedder.weight
    with torch.no_grad():  # as an optimizer step does: in place, the same storage
        table.mul_(-1.5)
    got = generate(model, [PROMPTS[0]], 8, stop_tokens=[])
    assert fast_decode._plans[model] is plan and plan._coarse[0] is not first
    assert torch.equal(plan._coarse[0].weight.qdata, quantize_int8(table.detach())[0])
    assert got == generate(model, [PROMPTS[0]], 8, stop_tokens=[], fast=False)


@pytest.mark.parametrize(
    "table, says",
    [
        (torch.zeros(0, 64), "at least one row and column, not [0, 64]"),
        (torch.zeros(8, 0), "at least one row and column, not [8, 0]"),
        (torch.zeros(64), "a 2-D float32 or bfloat16 table, not torch.float32 [64]"),
        (torch.zeros(4, 64, dtype=torch.float16), "not torch.float16 [4, 64]"),
        (torch.zeros(2, 4, 64), "not torch.float32 [2, 4, 64]"),
    ],
)
def test_a_bad_table_is_refused_in_one_line(table, says):
    with pytest.raises(ValueError, match="int8_copy takes") as e:
        CoarseHead(table, quant_gemv.library())
    assert says in str(e.value) and "\n" not in str(e.value)


def test_rescoring_refuses_operands_that_do_not_fit_the_table():
    """The C rescoring trusts its sizes, so x, y and the bounds are checked against the table
    first: each mismatch is named in one line and y is left as it was."""
    head = CoarseHead(torch.randn(50, 64), quant_gemv.library())
    x, y = torch.randn(2, 64), torch.randn(2, 50)
    before = y.clone()
    bad = {
        "x": (torch.randn(2, 32), y, head.l1, head.d2),
        "y": (x, torch.randn(3, 50), head.l1, head.d2),
        "l1": (x, y, head.l1[:10], head.d2),
        "d2": (x, y, head.l1, head.d2.double()),
    }
    for name, (xb, yb, l1, d2) in bad.items():
        with pytest.raises(ValueError, match=f"plain_exact_top: {name} must be contiguous"):
            quant_gemv.plain_exact_top(head.lib, head.table, xb, yb, l1, d2, None)
    with pytest.raises(ValueError, match="y must be contiguous float32"):
        quant_gemv.plain_exact_top(
            head.lib, head.table, x, y.t().contiguous().t(), *[head.l1, head.d2], None
        )
    assert torch.equal(y, before)
