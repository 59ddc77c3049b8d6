"""The command line as a whole: start-up cost of commands that need no model."""

import errno
import subprocess
import sys

import pytest

from gemmakit.cli import main
from gemmakit.errors import ConfigError, DataError, MissingFileError, UsageError

CHECK = """
import sys
import gemmakit
from gemmakit import cli
cli.build_parser()
assert gemmakit.__version__
assert "torch" not in sys.modules, "torch was imported"
assert callable(gemmakit.get_config)
print(gemmakit.get_config("tiny").d_model)
"""


def test_parser_and_config_do_not_import_torch():
    # tokenizer and data commands must start in a fraction of a second, not torch's 4 s
    out = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["128"]


def test_package_exports_resolve_lazily():
    import gemmakit

    assert gemmakit.load_model is gemmakit.api.load_model
    assert set(gemmakit.__all__) <= set(dir(gemmakit))
    try:
        gemmakit.no_such_name  # noqa: B018
    except AttributeError as e:
        assert "no_such_name" in str(e)
    else:
        raise AssertionError("unknown attribute did not raise")


# ------------------------------------------------- user errors: one line; bugs: a traceback


def failing_command(monkeypatch, exc: BaseException) -> None:
    """`gemmakit info` made to raise `exc` (register() reads the module's `run` each time)."""
    import gemmakit.commands.info as info

    def run(args):
        raise exc

    monkeypatch.setattr(info, "run", run)


@pytest.mark.parametrize(
    "exc",
    [
        ConfigError("recipe.yaml: unknown key 'x'"),
        DataError("a.jsonl:3: not valid JSON"),
        UsageError("--top-p must be in (0, 1], got 5.0"),
        MissingFileError("nothere.yaml: no such recipe file"),
        ConfigError("r.yaml: not valid YAML (while parsing\n  in line 2\n    ^)"),
        FileNotFoundError(errno.ENOENT, "No such file or directory", "nothere"),
        PermissionError(errno.EACCES, "Permission denied", "/root/x"),
        OSError(errno.ENOSPC, "No space left on device", "out/model.safetensors"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_a_user_error_is_one_line_with_exit_2(monkeypatch, capsys, exc):
    failing_command(monkeypatch, exc)
    assert main(["info", "tiny"]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("gemmakit info: error: ")
    assert captured.err.count("\n") == 1, captured.err
    assert "Traceback" not in captured.err
    name = getattr(exc, "filename", None) or str(exc).split(":")[0]
    assert name in captured.err


@pytest.mark.parametrize(
    "exc",
    [
        RuntimeError("a bug"),
        KeyError("weights"),
        ValueError("a plain ValueError is a bug, not a user error"),
        TypeError("bad call"),
        OSError(errno.EIO, "Input/output error"),  # no file named, not the user's doing
    ],
    ids=lambda e: type(e).__name__,
)
def test_an_internal_bug_keeps_its_traceback(monkeypatch, exc):
    failing_command(monkeypatch, exc)
    with pytest.raises(type(exc)):
        main(["info", "tiny"])


BUG = """
import gemmakit.commands.info as info
def run(args):
    raise RuntimeError("an internal bug")
info.run = run
from gemmakit.cli import main
raise SystemExit(main(["info", "tiny"]))
"""


def test_an_internal_bug_exits_1_with_its_traceback():
    out = subprocess.run([sys.executable, "-c", BUG], capture_output=True, text=True)
    assert out.returncode == 1
    assert "Traceback" in out.stderr and "RuntimeError: an internal bug" in out.stderr
    assert "def run" in out.stderr or "in run" in out.stderr  # the frame that raised


def test_a_real_user_error_from_the_cli_is_one_line(tmp_path):
    """Through a real process: exit status 2 and a single line on stderr."""
    cmd = [sys.executable, "-m", "gemmakit.cli", "data", "inspect", str(tmp_path / "none")]
    out = subprocess.run(cmd, capture_output=True, text=True)
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and "none" in out.stderr
