"""Keep freed CPU memory in the process for reuse, instead of handing it back to the kernel.

glibc's malloc serves large blocks with fresh mmaps and trims the heap top after frees, so a
training step that frees and re-allocates the same activations every step takes a page
fault for each 4 KiB of them, every step: on the tiny preset 10k faults (40 MiB), about 5% of
a CPU step. Raising the mmap threshold to its maximum (32 MiB) and turning off trimming makes
those blocks come back from the heap with no fault. The cost is that the process keeps its
peak heap size, which is what a training run reaches every step anyway.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_MAX = 32 * 2**20  # glibc's ceiling on 64-bit (4 * 1024 * 1024 * sizeof(long))
_done = False


def keep_freed_memory() -> bool:
    """Tune glibc malloc for a training loop (once per process). False where it does not
    apply (not glibc, or GEMMAKIT_NO_MALLOPT=1) or glibc refused."""
    global _done
    if _done:
        return True
    if os.environ.get("GEMMAKIT_NO_MALLOPT", "0") not in ("", "0"):
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
        libc.gnu_get_libc_version  # noqa: B018  (only glibc has it)
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # trim threshold: the largest int, i.e. never give the heap top back
    ok = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX) == 1
    ok = mallopt(M_TRIM_THRESHOLD, 2**31 - 1) == 1 and ok
    _done = ok
    return ok
