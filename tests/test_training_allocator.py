"""keep_freed_memory: a training process re-uses freed activations without page faults."""

import subprocess
import sys

import pytest

from gemmakit.training import allocator

CHILD = """
import resource, sys
import torch
from gemmakit.training import allocator
if sys.argv[1] == "tuned":
    assert allocator.keep_freed_memory()
def step():  # activations of 1 to 30 MiB, allocated, written and freed, as in a step
    acts = [torch.ones(n * 2**18) for n in (1, 3, 8, 16, 30, 4, 20)]
    del acts
step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    step()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5)
"""


def faults_per_step(mode: str) -> float:
    out = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return float(out.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_tuned_allocator_takes_fewer_page_faults_per_step():
    default, tuned = faults_per_step("default"), faults_per_step("tuned")
    # 82 MiB touched per step: ~21k faults if every block came fresh from the kernel
    assert tuned < 0.5 * default, (default, tuned)


def test_opt_out(monkeypatch):
    monkeypatch.setattr(allocator, "_done", False)
    monkeypatch.setenv("GEMMAKIT_NO_MALLOPT", "1")
    assert allocator.keep_freed_memory() is False
