"""The fused CPU training ops (RMSNorm, RoPE, gelu(a) * b): values and gradients equal the
model's math in gemmakit/model/layers.py, the dispatch rules (training only), and a training
step equal with and without them."""

from __future__ import annotations

import pytest
import torch
from helpers import needs_kernel

from gemmakit.api import build_model
from gemmakit.config import get_config
from gemmakit.kernels import train_ops
from gemmakit.model import layers
from gemmakit.training.losses import next_token_loss


def grads(fn, inputs, upstream):
    out = fn(*inputs)
    return out, torch.autograd.grad(out, inputs, upstream)


@needs_kernel
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("shape", [(1, 8), (3, 7, 19), (2, 64, 128), (5, 1, 2051)])
def test_rms_norm_matches_torch(shape, threads):
    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(sum(shape))
    x = (torch.randn(shape, generator=gen) * 5).requires_grad_()
    w = torch.randn(shape[-1], generator=gen).requires_grad_()
    g = torch.randn(shape, generator=gen)
    assert train_ops._kernel_lib(x, w) is not None
    got, (gx, gw) = grads(lambda a, b: train_ops.rms_norm(a, b, 1e-6), [x, w], g)
    want, (wx, ww) = grads(lambda a, b: layers.rms_norm(a, b, 1e-6), [x, w], g)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gx, wx, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gw, ww, rtol=1e-5, atol=1e-4)


@needs_kernel
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("n", [1, 7, 8, 4096, 4096 * 3 + 13])
def test_gelu_mul_matches_torch(n, threads):
    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(n)
    a = torch.randn(n, generator=gen) * 4
    a[: min(n, 4)] = torch.tensor([0.0, -30.0, 30.0, 1e-4])[: min(n, 4)]  # 0, saturated, tiny
    a.requires_grad_()
    b = torch.randn(n, generator=gen).requires_grad_()
    g = torch.randn(n, generator=gen)
    assert train_ops._kernel_lib(a, b) is not None
    got = grads(train_ops.gelu_mul, [a, b], g)
    torch_f32 = grads(layers.gelu_gate, [a, b], g)
    a64, b64 = (t.detach().double().requires_grad_() for t in (a, b))
    exact = grads(layers.gelu_gate, [a64, b64], g.double())
    # gelu' crosses zero near a = -0.75, where its float32 terms cancel: judge the kernel by
    # its distance from float64, against torch's own float32 distance from it
    for ours, theirs, truth in zip(
        [got[0], *got[1]], [torch_f32[0], *torch_f32[1]], [exact[0], *exact[1]]
    ):
        err = (ours.double() - truth).abs().max().item()
        torch_err = (theirs.double() - truth).abs().max().item()
        assert err <= 2 * torch_err + 1e-6, (err, torch_err)


@needs_kernel
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("transposed", [True, False])
@pytest.mark.parametrize("head_dim", [2, 20, 32, 256])
def test_rope_matches_torch(head_dim, transposed, threads):
    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(head_dim)
    B, N, T = 2, 3, 7
    if transposed:  # as attention makes it: a [B, T, N, H] projection seen as [B, N, T, H]
        x = torch.randn(B, T, N, head_dim, generator=gen).transpose(1, 2)
    else:
        x = torch.randn(B, N, T, head_dim, generator=gen)
    x.requires_grad_()
    half = torch.randn(2, B, T, head_dim // 2, generator=gen)
    cos, sin = half.repeat(1, 1, 1, 2)  # both halves share their angles
    g = torch.randn(B, N, T, head_dim, generator=gen)
    assert train_ops._kernel_lib(cos, sin, strided=x) is not None
    got, (gx,) = grads(lambda a: train_ops.rope(a, cos, sin), [x], g)
    want, (wx,) = grads(lambda a: layers.rope(a, cos, sin), [x], g)
    assert got.stride() == x.stride()  # SDPA sees the layout it saw before
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gx, wx, rtol=1e-5, atol=1e-6)


@needs_kernel
def test_kernels_run_only_where_a_gradient_is_wanted(monkeypatch):
    x, w = torch.randn(4, 16), torch.randn(16)
    assert train_ops._kernel_lib(x, w) is None  # nothing requires grad: inference
    w.requires_grad_()
    assert train_ops._kernel_lib(x, w) is not None
    with torch.no_grad():
        assert train_ops._kernel_lib(x, w) is None
    assert train_ops._kernel_lib(x.double(), w) is None
    assert train_ops._kernel_lib(x.t(), w[:4]) is None  # not contiguous
    assert not train_ops.rms_norm_applies(x, w.detach())
    # inference is the model's torch math exactly (bit-identical to HF transformers)
    norm = layers.RMSNorm(16)
    with torch.no_grad():
        norm.weight.copy_(w)
        torch.testing.assert_close(norm(x), layers.rms_norm(x, w, 1e-6), rtol=0, atol=0)
    monkeypatch.setenv("GEMMAKIT_NO_KERNELS", "1")
    assert train_ops._kernel_lib(x, w) is None
    assert not train_ops.rms_norm_applies(x, w)


def test_fallback_without_library(monkeypatch):
    monkeypatch.setattr(train_ops, "library", lambda: None)
    a = torch.randn(33, requires_grad=True)
    b = torch.randn(33, requires_grad=True)
    assert not train_ops.gelu_mul_applies(a, b)
    mlp = layers.GatedMLP(8, 33)
    x = torch.randn(2, 8, requires_grad=True)
    want = mlp.down_proj(layers.gelu_gate(mlp.gate_proj(x), mlp.up_proj(x)))
    torch.testing.assert_close(mlp(x), want, rtol=0, atol=0)


@needs_kernel
def test_training_step_same_with_and_without_kernels(monkeypatch):
    """A tiny model's loss and every gradient agree with the fused ops on and off."""
    cfg = get_config("tiny").replace(vocab_size=512, n_layers=2)
    tokens = torch.randint(0, 512, (2, 33), generator=torch.Generator().manual_seed(0))
    batch = {"tokens": tokens[:, :-1], "targets": tokens[:, 1:]}

    def step():
        model = build_model(cfg, dtype=torch.float32, seed=0)
        for p in model.parameters():  # non-zero norm weights: the (1 + w) scale matters
            if p.dim() == 1:
                torch.nn.init.normal_(p, std=0.3, generator=torch.Generator().manual_seed(1))
        loss = next_token_loss(model, batch)
        loss.backward()
        return loss, [p.grad for p in model.parameters()]

    loss_fused, g_fused = step()
    monkeypatch.setenv("GEMMAKIT_NO_KERNELS", "1")
    loss_torch, g_torch = step()
    torch.testing.assert_close(loss_fused, loss_torch, rtol=1e-6, atol=1e-6)
    for a, b in zip(g_fused, g_torch):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@needs_kernel
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("vocab", [1, 13, 4096, 40_003])
def test_xent_rows_matches_the_torch_loss(vocab, threads, monkeypatch):
    from gemmakit.training.losses import IGNORE, _chunk_loss

    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(vocab)
    z = torch.randn(9, vocab, generator=gen) * 10
    t = torch.randint(0, vocab, (9,), generator=gen)
    t[2] = IGNORE
    z[4, t[4]] = 300.0  # a certain prediction: loss 0, no overflow
    assert train_ops.xent_rows_kernel(z) is not None
    loss, grad = _chunk_loss(z.clone(), t, want_grad=True)
    monkeypatch.setenv("GEMMAKIT_NO_KERNELS", "1")
    assert train_ops.xent_rows_kernel(z) is None
    want_loss, want_grad = _chunk_loss(z.clone(), t, want_grad=True)
    torch.testing.assert_close(loss, want_loss, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(grad, want_grad, rtol=1e-5, atol=1e-7)
    assert grad[2].abs().sum() == 0  # the ignored row has no gradient


@needs_kernel
def test_xent_rows_rejects_a_target_beyond_the_vocabulary():
    lib = train_ops.xent_rows_kernel(torch.zeros(2, 5))
    with pytest.raises(ValueError, match="vocabulary size 5"):
        train_ops.xent_rows(lib, torch.zeros(2, 5), torch.tensor([1, 5]), want_grad=True)


@needs_kernel
@pytest.mark.parametrize("threads", [1, 2])
def test_argmax_is_torch_argmax(threads, monkeypatch):
    """Greedy decoding's pick (train_ops.argmax, the C row_argmax) is torch.argmax's: ties go to
    the first, a NaN counts as the largest, an all -inf row picks 0; strided rows, a row
    shorter than a vector, a vocabulary with a tail past the last 8."""
    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(7, 262147, generator=gen)
    z[1, 5] = z[1, 262140] = z[1].max() + 1  # a tie: the first wins
    z[2, 262146] = 1e9  # the maximum in the tail
    z[3, 100:103] = float("nan")  # the first NaN wins, as in torch
    z[4] = float("-inf")
    z[5, 9:17] = float("inf")
    z[6] = 0.0
    z[6, 3] = -0.0
    for rows in (z, z[:, 1:], z[2:3], z[:, :5], z[:, :1]):
        assert torch.equal(train_ops.argmax(rows), rows.argmax(-1))
    assert train_ops.argmax(z.bfloat16()).dtype == torch.int64  # other dtypes: torch's
    assert torch.equal(train_ops.argmax(z.bfloat16()), z.bfloat16().argmax(-1))
    monkeypatch.setenv("GEMMAKIT_NO_KERNELS", "1")
    assert torch.equal(train_ops.argmax(z), z.argmax(-1))


CHECKPOINTED_STEP = """
import torch
from gemmakit.api import build_model
from gemmakit.config import get_config
from gemmakit.kernels import train_ops
from gemmakit.training.loop import checkpoint_blocks
from gemmakit.training.losses import next_token_loss
model = build_model(get_config("tiny").replace(vocab_size=256, n_layers=2)).train()
checkpoint_blocks(model)
assert "lib" not in train_ops.LIBRARY._state  # it loads inside the checkpointed forward
tokens = torch.randint(0, 256, (2, 17))
next_token_loss(model, {"tokens": tokens[:, :-1], "targets": tokens[:, 1:]}).backward()
print(train_ops.LIBRARY._state["lib"] is not None)
"""


@needs_kernel
def test_first_kernel_use_inside_activation_checkpointing_does_not_deadlock():
    # The self-test's autograd once ran under checkpointing's saved-tensor hooks, which
    # recomputed the block, which re-entered the library lock: a silent hang.
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-c", CHECKPOINTED_STEP], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[-1] == "True"


@needs_kernel
def test_nan_propagates_so_divergence_is_seen():
    # The loop stops on a non-finite loss; a kernel that turned NaN into a finite number would
    # hide a diverged run.
    a = torch.randn(64)
    a[3] = a[40] = float("nan")  # one in the vector body, one in a second vector
    b = torch.ones(64, requires_grad=True)
    h = train_ops.gelu_mul(a.requires_grad_(), b)
    assert torch.isnan(h[[3, 40]]).all() and torch.isfinite(h[:3]).all()
    z = torch.randn(3, 100)
    z[1, 57] = float("nan")
    lib = train_ops.xent_rows_kernel(z)
    loss = train_ops.xent_rows(lib, z, torch.tensor([0, 1, 2]), want_grad=True)
    assert torch.isnan(loss[1]) and torch.isfinite(loss[[0, 2]]).all()
