"""Back the weights a decode step streams with 2 MiB transparent huge pages (Linux).

Decoding reads every weight once per token, a stream of gigabytes. In 4 KiB pages the
hardware prefetchers stop at each page's end and every page needs its own TLB entry; in 2 MiB
pages one entry covers 512 of them. On a 2-core Zen 3 the int4 GEMV read its weights 9-17%
faster from huge pages (the bf16 one 0-8%), measured alternated on the same weights
(benchmarks/hugepages.py measures whole decodes).

torch allocates large tensors with plain mmaps, which a kernel whose THP setting is
"madvise" (the common default) backs with 4 KiB pages. `back_with_huge_pages` asks the
kernel to move the tensors' memory, in place, into huge pages: madvise(MADV_HUGEPAGE) and then
madvise(MADV_COLLAPSE) (Linux 6.1 and newer; it copies the pages synchronously, keeping their
contents and addresses). The copy is not free: about 1.4 s per GB on the Zen 3 VM (7 s for the
2B model's 5 GB of bfloat16), against a decode 1.06-1.14x faster in bfloat16 and 1.00-1.06x in
int4 there. So `gemmakit serve`, which decodes for hours, does it once at start, and one-shot
commands (generate, chat, eval) do not. Only the whole 2 MiB pages inside each run of adjacent
tensors can move; the rest stays as it is. Anything the kernel refuses (an older kernel, THP
"never", a file-backed mapping, no free huge page) leaves that memory as it was: this is only
ever a speed-up. GEMMAKIT_NO_HUGEPAGES=1 turns it off.
"""

from __future__ import annotations

import ctypes
import os
import sys
from collections.abc import Iterable

import torch

HUGE_PAGE = 2 << 20
PAGE = 4096
MADV_HUGEPAGE = 14  # linux/mman.h
MADV_COLLAPSE = 25
_STEP = 32 * HUGE_PAGE
_madvise = None


def _libc_madvise():
    global _madvise
    if _madvise is None:
        fn = ctypes.CDLL(None, use_errno=True).madvise
        fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        fn.restype = ctypes.c_int
        _madvise = fn
    return _madvise


def enabled() -> bool:
    """Linux, and not turned off by GEMMAKIT_NO_HUGEPAGES=1."""
    return sys.platform == "linux" and os.environ.get("GEMMAKIT_NO_HUGEPAGES", "0") in ("", "0")


def spans(tensors: Iterable[torch.Tensor]) -> list[tuple[int, int]]:
    """The CPU tensors' storages as [start, end) address ranges, those whose pages touch or
    overlap merged: every page of a span belongs to one of the storages, so all of it is
    mapped memory."""
    ranges = sorted(
        (s.data_ptr(), s.data_ptr() + s.nbytes())
        for t in tensors
        if t is not None and t.device.type == "cpu"
        for s in (t.untyped_storage(),)
        if s.nbytes() > 0
    )
    merged: list[list[int]] = []
    for lo, hi in ranges:
        if merged and lo // PAGE <= (merged[-1][1] - 1) // PAGE + 1:
            merged[-1][1] = max(merged[-1][1], hi)
        else:
            merged.append([lo, hi])
    return [(lo, hi) for lo, hi in merged]


def huge_ranges(tensors: Iterable[torch.Tensor]) -> list[tuple[int, int]]:
    """The whole 2 MiB pages inside `spans(tensors)`, as [start, end) ranges."""
    out = []
    for lo, hi in spans(tensors):
        a, b = -(-lo // HUGE_PAGE) * HUGE_PAGE, hi // HUGE_PAGE * HUGE_PAGE
        if b > a:
            out.append((a, b))
    return out


def back_with_huge_pages(tensors: Iterable[torch.Tensor]) -> int:
    """Move the tensors' memory into huge pages where the kernel agrees (see the module's
    docstring). Returns the bytes now in huge pages (0 where nothing moved)."""
    if not enabled():
        return 0
    try:
        madvise = _libc_madvise()
    except (OSError, AttributeError):
        return 0
    moved = 0
    for a, b in huge_ranges(tensors):
        madvise(a, b - a, MADV_HUGEPAGE)  # also for the pages faulted in later
        for lo in range(a, b, _STEP):  # in steps, so that one refusal costs only its step
            n = min(_STEP, b - lo)
            if madvise(lo, n, MADV_COLLAPSE) == 0:
                moved += n
    return moved
