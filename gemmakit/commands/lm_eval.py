"""`gemmakit lm-eval ARGS...`: lm-evaluation-harness's own command line, with gemmakit models
registered (`--model gemmakit --model_args model=gemma3-270m,dtype=float32`). Every argument
after `lm-eval` goes to lm-eval unparsed (`gemmakit.cli.main` hands them over), so all of its
flags work as they do for its `lm_eval` command."""

from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path

from gemmakit.errors import MissingPackageError, UsageError

NAME = "lm-eval"


def register(sub) -> None:
    # listed in `gemmakit -h`; the arguments reach `run` through `passthrough_args`
    p = sub.add_parser(
        NAME,
        help="lm-evaluation-harness's command line with gemmakit models (--model gemmakit)",
        add_help=False,
    )
    p.add_argument("lm_eval_args", nargs=argparse.REMAINDER)
    p.set_defaults(func=run)


def passthrough_args(rest: list[str]) -> argparse.Namespace:
    """The parsed arguments of `gemmakit lm-eval REST...`: REST as it is."""
    return argparse.Namespace(command=NAME, func=run, lm_eval_args=list(rest))


def run(args: argparse.Namespace) -> int:
    try:
        from lm_eval.__main__ import cli_evaluate
    except ImportError:
        raise MissingPackageError(
            "gemmakit lm-eval needs lm-evaluation-harness: pip install lm-eval==0.4.13 "
            "(or pip install 'gemmakit[lm-eval]')"
        ) from None
    import gemmakit.evaluation.lm_eval_adapter  # noqa: F401  (registers the "gemmakit" model)

    saved = sys.argv
    sys.argv = ["lm-eval", *args.lm_eval_args]  # lm-eval's parser reads sys.argv
    try:
        cli_evaluate()
    except ValueError as e:
        # lm-eval reports a bad --tasks, --limit or config file as a ValueError raised in its
        # config module: that is the user's input, so one line; any other ValueError is a bug
        if not _raised_in_config(e):
            raise
        hint = " (`gemmakit lm-eval ls tasks` lists them)" if "Tasks not found" in str(e) else ""
        raise UsageError(f"lm-eval: {e}{hint}") from None
    finally:
        sys.argv = saved
    return 0


def _raised_in_config(e: BaseException) -> bool:
    frames = traceback.extract_tb(e.__traceback__)
    return (
        bool(frames)
        and Path(frames[-1].filename).parent.name == "config"
        and (Path(frames[-1].filename).parent.parent.name == "lm_eval")
    )
