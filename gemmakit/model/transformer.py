"""The Gemma decoder: embedding, blocks, final norm, tied output projection."""

from __future__ import annotations

import torch
from torch import nn

from gemmakit.config import GemmaConfig
from gemmakit.errors import UsageError
from gemmakit.model.attention import Attention, soft_cap
from gemmakit.model.cache import KVCache
from gemmakit.model.layers import GatedMLP, RMSNorm, linear, rope_angles
from gemmakit.quant.weight import QuantWeight


class Block(nn.Module):
    """x + Attn(norm(x)), then + MLP(norm(.)); Gemma 2/3 also norm each branch's output."""

    def __init__(self, config: GemmaConfig, layer: int) -> None:
        super().__init__()
        d, eps = config.d_model, config.norm_eps
        self.is_local = config.is_local(layer)
        self.attn_norm = RMSNorm(d, eps)
        self.attn = Attention(config, layer)
        self.mlp_norm = RMSNorm(d, eps)
        self.mlp = GatedMLP(d, config.ffn_dim)
        if config.sandwich_norm:
            self.post_attn_norm = RMSNorm(d, eps)
            self.post_mlp_norm = RMSNorm(d, eps)
        else:
            self.post_attn_norm = self.post_mlp_norm = None

    def forward(self, x, cos, sin, mask, cache=None) -> torch.Tensor:
        h = self.attn(self.attn_norm(x), cos, sin, mask, cache)
        if self.post_attn_norm is not None:
            h = self.post_attn_norm(h)
        x = x + h
        h = self.mlp(self.mlp_norm(x))
        if self.post_mlp_norm is not None:
            h = self.post_mlp_norm(h)
        return x + h


class Gemma(nn.Module):
    """tokens [B, T] -> logits [B, T, V]."""

    def __init__(self, config: GemmaConfig) -> None:
        super().__init__()
        self.config = config
        self.embedder = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        self.final_norm = RMSNorm(config.d_model, config.norm_eps)

    @property
    def dtype(self) -> torch.dtype:
        return self.embedder.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embedder.weight.device

    def forward(
        self,
        tokens: torch.Tensor,
        *,
        positions: torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
        last_only: bool = False,
        return_hidden: bool = False,
    ) -> torch.Tensor:
        """tokens [B, T] -> logits [B, T, V] (or [B, 1, V] with `last_only`).

        positions [B, T]: RoPE positions (default: cache.length + 0..T-1, or with segment_ids
        the offset within each segment).
        segment_ids [B, T]: packed sequences (no cache): a token attends only to earlier tokens
        of its own segment, so documents packed into one row do not see each other.
        cache: decoding state; keys at cache.key_valid == False (left padding) are masked.
        return_hidden: the final-normed hidden states [B, T, D] instead of logits, for a loss
        that computes logits chunk by chunk (see `logits`).
        """
        cfg = self.config
        B, T = tokens.shape
        start = cache.length if cache is not None else 0
        if segment_ids is not None and cache is not None:
            raise UsageError("segment_ids is for packed training sequences, not with a cache")
        if positions is None:
            if segment_ids is None:
                positions = torch.arange(start, start + T, device=tokens.device).expand(B, T)
            else:
                positions = segment_positions(segment_ids)

        x = self.embedder(tokens)
        # The scale is rounded to the activation dtype first, as in the released models.
        x = x * torch.tensor(cfg.d_model**0.5, dtype=x.dtype)

        global_mask, local_mask = self._masks(B, T, start, cache, tokens.device, segment_ids)
        cos_sin = {}
        for theta, scaling in {(cfg.rope_theta, cfg.rope_scaling), self._local_rope()}:
            cos, sin = rope_angles(positions, cfg.head_dim, theta, scaling)
            cos_sin[theta, scaling] = cos.to(x.dtype), sin.to(x.dtype)
        for block in self.blocks:
            if block.is_local:
                cos, sin = cos_sin[self._local_rope()]
                mask = local_mask
            else:
                cos, sin = cos_sin[cfg.rope_theta, cfg.rope_scaling]
                mask = global_mask
            x = block(x, cos, sin, mask, cache)
        if cache is not None:
            cache.length += T
        if last_only:
            x = x[:, -1:]
        x = self.final_norm(x)
        return x if return_hidden else self.logits(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final-normed hidden states [..., D] -> logits [..., V] (tied embedding)."""
        weight, cap = self.embedder.weight, self.config.final_logit_softcap
        logits = linear(hidden, weight)  # the 1 GB read of a 2B decode step
        if cap is not None:
            logits = soft_cap(logits, cap)
        if isinstance(weight, QuantWeight):
            flat = hidden.reshape(-1, hidden.shape[-1])
            if weight.uses_kernel(flat):  # rounded activations: the top entries recomputed
                weight.exact_top(flat, logits.view(-1, logits.shape[-1]), cap)
        return logits

    def _local_rope(self) -> tuple[float, float]:
        cfg = self.config
        if cfg.rope_local_theta is None:
            return cfg.rope_theta, cfg.rope_scaling
        return cfg.rope_local_theta, 1.0

    def _masks(self, B, T, start, cache, device, segment_ids=None):
        """Boolean masks [B, 1, T, S] (True: attend) for global and local layers.

        None stands for plain causal attention over unpadded keys, which SDPA does fastest.
        """
        cfg = self.config
        S = start + T
        padded = cache is not None and not bool(cache.key_valid[:, :S].all())
        padded = padded or segment_ids is not None
        window = cfg.sliding_window if cfg.sliding_window and cfg.global_every > 1 else None
        needs_local = window is not None and S > window
        if not padded and not needs_local:
            return None, None
        q_pos = torch.arange(start, S, device=device)[:, None]  # [T, 1]
        k_pos = torch.arange(S, device=device)[None, :]  # [1, S]
        causal = k_pos <= q_pos  # [T, S]
        if segment_ids is not None:
            same = segment_ids[:, None, :, None] == segment_ids[:, None, None, :]
            global_mask = causal & same  # [B, 1, T, T]
        elif padded:
            # A padding query keeps its own key so that no row is empty (its output is unused).
            keep = cache.key_valid[:, None, None, :S] | (k_pos == q_pos)
            global_mask = causal & keep  # [B, 1, T, S]
        else:
            global_mask = causal.expand(B, 1, T, S)
        local_mask = global_mask & (k_pos > q_pos - window) if needs_local else global_mask
        if not padded:
            global_mask = None
        return global_mask, local_mask


def segment_positions(segment_ids: torch.Tensor) -> torch.Tensor:
    """Each token's offset from the start of its segment: segment_ids [B, T] -> [B, T] int64.
    A segment is a run of equal ids (ids of adjacent segments must differ)."""
    B, T = segment_ids.shape
    idx = torch.arange(T, device=segment_ids.device).expand(B, T)
    new = torch.ones_like(segment_ids, dtype=torch.bool)
    new[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    starts = torch.where(new, idx, 0).cummax(dim=1).values  # index of each segment's start
    return idx - starts


def init_weights(model: Gemma, std: float = 0.02, seed: int | None = None) -> Gemma:
    """Random normal weights (std) for every matrix, zeros for every norm (scale 1 + 0)."""
    gen = torch.Generator(device="cpu")
    if seed is not None:
        gen.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.zero_()
            else:
                w = torch.empty(p.shape, dtype=torch.float32).normal_(0.0, std, generator=gen)
                p.copy_(w)
    return model
