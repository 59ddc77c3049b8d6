"""`gemmakit merge-lora BASE ADAPTER OUT`: fold a LoRA adapter (PEFT's folder, e.g. a LoRA SFT
checkpoint) into its base model's weights and write the result as an HF checkpoint folder,
which every tool that reads Gemma checkpoints loads (gemmakit, transformers, convert)."""

from __future__ import annotations

import argparse
from pathlib import Path

from gemmakit.commands.common import DTYPES, tokenizer_proto, torch_dtype
from gemmakit.resolve import TOKENIZER_FILE, checkpoint_path


def register(sub) -> None:
    p = sub.add_parser("merge-lora", help="fold a LoRA adapter into its base, for export")
    p.add_argument("base", help="the base model: checkpoint path or installed model name")
    p.add_argument("adapter", help="PEFT folder (adapter_config.json + adapter_model.safetensors)")
    p.add_argument("out", help="output folder (HF safetensors + config.json + tokenizer.model)")
    p.add_argument("--dtype", choices=DTYPES, help="default: the base's own (float32 for GGUF)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from gemmakit.api import load_model
    from gemmakit.checkpoint import save_hf

    base_path = checkpoint_path(args.base)
    model = load_model(base_path, dtype=torch_dtype(args.dtype), adapter=args.adapter, merge=True)
    beside = Path(args.adapter) / TOKENIZER_FILE  # a LoRA SFT checkpoint keeps one
    tokenizer = beside.read_bytes() if beside.is_file() else tokenizer_proto(None, base_path)
    extra = {TOKENIZER_FILE: tokenizer} if tokenizer else None
    save_hf(model, args.out, extra_files=extra)
    print(f"wrote {args.out} ({model.config.name} with the adapter of {args.adapter} merged)")
    return 0
