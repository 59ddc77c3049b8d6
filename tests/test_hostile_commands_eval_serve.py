"""The commands added for evaluation, serving and quantization, given hostile input: each
refusal is one line naming what is wrong, and nothing outside the output folder changes."""

from __future__ import annotations

import pytest
from test_hostile_inputs import one_line_error, snapshot

from gemmakit.api import build_model
from gemmakit.checkpoint import save_hf
from gemmakit.config import get_config


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ck") / "ck"
    save_hf(build_model(get_config("tiny"), seed=0), folder)
    return folder


@pytest.fixture
def files(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "bad.jsonl").write_text("{bad\n")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "mine.txt").write_text("keep")
    (tmp_path / "afile").write_text("not a folder")
    return tmp_path


EVAL_CASES = [
    (["--tasks", "nosuch"], "unknown task 'nosuch'"),
    (["--tasks", ","], "--tasks names no task"),
    (["--tasks", "hellaswag:{d}/missing.jsonl"], "missing.jsonl: no such file"),
    (["--tasks", "hellaswag:{d}/empty.jsonl"], "empty.jsonl: no hellaswag questions"),
    (["--tasks", "hellaswag:{d}/bad.jsonl"], "bad.jsonl:1: not valid JSON"),
    (["--tasks", "ifeval", "--limit", "0"], "--limit must be at least 1"),
]


@pytest.mark.parametrize("extra,needle", EVAL_CASES)
def test_eval_refuses_bad_tasks_and_writes_nothing(files, extra, needle, capsys):
    out = files / "out"
    before = snapshot(files)
    argv = ["eval", "--model", "tiny", "--out", str(out)]
    one_line_error(capsys, argv + [a.format(d=files) for a in extra], needle)
    assert snapshot(files) == before and not out.exists()


def test_eval_out_that_is_a_file_is_refused(files, capsys):
    before = snapshot(files)
    argv = ["eval", "--model", "tiny", "--tasks", "ifeval", "--out", str(files / "afile")]
    one_line_error(capsys, argv, "afile: a file, not a folder")
    assert snapshot(files) == before


@pytest.mark.parametrize(
    "target,needle",
    [("missing", "no such folder"), ("empty.jsonl", "got a file"), ("full", "index.json")],
)
def test_memorization_refuses_what_is_not_training_data(files, target, needle, capsys):
    before = snapshot(files)
    one_line_error(capsys, ["memorization", str(files / target), "--model", "tiny"], needle)
    assert snapshot(files) == before


def test_quantize_never_writes_over_its_source_or_a_foreign_folder(checkpoint, files, capsys):
    before = snapshot(checkpoint.parent)
    for out in (checkpoint, checkpoint / "sub" / ".."):
        one_line_error(
            capsys, ["quantize", str(checkpoint), str(out), "--to", "int8"], "would replace it"
        )
    one_line_error(capsys, ["convert", str(checkpoint), str(checkpoint)], "is where the source")
    assert snapshot(checkpoint.parent) == before
    one_line_error(
        capsys,
        ["quantize", str(checkpoint), str(files / "full"), "--to", "int8"],
        "holds 'mine.txt'",
    )
    assert (files / "full" / "mine.txt").read_text() == "keep"
    one_line_error(capsys, ["quantize", "tiny", str(files / "q"), "--to", "int8"], "preset")
    assert not (files / "q").exists()


@pytest.mark.parametrize(
    "extra,needle",
    [
        (["--port", "0"], "--port must be from 1 to 65535, got 0"),
        (["--port", "99999"], "--port must be from 1 to 65535, got 99999"),
        (["--max-batch", "0"], "--max-batch must be >= 1"),
        (["--max-queue", "-1"], "--max-queue must be >= 1"),
        (["--prefix-cache", "-5"], "--prefix-cache must be >= 0"),
    ],
)
def test_serve_refuses_out_of_range_settings(extra, needle, capsys):
    one_line_error(capsys, ["serve", "--model", "tiny", *extra], needle)


def test_lm_eval_unknown_task_is_one_line(capsys):
    pytest.importorskip("lm_eval")
    argv = ["lm-eval", "--model", "gemmakit", "--model_args", "model=tiny", "--tasks", "nosuch"]
    one_line_error(capsys, argv, "Tasks not found: nosuch", "ls tasks")
