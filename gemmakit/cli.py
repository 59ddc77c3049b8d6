"""The `gemmakit` command: each subcommand lives in its own module under gemmakit.commands."""

from __future__ import annotations

import argparse
import importlib
import sys

# Subcommand modules; each has `register(subparsers)` that adds its parser and sets `func`.
COMMANDS = [
    "gemmakit.commands.info",
    "gemmakit.commands.generate",
    "gemmakit.commands.convert",
    "gemmakit.commands.run",
    "gemmakit.commands.pretrain",
    "gemmakit.commands.tokenizer",
    "gemmakit.commands.chat",
    "gemmakit.commands.data",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gemmakit", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except (FileNotFoundError, ValueError, KeyError, ModuleNotFoundError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"gemmakit {args.command}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
