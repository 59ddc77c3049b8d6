"""back_with_huge_pages: the weights a decode step streams move into 2 MiB pages in place,
their contents and addresses kept; the decoder does it to its weights when it is built."""

from __future__ import annotations

import sys

import pytest
import torch

from gemmakit.kernels import hugepages

MIB = 2**20
linux = pytest.mark.skipif(sys.platform != "linux", reason="transparent huge pages are Linux's")


def huge_bytes(lo: int, hi: int) -> int:
    """AnonHugePages of the mappings that overlap [lo, hi), from /proc/self/smaps (a mapping
    the range only touches counts whole: callers give ranges that are whole mappings' worth)."""
    total, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                a, b = (int(v, 16) for v in head.split("-"))
                inside = a < hi and b > lo
            elif inside and head == "AnonHugePages:":
                total += int(line.split()[1]) * 1024
    return total


def collapse_works() -> bool:
    t = torch.ones(8 * MIB // 4)
    return hugepages.back_with_huge_pages([t]) > 0


def test_spans_merge_storages_whose_pages_touch():
    big = torch.zeros(4 * MIB // 4)
    a, b = big[: MIB // 4], big[MIB // 4 + 10 :]  # two views of one storage: one span
    lo = big.data_ptr()
    assert hugepages.spans([a, b]) == [(lo, lo + 4 * MIB)]
    other = torch.zeros(16)
    spans = hugepages.spans([a, other, a])  # a repeated: still one span of its storage
    assert (lo, lo + 4 * MIB) in spans and len(spans) == 2


def test_huge_ranges_are_the_whole_2mib_pages_inside():
    t = torch.zeros(7 * MIB // 4)
    lo = t.data_ptr()
    (a, b), *rest = hugepages.huge_ranges([t])
    assert not rest
    assert a % (2 * MIB) == 0 and b % (2 * MIB) == 0
    assert lo <= a < lo + 2 * MIB and lo + 7 * MIB - 2 * MIB < b <= lo + 7 * MIB
    small = torch.zeros(MIB // 8)  # half a MiB: no whole huge page in it
    assert hugepages.huge_ranges([small]) == []


@linux
def test_tensors_move_into_huge_pages_keeping_their_contents():
    if not collapse_works():
        pytest.skip("this kernel refuses MADV_COLLAPSE (older than 6.1, or THP 'never')")
    gen = torch.Generator().manual_seed(0)
    t = torch.randn(24 * MIB // 4, generator=gen)
    before, ptr = t.clone(), t.data_ptr()
    ((a, b),) = hugepages.huge_ranges([t])
    moved = hugepages.back_with_huge_pages([t])
    assert moved == b - a >= 20 * MIB
    assert huge_bytes(a, b) >= b - a
    assert t.data_ptr() == ptr and torch.equal(t, before)
    t.add_(1)  # still ordinary, writable memory
    assert torch.equal(t, before + 1)


def test_opt_out_leaves_memory_alone(monkeypatch):
    calls = []
    monkeypatch.setattr(hugepages, "_libc_madvise", lambda: lambda *a: calls.append(a) or 0)
    t = torch.ones(12 * MIB // 4)
    assert hugepages.back_with_huge_pages([t]) > 0 and calls  # advised when on
    calls.clear()
    monkeypatch.setenv("GEMMAKIT_NO_HUGEPAGES", "1")
    assert hugepages.back_with_huge_pages([t]) == 0 and not calls


def test_serve_moves_the_model_into_huge_pages_at_start(tmp_path, monkeypatch):
    """`gemmakit serve` (hours of decoding) hands every weight to back_with_huge_pages once,
    before it serves; one-shot generation does not (the move costs ~1.4 s per GB)."""
    pytest.importorskip("uvicorn")
    from serving import tiny_model, tiny_tokenizer

    from gemmakit.checkpoint import save_hf
    from gemmakit.cli import main
    from gemmakit.serving import server

    tok = tiny_tokenizer(tmp_path)
    save_hf(
        tiny_model(tok.vocab_size),
        tmp_path / "m",
        extra_files={"tokenizer.model": tmp_path / "tok.model"},
    )
    given, real = [], hugepages.back_with_huge_pages
    monkeypatch.setattr(
        hugepages, "back_with_huge_pages", lambda ts: given.append(list(ts)) or real(ts)
    )
    served = []
    monkeypatch.setattr(server.Server, "run", lambda self: served.append(len(given)))
    assert main(["serve", "--checkpoint", str(tmp_path / "m"), "--port", "8"]) == 0
    assert served == [1] and len(given) == 1
    assert len(given[0]) >= 4 * 7 + 1  # every block's 7 projections and the embedding, at least
    given.clear()
    assert (
        main(["generate", "--checkpoint", str(tmp_path / "m"), "--max-new-tokens", "2", "hi"]) == 0
    )
    assert given == []
