"""IFEval-style verifiable instructions as a task: one greedy answer per prompt, scored by the
checkers of `gemmakit.instruct` (strict and loose, at prompt and instruction level, as
`instruct.scoring.score` computes them). The prompt goes to the model as it is; the runner's
chat mode (`ModelRunner(chat=True)`, for instruction-tuned models) sends it as a user turn of
Gemma's chat format, as IFEval is meant to be run.

`ifeval` runs the eval set gemmakit ships (`gemmakit/instruct/data/eval.jsonl`); `ifeval:PATH`
reads a file in IFEval's `input_data.jsonl` format (`{"key", "prompt", "instruction_id_list",
"kwargs"}`). Instruction-level accuracies are micro averages over all instructions, as IFEval
reports them (`aggregate` weighs each prompt by its number of instructions).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from gemmakit.evaluation.metrics import mean_stderr
from gemmakit.evaluation.requests import Generate
from gemmakit.evaluation.task import Doc, Result, Task
from gemmakit.instruct.generate import data_dir
from gemmakit.instruct.scoring import follows, read_eval, row_instructions

METRICS = ("prompt_strict", "prompt_loose", "instruction_strict", "instruction_loose")


class IFEvalTask(Task):
    name = "ifeval"
    num_fewshot = 0
    metrics = METRICS

    def __init__(self, rows: list[dict[str, Any]], max_new_tokens: int = 1280):
        # 1280: lm-eval's ifeval max_gen_toks; generation ends earlier at <end_of_turn>/EOS
        self._docs, self.max_new_tokens = rows, max_new_tokens

    def requests(self, doc: Doc, shots: Sequence[Doc]) -> list[Generate]:
        return [Generate(doc["prompt"], self.max_new_tokens)]

    def score(self, doc: Doc, results: Sequence[Result]) -> dict[str, float]:
        response = results[0][0]  # type: ignore[index]
        instructions = row_instructions(doc)
        strict = [follows(i, response) for i in instructions]
        loose = [follows(i, response, loose=True) for i in instructions]
        n = len(instructions)
        return {
            "prompt_strict": float(all(strict)),
            "prompt_loose": float(all(loose)),
            # a prompt's fraction followed, weighed by `n` in `aggregate`
            "instruction_strict": sum(strict) / n if n else 0.0,
            "instruction_loose": sum(loose) / n if n else 0.0,
            "instructions": float(n),
        }

    def aggregate(self, metric: str, values: Sequence[float]) -> tuple[float, float]:
        if not metric.startswith("instruction_"):
            return mean_stderr(values)
        # micro average over instructions: per-instruction 0/1 values, each prompt's fraction
        # repeated n times (the counts come from the rows, in the same order as `values`)
        counts = [len(row_instructions(r)) for r in self.docs()[: len(values)]]
        flat: list[float] = []
        for value, n in zip(values, counts):
            followed = round(value * n)
            flat += [1.0] * followed + [0.0] * (n - followed)
        if not flat:
            return 0.0, math.nan
        return mean_stderr(flat)


def ifeval(path: Path | None) -> IFEvalTask:
    return IFEvalTask(read_eval(path or data_dir() / "eval.jsonl"))


TASKS: dict[str, Callable[[Path | None], Task]] = {"ifeval": ifeval}
