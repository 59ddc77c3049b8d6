"""Build and load the C kernels (bf16_gemv.c, train_ops.c) with the system C compiler, via
ctypes.

The shared library is compiled once per sources + compiler + flags into
~/.cache/gemmakit/kernels/<hash>.so (written to a temp name, then renamed, so concurrent
processes never load a half-written file). Anything that goes wrong (no compiler, no AVX2/FMA,
a failed self-test) makes `library()` return None and the caller falls back to torch.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import threading
from pathlib import Path

import torch

from gemmakit.atomic import atomic_path

log = logging.getLogger(__name__)

SOURCES = [Path(__file__).with_name(n) for n in ("bf16_gemv.c", "train_ops.c")]
FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-shared", "-fPIC"]
MAX_ROWS = 8  # the kernel's largest M (decode of a batch of up to 8 sequences)

_lock = threading.Lock()
_state: dict[str, ctypes.CDLL | None] = {}


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "gemmakit" / "kernels"


def enabled() -> bool:
    """False when GEMMAKIT_NO_KERNELS is set to anything but '' or '0' (read on every call)."""
    return os.environ.get("GEMMAKIT_NO_KERNELS", "0") in ("", "0")


def cpu_supported() -> bool:
    """True on x86-64 Linux whose CPU flags include avx2 and fma (the kernel's instructions)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False  # no way to check: running AVX2 code blind could crash the process
    for line in text.splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            return {"avx2", "fma"} <= flags
    return False


def build(compiler: str | None = None) -> Path:
    """Compile the kernel sources (if not cached) and return the .so path. Raises on failure."""
    cc = compiler or os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise RuntimeError("no C compiler found (cc, gcc or $CC)")
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, check=True)
    key = hashlib.sha256()
    for part in (*(src.read_bytes() for src in SOURCES), cc, version.stdout, " ".join(FLAGS)):
        key.update(part if isinstance(part, bytes) else part.encode())
    out = cache_dir() / f"gemmakit-kernels-{key.hexdigest()[:16]}.so"
    if out.exists():
        return out
    with atomic_path(out) as tmp:
        cmd = [cc, *FLAGS, "-o", str(tmp), *map(str, SOURCES), "-lm"]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr.strip()}")
    return out


def _open(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    fn = lib.bf16_gemv
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
    fn.argtypes += [ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int]
    fn.restype = ctypes.c_int
    P, I64, F32, INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int
    signatures = {
        "rmsnorm_fwd": [P, P, P, P, I64, I64, F32, INT],
        "rmsnorm_bwd": [P, P, P, P, P, P, I64, I64, INT],
        "gelu_mul_fwd": [P, P, P, I64, INT],
        "gelu_mul_bwd": [P, P, P, P, P, I64, INT],
        "xent_rows": [P, P, P, I64, I64, INT, INT],
        "rope_apply": [P, P, P, P, *[I64] * 10, INT, INT],
    }
    for name, args in signatures.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, ctypes.c_int
    return lib


def _self_test(lib: ctypes.CDLL) -> None:
    """Raise unless the kernel matches float32 matmul on shapes with K and N tails."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(29, 45, generator=gen).to(torch.bfloat16)
    for m in (1, 3, 6):
        x = torch.randn(m, 45, generator=gen)
        got = _call(lib, x, w, n_threads=2)
        want = x @ w.float().T
        if not torch.allclose(got, want, rtol=1e-5, atol=1e-5):
            raise RuntimeError(f"self-test failed for M={m}: max error {(got - want).abs().max()}")
    from gemmakit.kernels import train_ops  # the fused training ops, against torch

    train_ops.self_test(lib)


def _isolated(fn, *args) -> None:
    """Run fn(*args) in a fresh thread and re-raise what it raised. The first kernel call can
    come from inside a training forward (activation checkpointing's saved-tensor hooks,
    autocast, no_grad: all thread-local); the self-test's autograd must see none of them, or
    checkpointing would recompute the caller's block inside the self-test."""
    errors: list[BaseException] = []

    def target() -> None:
        try:
            fn(*args)
        except BaseException as exc:  # noqa: BLE001 (handed to the caller)
            errors.append(exc)

    thread = threading.Thread(target=target, name="gemmakit-kernel-self-test")
    thread.start()
    thread.join()
    if errors:
        raise errors[0]


def library() -> ctypes.CDLL | None:
    """The loaded kernel library, or None when kernels are unavailable (reason logged once)."""
    if "lib" in _state:
        return _state["lib"]
    with _lock:
        if "lib" not in _state:
            lib = None
            try:
                if not cpu_supported():
                    raise RuntimeError("CPU lacks AVX2/FMA or is not x86-64 Linux")
                lib = _open(build())
                _isolated(_self_test, lib)
            except Exception as exc:  # any failure means: use torch instead
                log.debug("gemmakit bf16 kernels disabled, using torch: %s", exc)
                lib = None
            _state["lib"] = lib
    return _state["lib"]


def _call(lib: ctypes.CDLL, x: torch.Tensor, weight: torch.Tensor, n_threads: int) -> torch.Tensor:
    """x [M, K] float32 contiguous, weight [N, K] bf16 contiguous -> [M, N] float32."""
    (m, k), n = x.shape, weight.shape[0]
    y = torch.empty(m, n, dtype=torch.float32)
    rc = lib.bf16_gemv(x.data_ptr(), weight.data_ptr(), y.data_ptr(), m, n, k, n_threads)
    if rc != 0:
        shapes = f"x {tuple(x.shape)}, weight {tuple(weight.shape)}"
        raise ValueError(f"bf16_gemv rejected the shapes {shapes}")
    return y


def bf16_matmul(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [M, K] (M <= MAX_ROWS) @ weight[N, K]^T for a bf16 CPU weight, in float32 -> [M, N].

    Requires `library()` to be non-None; x is converted once to contiguous float32.
    """
    lib = library()
    if lib is None:
        raise RuntimeError("bf16 kernels are unavailable on this machine")
    x = x.to(torch.float32).contiguous()
    return _call(lib, x, weight, torch.get_num_threads())
