"""`gemmakit instruct ...`: the instruction-following data and its scoring.

- `write DIR [--force]`: write the generated SFT, eval and preference files (the same bytes as
  the copies shipped in the package);
- `score --eval EVAL.jsonl --responses RESP.jsonl`: IFEval's strict and loose accuracy, at
  prompt and instruction level, with one line per instruction;
- `eval --model M [--eval EVAL.jsonl]`: a model's greedy answers to the eval prompts, scored.
"""

from __future__ import annotations

import argparse
import json


def register(sub) -> None:
    p = sub.add_parser("instruct", help="instruction-following data (IFEval-style) and scoring")
    isub = p.add_subparsers(dest="instruct_command", required=True)

    w = isub.add_parser("write", help="write the generated SFT/eval/preference JSONL files")
    w.add_argument("dir", help="output folder")
    w.add_argument("--force", action="store_true", help="overwrite existing files")
    w.set_defaults(func=run_write)

    s = isub.add_parser("score", help="score responses against IFEval-format prompts")
    s.add_argument(
        "--eval",
        required=True,
        help='JSONL {"key", "prompt", "instruction_id_list", "kwargs"} (IFEval input format)',
    )
    s.add_argument("--responses", required=True, help='JSONL {"key"|"prompt", "response"}')
    s.add_argument("--out", help="write the scores and per-sample results as JSON here")
    s.set_defaults(func=run_score)

    from gemmakit.commands.common import add_model_args

    e = isub.add_parser("eval", help="generate greedy answers with a model and score them")
    add_model_args(e)
    e.add_argument("--eval", dest="eval_file", help="IFEval-format JSONL (default: shipped)")
    e.add_argument("--limit", type=int, help="only the first N prompts")
    e.add_argument("--max-new-tokens", type=int, default=64)
    e.add_argument("--batch-size", type=int, default=8)
    e.add_argument("--out", help="write the scores and per-sample results as JSON here")
    e.set_defaults(func=run_eval)


def run_write(args: argparse.Namespace) -> int:
    from gemmakit.instruct.generate import write_data

    for path in write_data(args.dir, force=args.force):
        rows = sum(1 for _ in path.open(encoding="utf-8"))
        print(f"{path}  {rows} rows")
    return 0


def _report(result: dict, out: str | None) -> None:
    from gemmakit.atomic import write_json
    from gemmakit.instruct.scoring import format_report

    print(format_report(result))
    if out:
        write_json(out, result)
        print(f"wrote {out}")


def run_score(args: argparse.Namespace) -> int:
    from gemmakit.instruct.scoring import match_responses, read_eval, read_jsonl, score

    rows = read_eval(args.eval)
    responses = match_responses(rows, read_jsonl(args.responses), args.responses)
    _report(score(rows, responses), args.out)
    return 0


def run_eval(args: argparse.Namespace) -> int:
    from gemmakit.commands.common import load_model_and_tokenizer
    from gemmakit.errors import UsageError
    from gemmakit.instruct.evaluate import evaluate_instruction_following
    from gemmakit.instruct.generate import data_dir
    from gemmakit.instruct.scoring import read_eval

    if args.limit is not None and args.limit < 1:
        raise UsageError("--limit must be at least 1")
    rows = read_eval(args.eval_file or data_dir() / "eval.jsonl")[: args.limit]
    model, tokenizer = load_model_and_tokenizer(args)
    result = evaluate_instruction_following(
        model, tokenizer, rows, args.max_new_tokens, args.batch_size
    )
    _report(result, args.out)
    print(f"{len(rows)} prompts in {result['seconds']:.1f} s")
    for sample in result["samples"][:3]:
        print(json.dumps({k: sample[k] for k in ("prompt", "response", "strict")}))
    return 0
