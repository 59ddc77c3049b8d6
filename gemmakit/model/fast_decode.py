"""The fused decode step: one C call per token for the whole layer stack (kernels/decode_step.c)
instead of ~20 torch ops per layer driven from Python.

`fast_decoder(model, cache)` returns a `FastDecoder` when the step applies (a CPU model in
float32 or bfloat16 with plain linear layers, a matching cache of at most 16 rows, kernels
built), else None, and the caller runs `model(...)` as before. Its `step` is `model(tokens
[B, 1], positions=, cache=)[:, -1]` in float32: the same math, activations in float32 (the
eager bfloat16 path rounds them to bfloat16 after every op), RoPE cos/sin read from tables
precomputed for every cache position, no per-step allocation but the logits. Weights kept
quantized (gemmakit.quant, any format) run the same GEMV kernel as the eager path, which rounds
each layer's input to int16 per block of 32; q/k/v and gate/up share one call
(quant_gemv_multi). Last-bit differences from the eager path can round an activation lying on
a half-step the other way, so quantized models match eager within tests/test_fast_decode.py's
QUANT_BOUND rather than float32's. A greedy step (`step(..., greedy=True)`) of a float32 or
bfloat16 model reads its head as an int8 copy and recomputes the logits that could be the
maximum exactly (gemmakit/model/coarse_head.py).
"""

from __future__ import annotations

import ctypes
import os
import weakref
from collections.abc import Callable

import torch

from gemmakit.config import GemmaConfig
from gemmakit.kernels import decode_step as kernel
from gemmakit.kernels import gemv, quant_gemv
from gemmakit.kernels.build import CLibrary, enabled
from gemmakit.model.cache import KVCache
from gemmakit.model.coarse_head import CoarseHead
from gemmakit.model.layers import Linear, RMSNorm, rope_angles
from gemmakit.model.transformer import Gemma, init_weights
from gemmakit.quant.weight import QuantWeight

_plans: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> FastDecoder


def _array(ctype, values) -> ctypes.Array:
    return (ctype * len(values))(*values)


def _fingerprint(model: Gemma) -> tuple:
    """What the plan's raw pointers depend on: every parameter's and buffer's storage and dtype
    (a `.to()` or a module swapped for a LoRA one changes it; an in-place update does not)."""
    return tuple(
        (p.data_ptr(), p.dtype, type(m))
        for m in model.modules()
        for p in (*m._parameters.values(), *m._buffers.values())
        if p is not None
    )


def quant_record(w: QuantWeight, quant_ptr: int, ptr: Callable) -> kernel.Weight:
    """decode_step.c's Weight for a quantized weight run by the `quant_ptr` GEMV; ptr(t): the
    address of tensor t (None for None), kept alive by whoever passes it."""
    scale = getattr(w, "scale", None)
    return kernel.Weight(
        data=ptr(w.qdata),
        scale=None if scale is None else ptr(scale),
        quant=quant_ptr,
        fmt=w.code,
        group=w.group,
        tile=w.tile,
    )


class FastDecoder:
    """The fused step for one model; build it through `fast_decoder`."""

    def __init__(
        self,
        model: Gemma,
        lib: ctypes.CDLL,
        gemv_lib: ctypes.CDLL,
        quant_lib: ctypes.CDLL | None = None,
    ) -> None:
        cfg = model.config
        self.config, self.lib, self.dtype = cfg, lib, model.dtype
        self.fingerprint = _fingerprint(model)
        self.embedder = model.embedder  # the lookup stays in torch (any weight format)
        bf16 = self.dtype == torch.bfloat16
        fn = gemv_lib.bf16_gemv if bf16 else gemv_lib.f32_gemv
        gemv_ptr = ctypes.cast(fn, ctypes.c_void_p).value
        quant_ptr = ctypes.cast(quant_lib.quant_gemv, ctypes.c_void_p).value if quant_lib else None
        multi_ptr = (
            ctypes.cast(quant_lib.quant_gemv_multi, ctypes.c_void_p).value if quant_lib else None
        )
        self._keep: list = []  # every tensor whose address the C record holds
        self._coarse: tuple[CoarseHead, kernel.Weight] | None = None  # built on first use
        self._coarse_version = -1  # the head's version counter when the copy was made

        def ptr(t: torch.Tensor | None) -> int | None:
            if t is None:
                return None
            t = t.detach()
            self._keep.append(t)
            return t.data_ptr()

        def weight(w) -> kernel.Weight:
            if isinstance(w, QuantWeight):
                return quant_record(w, quant_ptr, ptr)
            return kernel.Weight(data=ptr(w), plain=gemv_ptr)

        def scale(norm: RMSNorm | None) -> int | None:
            # 1 + w in float32, as rms_norm computes it
            return None if norm is None else ptr(1.0 + norm.weight.detach().float())

        weights, norms = [], []
        for b in model.blocks:
            a, f = b.attn, b.mlp
            for lin in (
                a.q_proj,
                a.k_proj,
                a.v_proj,
                a.o_proj,
                f.gate_proj,
                f.up_proj,
                f.down_proj,
            ):
                weights.append(weight(lin.weight))
            for n in (
                b.attn_norm,
                b.post_attn_norm,
                b.mlp_norm,
                b.post_mlp_norm,
                a.q_norm,
                a.k_norm,
            ):
                norms.append(scale(n))
        self._arrays = (
            _array(ctypes.c_uint8, [int(b.is_local) for b in model.blocks]),
            _array(kernel.Weight, weights),
            _array(ctypes.c_void_p, norms),
            weight(model.embedder.weight),
        )
        window = cfg.sliding_window if cfg.sliding_window and cfg.global_every > 1 else 0
        # the scale is rounded to the activation dtype first, as in Gemma.forward
        self.normalizer = torch.tensor(cfg.d_model**0.5, dtype=self.dtype)
        self.record = kernel.Model(
            n_layers=cfg.n_layers,
            d_model=cfg.d_model,
            n_heads=cfg.n_heads,
            n_kv_heads=cfg.n_kv_heads,
            head_dim=cfg.head_dim,
            ffn_dim=cfg.ffn_dim,
            vocab=model.embedder.num_embeddings,
            window=window,
            norm_eps=cfg.norm_eps,
            query_scale=cfg.query_scale,
            attn_softcap=cfg.attn_logit_softcap or 0.0,
            final_softcap=cfg.final_logit_softcap or 0.0,
            bf16=int(bf16),
            is_local=ctypes.addressof(self._arrays[0]),
            weights=ctypes.addressof(self._arrays[1]),
            norms=ctypes.addressof(self._arrays[2]),
            final_norm=scale(model.final_norm),
            embed=ctypes.addressof(self._arrays[3]),
            quant_multi=multi_ptr,
        )
        self.vocab = self.record.vocab
        self._tables: list[torch.Tensor] = []
        self._scratch = torch.empty(0)
        self._cache_key: tuple | None = None
        self._cache_ptrs: tuple = ()

    def _grow_tables(self, rows: int) -> None:
        """cos/sin for RoPE positions 0..rows-1, global and local thetas, as the eager forward
        computes them (rounded to the model's dtype first)."""
        if self.record.rope_rows >= rows:
            return
        cfg = self.config
        positions = torch.arange(rows)[None]
        local = (cfg.rope_local_theta, 1.0) if cfg.rope_local_theta is not None else None
        tables = []
        for theta, scaling in (
            (cfg.rope_theta, cfg.rope_scaling),
            local or (cfg.rope_theta, cfg.rope_scaling),
        ):
            cos, sin = rope_angles(positions, cfg.head_dim, theta, scaling)
            tables += [t[0].to(self.dtype).float().contiguous() for t in (cos, sin)]
        self._tables = tables
        r = self.record
        r.cos_global, r.sin_global, r.cos_local, r.sin_local = (t.data_ptr() for t in tables)
        r.rope_rows = rows

    def _cache_pointers(self, cache: KVCache, batch: int) -> tuple:
        """The C arrays of the cache's per-layer buffers, rebuilt when any buffer moved
        (reserve, repeat_rows, or a caller swapping one in): the key is their addresses, so
        the arrays never point at a buffer the cache no longer holds."""
        key = (batch, cache.max_len, *(t.data_ptr() for t in (*cache.k, *cache.v)))
        if key != self._cache_key:
            self._check(cache, batch)  # shapes and dtypes, once per new set of buffers
            self._cache_ptrs = (
                _array(ctypes.c_void_p, [t.data_ptr() for t in cache.k]),
                _array(ctypes.c_void_p, [t.data_ptr() for t in cache.v]),
            )
            self._cache_key = key
        return self._cache_ptrs

    def _check(self, cache: KVCache, batch: int) -> None:
        """ValueError unless the cache has the layout the C step writes into."""
        c = self.config
        want = (batch, c.n_kv_heads, cache.max_len, c.head_dim)
        bufs = (*cache.k, *cache.v)
        if len(bufs) != 2 * c.n_layers or any(
            tuple(t.shape) != want or t.dtype != self.dtype or not t.is_contiguous() for t in bufs
        ):
            raise ValueError(f"a KV cache of {self.dtype} {list(want)} per layer is needed")
        if tuple(cache.key_valid.shape) != (batch, cache.max_len) or not (
            cache.key_valid.is_contiguous()
        ):
            raise ValueError("cache.key_valid does not match the cache")

    def _coarse_head(self) -> tuple[CoarseHead, kernel.Weight] | None:
        """The plain head's int8 copy and its Weight record (made on first use, and again
        after the table changed in place: a training step between generations bumps its
        version counter, where the plan itself still applies), or None for a quantized head
        or without the quantized GEMV kernel."""
        head = self.embedder.weight
        if isinstance(head, QuantWeight):
            return None
        if self._coarse is not None and self._coarse_version != head._version:
            self._coarse = None  # a snapshot of weights that have since changed
        if self._coarse is None:
            qlib = quant_gemv.library()
            if qlib is None:
                return None
            coarse = CoarseHead(head, qlib)  # holds the tensors the record points at
            quant_ptr = ctypes.cast(qlib.quant_gemv, ctypes.c_void_p).value
            record = quant_record(coarse.weight, quant_ptr, lambda t: t.data_ptr())
            self._coarse, self._coarse_version = (coarse, record), head._version
        return self._coarse

    def step(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        cache: KVCache,
        greedy: bool = False,
    ) -> torch.Tensor:
        """tokens [B] or [B, 1], RoPE positions [B, 1] -> logits [B, V] float32; writes the
        keys/values at cache.length and advances it, like `model(tokens, positions=,
        cache=)`. `greedy`: only each row's argmax will be used, so a plain (float32 or
        bfloat16) head may be read as its int8 copy (`CoarseHead`): the argmax is the exact
        logits' (those that could be the maximum are recomputed exactly), the other entries
        are within the copy's error bound."""
        coarse = self._coarse_head() if greedy and coarse_enabled() else None
        embed = self.record.embed
        if coarse is not None:
            self.record.embed = ctypes.addressof(coarse[1])
        try:
            return self._step(tokens, positions, cache, coarse)
        finally:
            self.record.embed = embed

    def _step(self, tokens, positions, cache, coarse) -> torch.Tensor:
        B = tokens.shape[0]
        x = self.embedder(tokens.reshape(B)) * self.normalizer  # [B, D], as Gemma.forward
        x = x.to(torch.float32).contiguous()
        positions = positions.reshape(B).to(torch.int64).contiguous()
        self._grow_tables(cache.max_len)
        c = self.config
        need = kernel.scratch_floats(
            c.d_model, c.n_heads, c.n_kv_heads, c.head_dim, c.ffn_dim, B, cache.max_len
        )
        if self._scratch.numel() < need:
            self._scratch = torch.empty(need)
        k_ptrs, v_ptrs = self._cache_pointers(cache, B)
        logits = torch.empty(B, self.vocab)
        rc = self.lib.decode_step(
            ctypes.byref(self.record),
            x.data_ptr(),
            positions.data_ptr(),
            B,
            k_ptrs,
            v_ptrs,
            cache.max_len,
            cache.length,
            cache.key_valid.data_ptr(),
            logits.data_ptr(),
            self._scratch.data_ptr(),
            self._scratch.numel(),
            torch.get_num_threads(),
        )
        if rc != 0:
            raise ValueError(f"decode_step failed: {kernel.ERRORS.get(rc, rc)}")
        cache.length += 1
        head = self.embedder.weight
        # the final-normed hidden states are the scratch's second [B, D] (decode_step.c); the
        # entries that could be the maximum are recomputed from them exactly
        xn = self._scratch[B * c.d_model : 2 * B * c.d_model].view(B, c.d_model)
        if coarse is not None:
            coarse[0].rescore(xn, logits, c.final_logit_softcap)
        elif isinstance(head, QuantWeight):
            head.exact_top(xn, logits, c.final_logit_softcap)
        return logits


def coarse_enabled() -> bool:
    """False when GEMMAKIT_NO_COARSE_HEAD is set to anything but '' or '0' (read on every
    step): greedy steps then read the plain head, and no int8 copy is made."""
    return os.environ.get("GEMMAKIT_NO_COARSE_HEAD", "0") in ("", "0")


def unsupported(model: Gemma, cache: KVCache | None = None) -> str | None:
    """Why the fused step cannot run this model (and cache), or None when it can."""
    if model.device.type != "cpu":
        return "not a CPU model"
    if model.dtype not in (torch.float32, torch.bfloat16):
        return f"dtype {model.dtype}"
    for b in model.blocks:
        a, f = b.attn, b.mlp
        for lin in (a.q_proj, a.k_proj, a.v_proj, a.o_proj, f.gate_proj, f.up_proj, f.down_proj):
            if type(lin) is not Linear or lin.bias is not None:
                return f"a {type(lin).__name__} layer (LoRA, biased) needs the eager path"
            if not _plain_or_quant(lin.weight, model.dtype):
                return "mixed, non-contiguous or unknown weights"
    if not _plain_or_quant(model.embedder.weight, model.dtype):
        return "an unsupported embedding"
    if torch.is_grad_enabled() and any(p.requires_grad for p in model.parameters()):
        return "gradients wanted"
    if cache is not None:
        k = cache.k[0] if cache.k else None
        if k is None or k.dtype != model.dtype or k.device.type != "cpu":
            return "a cache of another dtype or device"
        if k.shape[0] > kernel.MAX_ROWS:
            return f"batch {k.shape[0]} > {kernel.MAX_ROWS}"
        if not all(t.is_contiguous() for t in (*cache.k, *cache.v, cache.key_valid)):
            return "a non-contiguous cache"
    if not enabled():
        return "kernels disabled (GEMMAKIT_NO_KERNELS)"
    if gemv.library() is None or library() is None:
        return "kernels not built"
    if any(isinstance(m, QuantWeight) for m in model.modules()) and quant_gemv.library() is None:
        return "the quantized GEMV kernel is not built"
    return None


def _plain_or_quant(w, dtype: torch.dtype) -> bool:
    """A contiguous CPU tensor of the model's dtype, or a QuantWeight of any format."""
    if isinstance(w, QuantWeight):
        return w.device.type == "cpu" and w.dtype == dtype
    return isinstance(w, torch.Tensor) and w.dtype == dtype and w.is_contiguous()


def fast_decoder(model: Gemma, cache: KVCache | None = None) -> FastDecoder | None:
    """The model's `FastDecoder` (built once, rebuilt when its weights moved), or None when
    `unsupported(model, cache)`. Call once per generation, not per token."""
    if unsupported(model, cache) is not None:
        return None
    plan = _plans.get(model)
    if plan is None or plan.fingerprint != _fingerprint(model):
        quant = any(isinstance(m, QuantWeight) for m in model.modules())
        plan = FastDecoder(
            model, library(), gemv.library(), quant_gemv.library() if quant else None
        )
        _plans[model] = plan
    return plan


@torch.inference_mode()
def self_test(lib: ctypes.CDLL) -> None:
    """Raise unless the fused step of `lib` equals the eager model's decode step on a small
    random float32 model (two prompts, one left-padded; a sliding window it overflows)."""

    cfg = GemmaConfig(
        name="self-test",
        vocab_size=64,
        d_model=32,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        head_dim=16,
        ffn_dim=48,
        max_seq_len=32,
        sandwich_norm=True,
        qk_norm=True,
        sliding_window=4,
        global_every=2,
        rope_local_theta=10000.0,
    )
    model = init_weights(Gemma(cfg), std=0.3, seed=0).eval()
    gemv_lib = gemv.library()
    if gemv_lib is None:
        raise RuntimeError("the GEMV library it calls is unavailable")
    plan = FastDecoder(model, lib, gemv_lib)
    tokens = torch.tensor([[0, 0, 5, 9, 11, 3], [7, 8, 2, 6, 1, 4]])
    valid = tokens != 0
    caches = [KVCache(cfg, 2, 10, torch.float32) for _ in range(2)]
    positions = (valid.long().cumsum(-1) - 1).clamp(min=0)
    for c in caches:
        c.key_valid[:, :6] = valid
        model(tokens, positions=positions, cache=c)
    nxt, pos = torch.tensor([[13], [17]]), positions[:, -1:] + 1
    want = model(nxt, positions=pos, cache=caches[0])[:, -1]
    got = plan.step(nxt, pos, caches[1])
    if not torch.allclose(got, want, rtol=1e-4, atol=1e-4):
        raise RuntimeError(f"self-test failed: max error {(got - want).abs().max()}")


LIBRARY = CLibrary("decode step", kernel.SOURCE, kernel.SIGNATURES, self_test)


def library() -> ctypes.CDLL | None:
    """The fused decode-step library, or None when it is unavailable (the reason warned once)."""
    return LIBRARY.get()
