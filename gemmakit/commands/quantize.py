"""`gemmakit quantize SRC OUT --to FORMAT`: write a checkpoint whose linear weights and tied
embedding are stored quantized (int8, int4, int4-g128, q8_0, q4_k; see gemmakit/quant/), as an
HF folder that `load_model(OUT, quant="keep")` / `--quant keep` runs without dequantizing."""

from __future__ import annotations

import argparse
from pathlib import Path

from gemmakit.commands.common import tokenizer_proto

TARGETS = ("int8", "int4", "int4-g128", "q8_0", "q4_k")


def register(sub) -> None:
    p = sub.add_parser("quantize", help="save a checkpoint with quantized weights")
    p.add_argument("src", help="checkpoint path (HF, .ckpt, .gguf) or installed model name")
    p.add_argument("out", help="output folder (safetensors + config.json + tokenizer.model)")
    p.add_argument("--to", required=True, choices=TARGETS, help="int4: groups of 32")
    p.add_argument("--tokenizer", help="SentencePiece .model to store (default: the source's)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from gemmakit.api import load_model
    from gemmakit.checkpoint.save import prepare_output
    from gemmakit.quant.checkpoint import save_quantized
    from gemmakit.quant.model import quant_summary
    from gemmakit.resolve import checkpoint_path

    src = checkpoint_path(args.src)
    prepare_output(Path(args.out), folder=True, source=src)  # before the (long) load
    model = load_model(src, dtype=torch.float32, quant=args.to)
    save_quantized(model, args.out, tokenizer_proto(args.tokenizer, src))
    sizes = ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in quant_summary(model).items())
    print(f"wrote {args.out} ({model.config.name}, {args.to}: {sizes})")
    return 0
