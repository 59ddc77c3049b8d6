"""HF `config.json` <-> GemmaConfig, and a config guessed from tensor shapes."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from gemmakit.config import GEMMA3_TOKEN_IDS, PRESETS, GemmaConfig, TokenIds
from gemmakit.errors import CheckpointError, ConfigError

# GemmaConfig field -> the config.json key it comes from
HF_KEYS = {
    "vocab_size": "vocab_size",
    "d_model": "hidden_size",
    "n_layers": "num_hidden_layers",
    "n_heads": "num_attention_heads",
    "n_kv_heads": "num_key_value_heads",
    "head_dim": "head_dim",
    "ffn_dim": "intermediate_size",
    "max_seq_len": "max_position_embeddings",
    "norm_eps": "rms_norm_eps",
    "rope_theta": "rope_theta",
    "query_pre_attn_scalar": "query_pre_attn_scalar",
    "sliding_window": "sliding_window",
    "attn_logit_softcap": "attn_logit_softcapping",
    "final_logit_softcap": "final_logit_softcapping",
    "global_every": "layer_types",
}

_ARCH = {
    "gemma": "GemmaForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
}


def config_from_hf(hf: dict[str, Any], name: str = "checkpoint") -> GemmaConfig:
    """A GemmaConfig from the fields of an HF Gemma, Gemma 2 or Gemma 3 `config.json`."""
    if "text_config" in hf:  # Gemma 3 multimodal wrapper: the text model's fields
        hf = {"model_type": "gemma3_text", **hf["text_config"]}
    kind = hf.get("model_type", "gemma")
    if kind not in _ARCH:
        raise CheckpointError(f"model_type {kind!r} is not a Gemma text model ({', '.join(_ARCH)})")
    rope = hf.get("rope_parameters") or {}
    global_rope = rope.get("full_attention", rope)
    local_rope = rope.get("sliding_attention", {})
    scaling = hf.get("rope_scaling") or global_rope
    n_heads, head_dim = hf["num_attention_heads"], hf.get("head_dim")
    if head_dim is None and isinstance(n_heads, int) and n_heads > 0:
        head_dim = hf["hidden_size"] // n_heads  # else GemmaConfig names num_attention_heads
    fields: dict[str, Any] = dict(
        name=name,
        vocab_size=hf["vocab_size"],
        d_model=hf["hidden_size"],
        n_layers=hf["num_hidden_layers"],
        n_heads=n_heads,
        n_kv_heads=hf.get("num_key_value_heads", n_heads),
        head_dim=head_dim,
        ffn_dim=hf["intermediate_size"],
        max_seq_len=hf.get("max_position_embeddings", 8192),
        rope_theta=float(global_rope.get("rope_theta", hf.get("rope_theta", 10_000.0))),
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        query_pre_attn_scalar=hf.get("query_pre_attn_scalar"),
    )
    if fields["query_pre_attn_scalar"] == fields["head_dim"]:
        fields["query_pre_attn_scalar"] = None  # the default; keeps presets comparable
    if scaling.get("rope_type") == "linear" or scaling.get("type") == "linear":
        fields["rope_scaling"] = float(scaling["factor"])
    if kind in ("gemma2", "gemma3_text"):
        types = hf.get("layer_types")
        if types:
            globals_ = [i for i, t in enumerate(types) if t == "full_attention"]
            every = globals_[0] + 1 if globals_ else len(types) + 1
            if any(((i + 1) % every == 0) != (t == "full_attention") for i, t in enumerate(types)):
                raise CheckpointError(f"layer_types pattern {types} is not periodic")
        else:
            every = hf.get("sliding_window_pattern", hf.get("_sliding_window_pattern", 2))
        fields |= dict(
            sandwich_norm=True,
            sliding_window=hf.get("sliding_window"),
            global_every=every,
            attn_logit_softcap=hf.get("attn_logit_softcapping"),
            final_logit_softcap=hf.get("final_logit_softcapping"),
        )
    if kind == "gemma3_text":
        fields |= dict(
            qk_norm=True,
            rope_local_theta=float(
                local_rope.get("rope_theta", hf.get("rope_local_base_freq", 10_000.0))
            ),
            tokens=GEMMA3_TOKEN_IDS,
        )
    try:
        return GemmaConfig(**fields)
    except ConfigError as e:
        key = HF_KEYS.get(getattr(e, "field", ""))
        value = fields.get(getattr(e, "field", ""))
        if key is None:
            raise
        raise ConfigError(f"{key}={value!r}: {e}") from None


def config_to_hf(config: GemmaConfig) -> dict[str, Any]:
    """The `config.json` fields HF transformers needs to load our saved checkpoint."""
    kind = {1: "gemma", 2: "gemma2", 3: "gemma3_text"}[config.generation]
    t: TokenIds = config.tokens
    hf: dict[str, Any] = dict(
        architectures=[_ARCH[kind]],
        model_type=kind,
        vocab_size=config.vocab_size,
        hidden_size=config.d_model,
        intermediate_size=config.ffn_dim,
        num_hidden_layers=config.n_layers,
        num_attention_heads=config.n_heads,
        num_key_value_heads=config.n_kv_heads,
        head_dim=config.head_dim,
        hidden_act="gelu_pytorch_tanh",
        hidden_activation="gelu_pytorch_tanh",
        max_position_embeddings=config.max_seq_len,
        rms_norm_eps=config.norm_eps,
        rope_theta=config.rope_theta,
        attention_bias=False,
        tie_word_embeddings=True,
        pad_token_id=t.pad,
        eos_token_id=t.eos,
        bos_token_id=t.bos,
    )
    if config.rope_scaling != 1.0:
        hf["rope_scaling"] = {"rope_type": "linear", "factor": config.rope_scaling}
    if kind != "gemma":
        hf |= dict(
            query_pre_attn_scalar=config.query_pre_attn_scalar or config.head_dim,
            sliding_window=config.sliding_window,
            layer_types=[
                "sliding_attention" if config.is_local(i) else "full_attention"
                for i in range(config.n_layers)
            ],
            attn_logit_softcapping=config.attn_logit_softcap,
            final_logit_softcapping=config.final_logit_softcap,
        )
    if kind == "gemma3_text":
        hf["rope_local_base_freq"] = config.rope_local_theta
        hf["rope_parameters"] = {
            "full_attention": {"rope_type": "default", "rope_theta": config.rope_theta},
            "sliding_attention": {"rope_type": "default", "rope_theta": config.rope_local_theta},
        }
        if config.rope_scaling != 1.0:
            hf["rope_parameters"]["full_attention"] = {
                "rope_type": "linear",
                "rope_theta": config.rope_theta,
                "factor": config.rope_scaling,
            }
    return hf


def read_hf_config(directory: Path) -> GemmaConfig | None:
    import json

    path = directory / "config.json"
    if not path.exists():
        return None
    try:
        hf = json.loads(path.read_text())
        if not isinstance(hf, dict):
            raise TypeError("not a JSON object")
        return config_from_hf(hf, name=directory.name)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        detail = f"missing key {e}" if isinstance(e, KeyError) else str(e)
        raise CheckpointError(f"{path}: {detail}") from e


def infer_config(shapes: dict[str, tuple[int, ...]], embed_key: str) -> GemmaConfig:
    """The preset whose shapes fit a checkpoint's tensors, with its layer count adjusted.

    Used for files that carry no config (gemma_pytorch `.ckpt`, a bare `.safetensors`).
    """
    vocab, d = shapes[embed_key]
    layers = {int(m.group(1)) for k in shapes if (m := re.search(r"layers\.(\d+)\.", k))}
    n_layers = max(layers) + 1 if layers else 0
    ffn = next((s[0] for k, s in shapes.items() if k.endswith("gate_proj.weight")), None)
    has_qk_norm = any(k.endswith("q_norm.weight") for k in shapes)
    has_sandwich = any(k.endswith("pre_feedforward_layernorm.weight") for k in shapes)
    for make in PRESETS.values():
        cfg = make()
        if (cfg.d_model, cfg.ffn_dim, cfg.qk_norm, cfg.sandwich_norm) == (
            d,
            ffn,
            has_qk_norm,
            has_sandwich,
        ):
            return cfg.replace(name=f"{cfg.name} (inferred)", vocab_size=vocab, n_layers=n_layers)
    raise CheckpointError(
        f"no preset has d_model={d}, ffn_dim={ffn}; pass the preset (config=...) explicitly"
    )
