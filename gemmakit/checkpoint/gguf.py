"""A GemmaConfig from a GGUF (llama.cpp) file's metadata.

The rest of GGUF support: the reader (sources.GGUFSource over gguf_file.py), the tensor names
(layouts.gguf_layout), the vocabulary (gguf_vocab.py) and the writer (gguf_write.py).
"""

from __future__ import annotations

from typing import Any

from gemmakit.checkpoint.gguf_vocab import sentencepiece_proto_from_gguf
from gemmakit.config import GEMMA3_TOKEN_IDS, PRESETS, GemmaConfig, TokenIds
from gemmakit.errors import CheckpointError

__all__ = ["ARCHITECTURES", "config_from_gguf", "sentencepiece_proto_from_gguf"]

ARCHITECTURES = ("gemma", "gemma2", "gemma3")


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
        head_dim=int(field("attention.key_length", d_model // max(n_heads, 1))),
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
