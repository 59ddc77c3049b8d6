"""The `gemmakit` command: each subcommand lives in its own module under gemmakit.commands."""

from __future__ import annotations

import argparse
import errno
import importlib
import sys

from gemmakit.errors import GemmakitError

# Subcommand modules; each has `register(subparsers)` that adds its parser and sets `func`.
COMMANDS = [
    "gemmakit.commands.info",
    "gemmakit.commands.generate",
    "gemmakit.commands.convert",
    "gemmakit.commands.run",
    "gemmakit.commands.pretrain",
    "gemmakit.commands.sft",
    "gemmakit.commands.rlhf",
    "gemmakit.commands.reward",
    "gemmakit.commands.dpo",
    "gemmakit.commands.merge_lora",
    "gemmakit.commands.quantize",
    "gemmakit.commands.distill",
    "gemmakit.commands.tokenizer",
    "gemmakit.commands.chat",
    "gemmakit.commands.data",
    "gemmakit.commands.instruct",
    "gemmakit.commands.memorization",
    "gemmakit.commands.eval",
    "gemmakit.commands.lm_eval",
    "gemmakit.commands.serve",
]

# Commands that hand every argument after their name to another program's parser unread
# (argparse would take `--model` after `lm-eval` for an option of its own); each module has
# `passthrough_args(rest) -> Namespace`.
PASSTHROUGH = {"lm-eval": "gemmakit.commands.lm_eval"}

_USER_OS_ERRORS = {
    errno.ENOENT,
    errno.EACCES,
    errno.EPERM,
    errno.EISDIR,
    errno.ENOTDIR,
    errno.ENOSPC,
    errno.EROFS,
    errno.EEXIST,
    errno.ENAMETOOLONG,
    errno.EDQUOT,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gemmakit", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        importlib.import_module(name).register(sub)
    return parser


def one_line(message: str) -> str:
    """`message` on one line: a multi-line one (a YAML parser's, with its caret drawing) has its
    lines joined with "; "."""
    return "; ".join(line.strip() for line in message.splitlines() if line.strip())


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in PASSTHROUGH:
        args = importlib.import_module(PASSTHROUGH[argv[0]]).passthrough_args(argv[1:])
    else:
        args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except GemmakitError as e:
        # A user error: one line naming what is wrong. Anything else is a bug and keeps its
        # traceback.
        print(f"gemmakit {args.command}: error: {one_line(str(e))}", file=sys.stderr)
        return 2
    except OSError as e:
        # The machine refused a path the user named (missing, no permission, disk full):
        # not a bug in gemmakit, so one line naming the path.
        if e.errno not in _USER_OS_ERRORS or e.filename is None:
            raise
        print(f"gemmakit {args.command}: error: {e.filename}: {e.strerror}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
