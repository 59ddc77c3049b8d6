"""The generation rows of the report's Table 6 (question answering and math), read from local
files, with the report's shot counts.

| task       | eval split   | shots from    | shots | prompt (lm-eval v0.4)      | metric |
|------------|--------------|---------------|-------|----------------------------|--------|
| triviaqa   | validation   | train         | 5     | Question: q?\\nAnswer:     | em, f1 |
| nq         | validation   | train         | 5     | Q: q?\\nA:                 | em, f1 |
| gsm8k      | test         | train         | 8     | Question: q\\nAnswer: (CoT)| maj@1  |
| gsm8k_maj8 | test         | train         | 8     | the same, 8 samples, T=0.6 | maj@8  |
| math       | test         | train         | 4     | Problem: .. Solution:      | acc    |
| bbh        | each subtask | cot-prompts/  | 3     | Q: ..\\nA: Let's think...  | em     |

Files (`PATH` of `--tasks name:PATH`): a data file or a folder, as `datafiles` reads them (the
HF `datasets` Parquet/JSON exports, `datasets` folders), and the original releases:
TriviaQA's `{"Data": [{"Question", "Answer": {"Aliases", ...}}]}` JSON (rc or unfiltered),
NQ-open's `NQ-open.dev.jsonl`, GSM8K's `test.jsonl`, MATH's folder of one JSON per problem
(`test/algebra/1.json`), BBH's per-task `{"examples": [{"input", "target"}]}` JSON files
(with the BBH repository's `cot-prompts/TASK.txt` beside them when present: then the three
shots are those chains of thought, as the BBH paper runs it). A file alone serves as both the
evaluation set and the shot pool (a document is never its own shot).

Chains of thought in GSM8K shots are the train answers with the calculator annotations
(`<<6*2=12>>`) removed and "#### N" written "The answer is N.".
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from gemmakit.errors import DataError, MissingFileError
from gemmakit.evaluation.answers import (
    after_phrase,
    exact_match,
    gsm8k_gold,
    last_boxed,
    last_number,
    math_equiv,
    same_number,
    token_f1,
)
from gemmakit.evaluation.datafiles import (
    Row,
    data_files,
    eval_and_shot_files,
    load_json,
    need_path,
    read_rows,
    split_files,
)
from gemmakit.evaluation.requests import Generate
from gemmakit.evaluation.task import Doc, Result, Task

# ------------------------------------------------------------------------------ file reading


def wrapped_rows(path: Path, key: str) -> list[Row] | None:
    """The records under `key` of a JSON file holding one object (TriviaQA's "Data", BBH's
    "examples"); None when the file is something else (JSON Lines, an array), for `read_rows`."""
    if path.suffix.lower() != ".json":
        return None
    text = path.read_text(encoding="utf-8")
    if not text.lstrip().startswith("{"):
        return None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        return None  # JSON Lines under a .json name (`datasets`' to_json)
    if not isinstance(obj, dict) or key not in obj:
        return None
    records = obj[key]
    if not isinstance(records, list):
        raise DataError(f"{path}: field {key!r} is {type(records).__name__}, expected a list")
    for i, r in enumerate(records):
        if not isinstance(r, dict):
            raise DataError(f"{path}: {key}[{i}] is {type(r).__name__}, expected an object")
    return [Row(r, f"{path}: {key}[{i}]") for i, r in enumerate(records)]


def rows_of(files: Sequence[Path], key: str | None = None) -> list[Row]:
    """Every row of `files`: the records under `key` where a file wraps them in an object."""
    rows: list[Row] = []
    for f in files:
        wrapped = wrapped_rows(f, key) if key else None
        rows += wrapped if wrapped is not None else read_rows(f)
    return rows


# ------------------------------------------------------------------------------ QA: TriviaQA, NQ


def _strings(row: Row, value: Any, field: str) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return value
    raise row.error(f"field {field!r} must be a string or a non-empty list of strings")


def triviaqa_doc(row: Row) -> dict[str, Any]:
    """{"question", "answers"} of a TriviaQA row: HF's `question` + `answer.aliases`/`value`,
    or the original release's `Question` + `Answer.Aliases`/`Value`."""
    if row.has("question"):
        question, answer = row.text("question"), row.get("answer", dict)
        aliases, value = answer.get("aliases"), answer.get("value")
    else:
        question, answer = row.text("Question"), row.get("Answer", dict)
        aliases, value = answer.get("Aliases"), answer.get("Value")
    golds = ([value] if isinstance(value, str) else []) + list(aliases or [])
    if not golds:
        raise row.error("the answer has no value and no aliases")
    return {"question": question, "answers": _strings(row, golds, "answer")}


def nq_doc(row: Row) -> dict[str, Any]:
    """{"question", "answers"} of an NQ-open row (`question`, `answer`: a list of strings)."""
    return {"question": row.text("question"), "answers": _strings(row, row.get("answer"), "answer")}


class QATask(Task):
    """Closed-book QA: few-shot `template` prompts, a greedy answer cut at a newline, period or
    comma (lm-eval's `until`), exact match and token F1 over every gold alias."""

    metrics = ("em", "f1")

    def __init__(
        self,
        name: str,
        docs: list[dict[str, Any]],
        shots: list[dict[str, Any]],
        template: str,
        num_fewshot: int = 5,
        max_new_tokens: int = 32,
    ):
        self.name, self._docs, self._shots = name, docs, shots or None
        self.template, self.num_fewshot, self.max_new_tokens = template, num_fewshot, max_new_tokens

    def question(self, doc: Doc) -> str:
        return self.template.format(question=doc["question"].strip().rstrip("?"))

    def requests(self, doc: Doc, shots: Sequence[Doc]) -> list[Generate]:
        prompt = "".join(f"{self.question(s)} {s['answers'][0]}\n\n" for s in shots)
        prompt += self.question(doc)
        return [Generate(prompt, self.max_new_tokens, stop=("\n", ".", ","))]

    def score(self, doc: Doc, results: Sequence[Result]) -> dict[str, float]:
        answer = results[0][0]  # type: ignore[index]
        return {"em": exact_match(answer, doc["answers"]), "f1": token_f1(answer, doc["answers"])}


def triviaqa(path: Path | None) -> QATask:
    path = need_path("triviaqa", path)
    eval_files, shot_files = eval_and_shot_files(path, ("validation", "dev"))
    docs = [triviaqa_doc(r) for r in rows_of(eval_files, "Data")]
    shots = [triviaqa_doc(r) for r in rows_of(shot_files, "Data")]
    return QATask("triviaqa", docs, shots, "Question: {question}?\nAnswer:")


def natural_questions(path: Path | None) -> QATask:
    path = need_path("nq", path)
    eval_files, shot_files = eval_and_shot_files(path, ("validation", "dev"))
    docs = [nq_doc(r) for r in rows_of(eval_files)]
    shots = [nq_doc(r) for r in rows_of(shot_files)]
    return QATask("nq", docs, shots, "Q: {question}?\nA:")


# ------------------------------------------------------------------------------ GSM8K


def gsm8k_doc(row: Row) -> dict[str, Any]:
    """{"question", "answer", "gold"} of a GSM8K row (`question`, `answer` ending "#### N")."""
    answer = row.text("answer")
    if "####" not in answer:
        raise row.error("field 'answer' has no '#### N' final answer")
    return {"question": row.text("question"), "answer": answer, "gold": gsm8k_gold(answer)}


def gsm8k_chain(answer: str) -> str:
    """A GSM8K train answer as a shot's chain of thought: calculator annotations removed, the
    "#### N" line written "The answer is N."."""
    reasoning, _, final = answer.partition("####")
    reasoning = re.sub(r"<<[^>]*>>", "", reasoning).strip()
    return f"{reasoning}\nThe answer is {final.strip()}."


def majority(answers: Sequence[str | None]) -> str | None:
    """The most common non-None answer (the earliest among equals); None when all are None."""
    counted = Counter(a for a in answers if a is not None)
    if not counted:
        return None
    best = max(counted.values())
    return next(a for a in answers if a is not None and counted[a] == best)


class GSM8KTask(Task):
    """Grade-school math with chain of thought: `k` answers per question (greedy for k = 1,
    else sampled at `temperature` from `seed`), each reduced to its last number; maj@k is 1
    when the most common number equals the gold."""

    num_fewshot = 8

    def __init__(
        self,
        docs: list[dict[str, Any]],
        shots: list[dict[str, Any]],
        k: int = 1,
        temperature: float = 0.6,
        seed: int = 0,
        max_new_tokens: int = 256,
        name: str = "gsm8k",
    ):
        self.name, self._docs, self._shots = name, docs, shots or None
        self.k, self.temperature, self.seed = k, (temperature if k > 1 else 0.0), seed
        self.max_new_tokens = max_new_tokens
        self.metrics = (f"maj@{k}",)

    def requests(self, doc: Doc, shots: Sequence[Doc]) -> list[Generate]:
        prompt = "".join(
            f"Question: {s['question']}\nAnswer: {gsm8k_chain(s['answer'])}\n\n" for s in shots
        )
        prompt += f"Question: {doc['question']}\nAnswer:"
        return [
            Generate(
                prompt,
                self.max_new_tokens,
                stop=("Question:", "\n\n"),
                temperature=self.temperature,
                n=self.k,
                seed=self.seed,
            )
        ]

    def score(self, doc: Doc, results: Sequence[Result]) -> dict[str, float]:
        voted = majority([last_number(a) for a in results[0]])  # type: ignore[union-attr]
        return {self.metrics[0]: float(same_number(voted, doc["gold"]))}


def _gsm8k_files(path: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    eval_files, shot_files = eval_and_shot_files(path, ("test",))
    return [gsm8k_doc(r) for r in rows_of(eval_files)], [gsm8k_doc(r) for r in rows_of(shot_files)]


def gsm8k(path: Path | None) -> GSM8KTask:
    return GSM8KTask(*_gsm8k_files(need_path("gsm8k", path)))


def gsm8k_maj8(path: Path | None) -> GSM8KTask:
    return GSM8KTask(*_gsm8k_files(need_path("gsm8k_maj8", path)), k=8, name="gsm8k_maj8")


# ------------------------------------------------------------------------------ MATH


def math_doc(row: Row) -> dict[str, Any]:
    """{"problem", "solution", "gold", "level", "type"} of a MATH row; the gold is the
    solution's last \\boxed{} (HF's `answer` column where the export has one)."""
    solution = row.text("solution")
    gold = row.data.get("answer") if isinstance(row.data.get("answer"), str) else None
    gold = gold or last_boxed(solution)
    if gold is None:
        raise row.error("field 'solution' has no \\boxed{...} answer")
    return {
        "problem": row.text("problem"),
        "solution": solution,
        "gold": gold,
        "level": row.data.get("level", ""),
        "type": row.data.get("type", ""),
    }


def _math_folder_rows(folder: Path) -> list[Row]:
    """The original release: one JSON object per problem (`algebra/1.json`)."""
    rows = []
    for f in sorted(folder.rglob("*.json"), key=lambda p: (p.parent.name, _num(p.stem))):
        obj = load_json(f)
        if not isinstance(obj, dict):
            raise DataError(f"{f}: expected a JSON object with 'problem' and 'solution'")
        rows.append(Row(obj, str(f)))
    return rows


def _num(stem: str) -> tuple[int, str]:
    return (int(stem), "") if stem.isdigit() else (1 << 30, stem)


def _is_release(folder: Path) -> bool:
    """Whether `folder` is a split of the original MATH release (`TYPE/N.json` files)."""
    return folder.is_dir() and any(folder.glob("*/*.json")) and not any(folder.rglob("*.parquet"))


def _math_rows(path: Path, split: str, required: bool) -> list[Row]:
    """Rows of one MATH split: the release's `split/TYPE/N.json` folder (or the split folder
    itself), else the `datafiles` files of the split; a single file is the test split."""
    if path.is_file():
        return read_rows(path) if split == "test" else []
    if _is_release(path / split):
        return _math_folder_rows(path / split)
    if _is_release(path):
        return _math_folder_rows(path) if path.name == split or split == "test" else []
    return rows_of(split_files(path, (split,), required=required))


class MathTask(Task):
    """MATH (Hendrycks et al. 2021): 4 shots with their worked solutions, the answer in the
    last \\boxed{} (or after "final answer is"), scored with `math_equiv`."""

    name = "math"
    num_fewshot = 4
    metrics = ("acc",)

    def __init__(self, docs: list[dict[str, Any]], shots: list[dict[str, Any]]):
        self._docs, self._shots = docs, shots or None

    def requests(self, doc: Doc, shots: Sequence[Doc]) -> list[Generate]:
        prompt = "".join(
            f"Problem:\n{s['problem']}\n\nSolution:\n{s['solution']}\n\n" for s in shots
        )
        prompt += f"Problem:\n{doc['problem']}\n\nSolution:\n"
        return [Generate(prompt, 512, stop=("\n\nProblem:", "Problem:\n"))]

    def score(self, doc: Doc, results: Sequence[Result]) -> dict[str, float]:
        text = results[0][0]  # type: ignore[index]
        answer = last_boxed(text)
        if answer is None and "final answer is" in text.lower():
            answer = after_phrase(text, "final answer is").split(". I hope")[0].strip("$ ")
        return {"acc": float(math_equiv(answer, doc["gold"]))}


def math_task(path: Path | None) -> MathTask:
    path = need_path("math", path)
    docs = [math_doc(r) for r in _math_rows(path, "test", required=True)]
    shots = [math_doc(r) for r in _math_rows(path, "train", required=False)]
    return MathTask(docs, shots)


# ------------------------------------------------------------------------------ BIG-Bench Hard


def bbh_cot_prompt(path: Path) -> str:
    """A BBH repository `cot-prompts/TASK.txt` without its canary line and "-----" separator:
    the task description and its three Q/A chains of thought."""
    text = path.read_text(encoding="utf-8")
    if "-----" in text:
        text = text.split("-----", 1)[1]
    return text.strip()


def _bbh_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    files = [f for f in data_files(path) if "cot-prompts" not in f.parts]
    if not files:
        raise MissingFileError(f"{path}: no BBH task files (TASK.json with 'examples')")
    return files


class BBHTask(Task):
    """BIG-Bench Hard: per subtask, 3 shots (the BBH repository's chains of thought when
    `cot-prompts/` is there, else the subtask's first 3 examples as direct answers, which are
    then not evaluated), "A: Let's think step by step." and exact match of the text after "the
    answer is" with the target."""

    name = "bbh"
    num_fewshot = 3
    metrics = ("em",)
    fewshot_order = "first"

    def __init__(self, docs: list[dict[str, Any]], shots: dict[str, list], prompts: dict[str, str]):
        self._docs, self._task_shots, self._prompts = docs, shots, prompts

    # differs: each subtask has its own shots (a dict by subtask, not one list); the pool is
    # all of them, in subtask order, and a document draws only from its own subtask's
    def fewshot_docs(self) -> Sequence[Doc]:
        return [s for pool in self._task_shots.values() for s in pool]

    def shot_pool(self, doc: Doc) -> Sequence[Doc]:
        return self._task_shots.get(doc["task"], [])

    def requests(self, doc: Doc, shots: Sequence[Doc]) -> list[Generate]:
        if doc["task"] in self._prompts:
            prefix = self._prompts[doc["task"]] + "\n\n"
        else:
            prefix = "".join(
                f"Q: {s['input']}\nA: Let's think step by step. So the answer is {s['target']}.\n\n"
                for s in shots
            )
        prompt = f"{prefix}Q: {doc['input']}\nA: Let's think step by step."
        return [Generate(prompt, 256, stop=("\n\nQ:", "\nQ:", "\n\n\n"))]

    def score(self, doc: Doc, results: Sequence[Result]) -> dict[str, float]:
        answer = after_phrase(results[0][0])  # type: ignore[index]
        return {"em": float(answer.strip() == doc["target"].strip())}


def bbh(path: Path | None) -> BBHTask:
    path = need_path("bbh", path)
    docs, shots, prompts = [], {}, {}
    for f in _bbh_files(path):
        # the original release names a file by its task; HF exports name the folder
        plain = f.suffix == ".json" and not f.stem.startswith(("test", "train", "data"))
        task = f.stem if plain else f.parent.name
        rows = rows_of([f], "examples")
        examples = [
            {"task": task, "input": r.text("input"), "target": r.text("target")} for r in rows
        ]
        cot = f.parent.parent / "cot-prompts" / f"{task}.txt"
        cot = cot if cot.is_file() else f.parent / "cot-prompts" / f"{task}.txt"
        if cot.is_file():
            prompts[task] = bbh_cot_prompt(cot)
            shots[task] = []
        else:
            shots[task], examples = examples[:3], examples[3:]
        docs += examples
    return BBHTask(docs, shots, prompts)


TASKS: dict[str, Callable[[Path | None], Task]] = {
    "triviaqa": triviaqa,
    "nq": natural_questions,
    "gsm8k": gsm8k,
    "gsm8k_maj8": gsm8k_maj8,
    "math": math_task,
    "bbh": bbh,
}
