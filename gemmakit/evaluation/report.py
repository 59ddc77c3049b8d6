"""What `gemmakit eval` writes: results.json (every score with its standard error and the exact
settings), samples_TASK.jsonl (each document's requests, model outputs and scores) and table.md
(the layout of the report's Table 6, published numbers beside the measured ones).

Everything is rendered in memory first and each file written atomically, so a run that fails
leaves no half-written output.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import platform
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from gemmakit.atomic import atomic_path, strict_json, write_json
from gemmakit.evaluation.published import CARD_OTHER, TABLE6, PublishedRow
from gemmakit.evaluation.task import TaskResult
from gemmakit.resolve import CHECKPOINT_SUFFIXES


def jsonable(obj: Any) -> Any:
    """A JSON-ready form of requests, results and documents (dataclasses, tuples, paths)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [jsonable(v) for v in obj]
    if isinstance(obj, float):
        return strict_json(obj)  # NaN (a metric a row does not have) -> null
    if isinstance(obj, str | int | bool) or obj is None:
        return obj
    return str(obj)


def sample_rows(result: TaskResult, docs: Sequence[Any]) -> list[dict[str, Any]]:
    """One JSON-ready row per evaluated document: the document, its requests, the model's
    answers and the scores (`docs` in evaluation order)."""
    return [
        jsonable({"doc_id": s["doc_id"], "doc": docs[s["doc_id"]], **s}) for s in result.samples
    ]


def file_sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def checkpoint_identity(path: Path) -> dict[str, Any]:
    """The path and sha256 of a checkpoint file; for a folder, of each weights file in it."""
    if path.is_file():
        return {"path": str(path), "sha256": file_sha256(path)}
    files = sorted(f for f in path.iterdir() if f.is_file() and f.suffix in CHECKPOINT_SUFFIXES)
    return {"path": str(path), "sha256": {f.name: file_sha256(f) for f in files}}


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": sys.version.split()[0], "platform": platform.platform()}
    for pkg in ("gemmakit", "torch"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def _pct(value: float | None) -> str:
    return "" if value is None else f"{value:.1f}"


def _measured(entry: Mapping[str, Any], scale: float) -> tuple[str, str]:
    """("acc_norm, 0-shot, n=100", "40.9 ± 4.9") for a task's headline metric."""
    metric = entry["headline"]
    m = entry["metrics"][metric]
    run = f"{metric}, {entry['num_fewshot']}-shot, n={entry['samples']}"
    return run, f"{m['value'] * scale:.1f} ± {m['stderr'] * scale:.1f}"


def _row_entry(row: PublishedRow, tasks: Mapping[str, Any]) -> Mapping[str, Any] | None:
    return next((tasks[t] for t in row.tasks if t in tasks), None)


def table_markdown(results: Mapping[str, Any]) -> str:
    """Table 6's rows in its order, each with the run's protocol and measured headline metric
    (x100, ± its standard error) beside the report's Gemma 2B/7B and the Gemma 3 270M model
    card's scores; then the run's tasks outside Table 6."""
    tasks = results["tasks"]
    model = results["model"]
    lines = [
        f"# {model['name']}: benchmarks",
        "",
        f"Model `{model['source']}` ({model['config']}, {model['dtype']}"
        + (", chat format" if results["settings"]["chat"] else "")
        + f"); seed {results['settings']['seed']}"
        + (
            f"; first {results['settings']['limit']} documents"
            if results["settings"]["limit"]
            else ""
        )
        + ". Published numbers are the Gemma report's Table 6 (pretrained 2B/7B) and the Gemma 3 "
        "270M model card's; measured numbers are x100 with their standard error.",
        "",
        "| Benchmark | Table 6 protocol | run (metric, shots, n) | measured | Gemma 2B | Gemma 7B "
        "| 270M PT (card) | 270M IT (card) | card shots |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    shown: set[str] = set()
    for row in TABLE6 + CARD_OTHER:
        entry = _row_entry(row, tasks)
        if entry is None and row in CARD_OTHER:
            continue
        run, measured = _measured(entry, 100.0) if entry is not None else ("not run", "")
        if entry is not None:
            shown.add(entry["task"])
        cells = [
            row.benchmark,
            row.protocol,
            run,
            measured,
            _pct(row.gemma_2b),
            _pct(row.gemma_7b),
            _pct(row.card_270m_pt),
            _pct(row.card_270m_it),
            row.card_shots,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    others = [name for name in tasks if name not in shown]
    if others:
        lines += ["", "Other tasks:", "", "| task | metric | shots | n | value | stderr |"]
        lines.append("|---|---|---|---|---|---|")
        for name in others:
            e = tasks[name]
            for metric, m in e["metrics"].items():
                lines.append(
                    f"| {name} | {metric} | {e['num_fewshot']} | {e['samples']} "
                    f"| {m['value']:.4f} | {m['stderr']:.4f} |"
                )
    return "\n".join(lines) + "\n"


def write_outputs(
    out: Path, results: Mapping[str, Any], samples: Mapping[str, list[dict[str, Any]]]
) -> list[Path]:
    """results.json, samples_TASK.jsonl for each task and table.md in `out`, each atomically;
    returns the paths written."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, rows in samples.items():
        path = out / f"samples_{name}.jsonl"
        with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False, allow_nan=False) + "\n")
        written.append(path)
    written.append(write_json(out / "results.json", results))
    table = out / "table.md"
    with atomic_path(table) as tmp:
        tmp.write_text(table_markdown(results), encoding="utf-8")
    written.append(table)
    return written
