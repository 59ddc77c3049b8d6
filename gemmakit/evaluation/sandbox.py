"""Run model-written Python in a separate, limited process (HumanEval, MBPP).

Each program runs in a fresh `python -I` (isolated mode: no user site, no PYTHON* variables)
started with a clean environment, in a throwaway temporary directory that is its cwd, HOME and
TMPDIR, in a session of its own (so a timeout kills everything it started). Inside the child,
before the program runs, a small bootstrap sets up these layers, in this order:

1. network: `unshare(CLONE_NEWNET)` (as root) or `unshare(CLONE_NEWUSER | CLONE_NEWNET)` (as
   another user) through libc, so the program sees only a downed loopback; where the kernel
   refuses, only layer 4 blocks sockets (`SandboxResult.isolation` says which held);
2. identity: as root, the child drops to uid/gid 65534 (nobody), which owns only the temp
   directory, so the kernel itself refuses writes to the caller's files;
3. limits (`resource.setrlimit`): RLIMIT_CPU (CPU seconds), RLIMIT_AS (address space),
   RLIMIT_FSIZE (largest file written, also caps its captured output), RLIMIT_NPROC,
   RLIMIT_CORE 0;
4. an audit hook (PEP 578) that raises PermissionError on: socket creation; fork, exec, spawn,
   subprocess, os.system, kill; ctypes (which could undo all of the above); and any open for
   writing, remove, rename, rmdir, mkdir, chmod, link or truncate of a path outside the temp
   directory. Audit hooks cannot be removed from Python code.

The parent also enforces a wall-clock timeout (SIGKILL to the child's process group) and
deletes the directory afterwards. A program passes when it runs to its end: exit status 0 and
the bootstrap's end marker (a random nonce, so `sys.exit(0)` or `os._exit(0)` half-way through
does not count as a pass). Linux only.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

NOBODY = 65534

# The child's bootstrap: argv = [nonce, tempdir, cpu_s, mem_bytes, fsize_bytes, nproc, drop_uid];
# the program's source comes on stdin. Kept free of imports beyond the standard library.
_BOOTSTRAP = r"""
import os, sys, resource
nonce, root, cpu, mem, fsize, nproc, drop = sys.argv[1:8]
del sys.argv[1:]
src = sys.stdin.read()
layers = []
try:
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    flags = 0x40000000 if os.geteuid() == 0 else 0x40000000 | 0x10000000
    if libc.unshare(flags) == 0:
        layers.append("netns")
except Exception:
    pass
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
resource.setrlimit(resource.RLIMIT_CPU, (int(cpu), int(cpu) + 1))
resource.setrlimit(resource.RLIMIT_AS, (int(mem), int(mem)))
resource.setrlimit(resource.RLIMIT_FSIZE, (int(fsize), int(fsize)))
resource.setrlimit(resource.RLIMIT_NPROC, (int(nproc), int(nproc)))
if drop == "1" and os.geteuid() == 0:
    os.setgroups([])
    os.setgid(65534)
    os.setuid(65534)
    layers.append("uid")
root = os.path.realpath(root)
_WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
_PATH_EVENTS = {"os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.chmod", "os.chown",
                "os.link", "os.symlink", "os.truncate", "os.utime", "shutil.rmtree",
                "shutil.move", "os.chdir", "os.chflags", "os.setxattr", "os.removexattr"}
_DENY = ("socket.", "os.fork", "os.forkpty", "os.exec", "os.posix_spawn", "os.spawn",
         "os.system", "os.kill", "os.killpg", "subprocess.", "ctypes.", "os.startfile",
         "signal.pthread_kill", "pty.", "resource.setrlimit", "os.setuid", "os.setgid",
         "gc.get_objects", "gc.get_referrers", "gc.get_referents")
_busy = []

def _inside(p):
    if isinstance(p, int):
        return False
    p = os.fsdecode(p)
    full = os.path.realpath(os.path.join(root, p) if not os.path.isabs(p) else p)
    return full == root or full.startswith(root + os.sep)

def _hook(event, args):
    if _busy:
        return
    _busy.append(1)
    try:
        if event.startswith(_DENY):
            raise PermissionError(f"sandbox: {event} is not allowed")
        if event == "open" and args[2] & _WRITE and not _inside(args[0]):
            raise PermissionError(f"sandbox: writing {args[0]!r} is not allowed")
        if event in _PATH_EVENTS:
            for a in args[:2]:
                if isinstance(a, (str, bytes, os.PathLike)) and not _inside(a):
                    raise PermissionError(f"sandbox: {event} on {a!r} is not allowed")
    finally:
        _busy.clear()

del ctypes, libc
sys.modules.pop("ctypes", None)
sys.addaudithook(_hook)
layers.append("audit")
_out = os.dup(1)
os.write(_out, ("\n" + nonce + " layers " + ",".join(layers) + "\n").encode())
g = {"__name__": "__main__", "__builtins__": __builtins__}
try:
    exec(compile(src, "<program>", "exec"), g)
except SystemExit as e:
    if e.code not in (None, 0):
        raise
    raise SystemExit("sandbox: program exited before its end")
sys.stdout.flush()
os.write(_out, ("\n" + nonce + " end\n").encode())
"""


@dataclass(frozen=True)
class SandboxLimits:
    """Per-program limits: wall-clock seconds (the parent kills the process group), CPU
    seconds, address space in bytes, largest file (and captured output) in bytes, processes
    (for the child's uid; a backstop behind the audit hook's fork ban)."""

    timeout_s: float = 10.0
    cpu_s: int = 10
    memory_bytes: int = 1 << 30
    file_bytes: int = 16 << 20
    nproc: int = 512


@dataclass(frozen=True)
class SandboxResult:
    """How one program ended. `status`: "passed", "failed" (an exception or a nonzero exit;
    `detail` holds the last line of its stderr), "timeout" (wall clock) or "killed" (a signal:
    CPU limit, memory); `isolation`: the layers that held ("netns", "uid", "audit")."""

    status: str
    detail: str
    seconds: float
    isolation: tuple[str, ...] = ()

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def _world_executable(path: str) -> bool:
    """Whether a user other than the owner can run `path` (every parent directory searchable
    and the file executable by others): the interpreter nobody must be able to start."""
    p = Path(path).resolve()
    for part in [p, *p.parents]:
        try:
            if not os.stat(part).st_mode & stat.S_IXOTH:
                return False
        except OSError:
            return False
    return True


def child_python() -> tuple[str, bool]:
    """(interpreter, drop privileges): this interpreter, or as root the first of it and the
    system `python3` that uid nobody can run (a venv under /root cannot be); as root with no
    such interpreter the child keeps root's uid (the audit hook still confines writes)."""
    if os.geteuid() != 0:
        return sys.executable, False
    for candidate in (sys.executable, shutil.which("python3"), "/usr/bin/python3"):
        if candidate and _world_executable(candidate):
            return candidate, True
    return sys.executable, False


def _temp_root(drop: bool) -> str:
    """Where the throwaway directories go: the usual temp folder, or, when the child runs as
    nobody and cannot reach it (a 0700 folder on the way), /tmp."""
    root = tempfile.gettempdir()
    return "/tmp" if drop and not _world_executable(root) else root


def _tail(f, limit: int = 4096) -> str:
    f.seek(0, os.SEEK_END)
    size = f.tell()
    f.seek(max(0, size - limit))
    return f.read().decode("utf-8", "replace")


def run_program(source: str, limits: SandboxLimits = SandboxLimits()) -> SandboxResult:
    """Run Python `source` in a sandbox (see the module docstring) and say how it ended."""
    python, drop = child_python()
    nonce = secrets.token_hex(16)
    t0 = time.perf_counter()
    tmp = tempfile.mkdtemp(prefix="gemmakit-sandbox-", dir=_temp_root(drop))
    try:
        if drop:
            os.chown(tmp, NOBODY, NOBODY)
        env = {
            "PATH": "/usr/bin:/bin",
            "HOME": tmp,
            "TMPDIR": tmp,
            "LANG": "C.UTF-8",
            "PYTHONHASHSEED": "0",
            "OMP_NUM_THREADS": "1",
        }
        argv = [python, "-I", "-c", _BOOTSTRAP, nonce, tmp, str(limits.cpu_s)]
        argv += [str(limits.memory_bytes), str(limits.file_bytes), str(limits.nproc)]
        argv += ["1" if drop else "0"]
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.PIPE,
                stdout=out,
                stderr=err,
                cwd=tmp,
                env=env,
                start_new_session=True,
                close_fds=True,
            )
            try:
                proc.communicate(source.encode("utf-8"), timeout=limits.timeout_s)
                timed_out = False
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
                proc.wait()
            seconds = time.perf_counter() - t0
            stdout, stderr = _tail(out), _tail(err)
            out.seek(0)
            head = out.read(200).decode("utf-8", "replace")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    # The layers line is the first of stdout (its head, which the tail may have lost).
    layers = [ln.split()[2] for ln in head.splitlines() if ln.startswith(nonce + " layers ")]
    isolation = tuple(layers[0].split(",")) if layers else ()
    marker = stdout.rstrip().endswith(nonce + " end")
    last = next((ln for ln in reversed(stderr.strip().splitlines()) if ln.strip()), "")
    if timed_out:
        return SandboxResult("timeout", f"no end after {limits.timeout_s:g} s", seconds, isolation)
    if proc.returncode < 0:
        name = signal.Signals(-proc.returncode).name
        return SandboxResult("killed", f"{name} {last}".strip(), seconds, isolation)
    if proc.returncode == 0 and marker:
        return SandboxResult("passed", "", seconds, isolation)
    return SandboxResult("failed", last or f"exit status {proc.returncode}", seconds, isolation)


def run_programs(
    sources: Sequence[str], limits: SandboxLimits = SandboxLimits(), workers: int | None = None
) -> list[SandboxResult]:
    """`run_program` over many sources, at most `workers` at once (default: the CPU count),
    results in the sources' order."""
    workers = max(1, workers or os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda s: run_program(s, limits), sources))
