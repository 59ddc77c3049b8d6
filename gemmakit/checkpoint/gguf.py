"""GGUF (llama.cpp) checkpoints: a lazy tensor reader, the config from the file's metadata, and the
layout from our parameter names to llama.cpp's.

Two things llama.cpp's converter does to Gemma weights, undone here:
- every RMSNorm weight is stored as 1 + w (it folds Gemma's "+1" in), so the layout subtracts 1;
- q and k rows are NOT permuted for Gemma (only for LLaMA-style RoPE), so they load as they are.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from gemmakit.checkpoint.dequant import dequantize
from gemmakit.checkpoint.gguf_file import GGUFFile, GGUFFormatError
from gemmakit.checkpoint.gguf_vocab import sentencepiece_proto_from_gguf
from gemmakit.checkpoint.layouts import Spec
from gemmakit.checkpoint.sources import CheckpointError, TensorSource
from gemmakit.config import GEMMA3_TOKEN_IDS, PRESETS, GemmaConfig, TokenIds

__all__ = ["GGUFSource", "config_from_gguf", "gguf_layout", "sentencepiece_proto_from_gguf"]

ARCHITECTURES = ("gemma", "gemma2", "gemma3")


class GGUFSource(TensorSource):
    """A `.gguf` file: keys are llama.cpp names (`blk.0.attn_q.weight`), shapes in PyTorch
    (out, in) order, and get(key) dequantizes to a float32 tensor."""

    default_dtype = torch.float32

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            self.file = GGUFFile(self.path)
        except GGUFFormatError as e:
            raise CheckpointError(str(e)) from e

    def keys(self) -> list[str]:
        return list(self.file.tensors)

    def shape(self, key: str) -> tuple[int, ...]:
        return self.file.tensors[key].shape

    def qtype(self, key: str) -> str:
        """The stored GGML type's name (F32, Q8_0, Q4_K, ...)."""
        return self.file.tensors[key].qtype.name

    def get(self, key: str) -> torch.Tensor:
        if key not in self.file.tensors:
            raise CheckpointError(f"{self.path}: no tensor {key!r}")
        info = self.file.tensors[key]
        try:
            return dequantize(self.file.raw(key), info.qtype, info.shape)
        except NotImplementedError as e:
            raise CheckpointError(f"{self.path}: tensor {key!r}: {e}") from e

    def config(self) -> GemmaConfig:
        try:
            return config_from_gguf(self.file.metadata, self.shape("token_embd.weight")[0])
        except (KeyError, ValueError) as e:
            raise CheckpointError(f"{self.path}: {e}") from e


def config_from_gguf(meta: dict[str, Any], vocab_size: int | None = None) -> GemmaConfig:
    """A GemmaConfig from GGUF metadata (`general.architecture` gemma, gemma2 or gemma3).

    Fields llama.cpp does not store it hard-codes per architecture, and so do we: Gemma 2
    alternates local/global layers (window 4096), Gemma 3 has one global layer in six and a
    local RoPE base of 10k. The name is the preset's when every field matches one.
    """
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise CheckpointError(
            f"general.architecture is {arch!r}, not a Gemma text model ({', '.join(ARCHITECTURES)})"
        )

    def field(key: str, default: Any = KeyError) -> Any:  # KeyError: required
        value = meta.get(f"{arch}.{key}", default)
        if value is KeyError:
            raise CheckpointError(f"metadata field {arch}.{key} is missing")
        return value

    n_heads = int(field("attention.head_count"))
    d_model = int(field("embedding_length"))
    vocab = vocab_size or field("vocab_size", None) or len(meta["tokenizer.ggml.tokens"])
    fields: dict[str, Any] = dict(
        name=str(meta.get("general.name", arch)),
        vocab_size=int(vocab),
        d_model=d_model,
        n_layers=int(field("block_count")),
        n_heads=n_heads,
        n_kv_heads=int(field("attention.head_count_kv", n_heads)),
        head_dim=int(field("attention.key_length", d_model // n_heads)),
        ffn_dim=int(field("feed_forward_length")),
        max_seq_len=int(field("context_length", 8192)),
        rope_theta=float(field("rope.freq_base", 10_000.0)),
        norm_eps=float(field("attention.layer_norm_rms_epsilon", 1e-6)),
        tokens=_token_ids(meta, GEMMA3_TOKEN_IDS if arch == "gemma3" else TokenIds()),
    )
    if arch in ("gemma2", "gemma3"):
        fields |= dict(
            sandwich_norm=True,
            sliding_window=int(
                field("attention.sliding_window", *([4096] if arch == "gemma2" else []))
            ),
            global_every=2 if arch == "gemma2" else 6,
            attn_logit_softcap=field("attn_logit_softcapping", None),
            final_logit_softcap=field("final_logit_softcapping", None),
        )
    # norm_eps is stored as float32 (9.99999997e-07); round it back to the value it encodes
    fields["norm_eps"] = float(f"{fields['norm_eps']:.6g}")
    # the 27B models scale queries by (d/Nq)^-0.5, not head_dim^-0.5; llama.cpp tells them by
    # their layer count, as here
    if (arch, fields["n_layers"]) in (("gemma2", 46), ("gemma3", 62)):
        fields["query_pre_attn_scalar"] = d_model / n_heads
    if arch == "gemma3":
        fields |= dict(qk_norm=True, rope_local_theta=10_000.0)
        if field("rope.scaling.type", None) == "linear":
            fields["rope_scaling"] = float(field("rope.scaling.factor"))
    config = GemmaConfig(**fields)
    for make in PRESETS.values():
        preset = make()
        if preset.replace(name=config.name, padded_vocab_size=None) == config:
            return config.replace(name=preset.name, padded_vocab_size=preset.padded_vocab_size)
    return config


def _token_ids(meta: dict[str, Any], defaults: TokenIds) -> TokenIds:
    """Special ids from tokenizer.ggml.* where the file names them, the family's otherwise."""
    found = {
        name: meta[f"tokenizer.ggml.{key}"]
        for name, key in (
            ("bos", "bos_token_id"),
            ("eos", "eos_token_id"),
            ("pad", "padding_token_id"),
            ("unk", "unknown_token_id"),
        )
        if f"tokenizer.ggml.{key}" in meta
    }
    return TokenIds(**{**defaults.__dict__, **{k: int(v) for k, v in found.items()}})


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
