"""The code sandbox: programs that attack the caller fail safely and quickly, honest ones pass."""

from __future__ import annotations

import time

import pytest

from gemmakit.evaluation.sandbox import SandboxLimits, run_program, run_programs

FAST = SandboxLimits(timeout_s=3.0, cpu_s=2, memory_bytes=512 << 20, file_bytes=1 << 20)


def test_a_correct_program_passes_and_says_which_layers_held():
    r = run_program("import math\nassert math.gcd(12, 18) == 6\nprint('fine')", FAST)
    assert r.status == "passed" and r.passed
    assert "audit" in r.isolation  # always; netns/uid where the kernel allows them


@pytest.mark.parametrize(
    "source, reason",
    [
        ("assert 1 == 2, 'wrong'", "AssertionError: wrong"),
        ("raise ValueError('bad input')", "ValueError: bad input"),
        ("import sys\nsys.exit(3)", ""),
        # exiting with status 0 before the end (past the tests) is not a pass
        ("import sys\nsys.exit(0)\nassert False", "exited before its end"),
        ("import os\nos._exit(0)", "exit status 0"),
    ],
)
def test_failures_are_failures(source, reason):
    r = run_program(source, FAST)
    assert r.status == "failed"
    assert reason in r.detail


def test_attacks_fail_safely_quickly_and_the_callers_file_survives(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    attacks = {
        "write": f"open({str(victim)!r}, 'w').write('gone')",
        "append": f"open({str(victim)!r}, 'a').write('more')",
        "delete": f"import os\nos.remove({str(victim)!r})",
        "rename": f"import os\nos.rename({str(victim)!r}, {str(victim)!r} + '.x')",
        "rmtree": f"import shutil\nshutil.rmtree({str(tmp_path)!r})",
        "os.open": f"import os\nos.open({str(victim)!r}, os.O_WRONLY | os.O_TRUNC)",
        "ctypes": f"import ctypes\nctypes.CDLL(None).unlink({str(victim).encode()!r})",
        "socket": "import socket\nsocket.create_connection(('1.1.1.1', 80), timeout=1)",
        "subprocess": f"import subprocess\nsubprocess.run(['rm', {str(victim)!r}])",
        "system": f"import os\nos.system('rm {victim}')",
        "fork bomb": "import os\nwhile True:\n    os.fork()",
        "10 GB": "x = bytearray(10 * 1024**3)",
        "busy loop": "while True:\n    pass",
        "sleep": "import time\ntime.sleep(60)",
        "output flood": "while True:\n    print('x' * 10000)",
    }
    t0 = time.perf_counter()
    results = dict(zip(attacks, run_programs(list(attacks.values()), FAST, workers=4)))
    elapsed = time.perf_counter() - t0
    for name, r in results.items():
        assert not r.passed, name
        assert r.status in ("failed", "timeout", "killed"), (name, r)
        assert r.seconds < FAST.timeout_s + 2, (name, r)
    assert results["busy loop"].status in ("timeout", "killed")
    assert results["sleep"].status == "timeout"
    assert "PermissionError" in results["write"].detail
    assert "MemoryError" in results["10 GB"].detail or results["10 GB"].status == "killed"
    assert victim.read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["victim.txt"]
    assert elapsed < 30


def test_the_program_works_in_its_own_throwaway_directory():
    source = (
        "import os, tempfile\n"
        "open('scratch.txt', 'w').write('x')\n"
        "assert os.path.exists('scratch.txt')\n"
        "assert os.environ['HOME'] == os.getcwd()\n"
        "assert 'PYTHONPATH' not in os.environ\n"
        "fd, name = tempfile.mkstemp()\n"
        "os.remove('scratch.txt')\n"
        "print(os.getcwd())\n"
    )
    first, second = run_programs([source, source], FAST, workers=2)
    assert first.passed and second.passed


def test_results_keep_the_order_of_the_sources():
    sources = [f"assert {i} % 2 == 0" for i in range(6)]
    assert [r.passed for r in run_programs(sources, FAST, workers=3)] == [
        True,
        False,
        True,
        False,
        True,
        False,
    ]
