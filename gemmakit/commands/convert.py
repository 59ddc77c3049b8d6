"""`gemmakit convert SRC DST`: between HF safetensors, gemma_pytorch .ckpt and GGUF."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from gemmakit.commands.common import check_vocab_fits, tokenizer_proto
from gemmakit.dtypes import DTYPES, torch_dtype
from gemmakit.errors import UsageError
from gemmakit.resolve import (
    TOKENIZER_FILE,
    checkpoint_path,
)

# --dtype name -> the GGUF dtype of save_gguf
GGUF_DTYPE = {"float32": "f32", "float16": "f16", "bfloat16": "bf16", "q8_0": "q8_0"}


def register(sub) -> None:
    p = sub.add_parser("convert", help="convert a checkpoint to another format")
    p.add_argument("src", help="HF directory, .safetensors, .ckpt, .gguf or an installed model")
    p.add_argument(
        "dst", help="a directory (HF layout), a .ckpt file (gemma_pytorch) or a .gguf file"
    )
    p.add_argument("--to", choices=["hf", "gemma_pytorch", "gguf"], help="default: from dst's name")
    p.add_argument("--preset", help="check the source against this preset")
    p.add_argument(
        "--dtype",
        choices=[*DTYPES, "q8_0"],
        help="default: the source's own (GGUF: bfloat16 from a bfloat16 source, else float16); "
        "q8_0 only for GGUF",
    )
    p.add_argument("--max-shard-size", type=float, default=None, help="GB per HF shard")
    p.add_argument(
        "--tokenizer",
        help="SentencePiece .model or .gguf whose vocabulary to use (default: the source's own)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from gemmakit.checkpoint import load_checkpoint, save_gemma_pytorch, save_gguf, save_hf
    from gemmakit.checkpoint.save import prepare_output
    from gemmakit.tokenizer import Tokenizer

    src = checkpoint_path(args.src)
    dst = Path(args.dst)
    suffixes = {".ckpt": "gemma_pytorch", ".gguf": "gguf"}
    fmt = args.to or suffixes.get(dst.suffix, "hf")
    if args.dtype == "q8_0" and fmt != "gguf":
        raise UsageError("--dtype q8_0 is for GGUF output only")
    if args.max_shard_size is not None and not args.max_shard_size > 0:
        raise UsageError(f"--max-shard-size must be > 0 (GB), got {args.max_shard_size}")
    prepare_output(dst, folder=fmt == "hf", source=src)  # before the (long) load
    proto = tokenizer_proto(args.tokenizer, src)
    tokenizer = None
    if proto is not None:
        tokenizer = Tokenizer(model_proto=proto, name=args.tokenizer or f"the tokenizer of {src}")
    load_dtype = None if fmt == "gguf" else torch_dtype(args.dtype)
    model = load_checkpoint(src, config=args.preset, dtype=load_dtype)
    if tokenizer is not None:
        check_vocab_fits(tokenizer, model.config, args.tokenizer or src)
    if fmt == "gguf":
        dtype = args.dtype or ("bfloat16" if str(model.dtype) == "torch.bfloat16" else "float16")
        if tokenizer is None:
            print(
                f"warning: no tokenizer found for {src}: {dst} gets no vocabulary (llama.cpp "
                "needs one; give --tokenizer)",
                file=sys.stderr,
            )
        save_gguf(model, dst, tokenizer=tokenizer, dtype=GGUF_DTYPE[dtype])
        print(f"wrote {dst} (gguf, {model.config.name}, {GGUF_DTYPE[dtype]})")
        return 0
    if fmt == "hf":
        shard = int(args.max_shard_size * 1e9) if args.max_shard_size else None
        extra = {TOKENIZER_FILE: proto} if proto is not None else {}
        save_hf(model, dst, max_shard_bytes=shard, extra_files=extra)
    else:
        save_gemma_pytorch(model, dst)
    print(f"wrote {dst} ({fmt}, {model.config.name}, {next(model.parameters()).dtype})")
    return 0
