"""`gemmakit merge-lora BASE ADAPTER OUT`: fold a LoRA adapter (PEFT's folder, e.g. a LoRA SFT
checkpoint) into its base model's weights and write the result as an HF checkpoint folder,
which every tool that reads Gemma checkpoints loads (gemmakit, transformers, convert)."""

from __future__ import annotations

import argparse

from gemmakit.commands.common import DTYPES, torch_dtype


def register(sub) -> None:
    p = sub.add_parser("merge-lora", help="fold a LoRA adapter into its base, for export")
    p.add_argument("base", help="the base model: checkpoint path or installed model name")
    p.add_argument("adapter", help="PEFT folder (adapter_config.json + adapter_model.safetensors)")
    p.add_argument("out", help="output folder (HF safetensors + config.json + tokenizer.model)")
    p.add_argument("--dtype", choices=DTYPES, help="default: the base's own (float32 for GGUF)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from gemmakit.api import load_model
    from gemmakit.checkpoint import save_hf

    model = load_model(args.base, dtype=torch_dtype(args.dtype), adapter=args.adapter, merge=True)
    tokenizer = _tokenizer_file(Path(args.adapter), args.base)
    extra = {"tokenizer.model": tokenizer} if tokenizer else None
    save_hf(model, args.out, extra_files=extra)
    print(f"wrote {args.out} ({model.config.name} with the adapter of {args.adapter} merged)")
    return 0


def _tokenizer_file(adapter, base: str):
    """The adapter's tokenizer.model, else the base's (its folder's, or a GGUF's vocabulary);
    None when neither has one."""
    from pathlib import Path

    from gemmakit.installed import installed_model_path
    from gemmakit.tokenizer import tokenizer_file_for_gguf

    if (adapter / "tokenizer.model").is_file():
        return adapter / "tokenizer.model"
    path = installed_model_path(base) or Path(base)
    if path.suffix == ".gguf" and path.is_file():
        return tokenizer_file_for_gguf(path)
    folder = path if path.is_dir() else path.parent
    return folder / "tokenizer.model" if (folder / "tokenizer.model").is_file() else None
