"""The log-likelihood rows of the report's Table 6, read from local files.

Each benchmark maps a row of its files to a `Choice`, reading both the column names of the HF
`datasets` copy and the original release where they differ. Prompts are lm-evaluation-harness's
(v0.4) for the task of the same name; shot counts are Table 6's, and 0 where it gives none,
except ARC-Challenge (25, as the later Gemma reports and the Gemma 3 model card run it) and
AGIEval (3, the later reports' "3-5-shot"). The first metric is the one a table shows: acc_norm
for HellaSwag, PIQA, OpenBookQA and ARC (the Open LLM Leaderboard's choice), acc elsewhere.

| task           | eval split | shots from    | shots | prompt -> options                  |
|----------------|------------|---------------|-------|------------------------------------|
| mmlu           | test       | dev (subject) | 5     | question, A-D lines -> A-D         |
| hellaswag      | validation | train         | 0     | label: ctx_a Ctx_b -> endings      |
| piqa           | validation | train         | 0     | Question: goal / Answer: -> sol1/2 |
| siqa           | validation | train         | 0     | Q: context question / A: -> A-C    |
| boolq          | validation | train         | 0     | passage, question? -> no, yes      |
| winogrande     | validation | train (xl)    | 0     | partial scoring                    |
| commonsense_qa | validation | train         | 7     | question, A-E lines -> A-E         |
| openbookqa     | test       | train         | 0     | question_stem -> choices           |
| arc_easy       | test       | train         | 0     | Question: q / Answer: -> choices   |
| arc_challenge  | test       | train         | 25    | the same                           |
| agieval        | each exam  | the same exam | 3     | AGIEval's "Among A through E"      |

MMLU's score is the mean over all questions (micro), as MMLU's own evaluate.py and lm-eval's
`mmlu` group (weighted by size) compute it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from gemmakit.errors import DataError
from gemmakit.evaluation.choice import Choice, ChoiceTask
from gemmakit.evaluation.datafiles import (
    Row,
    data_files,
    eval_and_shot_files,
    need_path,
    read_rows,
    with_labels,
)

LETTERS = "ABCDEFGHIJ"
MMLU_CSV_FIELDS = ("question", "A", "B", "C", "D", "answer")


# ------------------------------------------------------------------------------ field helpers


def _index(row: Row, name: str, n: int, base: int = 0) -> int:
    """An answer index in [0, n) from an int, a digit string ("2"; `base` 1 when the data
    counts from 1) or a letter ("C")."""
    value = row.get(name, (int, str))
    if isinstance(value, str):
        v = value.strip()
        if len(v) == 1 and v.upper() in LETTERS:
            i = LETTERS.index(v.upper())
        elif v.lstrip("-").isdigit():
            i = int(v) - base
        else:
            raise row.error(f"field {name!r} is {value!r}, not an answer index or letter")
    else:
        i = value - base
    if not 0 <= i < n:
        raise row.error(f"field {name!r} is {value!r}: no such option (there are {n})")
    return i


def _choices(row: Row, name: str) -> tuple[list[str], list[str]]:
    """(texts, labels) of `choices`: HF's {"text": [...], "label": [...]} or the original
    releases' [{"text", "label"}, ...]."""
    value = row.get(name, (dict, list))
    if isinstance(value, dict):
        texts, labels = value.get("text"), value.get("label")
        if not isinstance(texts, list) or not isinstance(labels, list) or len(texts) != len(labels):
            raise row.error(f"field {name!r} needs lists 'text' and 'label' of one length")
        pairs = list(zip(texts, labels, strict=True))
    else:
        pairs = []
        for c in value:
            if not isinstance(c, dict) or "text" not in c or "label" not in c:
                raise row.error(f"field {name!r}: each choice needs 'text' and 'label'")
            pairs.append((c["text"], c["label"]))
    if not pairs or not all(isinstance(t, str) and isinstance(lab, str) for t, lab in pairs):
        raise row.error(f"field {name!r}: choices must be non-empty strings")
    return [t for t, _ in pairs], [lab for _, lab in pairs]


def _question(row: Row) -> tuple[str, list[str], list[str]]:
    """(stem, texts, labels) from HF's flat layout (question, choices) or the original ARC /
    OpenBookQA / CommonsenseQA layout (question: {stem, choices})."""
    q = row.data.get("question")
    if isinstance(q, dict):
        nested = Row(q, row.where + " question")
        texts, labels = _choices(nested, "choices")
        return nested.text("stem"), texts, labels
    stem = row.text("question_stem") if row.has("question_stem") else row.text("question")
    texts, labels = _choices(row, "choices")
    return stem, texts, labels


def _key(row: Row, labels: list[str]) -> int:
    key = row.get("answerKey", (str, int))
    if str(key).strip() not in labels:
        raise row.error(f"answerKey {key!r} is none of the choice labels {labels}")
    return labels.index(str(key).strip())


def _lettered(stem: str, options: Sequence[str]) -> str:
    lines = "".join(f"\n{LETTERS[i]}. {o}" for i, o in enumerate(options))
    return f"{stem.strip()}{lines}\nAnswer:"


# ---------------------------------------------------------------------------- row -> Choice


def hellaswag_text(text: str) -> str:
    """lm-eval's HellaSwag preprocessing: WikiHow's " [title]" becomes ". ", other bracketed
    tags go, double spaces become one."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def hellaswag(row: Row) -> Choice:
    ctx = row.text("ctx_a") + " " + row.text("ctx_b").capitalize()
    endings = row.get("endings", list)
    query = hellaswag_text(row.text("activity_label") + ": " + ctx)
    options = tuple(hellaswag_text(str(e)) for e in endings)
    return Choice(query, options, _index(row, "label", len(options)), where=row.where)


def piqa(row: Row) -> Choice:
    options = (row.text("sol1"), row.text("sol2"))
    query = f"Question: {row.text('goal')}\nAnswer:"
    return Choice(query, options, _index(row, "label", 2), where=row.where)


def siqa(row: Row) -> Choice:
    options = (row.text("answerA"), row.text("answerB"), row.text("answerC"))
    query = f"Q: {row.text('context')} {row.text('question')}\nA:"
    return Choice(query, options, _index(row, "label", 3, base=1), where=row.where)


def boolq(row: Row) -> Choice:
    query = f"{row.text('passage')}\nQuestion: {row.text('question')}?\nAnswer:"
    if row.has("label"):  # super_glue/boolq: 0 false, 1 true
        gold = _index(row, "label", 2)
    else:  # google/boolq and the original release: a JSON boolean
        gold = int(row.get("answer", bool))
    return Choice(query, ("no", "yes"), gold, where=row.where)


def winogrande(row: Row) -> Choice:
    sentence = row.text("sentence")
    if "_" not in sentence:
        raise row.error("field 'sentence' has no blank '_'")
    cut = sentence.index("_")  # the first, as lm-eval takes it
    options = tuple(sentence[:cut] + row.text(f"option{i}") for i in (1, 2))
    rest = sentence[cut + 1 :].strip()
    return Choice("", options, _index(row, "answer", 2, base=1), partial=rest, where=row.where)


def arc(row: Row) -> Choice:
    stem, texts, labels = _question(row)
    query = f"Question: {stem}\nAnswer:"
    return Choice(query, tuple(texts), _key(row, labels), where=row.where)


def openbookqa(row: Row) -> Choice:
    stem, texts, labels = _question(row)
    return Choice(stem, tuple(texts), _key(row, labels), where=row.where)


def commonsense_qa(row: Row) -> Choice:
    stem, texts, labels = _question(row)
    query = "Question: " + _lettered(stem, texts)
    options = tuple(LETTERS[: len(texts)])
    return Choice(query, options, _key(row, labels), where=row.where)


def mmlu(row: Row, subject: str = "") -> Choice:
    if row.has("choices"):  # cais/mmlu: question, subject, choices, answer (int)
        options = [str(c) for c in row.get("choices", list)]
    elif all(row.has(letter) for letter in "ABCD"):  # the release's CSV: question, A-D, answer
        options = [row.text(letter) for letter in "ABCD"]
    else:
        raise row.error(f"no field 'choices' (nor A, B, C, D; fields: {sorted(row.data)})")
    subject = row.text("subject") if row.has("subject") else subject
    if not subject:
        raise row.error("no subject (field 'subject', or a file named SUBJECT_test.csv)")
    gold = _index(row, "answer", len(options))
    query = _lettered(row.text("question"), options)
    return Choice(query, tuple(LETTERS[: len(options)]), gold, where=row.where, group=subject)


def mmlu_description(doc: Choice) -> str:
    subject = doc.group.replace("_", " ")
    return f"The following are multiple choice questions (with answers) about {subject}.\n\n"


AGIEVAL_EXAMS = (  # the English multiple-choice exams (lm-eval's agieval_en without MATH)
    "sat-en-without-passage",  # before sat-en: the longer name must win
    "sat-en",
    "sat-math",
    "aqua-rat",
    "logiqa-en",
    "lsat-ar",
    "lsat-lr",
    "lsat-rc",
)


def agieval(row: Row, exam: str = "") -> Choice:
    if row.has("query"):  # lm-eval's copy (dmayhem93/agieval-*): query, choices, gold [i]
        options = tuple(str(c) for c in row.get("choices", list))
        gold = row.get("gold", (list, int))
        gold = gold[0] if isinstance(gold, list) and len(gold) == 1 else gold
        if not isinstance(gold, int) or not 0 <= gold < len(options):
            raise row.error(f"field 'gold' is {row.data['gold']!r}, not one option index")
        return Choice(row.text("query"), options, gold, where=row.where, group=exam)
    # the release's data/v1/*.jsonl: passage (or null), question, options ["(A)...", ...], label
    options = tuple(str(o) for o in row.get("options", list))
    passage = row.data.get("passage") or ""
    last = LETTERS[len(options) - 1]
    query = (
        f"Q: {passage} {row.text('question')} Answer Choices: {' '.join(options)}\n"
        f"A: Among A through {last}, the answer is"
    ).replace("Q:  ", "Q: ")
    return Choice(query, options, _index(row, "label", len(options)), where=row.where, group=exam)


# ---------------------------------------------------------------------------------- loading


@dataclass(frozen=True)
class Benchmark:
    """How to read one benchmark: the row mapping, split names in order of preference, the
    words a preferred subset's files carry, the labels field of an original release's
    `*-labels.lst`, and the task's shots and metrics."""

    to_choice: Callable[[Row], Choice]
    eval_splits: tuple[str, ...]
    shots: int
    metrics: tuple[str, ...]
    fewshot_splits: tuple[str, ...] = ("train",)
    prefer: tuple[str, ...] = ()
    labels_field: str | None = None


VALIDATION = ("validation", "valid", "val", "dev")

BENCHMARKS: dict[str, Benchmark] = {
    "hellaswag": Benchmark(hellaswag, VALIDATION, 0, ("acc_norm", "acc")),
    "piqa": Benchmark(piqa, VALIDATION, 0, ("acc_norm", "acc"), labels_field="label"),
    "siqa": Benchmark(siqa, VALIDATION, 0, ("acc", "acc_norm"), labels_field="label"),
    "boolq": Benchmark(boolq, VALIDATION, 0, ("acc",)),
    "winogrande": Benchmark(
        winogrande, VALIDATION, 0, ("acc",), prefer=("xl",), labels_field="answer"
    ),
    "commonsense_qa": Benchmark(commonsense_qa, VALIDATION, 7, ("acc",)),
    "openbookqa": Benchmark(openbookqa, ("test",), 0, ("acc_norm", "acc"), prefer=("main",)),
    "arc_easy": Benchmark(arc, ("test",), 0, ("acc_norm", "acc"), prefer=("easy",)),
    "arc_challenge": Benchmark(arc, ("test",), 25, ("acc_norm", "acc"), prefer=("challenge",)),
}


def _read(files: Sequence[Path], bench: Benchmark) -> list[Choice]:
    docs: list[Choice] = []
    for f in files:
        rows = read_rows(f)
        if bench.labels_field:
            rows = with_labels(rows, f, bench.labels_field)
        docs.extend(bench.to_choice(r) for r in rows)
    return docs


def load_benchmark(name: str, path: Path | None) -> ChoiceTask:
    """The task `name` of BENCHMARKS over the data at `path`."""
    bench = BENCHMARKS[name]
    evals, pool = eval_and_shot_files(
        need_path(name, path), bench.eval_splits, bench.fewshot_splits, bench.prefer
    )
    pool = [f for f in pool if f not in evals]  # a file named for both splits is not a shot
    docs = _read(evals, bench)
    if not docs:
        raise DataError(f"{path}: no {name} questions")
    return ChoiceTask(name, docs, bench.shots, _read(pool, bench) or None, metrics=bench.metrics)


def _mmlu_subject(file: Path) -> str:
    return re.sub(r"_(test|dev|val|validation|train)$", "", file.stem)


def load_mmlu(path: Path | None) -> ChoiceTask:
    """MMLU from cais/mmlu's Parquet/JSON (the `all` subset preferred when the folder holds the
    per-subject copies too) or the release's data/{dev,test}/SUBJECT_{dev,test}.csv. Shots: the
    first examples of the question's own subject in the dev split, as lm-eval and MMLU's
    evaluate.py take them (the test file itself when no dev split is found)."""
    evals, pool = eval_and_shot_files(need_path("mmlu", path), ("test",), ("dev",), ("all",))

    def read(files: list[Path]) -> list[Choice]:
        docs = []
        for f in files:
            fields = MMLU_CSV_FIELDS if f.suffix.lower() == ".csv" else None
            docs.extend(mmlu(r, _mmlu_subject(f)) for r in read_rows(f, fields))
        return docs

    docs = read(evals)
    if not docs:
        raise DataError(f"{path}: no MMLU questions")
    return ChoiceTask(
        "mmlu",
        docs,
        5,
        read(pool) or None,
        description=mmlu_description,
        metrics=("acc",),
        group_shots=True,
        fewshot_order="first",
    )


def _exam(file: Path) -> str | None:
    words = file.as_posix().lower().replace("_", "-")
    return next((e for e in AGIEVAL_EXAMS if e in words), None)


def load_agieval(path: Path | None) -> ChoiceTask:
    """AGIEval's English multiple-choice exams: a folder of exam files (the release's
    data/v1/*.jsonl or lm-eval's dmayhem93/agieval-* copies, named by exam), or one exam file.
    Shots come from the same exam. Files of other exams (Chinese, MATH) are skipped."""
    path = need_path("agieval", path)
    files = [path] if path.is_file() else data_files(path)
    docs: list[Choice] = []
    for f in files:
        exam = _exam(f) or (f.stem if path.is_file() else None)
        if exam is not None:
            docs.extend(agieval(r, exam) for r in read_rows(f))
    if not docs:
        raise DataError(
            f"{path}: no AGIEval English multiple-choice exam files (names with one of "
            f"{', '.join(AGIEVAL_EXAMS)})"
        )
    return ChoiceTask("agieval", docs, 3, None, metrics=("acc", "acc_norm"), group_shots=True)


TASKS: dict[str, Callable[[Path | None], ChoiceTask]] = {
    "mmlu": load_mmlu,
    "agieval": load_agieval,
    **{name: partial(load_benchmark, name) for name in BENCHMARKS},
}
