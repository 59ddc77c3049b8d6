"""`gemmakit memorization RUN_OR_SHARDS`: the report's discoverable-memorization test over the
documents a model trained on, per data source (gemmakit.evaluation.memorization)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from gemmakit.dtypes import DTYPES
from gemmakit.errors import MissingFileError, UsageError

RESULT_FILE = "memorization.json"
MEMORIZED_FILE = "memorized.jsonl"


def register(sub) -> None:
    p = sub.add_parser(
        "memorization",
        help="how much of its training data a model reproduces (exact and approximate)",
        description=(
            "Sample training documents per data source, prompt with their first tokens, "
            "greedy-decode the next ones and compare them with the document: exact and "
            "approximate (edit distance <= 10%%) rates with 95%% Wilson intervals, and how "
            "many memorized outputs hold personal data (the data pipeline's detectors)."
        ),
    )
    p.add_argument(
        "data",
        metavar="RUN_OR_SHARDS",
        help="a training run folder (its recipe's shards; its newest checkpoint is the "
        "default model), a `gemmakit run` folder, a data folder with mixture.json, or a "
        "token-shard folder",
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", help="an installed model or a preset (default: the run's)")
    src.add_argument("--checkpoint", help="HF directory, .safetensors, .ckpt or .gguf file")
    p.add_argument("--tokenizer", help="SentencePiece .model to decode outputs for the PII check")
    p.add_argument("--adapter", help="a LoRA folder in PEFT's format")
    p.add_argument("--dtype", choices=DTYPES, help="default: the checkpoint's own")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cpu)")
    p.add_argument(
        "--per-source", type=int, default=100, help="documents sampled per source (default 100)"
    )
    p.add_argument("--prompt-tokens", type=int, default=50)
    p.add_argument("--continuation-tokens", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=32, help="prompts decoded together")
    p.add_argument("--seed", type=int, default=0, help="which documents are sampled")
    p.add_argument("--out", help=f"folder for {RESULT_FILE} and {MEMORIZED_FILE}")
    p.set_defaults(func=run)


def check_args(args: argparse.Namespace) -> None:
    for name in ("per_source", "prompt_tokens", "continuation_tokens", "batch_size"):
        if getattr(args, name) < 1:
            flag = "--" + name.replace("_", "-")
            raise UsageError(f"{flag} must be at least 1, got {getattr(args, name)}")


def run(args: argparse.Namespace) -> int:
    from gemmakit.api import load_model
    from gemmakit.commands.common import check_device, check_vocab_fits
    from gemmakit.dtypes import torch_dtype
    from gemmakit.evaluation.memorization import measure_sources
    from gemmakit.evaluation.training_sources import describe, find_sources
    from gemmakit.tokenizer import load_tokenizer

    check_args(args)
    check_device(args.device)
    sources, run_checkpoint = find_sources(args.data)
    source = args.model or args.checkpoint or run_checkpoint
    if source is None:
        raise UsageError(
            f"{args.data} is not a training run: name the model (--model/--checkpoint)"
        )
    print(f"sources:\n{describe(sources)}", file=sys.stderr)
    print(f"model: {source}", file=sys.stderr)
    model = load_model(
        source, dtype=torch_dtype(args.dtype), device=args.device, adapter=args.adapter
    )
    need = 1 + args.prompt_tokens + args.continuation_tokens
    if need > model.config.max_seq_len:
        raise UsageError(
            f"--prompt-tokens + --continuation-tokens + BOS = {need} exceeds the model's "
            f"{model.config.max_seq_len}-token context"
        )
    try:
        tokenizer = load_tokenizer(args.tokenizer or source)
        check_vocab_fits(tokenizer, model.config, args.tokenizer or source)
        decode = tokenizer.decode
    except MissingFileError as e:
        if args.tokenizer:
            raise
        print(f"note: no tokenizer ({e}); personal data not checked", file=sys.stderr)
        decode = None

    def progress(done: int, total: int) -> None:
        if sys.stderr.isatty():
            print(f"\r{done}/{total} documents", end="" if done < total else "\n", file=sys.stderr)

    report = measure_sources(
        model,
        sources,
        per_source=args.per_source,
        seed=args.seed,
        prompt_len=args.prompt_tokens,
        continuation_len=args.continuation_tokens,
        batch_size=args.batch_size,
        decode=decode,
        progress=progress,
    )
    result = report.to_dict()
    result["settings"].update({"data": str(args.data), "model": str(source)})
    print(format_table(result))
    if args.out:
        write_outputs(Path(args.out), result, report.outcomes)
        print(f"\n{Path(args.out) / RESULT_FILE}", file=sys.stderr)
    return 0


def write_outputs(out: Path, result: dict, outcomes) -> None:
    """memorization.json (the rates), memorized.jsonl (every memorized output), atomically."""
    from gemmakit.atomic import atomic_path, write_json

    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / MEMORIZED_FILE) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for o in outcomes:
            if o.approximate:
                row = {
                    "source": o.probe.source,
                    "doc": o.probe.doc,
                    "exact": o.exact,
                    "edit_distance": o.distance,
                    "prompt": o.probe.prompt,
                    "generated": o.generated,
                    "text": o.text,
                    "pii": o.pii,
                }
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    write_json(out / RESULT_FILE, result)


def _pct(rate: float, ci: list[float]) -> str:
    return f"{rate:6.1%} [{ci[0]:.1%}, {ci[1]:.1%}]"


def format_table(result: dict) -> str:
    """The per-source table: documents tested, exact and approximate rates with their 95%
    intervals, and memorized outputs with personal data (by kind found)."""
    rows = [("source", "tested", "exact [95% CI]", "approximate [95% CI]", "memorized with PII")]
    for name, r in [*result["sources"].items(), ("all", result["overall"])]:
        if r["pii"] is None:
            pii = "not checked"
        else:
            kinds = ", ".join(f"{k} {v}" for k, v in r["pii"].items() if v)
            pii = f"{r['pii_any']}/{r['approximate']}" + (f" ({kinds})" if kinds else "")
        rows.append(
            (
                name,
                f"{r['documents']}/{r['eligible']}",
                _pct(r["exact_rate"], r["exact_ci95"]),
                _pct(r["approximate_rate"], r["approximate_ci95"]),
                pii,
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    s = result["settings"]
    lines.append(
        f"\n{s['prompt_tokens']}-token prompts, {s['continuation_tokens']} greedy tokens; "
        f"approximate: edit distance <= {s['approximate_max_edit_distance']}; "
        f"tested/eligible: documents sampled / long enough"
    )
    return "\n".join(lines)
