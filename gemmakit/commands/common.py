"""Options shared by the subcommands that load a model."""

from __future__ import annotations

import argparse

from gemmakit.errors import UsageError

DTYPES = ("float32", "bfloat16", "float16")


def torch_dtype(name: str | None):
    """The torch dtype called `name` (torch is imported only by commands that need it)."""
    import torch

    return getattr(torch, name) if name else None


def add_model_args(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="an installed model (gemma3-270m) or a preset name")
    src.add_argument("--checkpoint", help="HF directory, .safetensors, .ckpt or .gguf file")
    p.add_argument("--preset", help="check the checkpoint against this preset")
    p.add_argument("--tokenizer", help="SentencePiece .model file (default: beside the weights)")
    p.add_argument("--dtype", choices=DTYPES, help="default: the checkpoint's own")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cpu)")


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
    from gemmakit.api import load_model
    from gemmakit.tokenizer import load_tokenizer

    check_device(args.device)
    source = args.model or args.checkpoint
    dtype = torch_dtype(args.dtype)
    model = load_model(source, dtype=dtype, device=args.device, config=args.preset)
    tok_source = args.tokenizer or source
    tokenizer = load_tokenizer(tok_source)
    return model, tokenizer
