"""`gemmakit serve`: an OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions,
/v1/models, /health) with continuous batching, and a chat page at /. Binds 127.0.0.1 unless
--host says otherwise; with --api-key (or GEMMAKIT_API_KEY) every route wants
`Authorization: Bearer <key>` (the page: open /?key=<key>). SIGINT or SIGTERM stops it: no new
requests, the ones in flight are ended, then it exits."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from gemmakit.commands.common import add_model_args, load_model_and_tokenizer
from gemmakit.errors import MissingPackageError, UsageError


def register(sub) -> None:
    p = sub.add_parser("serve", help="serve a model over OpenAI's HTTP API", description=__doc__)
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="default: 127.0.0.1 (this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--served-name",
        help="the model name clients give (default: --model's, or "
        "the checkpoint's file or folder name)",
    )
    p.add_argument("--api-key", default=None, help="default: $GEMMAKIT_API_KEY; none: open")
    p.add_argument("--max-batch", type=int, default=16, help="sequences decoded together")
    p.add_argument("--max-queue", type=int, default=64, help="waiting beyond this: 429")
    p.add_argument(
        "--prefill-chunk",
        type=int,
        default=256,
        help="prompt tokens prefilled between two decode steps",
    )
    p.add_argument(
        "--prefix-cache",
        type=int,
        default=4096,
        help="prompt positions kept for reuse by prompts that share a prefix",
    )
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from gemmakit.serving.app import create_app
        from gemmakit.serving.engine import Engine
        from gemmakit.serving.server import Server
    except ModuleNotFoundError as e:
        raise MissingPackageError(
            f"gemmakit serve needs {e.name}: pip install 'gemmakit[serve]'"
        ) from None
    if not 1 <= args.port <= 65535:
        raise UsageError(f"--port must be from 1 to 65535, got {args.port}")
    for name in ("max_batch", "max_queue", "prefill_chunk", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.prefix_cache < 0:
        raise UsageError(f"--prefix-cache must be >= 0, got {args.prefix_cache}")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    api_key = args.api_key or os.environ.get("GEMMAKIT_API_KEY") or None
    model, tokenizer = load_model_and_tokenizer(args)
    # a server decodes for hours: the one-time move of its weights into huge pages pays back
    from gemmakit.kernels import hugepages

    hugepages.back_with_huge_pages([*model.parameters(), *model.buffers()])
    name = args.served_name or args.model or Path(args.checkpoint).name
    engine = Engine(
        model,
        max_batch=args.max_batch,
        max_queue=args.max_queue,
        prefill_chunk=args.prefill_chunk,
        prefix_tokens=args.prefix_cache,
    )
    app = create_app(engine, tokenizer, name, api_key=api_key)
    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        timeout_graceful_shutdown=5,
    )
    server = Server(config, engine)
    print(
        f"gemmakit serve: {name} on http://{args.host}:{args.port}/ (chat page), "
        f"API at /v1{' (API key required)' if api_key else ''}",
        file=sys.stderr,
    )
    server.run()
    return 0
