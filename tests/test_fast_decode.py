"""The fused decode step (one C call per token) against the eager decode step it replaces:
same greedy ids, logits within a stated bound, batch 1 and left-padded batches, sliding
windows overflowed, caches regrown between calls, and the cases that must fall back."""

from __future__ import annotations

import pytest
import torch
from helpers import step_logits

from gemmakit.api import build_model
from gemmakit.config import get_config
from gemmakit.generation import Session, generate
from gemmakit.model import KVCache, fast_decode
from gemmakit.model.fast_decode import fast_decoder, unsupported
from gemmakit.model.transformer import init_weights

pytestmark = pytest.mark.skipif(
    fast_decode.library() is None, reason="the fused decode step kernel is not built here"
)

# Logit bounds, fused vs eager, in units of the logits' largest magnitude: float32 differs
# only by summation order; the eager bfloat16 path rounds activations after every op, the fused
# one keeps them in float32.
BOUND = {torch.float32: 1e-4, torch.bfloat16: 5e-2}
PRESETS = ["tiny", "tiny-gemma2", "tiny-gemma3"]  # Gemma 1 MQA; 2: GQA + softcaps; 3: qk-norm
PROMPTS = [[2, 17, 301, 4000, 5, 9], [2, 44], [2, 7, 7, 8, 9, 10, 11, 12, 13, 14]]


def model_for(preset: str, dtype: torch.dtype):
    model = init_weights(build_model(get_config(preset)), std=0.1, seed=3).to(dtype).eval()
    return model


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("batch", [1, 3])
def test_fused_step_logits_match_eager(preset, dtype, batch):
    model = model_for(preset, dtype)
    prompts = PROMPTS[:batch]
    # 12 steps after a 10-token prompt overflow the tiny presets' 16-token sliding window
    eager = step_logits(model, prompts, 12, fast=False)
    fused = step_logits(model, prompts, 12, fast=True)
    for e, f in zip(eager, fused):
        assert f.shape == e.shape and f.dtype == torch.float32
        err = (f - e).abs().max() / e.abs().max()
        assert err < BOUND[dtype], f"{preset} {dtype} batch {batch}: relative error {err}"


def test_more_rows_than_one_gemv_takes():
    """12 rows (the GEMV kernels take 8 at a time, the step up to 16), all left-padded to
    the longest of different lengths: each row as the eager path computes it."""
    model = model_for("tiny-gemma3", torch.float32)
    prompts = [PROMPTS[i % 3][: 2 + i % 9] for i in range(12)]
    eager = step_logits(model, prompts, 4, fast=False)
    fused = step_logits(model, prompts, 4, fast=True)
    for e, f in zip(eager, fused):
        assert f.shape == (12, e.shape[1])
        assert ((f - e).abs().amax(-1) / e.abs().amax(-1)).max() < BOUND[torch.float32]


@pytest.mark.parametrize("preset", PRESETS)
def test_fused_greedy_ids_equal_eager(preset):
    for dtype in (torch.float32, torch.bfloat16):
        model = model_for(preset, dtype)
        # batch 3, left-padded (batch 1 is in the logits test above)
        eager = generate(model, PROMPTS, 16, stop_tokens=[], fast=False)
        fused = generate(model, PROMPTS, 16, stop_tokens=[], fast=True)
        if dtype == torch.float32:
            assert fused == eager
        else:  # the first 8 always; bf16 rounding may flip a near-tie later on
            assert [f[:8] for f in fused] == [e[:8] for e in eager]


def test_session_regrows_the_cache_between_turns():
    """Session.reserve replaces the cache buffers: the fused step must follow them."""
    model = model_for("tiny-gemma3", torch.float32)
    turns = [[2, 5, 6, 7], [8, 9], [10, 11, 12]]
    outs = []
    for fast in (False, True):
        session, prompt, answers = Session(model), [], []
        for turn in turns:
            prompt = prompt + turn
            steps = session.stream(prompt, 12, stop_tokens=[])
            if not fast:
                steps = _eager(session, prompt)
            answers.append([s[0] for s in steps])
            prompt = prompt + answers[-1]
        outs.append(answers)
    assert outs[0] == outs[1]


def _eager(session: Session, prompt):
    """Session.stream with the fused step switched off (same cache handling)."""
    from gemmakit import generation

    session._close()
    keep = min(generation.common_prefix(session.ids, prompt), len(prompt) - 1)
    session.cache.truncate(keep)
    session._fed = list(prompt)
    session.cache.reserve(max(len(prompt) + 12, 2 * session.cache.max_len))
    steps = generation.stream_generate(
        session.model, [prompt[keep:]], 12, stop_tokens=[], cache=session.cache, fast=False
    )
    return session._record(steps)


def test_plan_is_rebuilt_when_the_weights_move():
    model = model_for("tiny", torch.float32)
    with torch.inference_mode():
        first = fast_decoder(model)
        assert fast_decoder(model) is first
        model.to(torch.bfloat16)  # new storage for every weight: stale pointers must not be used
        second = fast_decoder(model)
    assert second is not first and second.dtype == torch.bfloat16


def test_falls_back_where_the_fused_step_does_not_apply(monkeypatch):
    model = model_for("tiny", torch.float32)
    with torch.inference_mode():
        assert unsupported(model) is None
        assert "batch" in unsupported(model, KVCache(model.config, 17, 8, torch.float32))
        assert "dtype" in unsupported(model, KVCache(model.config, 1, 8, torch.bfloat16))
        decoder = fast_decoder(model)
        wrong = KVCache(model.config, 2, 8, torch.float32)  # batch 2 for one token
        with pytest.raises(ValueError, match="KV cache"):
            decoder.step(torch.tensor([[5]]), torch.tensor([[0]]), wrong)
        monkeypatch.setenv("GEMMAKIT_NO_KERNELS", "1")
        assert fast_decoder(model) is None
    monkeypatch.delenv("GEMMAKIT_NO_KERNELS")
    assert "gradients" in unsupported(model)  # outside inference mode, weights want gradients
    from gemmakit.model.lora import LoRASpec, apply_lora

    apply_lora(model, LoRASpec(rank=2))
    with torch.inference_mode():
        assert "LoRA" in unsupported(model)
        # and generation still works, eagerly
        assert len(generate(model, [[2, 5]], 3, stop_tokens=[])[0]) == 3


# Fused vs eager with quantized weights: both run the same GEMV kernel, which rounds each
# layer's input to int16 per block of 32; the two paths' inputs differ in float32's last bits
# (RMSNorm in C vs torch), enough to round an element lying on a half-step the other way
# (often with int8 embeddings: a row's values are small integers times one scale, so x / step
# can be exactly k + 0.5), which moves a product by one step of 1/32767 of its block's largest
# activation. Each path is within 5e-4 of the dequantized model's logits' scale
# (tests/test_quant.py); a bound of 1e-3 here.
QUANT_BOUND = 1e-3


@pytest.mark.parametrize("mode", ["q8_0", "q4_k", "int8", "int4"])
def test_fused_step_runs_quantized_weights(mode):
    """Weights kept quantized (gemmakit.quant) go through their own GEMV inside the step: the
    fused step matches the eager path within QUANT_BOUND and gives the same greedy ids."""
    from gemmakit.quant.model import quantize_model

    model = quantize_model(model_for("tiny-gemma3", torch.float32), mode)
    with torch.inference_mode():
        assert unsupported(model) is None
    eager = step_logits(model, PROMPTS, 12, fast=False)
    fused = step_logits(model, PROMPTS, 12, fast=True)
    for e, f in zip(eager, fused):
        assert (f - e).abs().max() / e.abs().max() < QUANT_BOUND
    assert generate(model, PROMPTS, 12, stop_tokens=[]) == generate(
        model, PROMPTS, 12, stop_tokens=[], fast=False
    )
    # 12 rows: the step hands the quant kernels (8 rows at most) two pieces (the server's
    # batch of 16 failed every step before it did)
    many = [PROMPTS[i % 3][: 2 + i % 9] for i in range(12)]
    for e, f in zip(step_logits(model, many, 3, False), step_logits(model, many, 3, True)):
        assert f.shape == e.shape == (12, e.shape[1])
        assert (f - e).abs().max() / e.abs().max() < QUANT_BOUND
