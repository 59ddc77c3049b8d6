"""IFEval-style verifiable instructions as a task: one greedy answer per prompt, sent as a user
turn of Gemma's chat format, scored by the checkers of `gemmakit.instruct` (strict and loose,
at prompt and instruction level, as `instruct.scoring.score` computes them).

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

from gemmakit.chat import render_chat
from gemmakit.evaluation.metrics import mean_stderr
from gemmakit.evaluation.requests import Generate
from gemmakit.evaluation.task import Doc, Result, Task
from gemmakit.instruct.generate import data_dir
from gemmakit.instruct.scoring import follows, read_eval, row_instructions

METRICS = ("prompt_strict", "prompt_loose", "instruction_strict", "instruction_loose")


def chat_prompt(text: str) -> str:
    """`text` as one user turn of Gemma's chat format, ready for the model's turn, without
    the <bos> (the runner prepends it); the turn markers are written by name, which the
    tokenizer reads as their control ids."""
    rendered = render_chat([{"role": "user", "content": text}], add_generation_prompt=True)
    return rendered.removeprefix("<bos>")


class IFEvalTask(Task):
    name = "ifeval"
    num_fewshot = 0
    metrics = METRICS

    def __init__(self, rows: list[dict[str, Any]], max_new_tokens: int = 1280, chat: bool = True):
        self.rows, self.max_new_tokens, self.chat = rows, max_new_tokens, chat

    def docs(self) -> Sequence[Doc]:
        return self.rows

    def requests(self, doc: Doc, shots: Sequence[Doc]) -> list[Generate]:
        prompt = chat_prompt(doc["prompt"]) if self.chat else doc["prompt"]
        return [Generate(prompt, self.max_new_tokens, stop=("<end_of_turn>",))]

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
        counts = [len(row_instructions(r)) for r in self.rows[: len(values)]]
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
