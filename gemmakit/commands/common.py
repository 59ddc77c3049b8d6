"""What the subcommands that load a model share: their options, loading the model and its
tokenizer, and streaming generated text."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from gemmakit.config import GemmaConfig
from gemmakit.dtypes import DTYPES, torch_dtype
from gemmakit.errors import CheckpointError, MissingFileError, UsageError
from gemmakit.quant.modes import QUANT_MODES
from gemmakit.resolve import find_tokenizer, model_path, tokenizer_beside


def add_model_args(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="an installed model (gemma3-270m) or a preset name")
    src.add_argument("--checkpoint", help="HF directory, .safetensors, .ckpt or .gguf file")
    p.add_argument("--preset", help="check the checkpoint against this preset")
    p.add_argument("--tokenizer", help="SentencePiece .model file (default: beside the weights)")
    p.add_argument("--adapter", help="a LoRA folder in PEFT's format (a LoRA SFT checkpoint)")
    p.add_argument("--dtype", choices=DTYPES, help="default: the checkpoint's own")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cpu)")
    p.add_argument(
        "--quant",
        choices=QUANT_MODES,
        help="keep: the file's quantized weights stay in their blocks (GGUF, a `gemmakit "
        "quantize` folder); int8/int4/...: quantize at load; default: dequantize (exact path)",
    )


def add_recipe_args(p: argparse.ArgumentParser, recipe_help: str, example: str) -> None:
    """The arguments every training stage takes: RECIPE, --set KEY=VALUE ..., --resume."""
    p.add_argument("recipe", help=recipe_help)
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"override a recipe value, e.g. --set {example} (repeatable)",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue from the newest checkpoint in the recipe's run_dir",
    )


def on_main_rank() -> bool:
    """Whether this process is rank 0 of a torchrun world (or runs alone): the one that prints
    a training command's summary, so it shows once, not once per process."""
    return os.environ.get("RANK", "0") == "0"


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--temperature", type=float, default=0.0, help=">= 0; 0: greedy")
    p.add_argument("--top-k", type=int, default=None, help="keep the k most likely tokens (>= 1)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus mass, in (0, 1]")
    p.add_argument("--seed", type=int, default=None)


def check_sampling_args(args: argparse.Namespace) -> None:
    """UsageError (one line) when --max-new-tokens or a sampling option is out of range."""
    from gemmakit.generation import check_sampling

    options = ("max_new_tokens", "temperature", "top_k", "top_p", "seed")
    names = {k: "--" + k.replace("_", "-") for k in options}
    check_sampling(args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed, names)


def check_device(name: str | None) -> None:
    """UsageError when --device names no device torch knows (cpu, cuda, cuda:1, mps, ...)."""
    import torch

    if name is None:
        return
    try:
        torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name!r}: not a device (cpu, cuda, cuda:N, mps, ...)") from None


def load_model_and_tokenizer(args: argparse.Namespace):
    """(model, tokenizer) for --model/--checkpoint, --tokenizer, --preset, --dtype, --device;
    a tokenizer whose ids do not fit the model's embedding is a CheckpointError."""
    from gemmakit.api import load_model
    from gemmakit.tokenizer import load_tokenizer

    check_device(args.device)
    source = args.model or args.checkpoint
    dtype = torch_dtype(args.dtype)
    model = load_model(
        source,
        dtype=dtype,
        device=args.device,
        config=args.preset,
        adapter=args.adapter,
        quant=getattr(args, "quant", None),
    )
    tokenizer = load_tokenizer(args.tokenizer or source)
    check_vocab_fits(tokenizer, model.config, args.tokenizer or source)
    return model, tokenizer


def check_vocab_fits(tokenizer, config: GemmaConfig, name: object) -> None:
    """Raise CheckpointError unless every id of `tokenizer` (loaded from `name`) has a row in
    the model's embedding: an id beyond it would index out of range."""
    if tokenizer.vocab_size > config.vocab_size:
        raise CheckpointError(
            f"{name}: the tokenizer has {tokenizer.vocab_size} pieces but the model "
            f"{config.name!r} embeds only {config.vocab_size} ids; give the model's own "
            "tokenizer (--tokenizer)"
        )


def stream_text(tokenizer, steps, out=None) -> list[int]:
    """Print decoded text as tokens arrive (decoding the whole so far keeps multi-byte
    characters and SentencePiece spaces right); returns the ids."""
    out = out or sys.stdout  # looked up per call: sys.stdout may be replaced (tests, pipes)
    ids: list[int] = []
    shown = ""
    for step in steps:
        if step[0] is None:
            break
        ids.append(step[0])
        text = tokenizer.decode(ids)
        if not text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for more bytes
            out.write(text[len(shown) :])
            out.flush()
            shown = text
    return ids


def tokenizer_proto(named: str | None, src: Path) -> bytes | None:
    """The serialized SentencePiece model that goes with the output: the one `--tokenizer`
    names (a `.model`, a checkpoint with one beside it, a `.gguf`), else the source's own;
    None when the source has none. A GGUF vocabulary is rebuilt in memory, never in a file."""
    from gemmakit.checkpoint.gguf_file import GGUFFile
    from gemmakit.checkpoint.gguf_vocab import sentencepiece_proto_from_metadata

    path = model_path(named) if named else src
    if path.suffix == ".gguf" and path.is_file():
        meta = GGUFFile(path).metadata
        if meta.get("tokenizer.ggml.tokens") is None:
            if named:
                raise MissingFileError(f"{named}: this GGUF file holds no vocabulary")
            return None  # weights only
        return sentencepiece_proto_from_metadata(meta, str(path))
    found = find_tokenizer(path) if named else tokenizer_beside(path)
    return found.read_bytes() if found is not None else None
