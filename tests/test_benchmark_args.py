"""benchmarks/quant_decode.py refuses bad options in one line before it builds any model (the
full run holds about 10 GB of models: a typo found after that costs minutes)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

BENCHMARKS = str(Path(__file__).resolve().parents[1] / "benchmarks")
sys.path.insert(0, BENCHMARKS)  # benchmarks/ is not a package: its scripts import each other
try:
    import batch_decode
    import hugepages as hugepages_bench
    import kernel_ab
    import quant_decode
finally:
    sys.path.remove(BENCHMARKS)  # no benchmark module shadows another test's imports


def assert_refused(call, prog: str, says: str, capsys, built: list) -> None:
    """call() exits with status 2 and one last stderr line "<prog>: error: ...<says>...",
    nothing built."""
    with pytest.raises(SystemExit) as exit_:
        call()
    assert exit_.value.code == 2 and not built
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"{prog}: error:") and says in err, err


@pytest.mark.parametrize(
    "argv, says",
    [
        (["--rounds", "0"], "--rounds: 0 is not at least 1"),
        (["--rounds", "three"], "--rounds: 'three' is not an integer"),
        (["--new-tokens", "-3"], "--new-tokens: -3 is not at least 1"),
        (["--layers", "0"], "--layers: 0 is not at least 1"),
        (["--modes", "int8,int5"], "--modes: unknown 'int5'"),
        (["--modes", ""], "--modes: unknown ''"),
        (["--modes", "keep"], "--modes: unknown 'keep'"),  # random weights: nothing to keep
        (["--modes", "bf16,int4,bf16"], "names a mode twice"),
        (["--preset", "gemma-9000"], "--preset: unknown preset 'gemma-9000'"),
    ],
)
def test_bad_options_are_refused_in_one_line(argv, says, capsys, monkeypatch):
    built = []
    monkeypatch.setattr(quant_decode.gemmakit, "build_model", lambda *a, **k: built.append(a))
    assert_refused(lambda: quant_decode.parse_args(argv), "quant_decode.py", says, capsys, built)


def test_good_options_parse():
    args, cfg, modes = quant_decode.parse_args(["--layers", "2", "--modes", "bf16,int4-g128"])
    assert cfg.n_layers == 2 and modes == ["bf16", "int4-g128"] and args.rounds == 3


def test_hugepages_benchmark_refuses_bad_options_under_its_own_name(capsys, monkeypatch):
    """benchmarks/hugepages.py takes quant_decode's options, refused the same way but in its
    own name, before any model is built."""
    built = []
    monkeypatch.setattr(hugepages_bench.gemmakit, "build_model", lambda *a, **k: built.append(a))
    for argv, says in (
        (["--rounds", "0"], "--rounds: 0 is not at least 1"),
        (["--modes", "int5"], "unknown 'int5'"),
    ):
        monkeypatch.setattr(sys, "argv", ["hugepages.py", *argv])
        assert_refused(hugepages_bench.main, "hugepages.py", says, capsys, built)


@pytest.mark.parametrize(
    "argv, says",
    [
        (["--rev", "no-such-revision"], "--rev: 'no-such-revision' is not a commit"),
        (["--rev", "HEAD", "--mode", "int5"], "--mode: unknown 'int5'"),
        (["--rev", "HEAD", "--rounds", "0"], "--rounds: 0 is not at least 1"),
        (["--rev", "HEAD", "--preset", "gemma-9000"], "--preset: unknown preset"),
        ([], "the following arguments are required: --rev"),
        (["--rev", ""], "--rev: '' is not a commit"),
        (["--rev=--git-dir"], "--rev: '--git-dir' is not a commit"),  # not a git option
        (["--rev", "HEAD", "--new-tokens", "-1"], "--new-tokens: -1 is not at least 1"),
        (["--rev", "HEAD", "--batch", "17"], "--batch: 17 is more than the fused step's 16"),
        (["--rev", "HEAD", "--batch", "0"], "--batch: 0 is not at least 1"),
        (["--rev", "HEAD", "--batch", "two"], "--batch: 'two' is not an integer"),
        (["--rev", "HEAD", "--new-tokens", "1"], "--new-tokens: at least 2"),
    ],
)
def test_kernel_ab_refuses_bad_options_before_building(argv, says, capsys, monkeypatch):
    """benchmarks/kernel_ab.py refuses a bad revision, mode or count in one line under its own
    name before it builds a library or a model; good options name the revision's commit."""
    built = []
    monkeypatch.setattr(kernel_ab, "build", lambda *a, **k: built.append(a))
    monkeypatch.setattr(kernel_ab.gemmakit, "build_model", lambda *a, **k: built.append(a))
    assert_refused(lambda: kernel_ab.parse_args(argv), "kernel_ab.py", says, capsys, built)
    args = kernel_ab.parse_args(["--rev", "HEAD", "--mode", "keep"])
    assert len(args.commit) == 40 and args.mode == "keep" and args.rounds == 9


@pytest.mark.parametrize(
    "argv, says",
    [
        (["--batches", "17"], "--batches: 17 is more than the fused step's 16 rows"),
        (["--batches", "0"], "--batches: 0 is not at least 1"),
        (["--batches"], "--batches: expected at least one argument"),
        (["--modes", "int5"], "--modes: invalid choice: 'int5'"),
        (["--new-tokens", "1"], "--new-tokens: at least 2"),
        (["--layers", "-2"], "--layers: -2 is not at least 1"),
        (["--preset", "gemma-9000"], "--preset: unknown preset"),
    ],
)
def test_batch_decode_refuses_bad_options_before_building(argv, says, capsys, monkeypatch):
    """benchmarks/batch_decode.py refuses each bad option in one line under its own name
    before it builds a model; good options give the config."""
    built = []
    monkeypatch.setattr(batch_decode.gemmakit, "build_model", lambda *a, **k: built.append(a))
    assert_refused(lambda: batch_decode.parse_args(argv), "batch_decode.py", says, capsys, built)
    args, cfg = batch_decode.parse_args(["--layers", "2", "--batches", "1", "16"])
    assert cfg.n_layers == 2 and args.batches == [1, 16] and not built


def test_hugepages_refuses_the_greedy_head_mode(capsys, monkeypatch):
    """bf16-head8 is quant_decode.py's alone: hugepages.py, which quantizes every mode but
    bf16, refuses it in one line."""
    built = []
    monkeypatch.setattr(quant_decode.gemmakit, "build_model", lambda *a, **k: built.append(a))
    call = lambda: quant_decode.parse_args(  # noqa: E731
        ["--modes", "bf16-head8"], prog="hugepages.py", choices=quant_decode.MODES
    )
    assert_refused(call, "hugepages.py", "--modes: unknown 'bf16-head8'", capsys, built)
    assert quant_decode.parse_args(["--modes", "bf16,bf16-head8"])[2] == ["bf16", "bf16-head8"]
