"""Multiple-choice scoring and the loaders of Table 6's log-likelihood benchmarks, on small files
in the real formats (HF Parquet/JSONL/Arrow, `save_to_disk` folders, the original releases),
with a fake model whose log-likelihoods the tests choose."""

import json
import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gemmakit.errors import DataError, MissingFileError, UsageError
from gemmakit.evaluation.choice import Choice, ChoiceTask, choice_scores
from gemmakit.evaluation.choice_benchmarks import TASKS, hellaswag_text
from gemmakit.evaluation.registry import load_task
from gemmakit.evaluation.requests import Loglikelihood, LoglikelihoodResult
from gemmakit.evaluation.task import draw_shots, evaluate


class TableLM:
    """A fake model: log p(continuation | context) from a function of the request; records
    every call."""

    def __init__(self, ll):
        self.ll = ll
        self.calls: list[list[Loglikelihood]] = []

    def loglikelihood(self, requests):
        self.calls.append(list(requests))
        return [LoglikelihoodResult(float(self.ll(r)), False, 1) for r in requests]

    def loglikelihood_rolling(self, requests):
        raise AssertionError("not asked")

    def generate(self, requests):
        raise AssertionError("not asked")


def results(*lls):
    return [LoglikelihoodResult(v, False, 1) for v in lls]


def write_parquet(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_arrow_stream(path, rows):
    """An Arrow IPC stream, the format of `datasets`' cache and save_to_disk files."""
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist(rows)
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    return path


# ------------------------------------------------------------------------------------ scoring


def test_acc_and_acc_norm_disagree_by_hand():
    doc = Choice("Q:", ("a", "bbbb"), gold=1)
    # acc: -2 > -4 picks option 0 (wrong); acc_norm: -2/1 = -2 < -4/4 = -1 picks option 1
    assert choice_scores(doc, results(-2.0, -4.0)) == {"acc": 0.0, "acc_norm": 1.0}
    # the other way round: gold 0 is right by acc, wrong by acc_norm
    doc0 = Choice("Q:", ("a", "bbbb"), gold=0)
    assert choice_scores(doc0, results(-2.0, -4.0)) == {"acc": 1.0, "acc_norm": 0.0}
    # a tie goes to the first option, as numpy's argmax does
    assert choice_scores(doc0, results(-1.0, -1.0))["acc"] == 1.0
    assert choice_scores(Choice("Q:", ("a", "b"), 1), results(-1.0, -1.0))["acc"] == 0.0
    with pytest.raises(ValueError):
        choice_scores(doc, results(-1.0))


def test_one_request_per_option_and_few_shot_prefix():
    docs = [
        Choice("Question: 1+1?\nAnswer:", ("2", "3"), 0),
        Choice("Question: 2+2?\nAnswer:", ("5", "4"), 1),
        Choice("Question: 3+3?\nAnswer:", ("6", "7", "8"), 0),
    ]
    task = ChoiceTask("sums", docs, num_fewshot=1, description=lambda d: "Sums.\n\n")
    lm = TableLM(lambda r: -len(r.continuation))
    result = evaluate(task, lm, seed=3)
    assert len(lm.calls) == 1 and len(lm.calls[0]) == 2 + 2 + 3  # one request per option
    shot = draw_shots(task, 2, docs[2], 3)[0]
    expected_ctx = "Sums.\n\n" + shot.query + " " + shot.options[shot.gold] + "\n\n" + docs[2].query
    assert lm.calls[0][4:] == [Loglikelihood(expected_ctx, " " + o) for o in ("6", "7", "8")]
    # all options one character: every pick is the first option -> right, wrong, right
    assert [s["scores"]["acc"] for s in result.samples] == [1.0, 0.0, 1.0]
    assert result.metrics["acc"] == (pytest.approx(2 / 3), pytest.approx(math.sqrt(1 / 3 / 3)))


def test_winogrande_partial_scoring_by_hand(tmp_path):
    rows = [
        {
            "sentence": "The trophy did not fit in the case because _ was too big.",
            "option1": "the trophy",
            "option2": "the case",
            "answer": "1",
        },
        {"sentence": "Ann gave Bo a gift because _ was kind.", "option1": "Ann", "option2": "Bo"},
    ]
    f = write_jsonl(tmp_path / "dev.jsonl", rows)
    (tmp_path / "dev-labels.lst").write_text("1\n2\n")  # the release's labels file
    task = TASKS["winogrande"](f)
    # the context is the sentence up to the blank with each option; the continuation is the
    # rest, the same for both options
    reqs = task.requests(task.docs()[0], [])
    assert reqs == [
        Loglikelihood("The trophy did not fit in the case because the trophy", " was too big."),
        Loglikelihood("The trophy did not fit in the case because the case", " was too big."),
    ]
    lls = {
        "The trophy did not fit in the case because the trophy": -3.0,
        "The trophy did not fit in the case because the case": -5.0,
        "Ann gave Bo a gift because Ann": -1.0,  # the model prefers option 1; gold is 2
        "Ann gave Bo a gift because Bo": -2.0,
    }
    lm = TableLM(lambda r: lls[r.context])
    result = evaluate(task, lm)
    assert {r.continuation for r in lm.calls[0]} == {" was too big.", " was kind."}
    assert [s["scores"]["acc"] for s in result.samples] == [1.0, 0.0]
    assert result.metrics["acc"][0] == 0.5 and task.metrics == ("acc",)
    # a shot is the gold-filled sentence followed by its rest
    shot = task.docs()[1]
    assert task.prefix(task.docs()[0], [shot]) == "Ann gave Bo a gift because Bo was kind.\n\n"


# ------------------------------------------------------------------------------------ loaders


HELLASWAG = [
    {
        "ind": 4,
        "activity_label": "Removing ice from car",
        "ctx_a": "Then, the man writes over the snow covering the window of a car.",
        "ctx_b": "a woman",
        "endings": [
            "is standing [title] Step one.",
            "stands behind the car.",
            "x",
            "walks  away.",
        ],
        "label": "3",
        "split": "val",
    },
    {
        "ind": 5,
        "activity_label": "Baking",
        "ctx_a": "A cook mixes flour.",
        "ctx_b": "she",
        "endings": ["bakes.", "sings loudly.", "runs.", "sleeps."],
        "label": "1",
        "split": "val",
    },
]


def test_hellaswag_preprocessing_and_acc_vs_acc_norm_from_parquet(tmp_path):
    path = write_parquet(tmp_path / "data" / "validation-00000-of-00001.parquet", HELLASWAG)
    write_parquet(tmp_path / "data" / "train-00000-of-00001.parquet", HELLASWAG[1:])
    task = load_task(f"hellaswag:{tmp_path}")
    assert task.num_fewshot == 0 and task.metrics == ("acc_norm", "acc")
    doc = task.docs()[0]
    assert doc.query == (
        "Removing ice from car: Then, the man writes over the snow covering the window of a "
        "car. A woman"
    )
    assert doc.options == ("is standing. Step one.", "stands behind the car.", "x", "walks away.")
    assert hellaswag_text(" a [header] b  c ") == "a b c"
    assert doc.gold == 3 and task.fewshot_docs()[0].query.startswith("Baking: ")

    # doc 1: acc picks "x" (-1.5, the highest: wrong); acc_norm (per character of the option)
    # picks "walks away." (-3/11 = -0.27, against -9/22, -10/22 and -1.5/1: right).
    # doc 2: "bakes." -2 (6 chars), "sings loudly." -4 (13), "runs." -2 (5), "sleeps." -2 (7):
    # acc picks "bakes." (the first of the -2s; gold is 1: wrong); acc_norm picks "sleeps."
    # (-2/7 = -0.29 beats -4/13 = -0.31: wrong)
    lls = {
        " is standing. Step one.": -9.0,
        " stands behind the car.": -10.0,
        " x": -1.5,
        " walks away.": -3.0,
        " bakes.": -2.0,
        " sings loudly.": -4.0,
        " runs.": -2.0,
        " sleeps.": -2.0,
    }

    def ll(r):
        return lls[r.continuation]

    result = evaluate(task, TableLM(ll))
    assert result.samples[0]["scores"] == {"acc_norm": 1.0, "acc": 0.0}
    assert result.samples[1]["scores"] == {"acc_norm": 0.0, "acc": 0.0}
    assert result.metrics["acc_norm"][0] == 0.5 and result.metrics["acc"][0] == 0.0
    # the original release's hellaswag_val.jsonl (integer labels) gives the same questions
    orig = write_jsonl(
        tmp_path / "orig" / "hellaswag_val.jsonl",
        [{**r, "label": int(r["label"])} for r in HELLASWAG],
    )
    write_jsonl(tmp_path / "orig" / "hellaswag_train.jsonl", HELLASWAG[1:])
    again = load_task(f"hellaswag:{orig.parent}")
    assert [(d.query, d.options, d.gold) for d in again.docs()] == [
        (d.query, d.options, d.gold) for d in task.docs()
    ]
    assert path.exists()


def test_piqa_release_files_with_labels_and_hf_jsonl(tmp_path):
    rows = [
        {"goal": "Dry wet hair", "sol1": "Use a towel.", "sol2": "Use a fork."},
        {"goal": "Open a jar", "sol1": "Sing to it.", "sol2": "Twist the lid."},
    ]
    write_jsonl(tmp_path / "rel" / "valid.jsonl", rows)
    (tmp_path / "rel" / "valid-labels.lst").write_text("0\n1\n")
    write_jsonl(tmp_path / "rel" / "train.jsonl", rows)
    (tmp_path / "rel" / "train-labels.lst").write_text("0\n1\n")
    task = TASKS["piqa"](tmp_path / "rel")
    assert [d.gold for d in task.docs()] == [0, 1]
    assert task.docs()[0].query == "Question: Dry wet hair\nAnswer:"
    assert task.requests(task.docs()[1], []) == [
        Loglikelihood("Question: Open a jar\nAnswer:", " Sing to it."),
        Loglikelihood("Question: Open a jar\nAnswer:", " Twist the lid."),
    ]
    hf = write_jsonl(
        tmp_path / "piqa_validation.jsonl", [{**r, "label": i} for i, r in enumerate(rows)]
    )
    assert [d.gold for d in TASKS["piqa"](hf).docs()] == [0, 1]
    (tmp_path / "rel" / "valid-labels.lst").write_text("0\n")
    with pytest.raises(DataError, match="valid-labels.lst: 1 labels for 2 rows"):
        TASKS["piqa"](tmp_path / "rel")


def test_siqa_boolq_commonsense_qa_openbookqa_prompts(tmp_path):
    siqa = write_jsonl(
        tmp_path / "siqa.jsonl",
        [
            {
                "context": "Tracy won.",
                "question": "How does Tracy feel?",
                "answerA": "sad",
                "answerB": "happy",
                "answerC": "tired",
                "label": "2",
            }
        ],
    )
    doc = TASKS["siqa"](siqa).docs()[0]
    assert (doc.query, doc.options, doc.gold) == (
        "Q: Tracy won. How does Tracy feel?\nA:",
        ("sad", "happy", "tired"),
        1,
    )
    google = write_parquet(
        tmp_path / "boolq.parquet",
        [{"question": "is the sky blue", "answer": True, "passage": "The sky is blue."}],
    )
    doc = TASKS["boolq"](google).docs()[0]
    assert doc.query == "The sky is blue.\nQuestion: is the sky blue?\nAnswer:"
    assert (doc.options, doc.gold) == (("no", "yes"), 1)
    glue = write_jsonl(tmp_path / "sg.jsonl", [{"question": "q", "passage": "p", "label": 0}])
    assert TASKS["boolq"](glue).docs()[0].gold == 0

    cqa_row = {
        "id": "x",
        "question": "Where is a fish?",
        "question_concept": "fish",
        "choices": {
            "label": ["A", "B", "C", "D", "E"],
            "text": ["sea", "sky", "car", "bed", "hat"],
        },
        "answerKey": "A",
    }
    release_row = {
        "id": "x",
        "answerKey": "A",
        "question": {
            "stem": "Where is a fish?",
            "choices": [
                {"label": k, "text": t} for k, t in zip("ABCDE", cqa_row["choices"]["text"])
            ],
        },
    }
    write_parquet(tmp_path / "cqa" / "validation-00000-of-00001.parquet", [cqa_row])
    write_parquet(tmp_path / "cqa" / "train-00000-of-00001.parquet", [cqa_row] * 8)
    task = TASKS["commonsense_qa"](tmp_path / "cqa")
    doc = task.docs()[0]
    assert (
        doc.query == "Question: Where is a fish?\nA. sea\nB. sky\nC. car\nD. bed\nE. hat\nAnswer:"
    )
    assert doc.options == ("A", "B", "C", "D", "E") and task.num_fewshot == 7
    shots = draw_shots(task, 0, doc, 0)  # 7 of the 8 train rows
    assert len(shots) == 7 and all("train-00000" in s.where for s in shots)
    write_jsonl(tmp_path / "rel" / "dev_rand_split.jsonl", [release_row])
    assert TASKS["commonsense_qa"](tmp_path / "rel").docs()[0] == Choice(
        doc.query, doc.options, 0, where=f"{tmp_path / 'rel' / 'dev_rand_split.jsonl'}:1"
    )

    obqa = {
        "id": "7",
        "question_stem": "The sun is a",
        "choices": {"text": ["star", "moon"], "label": ["A", "B"]},
        "answerKey": "A",
    }
    write_parquet(tmp_path / "obqa" / "main" / "test-00000-of-00001.parquet", [obqa])
    write_parquet(
        tmp_path / "obqa" / "additional" / "test-00000-of-00001.parquet",
        [{**obqa, "answerKey": "B", "fact1": "f"}],
    )
    doc = TASKS["openbookqa"](tmp_path / "obqa").docs()  # the main subset is preferred
    assert [(d.query, d.options, d.gold) for d in doc] == [("The sun is a", ("star", "moon"), 0)]


def test_arc_hf_parquet_and_release_jsonl_prefers_the_named_subset(tmp_path):
    hf = {
        "id": "Q1",
        "question": "Which is a metal?",
        "choices": {"text": ["wood", "iron", "glass"], "label": ["1", "2", "3"]},
        "answerKey": "2",
    }
    write_parquet(tmp_path / "ARC-Easy" / "test-00000-of-00001.parquet", [hf])
    write_parquet(tmp_path / "ARC-Challenge" / "test-00000-of-00001.parquet", [hf, hf])
    write_parquet(tmp_path / "ARC-Challenge" / "train-00000-of-00001.parquet", [hf] * 3)
    easy, chal = TASKS["arc_easy"](tmp_path), TASKS["arc_challenge"](tmp_path)
    assert len(easy.docs()) == 1 and len(chal.docs()) == 2
    assert (easy.num_fewshot, chal.num_fewshot) == (0, 25) and len(chal.fewshot_docs()) == 3
    doc = easy.docs()[0]
    assert (doc.query, doc.options, doc.gold) == (
        "Question: Which is a metal?\nAnswer:",
        ("wood", "iron", "glass"),
        1,
    )
    release = {
        "id": "Q1",
        "question": {
            "stem": "Which is a metal?",
            "choices": [{"text": t, "label": k} for t, k in zip(["wood", "iron", "glass"], "ABC")],
        },
        "answerKey": "B",
    }
    f = write_jsonl(tmp_path / "rel" / "ARC-Easy" / "ARC-Easy-Test.jsonl", [release])
    write_jsonl(tmp_path / "rel" / "ARC-Easy" / "ARC-Easy-Dev.jsonl", [release])
    got = TASKS["arc_easy"](tmp_path / "rel").docs()
    assert [(d.query, d.options, d.gold, d.where) for d in got] == [
        (doc.query, doc.options, 1, f"{f}:1")
    ]
    write_jsonl(f, [{**release, "answerKey": "E"}])
    with pytest.raises(DataError, match=r"ARC-Easy-Test.jsonl:1: answerKey 'E'"):
        TASKS["arc_easy"](tmp_path / "rel")


MMLU_CSV = {
    "dev/astronomy_dev.csv": [
        ["What is the Sun?", "A star", "A planet", "A moon", "A comet", "A"],
        ["What orbits Earth?", "Mars", "The Moon", "Venus", "Io", "B"],
    ],
    "dev/virology_dev.csv": [
        ["What is a virus?", "A cell", "A particle", "A plant", "A rock", "B"]
    ],
    "test/astronomy_test.csv": [["Which is a planet?", "Sun", "Mars", "Moon", "Sirius", "B"]],
    "test/virology_test.csv": [
        ["Flu is caused by", "bacteria", "a virus", "fungi", "cold", "B"],
        ['A "quoted, field"', "w", "x", "y", "z", "D"],
    ],
}


def test_mmlu_release_csv_subject_prompt_and_first_dev_shots(tmp_path):
    import csv

    for rel, rows in MMLU_CSV.items():
        (tmp_path / "data" / rel).parent.mkdir(parents=True, exist_ok=True)
        with open(tmp_path / "data" / rel, "w", newline="") as f:
            csv.writer(f).writerows(rows)
    task = load_task(f"mmlu:{tmp_path / 'data'}")
    assert [d.group for d in task.docs()] == ["astronomy", "virology", "virology"]
    assert task.docs()[2].query == 'A "quoted, field"\nA. w\nB. x\nC. y\nD. z\nAnswer:'
    doc = task.docs()[0]
    shots = draw_shots(task, 0, doc, seed=99)
    assert [s.query.split("\n")[0] for s in shots] == ["What is the Sun?", "What orbits Earth?"]
    ctx = task.requests(doc, shots)[0].context
    assert ctx == (
        "The following are multiple choice questions (with answers) about astronomy.\n\n"
        "What is the Sun?\nA. A star\nB. A planet\nC. A moon\nD. A comet\nAnswer: A\n\n"
        "What orbits Earth?\nA. Mars\nB. The Moon\nC. Venus\nD. Io\nAnswer: B\n\n"
        "Which is a planet?\nA. Sun\nB. Mars\nC. Moon\nD. Sirius\nAnswer:"
    )
    assert [r.continuation for r in task.requests(doc, shots)] == [" A", " B", " C", " D"]
    # the virology questions get virology's one dev example, never astronomy's
    assert [s.group for s in draw_shots(task, 1, task.docs()[1], 0)] == ["virology"]
    # micro average: 2 of 3 questions right, whatever the subjects
    lm = TableLM(lambda r: 0.0 if r.continuation == " B" else -1.0)
    assert evaluate(task, lm).metrics["acc"][0] == pytest.approx(2 / 3)


def test_mmlu_hf_parquet_prefers_all_and_errors_name_row_and_field(tmp_path):
    row = {"question": "2+2?", "subject": "elementary_mathematics", "choices": ["3", "4", "5", "6"]}
    write_parquet(tmp_path / "all" / "test-00000-of-00001.parquet", [{**row, "answer": 1}])
    write_parquet(tmp_path / "all" / "dev-00000-of-00001.parquet", [{**row, "answer": 1}] * 5)
    write_parquet(
        tmp_path / "elementary_mathematics" / "test-00000-of-00001.parquet", [{**row, "answer": 1}]
    )
    task = TASKS["mmlu"](tmp_path)
    assert len(task.docs()) == 1 and len(task.fewshot_docs()) == 5
    assert task.docs()[0].gold == 1
    bad = write_parquet(tmp_path / "bad" / "test.parquet", [{**row, "answer": 7}])
    with pytest.raises(DataError, match=r"test.parquet: row 0: field 'answer' is 7"):
        TASKS["mmlu"](bad)
    nofield = write_jsonl(tmp_path / "nf.jsonl", [{**row, "answer": 1}, {"question": "q"}])
    with pytest.raises(DataError, match=r"nf.jsonl:2: no field 'choices'"):
        TASKS["mmlu"](nofield)


def test_agieval_both_formats_and_shots_from_the_same_exam(tmp_path):
    lm_eval_row = {
        "query": "Q: 1+1? Answer Choices: (A)1 (B)2\nA: Among A through B, the answer is",
        "choices": ["(A)1", "(B)2"],
        "gold": [1],
    }
    write_parquet(tmp_path / "agieval-lsat-ar" / "data" / "test-00000.parquet", [lm_eval_row] * 2)
    write_jsonl(
        tmp_path / "v1" / "sat-math.jsonl",
        [
            {"passage": None, "question": "2x=4, x?", "options": ["(A)1", "(B)2"], "label": "B"},
            {"passage": "P.", "question": "Q?", "options": ["(A)a", "(B)b", "(C)c"], "label": "A"},
        ],
    )
    write_jsonl(tmp_path / "v1" / "gaokao-chinese.jsonl", [{"question": "skip me"}])
    task = TASKS["agieval"](tmp_path)
    assert [d.group for d in task.docs()] == ["lsat-ar", "lsat-ar", "sat-math", "sat-math"]
    assert task.docs()[2].query == (
        "Q: 2x=4, x? Answer Choices: (A)1 (B)2\nA: Among A through B, the answer is"
    )
    assert task.docs()[3].query.startswith("Q: P. Q? Answer Choices: (A)a (B)b (C)c\n")
    assert [d.gold for d in task.docs()] == [1, 1, 1, 0] and task.num_fewshot == 3
    for i, d in enumerate(task.docs()):
        assert all(s.group == d.group and s is not d for s in draw_shots(task, i, d, 0))


def test_datasets_folders_arrow_stream_and_save_to_disk(tmp_path):
    # a `datasets` cache folder: NAME-SPLIT.arrow streams beside dataset_info.json
    cache = tmp_path / "cache" / "hellaswag" / "default" / "0.1.0" / "abc123"
    write_arrow_stream(cache / "hellaswag-validation.arrow", HELLASWAG)
    write_arrow_stream(cache / "hellaswag-train.arrow", HELLASWAG[:1])
    (cache / "dataset_info.json").write_text("{}")
    task = TASKS["hellaswag"](tmp_path / "cache")
    assert [d.gold for d in task.docs()] == [3, 1] and len(task.fewshot_docs()) == 1

    datasets = pytest.importorskip("datasets")
    rows = {k: [r[k] for r in HELLASWAG] for k in HELLASWAG[0]}
    dd = datasets.DatasetDict(
        {"validation": datasets.Dataset.from_dict(rows), "train": datasets.Dataset.from_dict(rows)}
    )
    dd.save_to_disk(str(tmp_path / "saved"))
    saved = TASKS["hellaswag"](tmp_path / "saved")
    assert [(d.query, d.gold) for d in saved.docs()] == [(d.query, d.gold) for d in task.docs()]


def test_user_errors_are_one_line_and_name_the_place(tmp_path):
    with pytest.raises(UsageError, match="hellaswag needs its data: --tasks hellaswag:PATH"):
        load_task("hellaswag")
    with pytest.raises(UsageError, match="unknown task 'nope'"):
        load_task("nope:x")
    with pytest.raises(MissingFileError, match="no such file or folder"):
        load_task(f"piqa:{tmp_path / 'missing'}")
    write_jsonl(tmp_path / "train.jsonl", [{"goal": "g", "sol1": "a", "sol2": "b", "label": 0}])
    with pytest.raises(MissingFileError, match="no data file of split 'validation'"):
        load_task(f"piqa:{tmp_path}")
    f = write_jsonl(tmp_path / "v.jsonl", [{"goal": "g", "sol1": 3, "sol2": "b", "label": 0}])
    with pytest.raises(DataError, match=r"v.jsonl:1: field 'sol1' is int, expected str"):
        load_task(f"piqa:{f}")
    (tmp_path / "w.jsonl").write_text('{"sentence": "no blank", "option1": "a"\n')
    with pytest.raises(DataError, match=r"w.jsonl:1: not valid JSON"):
        load_task(f"winogrande:{tmp_path / 'w.jsonl'}")
    (tmp_path / "x.parquet").write_text("not parquet")
    with pytest.raises(DataError, match="x.parquet: not a Parquet file"):
        load_task(f"boolq:{tmp_path / 'x.parquet'}")
