"""Generation tasks: answer normalization and extraction, the loaders on fixtures in the real
file formats, and whole runs with fake models whose answers are chosen, scored by hand."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gemmakit.errors import DataError, UsageError
from gemmakit.evaluation.answers import (
    after_phrase,
    exact_match,
    gsm8k_gold,
    last_boxed,
    last_number,
    math_equiv,
    normalize_answer,
    token_f1,
)
from gemmakit.evaluation.generative import gsm8k_chain, majority
from gemmakit.evaluation.registry import load_task
from gemmakit.evaluation.requests import Generate
from gemmakit.evaluation.task import evaluate
from gemmakit.instruct.scoring import score as ifeval_score


class FakeLM:
    """Answers every Generate request with `answer(request)` (a list of n texts, or one text
    repeated n times); records the requests."""

    def __init__(self, answer: Callable[[Generate], str | list[str]]):
        self.answer, self.seen = answer, []

    def loglikelihood(self, requests):
        raise AssertionError("a generation task asked for log-likelihoods")

    def loglikelihood_rolling(self, requests):
        raise AssertionError("a generation task asked for rolling log-likelihoods")

    def generate(self, requests: Sequence[Generate]) -> list[list[str]]:
        self.seen += list(requests)
        out = []
        for r in requests:
            a = self.answer(r)
            out.append(a if isinstance(a, list) else [a] * r.n)
        return out


def last_question(prompt: str, marker: str) -> str:
    return prompt.rsplit(marker, 1)[1]


# ------------------------------------------------------------------------------ scorers


def test_squad_normalization_and_scores_by_hand():
    assert normalize_answer("  The Eiffel-Tower!  ") == "eiffeltower"
    assert normalize_answer("A Tale of Two Cities") == "tale of two cities"
    assert exact_match("the tale of two cities.", ["Tale of Two Cities", "x"]) == 1.0
    assert exact_match("Paris, France", ["Paris"]) == 0.0
    # pred "eiffel tower in paris" (4 tokens) vs gold "eiffel tower" (2): P=2/4, R=1, F1=2/3
    assert token_f1("The Eiffel tower in Paris", ["Eiffel Tower"]) == pytest.approx(2 / 3)
    # the best alias counts: "paris" vs "Paris" is 1.0
    assert token_f1("Paris", ["City of Light", "Paris"]) == 1.0
    assert token_f1("London", ["Paris"]) == 0.0


def test_numbers_of_gsm8k():
    assert last_number("She pays 3 * $4 = $12, so $1,234.50 in total.") == "1234.5"
    assert last_number("The answer is -7.") == "-7"
    assert last_number("no digits here") is None
    assert gsm8k_gold("Half is 36/2 = <<36/2=18>>18.\n#### 1,800") == "1800"
    assert majority(["5", None, "7", "7", "5"]) == "5"  # tie: the earliest
    assert majority([None, None]) is None
    chain = gsm8k_chain("Half is 36/2 = <<36/2=18>>18 cups.\n#### 18")
    assert chain == "Half is 36/2 = 18 cups.\nThe answer is 18."


@pytest.mark.parametrize(
    "pred, gold, same",
    [
        ("\\dfrac{1}{2}", "\\frac12", True),
        ("0.5", "\\frac{1}{2}", True),
        ("1/2", "\\frac{1}{2}", True),
        ("\\left( 3, 4 \\right)", "(3,4)", True),
        ("10\\text{ cm}", "10", True),
        ("2.50", "2.5", True),
        ("3.0", "3", True),
        ("x = 5", "5", True),
        ("100,000", "100000", True),
        ("\\$18.90", "18.9", True),
        ("90^\\circ", "90", True),
        ("\\sqrt2", "\\sqrt{2}", True),
        ("\\text{(B)}", "(B)", True),
        ("3", "4", False),
        ("\\frac{1}{3}", "\\frac{1}{2}", False),
        (None, "1", False),
    ],
)
def test_math_equivalence(pred, gold, same):
    assert math_equiv(pred, gold) is same


def test_boxed_and_answer_phrase_extraction():
    assert last_boxed("So $x = \\boxed{\\frac{1}{2}}$. Also \\boxed{3}") == "3"
    assert last_boxed("we get \\boxed{\\frac{a}{\\sqrt{b}}}.") == "\\frac{a}{\\sqrt{b}}"
    assert last_boxed("\\boxed 5$") == "5"
    assert last_boxed("\\boxed{unclosed") is None and last_boxed("none") is None
    assert after_phrase("Step one. So the answer is (B).") == "(B)"
    assert after_phrase("So The Answer Is True.\nQ: next") == "True"


# ------------------------------------------------------------------------------ TriviaQA / NQ


def write_parquet(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)


def hf_trivia_row(q, value, aliases):
    return {
        "question": q,
        "question_id": q[:5],
        "answer": {
            "aliases": aliases,
            "normalized_aliases": [],
            "value": value,
            "type": "WikipediaEntity",
        },
    }


def test_triviaqa_hf_parquet_five_shots_and_scores(tmp_path):
    train = [hf_trivia_row(f"Train question {i}?", f"ans{i}", [f"Ans{i}"]) for i in range(6)]
    val = [
        hf_trivia_row("Capital of France?", "Paris", ["Paris", "Paree"]),
        hf_trivia_row("Author of Hamlet?", "William Shakespeare", ["Shakespeare"]),
        hf_trivia_row("Largest planet?", "Jupiter", ["Jupiter"]),
    ]
    root = tmp_path / "rc.nocontext"
    write_parquet(root / "train-00000-of-00001.parquet", train)
    write_parquet(root / "validation-00000-of-00001.parquet", val)
    task = load_task(f"triviaqa:{root}")
    assert task.num_fewshot == 5 and len(task.docs()) == 3
    answers = {
        "Capital of France": "Paree",
        "Author of Hamlet": "Shakespeare, William",
        "Largest planet": "Saturn",
    }

    def answer(r):
        q = last_question(r.prompt, "Question: ").split("?")[0]
        return answers[q]

    lm = FakeLM(answer)
    result = evaluate(task, lm)
    # em: Paree 1, "shakespeare william" vs "shakespeare" 0, Saturn 0 -> 1/3
    # f1: 1; "shakespeare william" has the tokens of alias "William Shakespeare": 1; 0 -> 2/3
    assert result.metrics["em"][0] == pytest.approx(1 / 3)
    assert result.metrics["f1"][0] == pytest.approx(2 / 3)
    prompt = lm.seen[0].prompt
    assert prompt.count("Question: ") == 6 and prompt.endswith(
        "Question: Capital of France?\nAnswer:"
    )
    # each shot: its question, its answer's value and a blank line
    shots = prompt.split("\n\n")[:5]
    assert all(re.fullmatch(r"Question: Train question (\d)\?\nAnswer: ans\1", s) for s in shots)
    assert lm.seen[0].stop == ("\n", ".", ",") and lm.seen[0].temperature == 0.0
    # the shots are drawn from train, under the seed: the same run gives the same prompts
    lm2 = FakeLM(answer)
    evaluate(task, lm2)
    assert [r.prompt for r in lm2.seen] == [r.prompt for r in lm.seen]


def test_triviaqa_original_json_release(tmp_path):
    data = {
        "Data": [
            {
                "Question": "Who wrote Emma?",
                "QuestionId": "q1",
                "Answer": {"Aliases": ["Jane Austen", "Austen"], "Value": "Jane Austen"},
            },
            {
                "Question": "Red planet?",
                "QuestionId": "q2",
                "Answer": {"Aliases": ["Mars"], "Value": "Mars"},
            },
        ],
        "Version": 1.0,
    }
    f = tmp_path / "unfiltered-web-dev.json"
    f.write_text(json.dumps(data))
    task = load_task(f"triviaqa:{f}")
    assert [d["answers"][0] for d in task.docs()] == ["Jane Austen", "Mars"]
    result = evaluate(
        task, FakeLM(lambda r: "austen" if "Emma" in r.prompt.split("Question: ")[-1] else "Venus")
    )
    assert result.metrics["em"][0] == 0.5
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"Data": [{"Question": "q", "Answer": {}}]}))
    with pytest.raises(DataError, match=r"bad.json: Data\[0\]: the answer has no value"):
        load_task(f"triviaqa:{bad}")


def test_nq_open_jsonl_and_missing_field(tmp_path):
    f = tmp_path / "NQ-open.dev.jsonl"
    rows = [
        {"question": "who sang hey jude", "answer": ["The Beatles", "Beatles"]},
        {"question": "when did ww2 end", "answer": ["1945"]},
    ]
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = load_task(f"nq:{f}")
    lm = FakeLM(lambda r: "beatles" if "hey jude" in r.prompt.split("Q: ")[-1] else "1944")
    result = evaluate(task, lm)
    assert result.metrics["em"] == (0.5, 0.5)
    assert lm.seen[0].prompt.endswith("Q: who sang hey jude?\nA:")
    assert lm.seen[0].prompt.count("Q: ") == 2  # one shot: the only other row
    f.write_text(json.dumps({"question": "q"}) + "\n")
    with pytest.raises(DataError, match=r"NQ-open.dev.jsonl:1: no field 'answer'"):
        load_task(f"nq:{f}")


def test_a_task_that_reads_files_needs_a_path():
    with pytest.raises(UsageError, match="triviaqa:PATH"):
        load_task("triviaqa")


# ------------------------------------------------------------------------------ GSM8K


def gsm_rows(n, offset=0):
    rows = []
    for a in range(offset, offset + n):
        rows.append(
            {
                "question": f"Tom has {a} apples and buys 2. How many?",
                "answer": f"{a} + 2 = <<{a}+2={a + 2}>>{a + 2}\n#### {a + 2}",
            }
        )
    return rows


def test_gsm8k_eight_cot_shots_and_last_number(tmp_path):
    root = tmp_path / "gsm8k" / "main"
    write_parquet(root / "train-00000-of-00001.parquet", gsm_rows(10, offset=100))
    write_parquet(root / "test-00000-of-00001.parquet", gsm_rows(4))
    task = load_task(f"gsm8k:{tmp_path / 'gsm8k'}")
    # golds: 2, 3, 4, 5; answers: right, right with commas/period, wrong, no number
    replies = {
        "0": " 0 + 2 = 2. The answer is 2.",
        "1": " So 3.00 apples.",
        "2": " The answer is 5.",
        "3": " I do not know.",
    }
    lm = FakeLM(lambda r: replies[last_question(r.prompt, "Tom has ").split()[0]])
    result = evaluate(task, lm)
    assert result.metrics["maj@1"][0] == 0.5
    req = lm.seen[0]
    assert req.prompt.count("Question: ") == 9 and "The answer is 10" in req.prompt
    assert "<<" not in req.prompt
    assert req.n == 1 and req.temperature == 0.0 and "Question:" in req.stop


def test_gsm8k_majority_of_eight_samples(tmp_path):
    f = tmp_path / "test.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in gsm_rows(9)))
    task = load_task(f"gsm8k_maj8:{f}")
    assert task.metrics == ("maj@8",)

    def answer(r):
        i = int(last_question(r.prompt, "Tom has ").split()[0])
        right, wrong = f"= {i + 2}", f"= {i + 3}"
        # problem 0: 5 right of 8; problem 1: 3 right, 5 wrong; others: all None but one right
        if i == 0:
            return [right] * 5 + [wrong] * 3
        if i == 1:
            return [right] * 3 + [wrong] * 5
        return ["no idea"] * 7 + [right]

    lm = FakeLM(answer)
    result = evaluate(task, lm, limit=3)
    assert [s["scores"]["maj@8"] for s in result.samples] == [1.0, 0.0, 1.0]
    assert all(r.n == 8 and r.temperature > 0 for r in lm.seen)


# ------------------------------------------------------------------------------ MATH


def math_problem(i, answer):
    return {
        "problem": f"Compute problem {i}.",
        "level": "Level 2",
        "type": "Algebra",
        "solution": f"We work it out: $x = {answer}$, so the answer is $\\boxed{{{answer}}}$.",
    }


def test_math_original_release_folder(tmp_path):
    root = tmp_path / "MATH"
    for split, answers in (
        ("train", ["1", "2", "3", "4", "5"]),
        ("test", ["\\frac{1}{2}", "7", "10"]),
    ):
        for i, a in enumerate(answers):
            d = root / split / ("algebra" if i % 2 == 0 else "geometry")
            d.mkdir(parents=True, exist_ok=True)
            (d / f"{i}.json").write_text(
                json.dumps(math_problem(i if split == "test" else 100 + i, a))
            )
    task = load_task(f"math:{root}")
    assert len(task.docs()) == 3 and len(task.fewshot_docs()) == 5
    golds = sorted(d["gold"] for d in task.docs())
    assert golds == ["10", "7", "\\frac{1}{2}"]
    replies = {
        "0": "So $\\boxed{\\dfrac12}$.",
        "1": "Final Answer: The final answer is $7$. I hope it is correct.",
        "2": "\\boxed{11}",
    }
    lm = FakeLM(lambda r: replies[last_question(r.prompt, "Compute problem ").split(".")[0]])
    result = evaluate(task, lm)
    assert result.metrics["acc"][0] == pytest.approx(2 / 3)
    assert lm.seen[0].prompt.count("Problem:\n") == 5  # 4 shots + the question
    assert lm.seen[0].prompt.endswith("Solution:\n")


def test_math_hf_parquet_and_missing_boxed(tmp_path):
    f = tmp_path / "test-00000-of-00001.parquet"
    write_parquet(f, [math_problem(0, "3"), {**math_problem(1, "4"), "solution": "no box"}])
    with pytest.raises(DataError, match=r"test-00000-of-00001.parquet: row 1: .*boxed"):
        load_task(f"math:{f}")


# ------------------------------------------------------------------------------ BBH


def test_bbh_release_with_cot_prompts(tmp_path):
    (tmp_path / "bbh").mkdir()
    (tmp_path / "cot-prompts").mkdir()
    examples = [
        {"input": "not ( True ) and ( True ) is", "target": "False"},
        {"input": "True and not False is", "target": "True"},
    ]
    (tmp_path / "bbh" / "boolean_expressions.json").write_text(
        json.dumps({"canary": "c", "examples": examples}, indent=2)
    )
    (tmp_path / "cot-prompts" / "boolean_expressions.txt").write_text(
        "BENCHMARK DATA SHOULD NEVER APPEAR\n-----\n"
        "Evaluate the result of a random Boolean expression.\n\n"
        "Q: not ( ( not not True ) ) is\nA: Let's think step by step.\nSo the answer is False."
    )
    task = load_task(f"bbh:{tmp_path / 'bbh'}")
    assert len(task.docs()) == 2  # with chains of thought, no example is used as a shot
    lm = FakeLM(
        lambda r: (
            " True and True is True. So the answer is True."
            if "True and not" in r.prompt.split("Q: ")[-1]
            else " So the answer is True."
        )
    )
    result = evaluate(task, lm)
    assert result.metrics["em"][0] == 0.5
    prompt = lm.seen[0].prompt
    assert prompt.startswith("Evaluate the result") and "CANARY" not in prompt.upper()
    assert prompt.endswith("Q: not ( True ) and ( True ) is\nA: Let's think step by step.")


def test_bbh_without_cot_prompts_reserves_each_subtasks_first_three(tmp_path):
    for task_name in ("navigate", "snarks"):
        examples = [
            {"input": f"{task_name} item {i}", "target": f"{task_name}-{i}"} for i in range(5)
        ]
        (tmp_path / f"{task_name}.json").write_text(json.dumps({"examples": examples}))
    task = load_task(f"bbh:{tmp_path}")
    assert len(task.docs()) == 4 and task.num_fewshot == 3
    lm = FakeLM(
        lambda r: (
            "the answer is " + r.prompt.rsplit("Q: ", 1)[1].split("\n")[0].replace(" item ", "-")
        )
    )
    result = evaluate(task, lm)
    assert result.metrics["em"][0] == 1.0
    for r in lm.seen:
        subtask = r.prompt.rsplit("Q: ", 1)[1].split()[0]
        shots = [line for line in r.prompt.split("\n") if line.startswith("Q: ")][:-1]
        assert shots == [f"Q: {subtask} item {i}" for i in range(3)]


# ------------------------------------------------------------------------------ IFEval


def test_ifeval_task_matches_the_instruct_scorer():
    task = load_task("ifeval")
    rows = list(task.docs())[:12]
    responses = [
        "* red\n* blue\n* green\n* white\n* black"
        if i % 3 == 0
        else ("HELLO THERE" if i % 3 == 1 else "hello there friend, a fine day")
        for i in range(len(rows))
    ]
    lm = FakeLM(lambda r: responses[[row["prompt"] for row in rows].index(r.prompt)])
    result = evaluate(task, lm, limit=12)
    expected = ifeval_score(rows, responses)
    for metric in ("prompt_strict", "prompt_loose", "instruction_strict", "instruction_loose"):
        assert result.metrics[metric][0] == pytest.approx(expected[metric]), metric
    assert 0 < expected["instruction_loose"] < 1
    assert lm.seen[0].prompt == rows[0]["prompt"] and lm.seen[0].temperature == 0.0


def test_ifeval_reads_an_input_data_file(tmp_path):
    f = tmp_path / "input_data.jsonl"
    rows = [
        {
            "key": 1,
            "prompt": "Write a haiku.",
            "instruction_id_list": ["change_case:english_lowercase"],
            "kwargs": [{}],
        },
        {
            "key": 2,
            "prompt": "Say hi.",
            "instruction_id_list": ["change_case:english_capital", "punctuation:no_comma"],
            "kwargs": [{}, {}],
        },
    ]
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = load_task(f"ifeval:{f}")
    result = evaluate(task, FakeLM(lambda r: "soft rain, on the roof"))
    # row 1: lowercase yes -> 1/1; row 2: capital no, no-comma no -> 0/2
    assert result.metrics["prompt_strict"][0] == 0.5
    assert result.metrics["instruction_strict"][0] == pytest.approx(1 / 3)
