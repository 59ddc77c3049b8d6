"""`gemmakit convert SRC DST`: between HF safetensors, gemma_pytorch .ckpt (and from GGUF)."""

from __future__ import annotations

import argparse
from pathlib import Path

from gemmakit.commands.common import DTYPES, torch_dtype


def register(sub) -> None:
    p = sub.add_parser("convert", help="convert a checkpoint to another format")
    p.add_argument("src", help="HF directory, .safetensors, .ckpt or .gguf")
    p.add_argument("dst", help="a directory (HF layout) or a .ckpt file (gemma_pytorch)")
    p.add_argument("--to", choices=["hf", "gemma_pytorch"], help="default: from dst's name")
    p.add_argument("--preset", help="check the source against this preset")
    p.add_argument("--dtype", choices=DTYPES, help="default: the source's own")
    p.add_argument("--max-shard-size", type=float, default=None, help="GB per HF shard")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from gemmakit.checkpoint import load_checkpoint, save_gemma_pytorch, save_hf

    dst = Path(args.dst)
    fmt = args.to or ("gemma_pytorch" if dst.suffix == ".ckpt" else "hf")
    dtype = torch_dtype(args.dtype)
    model = load_checkpoint(args.src, config=args.preset, dtype=dtype)
    if fmt == "hf":
        shard = int(args.max_shard_size * 1e9) if args.max_shard_size else None
        extra = {}
        tok = _tokenizer_file(Path(args.src))
        if tok is not None:
            extra["tokenizer.model"] = tok
        save_hf(model, dst, max_shard_bytes=shard, extra_files=extra)
    else:
        save_gemma_pytorch(model, dst)
    print(f"wrote {dst} ({fmt}, {model.config.name}, {next(model.parameters()).dtype})")
    return 0


def _tokenizer_file(src: Path) -> Path | None:
    """The tokenizer that travels with a checkpoint, if there is one."""
    if src.suffix == ".gguf":
        from gemmakit.tokenizer import tokenizer_file_for_gguf

        return tokenizer_file_for_gguf(src)
    folder = src if src.is_dir() else src.parent
    tok = folder / "tokenizer.model"
    return tok if tok.exists() else None
