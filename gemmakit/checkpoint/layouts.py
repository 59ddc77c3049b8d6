"""Where each of the model's tensors lives in each checkpoint format.

A layout maps the model's own parameter names to a `Spec`: the key in the file, for fused
tensors the rows that belong to this parameter, and a transform applied on reading. Adding a
format means adding a layout here: HF transformers, gemma_pytorch and GGUF (llama.cpp).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from gemmakit.config import GemmaConfig
from gemmakit.errors import CheckpointError


@dataclass(frozen=True)
class Spec:
    key: str  # name in the checkpoint file
    rows: tuple[int, int] | None = None  # [start, stop) rows of a fused tensor
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None  # applied after reading

    def describe(self) -> str:
        return f"{self.key!r}" + (f" rows {self.rows[0]}:{self.rows[1]}" if self.rows else "")


def _block_names(config: GemmaConfig) -> dict[str, str]:
    """Our per-block parameter suffix -> the HF / gemma_pytorch suffix."""
    names = {
        "attn_norm.weight": "input_layernorm.weight",
        "attn.o_proj.weight": "self_attn.o_proj.weight",
        "mlp.gate_proj.weight": "mlp.gate_proj.weight",
        "mlp.up_proj.weight": "mlp.up_proj.weight",
        "mlp.down_proj.weight": "mlp.down_proj.weight",
    }
    if config.sandwich_norm:
        names |= {
            "post_attn_norm.weight": "post_attention_layernorm.weight",
            "mlp_norm.weight": "pre_feedforward_layernorm.weight",
            "post_mlp_norm.weight": "post_feedforward_layernorm.weight",
        }
    else:  # Gemma 1 calls its pre-MLP norm "post_attention_layernorm"
        names["mlp_norm.weight"] = "post_attention_layernorm.weight"
    if config.qk_norm:
        names |= {
            "attn.q_norm.weight": "self_attn.q_norm.weight",
            "attn.k_norm.weight": "self_attn.k_norm.weight",
        }
    return names


def hf_layout(config: GemmaConfig, prefix: str = "model.") -> dict[str, Spec]:
    """HF transformers `Gemma*ForCausalLM` safetensors names."""
    layout = {
        "embedder.weight": Spec(f"{prefix}embed_tokens.weight"),
        "final_norm.weight": Spec(f"{prefix}norm.weight"),
    }
    for i in range(config.n_layers):
        block = {ours: theirs for ours, theirs in _block_names(config).items()}
        for proj in ("q_proj", "k_proj", "v_proj"):
            block[f"attn.{proj}.weight"] = f"self_attn.{proj}.weight"
        for ours, theirs in block.items():
            layout[f"blocks.{i}.{ours}"] = Spec(f"{prefix}layers.{i}.{theirs}")
    return layout


def gemma_pytorch_layout(config: GemmaConfig) -> dict[str, Spec]:
    """google/gemma_pytorch `.ckpt` names; q, k, v fused as rows [q heads | k heads | v heads]."""
    layout = {
        "embedder.weight": Spec("embedder.weight"),
        "final_norm.weight": Spec("model.norm.weight"),
    }
    q = config.n_heads * config.head_dim
    kv = config.n_kv_heads * config.head_dim
    for i in range(config.n_layers):
        pre = f"model.layers.{i}."
        for ours, theirs in _block_names(config).items():
            layout[f"blocks.{i}.{ours}"] = Spec(pre + theirs)
        qkv = pre + "self_attn.qkv_proj.weight"
        layout[f"blocks.{i}.attn.q_proj.weight"] = Spec(qkv, (0, q))
        layout[f"blocks.{i}.attn.k_proj.weight"] = Spec(qkv, (q, q + kv))
        layout[f"blocks.{i}.attn.v_proj.weight"] = Spec(qkv, (q + kv, q + 2 * kv))
    return layout


# llama.cpp's converter stores every RMSNorm weight as 1 + w (it folds Gemma's "+1" in), so
# reading subtracts 1; q and k rows are NOT permuted for Gemma (only for LLaMA-style RoPE).
def _minus_one(t: torch.Tensor) -> torch.Tensor:
    return t - 1.0


def gguf_layout(config: GemmaConfig) -> dict[str, Spec]:
    """Our parameter names -> llama.cpp tensor names; norm weights get their stored +1 removed."""
    layout = {
        "embedder.weight": Spec("token_embd.weight"),
        "final_norm.weight": Spec("output_norm.weight", transform=_minus_one),
    }
    block = {
        "attn.q_proj.weight": "attn_q",
        "attn.k_proj.weight": "attn_k",
        "attn.v_proj.weight": "attn_v",
        "attn.o_proj.weight": "attn_output",
        "mlp.gate_proj.weight": "ffn_gate",
        "mlp.up_proj.weight": "ffn_up",
        "mlp.down_proj.weight": "ffn_down",
    }
    norms = {"attn_norm.weight": "attn_norm", "mlp_norm.weight": "ffn_norm"}
    if config.sandwich_norm:
        norms |= {
            "post_attn_norm.weight": "post_attention_norm",
            "post_mlp_norm.weight": "post_ffw_norm",
        }
    if config.qk_norm:
        norms |= {"attn.q_norm.weight": "attn_q_norm", "attn.k_norm.weight": "attn_k_norm"}
    for i in range(config.n_layers):
        for ours, theirs in block.items():
            layout[f"blocks.{i}.{ours}"] = Spec(f"blk.{i}.{theirs}.weight")
        for ours, theirs in norms.items():
            layout[f"blocks.{i}.{ours}"] = Spec(f"blk.{i}.{theirs}.weight", transform=_minus_one)
    return layout


# Keys a file may hold that the model does not need (score.weight: a reward model's head, read
# by gemmakit.model.reward; load_model gives its backbone).
IGNORED_KEYS = ("lm_head.weight", "score.weight", "freqs_cis", "rotary_emb.inv_freq")

HF_PREFIXES = ("model.", "model.language_model.", "language_model.model.")


def detect_layout(keys: list[str], config: GemmaConfig) -> tuple[str, dict[str, Spec]]:
    """(format name, layout) for a file holding `keys`."""
    keyset = set(keys)
    if "embedder.weight" in keyset:
        return "gemma_pytorch", gemma_pytorch_layout(config)
    for prefix in HF_PREFIXES:
        if f"{prefix}embed_tokens.weight" in keyset:
            return "hf", hf_layout(config, prefix)
    if "token_embd.weight" in keyset:
        return "gguf", gguf_layout(config)
    raise CheckpointError(
        "no embedding table found (looked for 'model.embed_tokens.weight', 'embedder.weight', "
        "'token_embd.weight')"
    )


def is_ignored(key: str) -> bool:
    return any(key.endswith(name) for name in IGNORED_KEYS)
