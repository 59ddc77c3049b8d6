"""Shared fixtures: small HF transformers Gemma models with random weights, saved to disk."""

from __future__ import annotations

import pytest
import torch

VOCAB = 512


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Every weight random, every norm weight non-zero (so the 1 + w of RMSNorm is tested)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            std = 0.5 if "norm" in name else 0.1
            p.copy_(torch.randn(p.shape, generator=gen) * std)


def make_hf_model(kind: str, seed: int = 0):
    """kind: gemma-mq (2B-shaped), gemma-mh (7B-shaped), gemma2, gemma3."""
    import transformers as tf

    common = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        head_dim=16,
        max_position_embeddings=256,
        num_attention_heads=4,
    )
    if kind == "gemma-mq":
        model = tf.GemmaForCausalLM(
            tf.GemmaConfig(num_hidden_layers=3, num_key_value_heads=1, **common)
        )
    elif kind == "gemma-mh":
        model = tf.GemmaForCausalLM(
            tf.GemmaConfig(num_hidden_layers=3, num_key_value_heads=4, **common)
        )
    elif kind == "gemma2":
        cfg = tf.Gemma2Config(
            num_hidden_layers=4,
            num_key_value_heads=2,
            sliding_window=8,
            query_pre_attn_scalar=24,
            **common,
        )
        model = tf.Gemma2ForCausalLM(cfg)
    elif kind == "gemma3":
        cfg = tf.Gemma3TextConfig(
            num_hidden_layers=7, num_key_value_heads=1, sliding_window=8, **common
        )
        model = tf.Gemma3ForCausalLM(cfg)
    else:
        raise ValueError(kind)
    _randomize(model, seed)
    return model.eval()


@pytest.fixture(scope="session")
def hf_checkpoints(tmp_path_factory):
    """kind -> (HF model, directory it was saved to with save_pretrained)."""
    out = {}
    for kind in ("gemma-mq", "gemma-mh", "gemma2", "gemma3"):
        model = make_hf_model(kind)
        path = tmp_path_factory.mktemp(kind)
        model.save_pretrained(path)
        out[kind] = (model, path)
    return out
