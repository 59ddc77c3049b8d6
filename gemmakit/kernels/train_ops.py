"""Fused CPU training ops (train_ops.c): RMSNorm, RoPE and gelu(a) * b as autograd functions,
the row-wise cross-entropy of the chunked loss, and the rows' argmax that greedy decoding
picks (`argmax`).

`rms_norm`, `rope` and `gelu_mul` compute what gemmakit.model.layers computes with torch ops (the
model's math lives there), in one pass per direction over the activations. The model runs them
where `*_applies` says so: float32 CPU tensors that need gradients (a training step). Inference
stays on torch's ops, so it stays bit-identical to HF transformers, and GPUs, other dtypes,
torch.compile and machines without the library are unaffected. GEMMAKIT_NO_KERNELS=1 turns
them off. This library builds and falls back apart from the GEMV one (gemv.py).
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch
import torch.nn.functional as F

from gemmakit.kernels.build import CLibrary, enabled

_P, _I64, _F32, _INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int
SIGNATURES = {
    "rmsnorm_fwd": [_P, _P, _P, _P, _I64, _I64, _F32, _INT],
    "rmsnorm_bwd": [_P, _P, _P, _P, _P, _P, _I64, _I64, _INT],
    "gelu_mul_fwd": [_P, _P, _P, _I64, _INT],
    "gelu_mul_bwd": [_P, _P, _P, _P, _P, _I64, _INT],
    "xent_rows": [_P, _P, _P, _I64, _I64, _INT, _INT],
    "rope_apply": [_P, _P, _P, _P, *[_I64] * 10, _INT, _INT],
    "softmax_stats": [_P, _I64, _I64, _I64, _I64, _P, _P, _P, _P, _P, _INT],
    "argmax_rows": [_P, _I64, _I64, _I64, _P, _INT],
}


def library() -> ctypes.CDLL | None:
    """The loaded training-ops library, or None when it is unavailable (the reason warned
    once). LIBRARY is defined at the end of this module, after its self-test."""
    return LIBRARY.get()


def _kernel_lib(
    *tensors: torch.Tensor, strided: torch.Tensor | None = None, for_grad: bool = True
) -> ctypes.CDLL | None:
    """The kernel library when every tensor is a contiguous float32 CPU tensor (`strided` may
    have any strides but a unit last one) and, with `for_grad`, grad mode is on and one of
    them requires grad; else None (torch's ops take over)."""
    every = (*tensors, strided) if strided is not None else tensors
    if for_grad and (not torch.is_grad_enabled() or not any(t.requires_grad for t in every)):
        return None
    for t in every:
        if t.dtype != torch.float32 or t.device.type != "cpu":
            return None
    if not all(t.is_contiguous() for t in tensors):
        return None
    if strided is not None and strided.stride(-1) != 1:
        return None
    if torch.compiler.is_compiling() or not enabled():
        return None
    return library()


def _require(*tensors: torch.Tensor, strided: torch.Tensor | None = None) -> ctypes.CDLL:
    lib = _kernel_lib(*tensors, strided=strided)
    if lib is None:
        raise RuntimeError("the fused training op does not apply here (check *_applies first)")
    return lib


def _check(rc: int, name: str) -> None:
    if rc != 0:
        raise ValueError(f"{name}: the kernel rejected its arguments (rc {rc})")


# --- RMSNorm -------------------------------------------------------------------------------


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps, lib):
        d = x.shape[-1]
        n = x.numel() // d
        y = torch.empty_like(x)
        rstd = torch.empty(n, dtype=torch.float32)
        threads = torch.get_num_threads()
        _check(
            lib.rmsnorm_fwd(
                x.data_ptr(), weight.data_ptr(), y.data_ptr(), rstd.data_ptr(), n, d, eps, threads
            ),
            "rmsnorm_fwd",
        )
        ctx.save_for_backward(x, weight, rstd)
        ctx.lib = lib
        return y

    @staticmethod
    def backward(ctx, gy):
        x, weight, rstd = ctx.saved_tensors
        gy = gy.contiguous()
        d = x.shape[-1]
        threads = torch.get_num_threads()
        gx = torch.empty_like(x)
        parts = torch.empty(threads, d, dtype=torch.float32)
        _check(
            ctx.lib.rmsnorm_bwd(
                gy.data_ptr(),
                x.data_ptr(),
                weight.data_ptr(),
                rstd.data_ptr(),
                gx.data_ptr(),
                parts.data_ptr(),
                x.numel() // d,
                d,
                threads,
            ),
            "rmsnorm_bwd",
        )
        return gx, parts.sum(0), None, None


def rms_norm_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """True when `rms_norm(x, weight, eps)` can run: a CPU training step in float32."""
    return x.shape[-1] == weight.numel() and _kernel_lib(x, weight) is not None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Gemma's RMSNorm of x [..., D] with weight [D] (scale 1 + w), fused; see
    gemmakit.model.layers.rms_norm for the math. Only where `rms_norm_applies`."""
    return _RMSNorm.apply(x, weight, eps, _require(x, weight))


# --- gelu(a) * b ---------------------------------------------------------------------------


class _GeluMul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b, lib):
        h = torch.empty_like(a)
        threads = torch.get_num_threads()
        _check(
            lib.gelu_mul_fwd(a.data_ptr(), b.data_ptr(), h.data_ptr(), a.numel(), threads),
            "gelu_mul_fwd",
        )
        ctx.save_for_backward(a, b)
        ctx.lib = lib
        return h

    @staticmethod
    def backward(ctx, gh):
        a, b = ctx.saved_tensors
        gh = gh.contiguous()
        ga, gb = torch.empty_like(a), torch.empty_like(b)
        _check(
            ctx.lib.gelu_mul_bwd(
                a.data_ptr(),
                b.data_ptr(),
                gh.data_ptr(),
                ga.data_ptr(),
                gb.data_ptr(),
                a.numel(),
                torch.get_num_threads(),
            ),
            "gelu_mul_bwd",
        )
        return ga, gb, None


def gelu_mul_applies(a: torch.Tensor, b: torch.Tensor) -> bool:
    """True when `gelu_mul(a, b)` can run: a CPU training step in float32."""
    return a.shape == b.shape and _kernel_lib(a, b) is not None


def gelu_mul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """gelu_tanh(a) * b (Gemma's gated MLP), fused; see gemmakit.model.layers.gelu_gate for the
    math. Only where `gelu_mul_applies`."""
    return _GeluMul.apply(a, b, _require(a, b))


# --- rotary embedding ----------------------------------------------------------------------


def _rope_call(lib, x: torch.Tensor, cos, sin, inverse: bool) -> torch.Tensor:
    y = torch.empty_like(x)  # the same strides as x (e.g. a [B, T, N, H] buffer seen transposed)
    B, N, T, H = x.shape
    _check(
        lib.rope_apply(
            x.data_ptr(),
            cos.data_ptr(),
            sin.data_ptr(),
            y.data_ptr(),
            B,
            N,
            T,
            H,
            x.stride(0),
            x.stride(1),
            x.stride(2),
            y.stride(0),
            y.stride(1),
            y.stride(2),
            int(inverse),
            torch.get_num_threads(),
        ),
        "rope_apply",
    )
    return y


class _Rope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin, lib):
        ctx.save_for_backward(cos, sin)
        ctx.lib = lib
        return _rope_call(lib, x, cos, sin, inverse=False)

    @staticmethod
    def backward(ctx, gy):
        cos, sin = ctx.saved_tensors
        if gy.stride(-1) != 1:
            gy = gy.contiguous()
        return _rope_call(ctx.lib, gy, cos, sin, inverse=True), None, None, None


def rope_applies(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    """True when `rope(x, cos, sin)` can run: a CPU training step in float32, x [B, N, T, H]
    with a unit last stride, constant cos/sin [B, T, H]."""
    return (
        x.dim() == 4
        and x.shape[-1] % 2 == 0
        and cos.shape == sin.shape == (x.shape[0], x.shape[2], x.shape[3])
        and not (cos.requires_grad or sin.requires_grad)
        and _kernel_lib(cos, sin, strided=x) is not None
    )


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of x [B, N, T, H] with cos/sin [B, T, H], fused; see
    gemmakit.model.layers.rope for the math. Only where `rope_applies`."""
    return _Rope.apply(x, cos, sin, _require(cos, sin, strided=x))


# --- cross-entropy rows --------------------------------------------------------------------


def xent_rows_kernel(z: torch.Tensor) -> ctypes.CDLL | None:
    """The library when `xent_rows` can take logits z (contiguous float32 CPU [C, V]); the
    loss computes their gradient itself, so no autograd is involved."""
    return _kernel_lib(z, for_grad=False) if z.dim() == 2 else None


def xent_rows(
    lib: ctypes.CDLL, z: torch.Tensor, targets: torch.Tensor, want_grad: bool
) -> torch.Tensor:
    """Per-row cross-entropy of logits z [C, V] against targets [C] (negative: ignored, loss
    0); with want_grad z becomes softmax(z) - one_hot(targets) in place (zero rows where
    ignored). Returns the [C] float32 losses."""
    targets = targets.to(torch.int64).contiguous()
    loss = torch.empty(z.shape[0], dtype=torch.float32)
    rc = lib.xent_rows(
        z.data_ptr(),
        targets.data_ptr(),
        loss.data_ptr(),
        z.shape[0],
        z.shape[1],
        int(want_grad),
        torch.get_num_threads(),
    )
    if rc == 2:
        raise ValueError(f"a target id is >= the vocabulary size {z.shape[1]}")
    _check(rc, "xent_rows")
    return loss


def softmax_stats(
    lib: ctypes.CDLL,
    z: torch.Tensor,
    offset: int,
    targets: torch.Tensor,
    picked: torch.Tensor,
    mx: torch.Tensor,
    arg: torch.Tensor,
    total: torch.Tensor,
) -> None:
    """Fold the logits tile z [n, v] (float32 CPU, unit last stride), whose column 0 is
    vocabulary id `offset`, into the running per-row max mx [n] float32, its id arg [n] int64
    (the first on ties) and total [n] float32 = sum of exp(logit - mx); picked [n] float32
    gets the logit of targets [n] (int64) where the tile holds it. Start from mx = -inf,
    arg = 0, total = 0; afterwards logsumexp = mx + log(total)."""
    n, v = z.shape
    rc = lib.softmax_stats(
        z.data_ptr(),
        n,
        v,
        z.stride(0),
        offset,
        targets.data_ptr(),
        picked.data_ptr(),
        mx.data_ptr(),
        arg.data_ptr(),
        total.data_ptr(),
        torch.get_num_threads(),
    )
    _check(rc, "softmax_stats")


def argmax(z: torch.Tensor) -> torch.Tensor:
    """z.argmax(-1) of logits z [n, v] (greedy decoding's pick): the same ids, ties to the
    first and a NaN counting as the largest, in one vectorised pass where the library applies
    (a float32 CPU tensor with a unit last stride; torch's argmax over a 256k vocabulary takes
    a tenth of a small model's decode step), else torch's."""
    lib = _kernel_lib(strided=z, for_grad=False) if z.dim() == 2 and z.shape[1] else None
    if lib is None:
        return z.argmax(-1)
    arg = torch.empty(z.shape[0], dtype=torch.int64)
    _check(
        lib.argmax_rows(
            z.data_ptr(), *z.shape, z.stride(0), arg.data_ptr(), torch.get_num_threads()
        ),
        "argmax_rows",
    )
    return arg


# --- the library's self-test ---------------------------------------------------------------
# Against torch's own ops, written here independently of gemmakit.model.layers (which imports
# this module); tests/test_train_ops.py checks these ops equal the model's math.


def _torch_rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return F.rms_norm(x, (x.shape[-1],), weight=1.0 + w, eps=eps)


def _torch_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2  # x [B, N, T, H]; cos/sin [B, T, H], both halves alike
    c, s = cos[:, None, :, :half], sin[:, None, :, :half]
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)


def _torch_gelu_mul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.gelu(a, approximate="tanh") * b


def self_test(lib: ctypes.CDLL) -> None:
    """Raise unless the fused ops match torch's (values and gradients) on shapes with tails."""
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(5, 19, generator=gen) * 3).requires_grad_()
    w = torch.randn(19, generator=gen).requires_grad_()
    g = torch.randn(5, 19, generator=gen)
    want = torch.autograd.grad(_torch_rms_norm(x, w, 1e-6), [x, w], g)
    y = _RMSNorm.apply(x, w, 1e-6, lib)
    got = torch.autograd.grad(y, [x, w], g)
    _close("rms_norm", y, _torch_rms_norm(x, w, 1e-6))
    for a, b in zip(got, want):
        _close("rms_norm backward", a, b)
    a = (torch.randn(4103, generator=gen) * 4).requires_grad_()  # not a multiple of 8 or 4096
    b = torch.randn(4103, generator=gen).requires_grad_()
    g = torch.randn(4103, generator=gen)
    h = _GeluMul.apply(a, b, lib)
    _close("gelu_mul", h, _torch_gelu_mul(a, b))
    got = torch.autograd.grad(h, [a, b], g)
    want = torch.autograd.grad(_torch_gelu_mul(a, b), [a, b], g)
    for u, v in zip(got, want):
        _close("gelu_mul backward", u, v)
    xt = torch.randn(2, 5, 3, 20, generator=gen).transpose(1, 2).requires_grad_()  # [B, N, T, H]
    cos, sin = torch.randn(2, 2, 5, 10, generator=gen).repeat(1, 1, 1, 2)
    g = torch.randn(2, 3, 5, 20, generator=gen)
    y = _Rope.apply(xt, cos, sin, lib)
    _close("rope", y, _torch_rope(xt, cos, sin))
    _close(
        "rope backward",
        torch.autograd.grad(y, xt, g)[0],
        torch.autograd.grad(_torch_rope(xt, cos, sin), xt, g)[0],
    )
    z = torch.randn(6, 1003, generator=gen) * 8
    t = torch.tensor([0, 1002, -100, 5, 77, 500])
    loss = xent_rows(lib, z.clone(), t, want_grad=False)
    grad = z.clone()
    xent_rows(lib, grad, t, want_grad=True)
    keep = t >= 0
    want_loss = F.cross_entropy(z, t, reduction="none", ignore_index=-100)
    want_grad = (z.softmax(-1) - F.one_hot(t.clamp(min=0), z.shape[1])) * keep[:, None]
    _close("xent_rows loss", loss, want_loss)
    _close("xent_rows grad", grad, want_grad)
    z[2, 7] = z[2, 900] = z[2].max() + 1  # a tie: the first id wins, as torch.argmax
    mx, total, picked = torch.full((6,), float("-inf")), torch.zeros(6), torch.zeros(6)
    arg = torch.zeros(6, dtype=torch.int64)
    t = torch.tensor([0, 1002, 399, 400, 77, 500])
    for start in range(0, 1003, 400):  # tiles of a wider buffer (row stride > tile width)
        softmax_stats(lib, z[:, start : start + 400], start, t, picked, mx, arg, total)
    _close("softmax_stats logsumexp", mx + total.log(), torch.logsumexp(z, -1))
    _close("softmax_stats target", picked, z.gather(1, t[:, None])[:, 0])
    if not torch.equal(arg, z.argmax(-1)):
        raise RuntimeError("self-test failed for softmax_stats: argmax differs")
    z[3, 11:20] = float("inf")  # ties at +inf; row 4: a NaN wins, as in torch; row 5: all -inf
    z[4, 600], z[4, 601], z[5] = float("nan"), float("nan"), float("-inf")
    for rows in (z, z[:, 3:1002], z[1:2]):  # strided rows, a tail past the last 8, one row
        got = torch.empty(len(rows), dtype=torch.int64)
        lib.argmax_rows(rows.data_ptr(), *rows.shape, rows.stride(0), got.data_ptr(), 2)
        if not torch.equal(got, rows.argmax(-1)):
            raise RuntimeError("self-test failed for argmax_rows")


def _close(what: str, got: torch.Tensor, want: torch.Tensor) -> None:
    if not torch.allclose(got, want, rtol=1e-5, atol=1e-5):
        raise RuntimeError(f"self-test failed for {what}: max error {(got - want).abs().max()}")


LIBRARY = CLibrary(
    "fused training ops", Path(__file__).with_name("train_ops.c"), SIGNATURES, self_test
)
