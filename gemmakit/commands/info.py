"""`gemmakit info PRESET`: shapes and parameter counts (report Table 1 and 2)."""

from __future__ import annotations

import argparse

from gemmakit.config import PRESETS, get_config


def register(sub) -> None:
    p = sub.add_parser("info", help="shapes and parameter counts of a preset")
    p.add_argument("preset", choices=list(PRESETS))
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from gemmakit.model.transformer import Gemma

    cfg = get_config(args.preset)
    with torch.device("meta"):  # count the parameters of the real module, allocating nothing
        model = Gemma(cfg)
    embedding = model.embedder.weight.numel()
    non_embedding = sum(p.numel() for p in model.parameters()) - embedding
    assert non_embedding == cfg.non_embedding_params()
    kinds = {1: "multi-query", cfg.n_heads: "multi-head"}
    rows = [
        ("d_model", cfg.d_model),
        ("layers", cfg.n_layers),
        (
            "query heads / KV heads",
            f"{cfg.n_heads} / {cfg.n_kv_heads} ({kinds.get(cfg.n_kv_heads, 'grouped-query')})",
        ),
        ("head_dim", cfg.head_dim),
        ("FFN width (gate, up each)", cfg.ffn_dim),
        ("feedforward hidden dims (Table 1)", 2 * cfg.ffn_dim),
        ("vocab (checkpoint)", cfg.vocab_size),
        ("context length", cfg.max_seq_len),
        (
            "sliding window",
            f"{cfg.sliding_window}, every {cfg.global_every}th layer global"
            if cfg.sliding_window
            else "none",
        ),
        ("embedding params", f"{embedding:,}"),
        ("non-embedding params", f"{non_embedding:,}"),
        ("total params", f"{embedding + non_embedding:,}"),
    ]
    if cfg.padded_vocab_size:
        padded = cfg.embedding_params(padded=True)
        rows += [
            ("vocab (Table 1, padded)", cfg.padded_vocab_size),
            ("embedding params (padded)", f"{padded:,}"),
            ("total params (padded)", f"{padded + non_embedding:,}"),
        ]
    width = max(len(k) for k, _ in rows)
    print(cfg.name)
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")
    return 0
