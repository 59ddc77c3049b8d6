"""The C kernels: the bf16 GEMV's exact float32 math, its dispatch rules, the torch fallback
(one warning, each library on its own), the verified build cache, and a bf16 model decoding
the same with and without the GEMV."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import needs_kernel

import gemmakit
from gemmakit.generation import generate
from gemmakit.kernels import build, gemv, quant_gemv, train_ops
from gemmakit.model import layers
from gemmakit.model.layers import linear


def rel_error(got: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> float:
    """max |got - exact| / (|x| @ |w|^T): the error in units of the summed magnitudes, which is
    what float32 accumulation bounds (about K * 6e-8 at worst, far less on average)."""
    exact = x.double() @ w.double().T
    scale = x.double().abs() @ w.double().abs().T
    return ((got.double() - exact).abs() / scale.clamp_min(1e-30)).max().item()


@needs_kernel
def test_libraries_build_on_this_machine():
    # a silent fallback here would hide a broken build or a failed self-test: the other
    # kernel tests skip when their library is unavailable
    from gemmakit.model import fast_decode

    for lib in (gemv, quant_gemv, train_ops, fast_decode):
        assert lib.library() is not None, lib.__name__


@needs_kernel
@pytest.mark.parametrize("m", range(1, 9))
@pytest.mark.parametrize("n,k", [(1, 1), (5, 8), (13, 37), (29, 129), (67, 640), (9, 2051)])
def test_kernel_equals_float32_matmul(m, n, k):
    gen = torch.Generator().manual_seed(m * 1000 + n + k)
    w = torch.randn(n, k, generator=gen).to(torch.bfloat16)
    x = torch.randn(m, k, generator=gen)
    assert gemv.applies(x, w)
    got = linear(x, w)
    want = x @ w.float().T
    assert got.dtype == torch.float32 and got.shape == (m, n)
    assert rel_error(got, x, w) < 1e-6
    assert rel_error(want, x, w) < 1e-6  # the bound is one float32 accumulation achieves
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


@needs_kernel
def test_bf16_input_gives_bf16_rounded_float32_result():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(300, 256, generator=gen).to(torch.bfloat16)
    x = torch.randn(2, 3, 256, generator=gen).to(torch.bfloat16)  # 6 rows over leading dims
    assert gemv.applies(x, w)
    got = linear(x, w)
    assert got.dtype == torch.bfloat16 and got.shape == (2, 3, 300)
    want = (x.float() @ w.float().T).to(torch.bfloat16)
    # both round one float32 sum: at most one bf16 ulp apart, and almost always equal
    torch.testing.assert_close(got, want, rtol=2**-7, atol=0)
    assert (got == want).float().mean() > 0.99
    torch.testing.assert_close(got, F.linear(x, w), rtol=2**-7, atol=0)


@needs_kernel
def test_bias_is_added():
    w = torch.randn(10, 16).to(torch.bfloat16)
    x, b = torch.randn(1, 16), torch.randn(10)
    torch.testing.assert_close(linear(x, w, b), x @ w.float().T + b)


@needs_kernel
def test_linear_calls_the_kernel_when_it_applies(monkeypatch):
    calls = []
    real = gemv.bf16_matmul
    monkeypatch.setattr(gemv, "bf16_matmul", lambda x, w: calls.append(1) or real(x, w))
    w = torch.randn(8, 16).to(torch.bfloat16)
    linear(torch.randn(8, 16), w)
    assert calls == [1]


def no_kernel(monkeypatch):
    """Make any call into the C kernel fail the test."""

    def boom(x, w):
        raise AssertionError("the kernel ran where torch should have")

    monkeypatch.setattr(gemv, "bf16_matmul", boom)


@pytest.mark.parametrize(
    "case", ["float32 weight", "float16 weight", "9 rows", "transposed weight", "training"]
)
def test_fallback_to_torch(monkeypatch, case):
    no_kernel(monkeypatch)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 32, generator=gen)
    w = torch.randn(24, 32, generator=gen).to(torch.bfloat16)
    if case == "float32 weight":
        w = w.float()
    elif case == "float16 weight":
        w, x = w.half(), x.half()
    elif case == "9 rows":
        x = torch.randn(3, 3, 32, generator=gen)
    elif case == "transposed weight":
        w = w.T.contiguous().T
    elif case == "training":
        w, x = w.requires_grad_(), x.to(torch.bfloat16).requires_grad_()
    assert not gemv.applies(x, w)
    got = linear(x, w)
    torch.testing.assert_close(got, F.linear(x, w.to(x.dtype)))
    if case == "training":
        got.sum().backward()
        assert x.grad is not None and w.grad is not None


def test_bf16_parameter_with_grad_uses_torch_unless_grad_is_off(monkeypatch):
    w = torch.randn(24, 32).to(torch.bfloat16).requires_grad_()
    x = torch.randn(1, 32).to(torch.bfloat16)
    assert not gemv.applies(x, w)  # autograd needs torch's backward
    with torch.no_grad():
        assert gemv.applies(x, w) == (gemv.library() is not None)


def test_env_var_disables(monkeypatch):
    w = torch.randn(24, 32).to(torch.bfloat16)
    x = torch.randn(1, 32)
    monkeypatch.setenv("GEMMAKIT_NO_KERNELS", "1")
    no_kernel(monkeypatch)
    assert not gemv.applies(x, w)
    torch.testing.assert_close(linear(x, w), x @ w.float().T)


def forget_libraries(monkeypatch) -> None:
    """Both kernel libraries unloaded for this test (restored after it), warnings unsaid."""
    monkeypatch.setattr(gemv.LIBRARY, "_state", {})
    monkeypatch.setattr(train_ops.LIBRARY, "_state", {})
    monkeypatch.setattr(build, "_warned", set())


def test_no_compiler_falls_back_with_one_warning(monkeypatch, tmp_path, caplog):
    forget_libraries(monkeypatch)
    monkeypatch.setattr(build, "cpu_supported", lambda: True)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    with caplog.at_level(logging.WARNING, logger="gemmakit.kernels.build"):
        assert gemv.library() is None
        assert train_ops.library() is None
    w = torch.randn(24, 32).to(torch.bfloat16)
    x = torch.randn(1, 32).to(torch.bfloat16)
    assert not gemv.applies(x, w)
    torch.testing.assert_close(linear(x, w), F.linear(x, w))
    assert not list(tmp_path.rglob("*.so*"))  # nothing half-written left behind
    # one warning for the process (both libraries fail for the same reason), saying why and
    # how to fix it
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert "does not run" in warnings[0] and "install a C compiler" in warnings[0]
    assert "GEMMAKIT_NO_KERNELS=1" in warnings[0]


def test_no_warning_when_kernels_are_turned_off(monkeypatch, tmp_path, caplog):
    forget_libraries(monkeypatch)
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("GEMMAKIT_NO_KERNELS", "1")
    w = torch.randn(24, 32).to(torch.bfloat16)
    with caplog.at_level(logging.WARNING):
        linear(torch.randn(1, 32), w)
        layers.RMSNorm(32)(torch.randn(2, 32, requires_grad=True))
    assert not caplog.records
    assert "lib" not in gemv.LIBRARY._state  # never even tried


@needs_kernel
def test_each_library_falls_back_on_its_own(monkeypatch, tmp_path, caplog):
    forget_libraries(monkeypatch)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    broken = tmp_path / "train_ops.c"
    broken.write_text("int rmsnorm_fwd( {\n")  # does not compile
    monkeypatch.setattr(train_ops.LIBRARY, "source", broken)
    with caplog.at_level(logging.WARNING, logger="gemmakit.kernels.build"):
        assert train_ops.library() is None
        assert gemv.library() is not None  # the GEMV is unaffected
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "fused training ops" in warning and "failed" in warning
    x = torch.randn(3, 16, requires_grad=True)
    norm = layers.RMSNorm(16)
    torch.testing.assert_close(norm(x), layers.rms_norm(x, norm.weight, 1e-6))


@needs_kernel
def test_failed_self_test_disables_that_library(monkeypatch, tmp_path, caplog):
    monkeypatch.setattr(build, "_warned", set())
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))

    def wrong(lib):
        raise RuntimeError("self-test failed for rms_norm: max error 3.0")

    lib = build.CLibrary(
        "fused training ops", train_ops.LIBRARY.source, train_ops.SIGNATURES, wrong
    )
    with caplog.at_level(logging.WARNING, logger="gemmakit.kernels.build"):
        assert lib.get() is None
        assert lib.get() is None  # decided once
    # one warning however many variants this CPU builds (AVX-512 machines build two or three)
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "self-test failed" in warning and "report" in warning


@needs_kernel
def test_a_header_change_rebuilds(monkeypatch, tmp_path):
    """A header beside the source (vmath.h) is part of the cache key: editing it builds anew
    instead of loading the library built from the old header."""
    import ctypes

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    (tmp_path / "k.h").write_text("#define K 1\n")
    source = tmp_path / "k.c"
    source.write_text('#include "k.h"\nint k(void) { return K; }\n')
    first = build.build(source, "k")
    (tmp_path / "k.h").write_text("#define K 2\n")
    second = build.build(source, "k")
    assert second != first and ctypes.CDLL(str(second)).k() == 2


@needs_kernel
def test_build_caches_by_content(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    source = gemv.LIBRARY.source
    first = build.build(source, "gemv")
    assert first.parent == tmp_path / "gemmakit" / "kernels" and first.suffix == ".so"
    stamp = first.stat().st_mtime_ns
    assert build.build(source, "gemv") == first and first.stat().st_mtime_ns == stamp  # cached
    record = json.loads(first.with_name(first.name + ".json").read_text())
    assert record == {
        "size": first.stat().st_size,
        "sha256": hashlib.sha256(first.read_bytes()).hexdigest(),
    }
    names = sorted(p.name for p in first.parent.iterdir())
    assert names == [first.name, first.name + ".json"]  # no temp files left


DAMAGED_CACHE_RUN = """
import torch
from gemmakit.kernels import gemv, train_ops
from gemmakit.model import layers
assert gemv.library() is not None and train_ops.library() is not None
w = torch.randn(24, 32, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
x = torch.randn(2, 32, generator=torch.Generator().manual_seed(1))
torch.testing.assert_close(gemv.linear(x, w), x @ w.float().T)
a = torch.randn(40, requires_grad=True)
torch.testing.assert_close(train_ops.gelu_mul(a, a), layers.gelu_gate(a, a))
print("ok")
"""


def _run_in_cache(cache: Path) -> subprocess.CompletedProcess:
    """DAMAGED_CACHE_RUN in a fresh interpreter whose kernel cache is under `cache`."""
    env = {**os.environ, "XDG_CACHE_HOME": str(cache)}
    env.pop("GEMMAKIT_NO_KERNELS", None)
    cmd = [sys.executable, "-c", DAMAGED_CACHE_RUN]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def built_cache(tmp_path_factory) -> Path:
    """A kernel cache holding freshly built libraries, built once for the damage cases."""
    cache = tmp_path_factory.mktemp("built")
    first = _run_in_cache(cache)
    assert first.returncode == 0 and first.stdout.strip() == "ok", first.stderr
    return cache


@needs_kernel
@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "bad record"])
def test_damaged_cached_library_is_rebuilt(tmp_path, built_cache, damage):
    """A cached .so cut short or overwritten (which dlopen turns into SIGBUS) is not loaded:
    the next run rebuilds it and computes correct results."""
    shutil.copytree(built_cache, tmp_path, dirs_exist_ok=True)
    libs = sorted((tmp_path / "gemmakit" / "kernels").glob("*.so"))
    assert len(libs) == 2  # one library per source
    for so in libs:
        data = so.read_bytes()
        if damage == "truncated":
            so.write_bytes(data[: len(data) // 2])
        elif damage == "garbage":
            so.write_bytes(bytes(range(256)) * (len(data) // 256) + data[: len(data) % 256])
        elif damage == "empty":
            so.write_bytes(b"")
        else:
            so.with_name(so.name + ".json").write_text("{not json")
    again = _run_in_cache(tmp_path)
    assert again.returncode == 0 and again.stdout.strip() == "ok", (again.returncode, again.stderr)
    assert "kernel is off" not in again.stderr  # rebuilt quietly, not disabled
    assert all(build.verified(so) for so in libs)


@needs_kernel
def test_bf16_greedy_decoding_same_with_and_without_kernel(monkeypatch):
    """The kernel and torch round differently-ordered float32 sums to bf16, so a logit can move
    by one bf16 ulp; greedy tokens may then differ only where the top two logits tie within
    that noise. Checks: each decode step's logits agree to bf16 precision, and any divergence
    of the generated text happens at such a near-tie."""
    model = gemmakit.build_model(gemmakit.get_config("tiny"), dtype=torch.bfloat16, seed=0)
    with torch.no_grad():  # wider block weights than the 0.02 init: varied text, not repeats
        for name, p in model.named_parameters():
            if p.dim() == 2 and "embedder" not in name:
                p.mul_(5.0)
    prompts = [[2, 17, 300, 45, 9], [2, 1000, 7]]
    calls = []
    real = gemv.bf16_matmul
    monkeypatch.setattr(gemv, "bf16_matmul", lambda x, w: calls.append(1) or real(x, w))
    # fast=False: the eager path, which calls the GEMV per projection (the fused decode step,
    # tested in test_fast_decode, runs the whole stack in one C call)
    with_kernel = generate(model, prompts, max_new_tokens=16, stop_tokens=[], fast=False)
    assert len(calls) >= 15 * (7 * 4 + 1)  # all projections and the logits, each decode step
    monkeypatch.setenv("GEMMAKIT_NO_KERNELS", "1")
    without = generate(model, prompts, max_new_tokens=16, stop_tokens=[], fast=False)
    assert len(set(with_kernel[0])) > 8  # the text is not one token repeated

    for prompt, a, b in zip(prompts, with_kernel, without, strict=True):
        seq = torch.tensor([prompt + a])
        with torch.no_grad():
            monkeypatch.setenv("GEMMAKIT_NO_KERNELS", "1")
            torch_logits = model(seq)[0].float()
            monkeypatch.setenv("GEMMAKIT_NO_KERNELS", "0")
            cache = gemmakit.model.KVCache(model.config, 1, seq.shape[1], torch.bfloat16)
            model(seq[:, : len(prompt)], cache=cache)
            steps = [
                model(seq[:, t : t + 1], cache=cache) for t in range(len(prompt), seq.shape[1])
            ]
        # decode steps through the kernel vs the full torch forward pass, to bf16 precision
        kernel_logits = torch.cat(steps, dim=1)[0, :-1].float()
        want = torch_logits[len(prompt) : -1]
        spread = want.abs().max().item()
        assert (kernel_logits - want).abs().max().item() < 0.05 * spread
        if a != b:
            i = next(j for j, (s, t) in enumerate(zip(a, b, strict=True)) if s != t)
            row = torch_logits[len(prompt) + i - 1]
            assert abs(row[a[i]] - row[b[i]]).item() < 0.02 * spread, (i, a[i], b[i])


def test_cpu_isas_follow_the_cpu_flags(monkeypatch):
    avx2 = {"avx2", "fma", "f16c"}
    cases = [
        (avx2 | {"avx512f", "avx512bw", "avx512vl", "avx512_vnni"}, ["avx512vnni", "avx2"]),
        (avx2 | {"avx_vnni"}, ["avxvnni", "avx2"]),
        (avx2 | {"avx512f", "avx512bw", "avx512vl"}, ["avx2"]),  # no VNNI: nothing to gain
        ({"avx2", "fma"}, []),  # no F16C: the kernels' float16 loads would fault
        (set(), []),
    ]
    for flags, want in cases:
        monkeypatch.setattr(build, "cpu_flags", lambda f=flags: frozenset(f))
        assert [isa.name for isa in build.cpu_isas()] == want, flags
        assert build.cpu_supported() == bool(want)


def test_cpu_flags_of_odd_machines_are_none(monkeypatch):
    """Not x86-64, /proc/cpuinfo unreadable, or no flags line in it: no flags, so no kernels
    (running AVX2 code blind could kill the process), and no exception."""
    monkeypatch.setattr(build.platform, "machine", lambda: "aarch64")
    assert build.cpu_flags() == frozenset() and build.cpu_isas() == []
    monkeypatch.setattr(build.platform, "machine", lambda: "x86_64")

    def unreadable(self, *a, **k):
        raise PermissionError(f"cannot read {self}")

    monkeypatch.setattr(build.Path, "read_text", unreadable)
    assert build.cpu_flags() == frozenset()
    monkeypatch.setattr(build.Path, "read_text", lambda self, *a, **k: "processor\t: 0\n\n")
    assert build.cpu_flags() == frozenset()
    monkeypatch.setattr(
        build.Path, "read_text", lambda self, *a, **k: "flags\t: fpu avx2 fma f16c\n"
    )
    assert [isa.name for isa in build.cpu_isas()] == ["avx2"]


@needs_kernel
def test_a_variant_failing_its_self_test_gives_way_to_the_next(monkeypatch, tmp_path, caplog):
    """If the best variant computes wrong on some machine, the self-test catches it and the next
    build is used, with one warning once that one is known to work."""
    monkeypatch.setattr(build, "_warned", set())
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    first = build.Isa("avx2-first", build.AVX2.cpu_flags, (*build.AVX2.cc_flags, "-DFIRST=1"))
    monkeypatch.setattr(build, "cpu_isas", lambda: [first, build.AVX2])
    tested = []

    def fails_first(lib):
        tested.append(lib)
        if len(tested) == 1:
            raise RuntimeError("self-test failed for rms_norm: max error 3.0")

    lib = build.CLibrary(
        "fused training ops", train_ops.LIBRARY.source, train_ops.SIGNATURES, fails_first
    )
    with caplog.at_level(logging.WARNING, logger="gemmakit.kernels.build"):
        assert lib.get() is not None
    assert lib.isa == build.AVX2 and len(tested) == 2
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "avx2-first build failed its self-test" in warning and "avx2 build instead" in warning
    assert len(list(tmp_path.rglob("*.so"))) == 2  # one library per variant, cached apart


@needs_kernel
def test_a_variant_the_compiler_cannot_build_gives_way_quietly(monkeypatch, tmp_path, caplog):
    """An older compiler without the best variant's flags: that build fails, the next one is
    used, and there is no warning (nothing for the user to fix), nor a half-written file."""
    monkeypatch.setattr(build, "_warned", set())
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    unknown = build.Isa("future", build.AVX2.cpu_flags, ("-mno-such-instruction-set",))
    monkeypatch.setattr(build, "cpu_isas", lambda: [unknown, build.AVX2])
    lib = build.CLibrary(
        "fused training ops", train_ops.LIBRARY.source, train_ops.SIGNATURES, lambda lib: None
    )
    with caplog.at_level(logging.INFO, logger="gemmakit.kernels.build"):
        assert lib.get() is not None
    assert lib.isa == build.AVX2
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert any("no future build" in r.getMessage() for r in caplog.records)
    files = [p.name for p in tmp_path.rglob("*") if p.is_file()]
    assert len(files) == 2 and all("-avx2-" in f for f in files), files  # .so and its record


@needs_kernel
def test_vnni_variants_use_the_vnni_dot_products(monkeypatch, tmp_path):
    """quant_gemv.c's integer dots end in one VNNI instruction where the build has the flags (a
    machine with them runs its self-test at load; this one can only compile them)."""
    source = Path(build.__file__).with_name("quant_gemv.c")
    cc = shutil.which("cc")
    for isa in build.ISAS[:-1]:
        pre = subprocess.run([cc, *isa.cc_flags, "-E", str(source)], capture_output=True, text=True)
        if pre.returncode != 0:
            pytest.skip(f"this compiler lacks {isa.name}'s flags: {pre.stderr[:200]}")
        code = pre.stdout[pre.stdout.index("__m256i dot32(") :]  # past the headers
        assert "dpwssd" in code, isa.name
    avx2 = build.build(source, quant_gemv.LIBRARY.name)  # the one this machine loads (cached)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    best = build.build(source, "quant-test", isa=build.ISAS[0])  # a full build of the best one

    def disassembly(so: Path) -> str:
        return subprocess.run(["objdump", "-d", str(so)], capture_output=True, text=True).stdout

    assert "vpdpwssd" in disassembly(best)
    assert "vpdpwssd" not in (text := disassembly(avx2)) and "vpmaddwd" in text


@needs_kernel
@pytest.mark.parametrize("module", ["gemv", "quant_gemv", "train_ops", "fast_decode"])
def test_every_variant_this_cpu_runs_passes_its_self_test(module, monkeypatch):
    """Each build variant the CPU can run (AVX-512 VNNI, AVX-VNNI, AVX2: on an Intel Xeon with
    both VNNI flags all three) loads and passes its library's self-test on its own, not only
    the best one that the process keeps."""
    from gemmakit.model import fast_decode

    lib = {"gemv": gemv, "quant_gemv": quant_gemv, "train_ops": train_ops}.get(module, fast_decode)
    lib = lib.LIBRARY
    for isa in build.cpu_isas():
        monkeypatch.setattr(build, "cpu_isas", lambda isa=isa: [isa])
        alone = build.CLibrary(lib.name, lib.source, lib.signatures, lib.self_test)
        assert alone.get() is not None and alone.isa == isa, (lib.name, isa.name)
