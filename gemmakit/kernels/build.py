"""Build, verify and load one C kernel source as its own shared library, via ctypes.

Each source (bf16_gemv.c, train_ops.c) is a separate `CLibrary`: compiled once per source +
compiler + flags (and the headers beside it: vmath.h) into
~/.cache/gemmakit/kernels/gemmakit-<name>-<hash>.so, with its size and
SHA-256 recorded beside it (`.so.json`). A cached library is loaded only when its bytes match
that record; a truncated or overwritten file (which dlopen would turn into a SIGBUS) is rebuilt
instead. Both files are written under a temporary name, fsynced, then renamed, so concurrent
processes never see half of one.

Each source is built for the best instruction set the CPU has (`ISAS`, best first: AVX-512 with
VNNI, AVX-VNNI, AVX2; the C code picks its paths from the compiler's macros). A variant that does
not build (an older compiler without the flags) or fails its self-test is passed over for the
next one, so a machine always ends on the AVX2 build at worst.

Anything that goes wrong with every variant (no compiler, a failed build, a failed self-test)
makes `CLibrary.get()` return None, and the caller uses torch's ops: one warning per process
says why and how to fix it. One library failing leaves the others in use.
GEMMAKIT_NO_KERNELS=1 turns every kernel off (and so silences the warning).
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import logging
import os
import platform
import shutil
import subprocess
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from gemmakit.atomic import atomic_path

log = logging.getLogger(__name__)

FLAGS = ["-O3", "-fopenmp", "-shared", "-fPIC"]  # every variant's, beside its Isa.cc_flags
INSTALL_HINT = "install a C compiler with OpenMP (e.g. apt install gcc)"
REPORT_HINT = "please report this (compiler and CPU)"
_warned: set[str] = set()  # reasons already warned about in this process


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "gemmakit" / "kernels"


def enabled() -> bool:
    """False when GEMMAKIT_NO_KERNELS is set to anything but '' or '0' (read on every call)."""
    return os.environ.get("GEMMAKIT_NO_KERNELS", "0") in ("", "0")


@dataclass(frozen=True)
class Isa:
    """One build variant: the CPU flags (/proc/cpuinfo names) it needs, its compiler flags."""

    name: str
    cpu_flags: frozenset[str]
    cc_flags: tuple[str, ...]


_AVX2 = ("-mavx2", "-mfma", "-mf16c")
ISAS = (  # best first
    Isa(
        "avx512vnni",
        frozenset({"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni"}),
        (*_AVX2, "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni"),
    ),
    Isa("avxvnni", frozenset({"avx2", "fma", "f16c", "avx_vnni"}), (*_AVX2, "-mavxvnni")),
    Isa("avx2", frozenset({"avx2", "fma", "f16c"}), _AVX2),
)
AVX2 = ISAS[-1]


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags on x86-64 Linux (/proc/cpuinfo); empty elsewhere."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return frozenset()
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()  # no way to check: running AVX2 code blind could crash the process
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def cpu_isas() -> list[Isa]:
    """The build variants this CPU can run, best first (none: the kernels are not used)."""
    flags = cpu_flags()
    return [isa for isa in ISAS if isa.cpu_flags <= flags]


def cpu_supported() -> bool:
    """True on x86-64 Linux whose CPU has AVX2, FMA and F16C (the kernels' least instructions)."""
    return bool(cpu_isas())


def _digest(data: bytes) -> dict[str, object]:
    return {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _write_synced(path: Path, data: bytes) -> None:
    """Write `data` to `path` atomically, on disk (fsync) before the rename makes it visible."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


def verified(so: Path) -> bool:
    """True when `so` and its `.json` record exist and the file's size and hash match it."""
    record = so.with_name(so.name + ".json")
    try:
        want = json.loads(record.read_text())
        return isinstance(want, dict) and want == _digest(so.read_bytes())
    except (OSError, ValueError):
        return False


def build(source: Path, name: str, compiler: str | None = None, isa: Isa = AVX2) -> Path:
    """The path of `source` compiled for `isa` as a verified shared library, compiled first
    unless a cached one verifies. Raises RuntimeError (saying why) when it cannot be built."""
    cc = compiler or os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise RuntimeError("no C compiler found (cc, gcc or $CC)")
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError) as e:
        raise RuntimeError(f"the C compiler {cc!r} does not run ({e})") from None
    key = hashlib.sha256()
    flags = [*FLAGS, *isa.cc_flags]
    headers = [h.read_bytes() for h in sorted(source.parent.glob("*.h"))]  # vmath.h
    for part in (source.read_bytes(), *headers, cc, version.stdout, " ".join(flags)):
        key.update(part if isinstance(part, bytes) else part.encode())
    out = cache_dir() / f"gemmakit-{name}-{isa.name}-{key.hexdigest()[:16]}.so"
    if verified(out):
        return out
    try:
        with atomic_path(out) as tmp:
            cmd = [cc, *flags, "-o", str(tmp), str(source), "-lm"]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr.strip()}")
            data = tmp.read_bytes()
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
    except OSError as e:  # an unwritable cache folder, a full disk
        raise RuntimeError(f"cannot write {out} ({e})") from None
    _write_synced(out.with_name(out.name + ".json"), json.dumps(_digest(data)).encode())
    return out


def isolated(fn: Callable[..., None], *args) -> None:
    """Run fn(*args) in a fresh thread and re-raise what it raised. The first kernel call can
    come from inside a training forward (activation checkpointing's saved-tensor hooks,
    autocast, no_grad: all thread-local); a self-test's autograd must see none of them, or
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


def warn_fallback(name: str, reason: str, fix: str) -> None:
    """One warning per process and reason: kernel `name` is off, why, and how to fix it."""
    first_line = reason.strip().splitlines()[0] if reason.strip() else "unknown error"
    log.debug("gemmakit kernel %s disabled: %s", name, reason)
    if first_line in _warned:
        return
    _warned.add(first_line)
    log.warning(
        "gemmakit: the %s C kernel is off, using torch's slower ops instead: %s. To fix: %s; "
        "or set GEMMAKIT_NO_KERNELS=1 to silence this.",
        name,
        first_line,
        fix,
    )


class CLibrary:
    """One kernel source, built and self-tested on first use.

    signatures: C function name -> ctypes argument types (every function returns int).
    self_test: raises unless the loaded library computes what torch computes.
    """

    def __init__(
        self,
        name: str,
        source: Path,
        signatures: dict[str, list],
        self_test: Callable[[ctypes.CDLL], None],
    ) -> None:
        self.name, self.source = name, source
        self.signatures, self.self_test = signatures, self_test
        self._lock = threading.Lock()
        self._state: dict[str, ctypes.CDLL | None] = {}
        self.isa: Isa | None = None  # the build variant loaded, once get() has run

    def get(self) -> ctypes.CDLL | None:
        """The loaded library, or None when it is unavailable (the reason warned once)."""
        if "lib" in self._state:
            return self._state["lib"]
        with self._lock:
            if "lib" not in self._state:
                self._state["lib"] = self._load()
        return self._state["lib"]

    def forget(self) -> None:
        """Drop the loaded library so the next get() builds and loads again (for tests)."""
        with self._lock:
            self._state.clear()

    def _load(self) -> ctypes.CDLL | None:
        isas = cpu_isas()
        if not isas:  # nothing to fix: the kernels are x86-64 AVX2 code
            log.info(
                "gemmakit %s kernel not used: CPU lacks AVX2/FMA/F16C or is not x86-64", self.name
            )
            return None
        failed: list[str] = []  # variants that built but failed their self-test
        for i, isa in enumerate(isas):
            built = False  # past the build: a failure from here on is the self-test's
            try:
                lib = ctypes.CDLL(str(build(self.source, self.name, isa=isa)))
                for fn_name, args in self.signatures.items():
                    fn = getattr(lib, fn_name)
                    fn.argtypes, fn.restype = args, ctypes.c_int
                built = True
                isolated(self.self_test, lib)
            except Exception as exc:  # any failure means: the next variant, or torch
                if i == len(isas) - 1:  # one warning, whichever variants failed before
                    warn_fallback(self.name, str(exc), REPORT_HINT if built else INSTALL_HINT)
                    return None
                if built:
                    reason = str(exc).strip().splitlines()[0]
                    failed.append(f"{isa.name} build failed its self-test ({reason})")
                else:  # e.g. a compiler without the variant's flags: nothing to fix
                    log.info("gemmakit %s kernel: no %s build (%s)", self.name, isa.name, exc)
                continue
            if failed:  # said only now, once a variant that works is known
                log.warning(
                    "gemmakit: the %s C kernel's %s; using its %s build instead. Please report "
                    "this (compiler and CPU).",
                    self.name,
                    "; its ".join(failed),
                    isa.name,
                )
            log.debug("gemmakit %s kernel: %s build", self.name, isa.name)
            self.isa = isa
            return lib
        return None
