"""IFEval's scoring: strict and loose accuracy, at prompt level (every instruction of a prompt
followed) and instruction level, with a per-instruction breakdown.

Eval rows are IFEval's input format, `{"key", "prompt", "instruction_id_list", "kwargs"}`;
responses are `{"key"|"prompt", "response"}` rows, as IFEval's response files.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from gemmakit.errors import DataError
from gemmakit.evaluation.datafiles import read_rows
from gemmakit.instruct.instructions import Instruction, build_instruction


def loose_variants(response: str) -> list[str]:
    """IFEval's loose variants: the response, with its first line, last line or both removed,
    each also with every `*` removed (8 texts, the response itself first)."""
    lines = response.split("\n")
    cut = [
        response,
        "\n".join(lines[1:]).strip(),
        "\n".join(lines[:-1]).strip(),
        "\n".join(lines[1:-1]).strip(),
    ]
    return cut + [t.replace("*", "") for t in cut]


def follows(instruction: Instruction, response: str, loose: bool = False) -> bool:
    """Whether `response` follows `instruction`: strict checks the response as it is, loose
    accepts any of its loose variants. An empty (blank) response follows nothing."""
    texts = loose_variants(response) if loose else [response]
    return any(t.strip() and instruction.check(t) for t in texts)


def row_instructions(row: Mapping[str, Any]) -> list[Instruction]:
    """The checkers of one eval row (its instruction_id_list with its kwargs)."""
    ids = row.get("instruction_id_list")
    kwargs = row.get("kwargs") or [{}] * len(ids or [])
    if not isinstance(ids, list) or len(kwargs) != len(ids):
        raise DataError(f"eval row {row.get('key')!r}: instruction_id_list and kwargs differ")
    return [build_instruction(i, k) for i, k in zip(ids, kwargs)]


def score(rows: Sequence[Mapping[str, Any]], responses: Sequence[str]) -> dict[str, Any]:
    """Score `responses[i]` against `rows[i]`.

    Returns {"prompt_strict", "prompt_loose", "instruction_strict", "instruction_loose"} (fractions
    in [0, 1]), "prompts", "instructions" (counts), "per_instruction": {id: {"n", "strict",
    "loose"}} and "per_category": the same by id prefix ("keywords", ...), and "samples": per
    row {"key", "prompt", "response", "strict": [bool], "loose": [bool]}.
    """
    if len(rows) != len(responses):
        raise DataError(f"{len(rows)} eval rows but {len(responses)} responses")
    samples = []
    per: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
    per_cat: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
    for row, response in zip(rows, responses):
        strict, loose = [], []
        for ins in row_instructions(row):
            s, lo = follows(ins, response), follows(ins, response, loose=True)
            strict.append(s)
            loose.append(lo)
            for table, name in ((per, ins.id), (per_cat, ins.id.split(":")[0])):
                table[name][0] += 1
                table[name][1] += s
                table[name][2] += lo
        samples.append(
            {
                "key": row.get("key"),
                "prompt": row["prompt"],
                "response": response,
                "strict": strict,
                "loose": loose,
            }
        )
    n_prompts = len(samples)
    n_ins = sum(len(s["strict"]) for s in samples)

    def frac(count: int, total: int) -> float:
        return count / total if total else 0.0

    def breakdown(table: dict[str, list[int]]) -> dict[str, dict[str, float]]:
        return {
            k: {"n": n, "strict": frac(s, n), "loose": frac(lo, n)}
            for k, (n, s, lo) in sorted(table.items())
        }

    return {
        "prompt_strict": frac(sum(all(s["strict"]) for s in samples), n_prompts),
        "prompt_loose": frac(sum(all(s["loose"]) for s in samples), n_prompts),
        "instruction_strict": frac(sum(sum(s["strict"]) for s in samples), n_ins),
        "instruction_loose": frac(sum(sum(s["loose"]) for s in samples), n_ins),
        "prompts": n_prompts,
        "instructions": n_ins,
        "per_instruction": breakdown(per),
        "per_category": breakdown(per_cat),
        "samples": samples,
    }


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a JSONL (or JSON array, Parquet, ...) file, read by the one benchmark-file
    reader; a bad line raises DataError naming file and line."""
    return [row.data for row in read_rows(path)]


def read_eval(path: str | Path) -> list[dict[str, Any]]:
    """IFEval-format eval rows; each must have "prompt" and "instruction_id_list" and build."""
    rows = read_rows(path)
    for row in rows:
        for field in ("prompt", "instruction_id_list"):
            if field not in row.data:
                raise row.error(f"missing field {field!r}")
        try:
            row_instructions(row.data)
        except DataError as e:
            raise row.error(str(e)) from e
    return [row.data for row in rows]


def match_responses(
    rows: Sequence[Mapping[str, Any]], response_rows: Sequence[Mapping[str, Any]], source: str = ""
) -> list[str]:
    """The response to each eval row, from `{"key"|"prompt", "response"}` rows (matched by key
    where both have one, else by prompt text). A row without a response raises DataError."""
    by_key, by_prompt = {}, {}
    for n, r in enumerate(response_rows, 1):
        if not isinstance(r.get("response"), str):
            raise DataError(f"{source}: row {n}: missing string field 'response'")
        if "key" in r:
            by_key[r["key"]] = r["response"]
        if "prompt" in r:
            by_prompt[r["prompt"]] = r["response"]
    out = []
    for row in rows:
        if row.get("key") in by_key:
            out.append(by_key[row["key"]])
        elif row["prompt"] in by_prompt:
            out.append(by_prompt[row["prompt"]])
        else:
            raise DataError(f"{source}: no response for eval key {row.get('key')!r}")
    return out


def format_report(result: Mapping[str, Any]) -> str:
    """The scores as a small text table: the four accuracies, then one line per instruction."""
    lines = [
        f"prompts {result['prompts']}, instructions {result['instructions']}",
        f"{'':28}{'strict':>8}{'loose':>8}",
        f"{'prompt-level':28}{result['prompt_strict']:8.3f}{result['prompt_loose']:8.3f}",
        f"{'instruction-level':28}"
        f"{result['instruction_strict']:8.3f}{result['instruction_loose']:8.3f}",
        "",
        f"{'instruction':44}{'n':>5}{'strict':>8}{'loose':>8}",
    ]
    for name, r in result["per_instruction"].items():
        lines.append(f"{name:44}{r['n']:5d}{r['strict']:8.3f}{r['loose']:8.3f}")
    return "\n".join(lines)
