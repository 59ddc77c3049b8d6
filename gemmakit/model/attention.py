"""Multi-query, grouped and multi-head attention, with Gemma 2/3 options from the config."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gemmakit.config import GemmaConfig
from gemmakit.model.cache import KVCache
from gemmakit.model.layers import Linear, RMSNorm, apply_rope


def soft_cap(x: torch.Tensor, cap: float) -> torch.Tensor:
    return torch.tanh(x / cap) * cap


class Attention(nn.Module):
    def __init__(self, config: GemmaConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.n_heads, self.n_kv_heads, self.head_dim = (
            config.n_heads,
            config.n_kv_heads,
            config.head_dim,
        )
        self.scale = config.query_scale
        self.softcap = config.attn_logit_softcap
        d, hd = config.d_model, config.head_dim
        self.q_proj = Linear(d, self.n_heads * hd, bias=False)
        self.k_proj = Linear(d, self.n_kv_heads * hd, bias=False)
        self.v_proj = Linear(d, self.n_kv_heads * hd, bias=False)
        self.o_proj = Linear(self.n_heads * hd, d, bias=False)
        if config.qk_norm:
            self.q_norm = RMSNorm(hd, config.norm_eps)
            self.k_norm = RMSNorm(hd, config.norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """x [B, T, D]; cos/sin [B, T, H]; mask [B, 1, T, S] bool (True: attend), or None for
        plain causal attention with the T queries at the last T of the S key positions.
        Returns [B, T, D]."""
        B, T, _ = x.shape
        N, K, H = self.n_heads, self.n_kv_heads, self.head_dim
        q = self.q_proj(x).view(B, T, N, H).transpose(1, 2)  # [B, N, T, H]
        k = self.k_proj(x).view(B, T, K, H).transpose(1, 2)  # [B, K, T, H]
        v = self.v_proj(x).view(B, T, K, H).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)  # [B, K, S, H]
        S = k.shape[2]

        if mask is None and T == S and self.softcap is None:
            # Plain causal attention (training, unpadded prefill): the fused kernel path.
            out = F.scaled_dot_product_attention(
                q, k, v, is_causal=True, scale=self.scale, enable_gqa=N != K
            )
            return self.o_proj(out.transpose(1, 2).reshape(B, T, N * H))

        # Query head n reads KV head n // G: fold the G query heads of a KV head into the
        # query axis, so no key or value is ever copied.  q: [B, K, G*T, H]
        G = N // K
        q = q.reshape(B, K, G * T, H)
        if mask is None and T == 1:
            pass  # one new query after the cache: it sees every key, no mask needed
        else:
            if mask is None:  # causal, the T queries being the last T positions
                mask = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(S - T)[None, None]
            if G > 1:
                mask = mask.repeat(1, 1, G, 1)  # row g*T + t is query t
        if self.softcap is None:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)
        else:
            scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * self.scale
            scores = soft_cap(scores, self.softcap)
            if mask is not None:
                scores = scores.masked_fill(~mask, float("-inf"))
            out = torch.matmul(scores.softmax(-1).to(v.dtype), v)
        out = out.reshape(B, N, T, H).transpose(1, 2).reshape(B, T, N * H)
        return self.o_proj(out)
