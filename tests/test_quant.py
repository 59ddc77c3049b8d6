"""Weights kept quantized (gemmakit.quant): the torch dequantizers against gguf-py's, the C
kernel against dequantize-then-matmul for every format and odd shapes, the torch fallback,
llama.cpp's Q8_0/Q4_K quantizers (read back by the GGUF reader), and quantized models: logits
and greedy ids against their own dequantized reference, saved and reloaded, from the CLI."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFWriter, quants
from helpers import needs_kernel, step_logits

from gemmakit.api import build_model, load_model
from gemmakit.checkpoint.dequant import dequantize as gguf_dequantize
from gemmakit.checkpoint.gguf_file import GGUFFile
from gemmakit.cli import main
from gemmakit.config import get_config
from gemmakit.generation import generate
from gemmakit.kernels import quant_gemv
from gemmakit.quant import formats
from gemmakit.quant.checkpoint import save_quantized
from gemmakit.quant.formats import (
    FORMATS,
    GGUF_FORMATS,
    HELD,
    dequantize,
    held_memory,
    held_rows,
    int4_memory,
    int4_tile,
    pack_int4,
    quantize_int4,
    unpack_int4,
)
from gemmakit.quant.ggml import quantize_q4_k, quantize_q8_0
from gemmakit.quant.model import (
    dequantize_model,
    quant_summary,
    quantize_model,
    quantize_weight,
)
from gemmakit.quant.selftest import check_all, error_bound, random_weight, reference
from gemmakit.quant.weight import QuantWeight


@pytest.fixture(autouse=True)
def _one_thread():
    """Small tensors: one thread is faster than two on a loaded machine (conftest restores)."""
    torch.set_num_threads(1)


PROMPTS = [[2, 17, 300, 41, 9], [2, 100, 7, 8, 9, 10, 11]]


@pytest.mark.parametrize("fmt", GGUF_FORMATS)
def test_torch_dequantize_matches_gguf_py(fmt):
    gen = torch.Generator().manual_seed(1)
    k = 512
    qdata, _, _ = random_weight(fmt, 5, k, gen)
    qtype = GGMLQuantizationType[fmt.upper()]
    want = quants.dequantize(qdata.numpy(), qtype)
    assert torch.equal(dequantize(fmt, qdata), torch.from_numpy(want).reshape(5, k))


@needs_kernel
def test_kernel_matches_reference_every_format_and_row_count():
    # every format, M = 1..8, N = 13 (not a multiple of anything), int8 with a K tail
    check_all(lambda *a: quant_gemv.call(quant_gemv.library(), *a), rows=tuple(range(1, 9)))


@needs_kernel
def test_kernel_catches_a_wrong_answer():
    def off_by_a_bit(*args):
        y = quant_gemv.call(quant_gemv.library(), *args)
        y[0, 0] += 1e-2
        return y

    with pytest.raises(RuntimeError, match="self-test failed"):
        check_all(off_by_a_bit, rows=(1,))


@needs_kernel
@pytest.mark.parametrize("seed", [6, 11, 26])
def test_candidates_self_test_does_not_depend_on_the_global_seed(seed):
    # its slop once came from torch's global generator: under these seeds a row kept more
    # coarse candidates than the cap and the library turned itself off (1 process in 6)
    torch.manual_seed(seed)
    quant_gemv.check_candidates(quant_gemv.library())


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("kernels", ["1", "0"])
def test_linear_equals_dequantize_then_matmul(fmt, kernels, monkeypatch):
    """QuantWeight.linear through the kernel (decode rows) and through the torch fallback
    in pieces of 8 rows (a short prefill), and through the torch fallback (GEMMAKIT_NO_KERNELS=1,
    or more than KERNEL_ROWS rows: a long prefill), bf16 activations too."""
    monkeypatch.setenv("GEMMAKIT_NO_KERNELS", "0" if kernels == "1" else "1")
    gen = torch.Generator().manual_seed(2)
    k = 256 if FORMATS[fmt].block == 256 else 96
    w = QuantWeight(fmt, (37, k), *random_weight(fmt, 37, k, gen))
    for rows in (1, 5, 11, 70):
        x = torch.randn(rows, k, generator=gen)
        want = reference(x, fmt, *w._parts(None))
        bound = error_bound(x, w.dequantize())
        assert ((w.linear(x) - want).abs() <= bound).all()
    xb = torch.randn(2, 3, k, generator=gen).to(torch.bfloat16)
    got = w.linear(xb)
    assert got.dtype == torch.bfloat16 and got.shape == (2, 3, 37)
    ref = xb.float() @ w.dequantize().T
    bound = error_bound(xb.float().view(6, k), w.dequantize()).view(2, 3, 37)
    assert ((got.float() - ref).abs() <= bound + 1e-2 * ref.abs()).all()  # + bf16 rounding


def test_embedding_rows_dequantize_only_the_looked_up_rows():
    gen = torch.Generator().manual_seed(3)
    w = QuantWeight("q8_0", (50, 64), *random_weight("q8_0", 50, 64, gen))
    ids = torch.tensor([[3, 49], [0, 3]])
    assert torch.equal(w.embed(ids), w.dequantize()[ids])


def test_int8_and_int4_error_bounds():
    w = torch.randn(64, 256) * 0.05
    q8 = dequantize("int8", *quantize_int8_parts(w))
    assert (q8 - w).abs().max() <= w.abs().amax(1, keepdim=True).max() / 254 + 1e-7
    for group in (32, 128):
        q4 = dequantize("int4", *quantize_int4(w, group))
        # a step of (max - min) / 15 per group, half of it at most (+ float16 rounding)
        span = w.view(64, -1, group).amax(-1) - w.view(64, -1, group).amin(-1)
        err = (q4 - w).abs().view(64, -1, group).amax(-1)
        assert (err <= span / 30 * 1.05 + 1e-4).all()


def quantize_int8_parts(w):
    from gemmakit.quant.formats import quantize_int8

    return quantize_int8(w)


def _rel_mse(a, b):
    return float((a - b).pow(2).mean() / b.pow(2).mean())


def test_ggml_quantizers_round_trip_and_are_read_back_by_the_gguf_reader(tmp_path):
    gen = torch.Generator().manual_seed(4)
    w = torch.randn(24, 512, generator=gen) * 0.05
    w[3] = 0.0  # an all-zero row: scale 0, no NaN
    blocks = {"q8_0": quantize_q8_0(w), "q4_k": quantize_q4_k(w)}
    assert _rel_mse(dequantize("q8_0", blocks["q8_0"]), w) < 1e-4
    # llama.cpp's Q4_K reaches ~0.4-0.5% relative MSE on Gaussian weights; plain int4 with
    # a float16 scale and min per 32 weights does worse than that
    assert _rel_mse(dequantize("q4_k", blocks["q4_k"]), w) < 0.0055
    assert torch.equal(dequantize("q4_k", blocks["q4_k"])[3], torch.zeros(512))
    path = tmp_path / "q.gguf"
    writer = GGUFWriter(path, "gemma3")
    for fmt, b in blocks.items():
        writer.add_tensor(fmt, b.numpy(), raw_dtype=GGMLQuantizationType[fmt.upper()])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    f = GGUFFile(path)
    for fmt, b in blocks.items():
        info = f.tensors[fmt]
        assert info.shape == (24, 512) and info.qtype.name.lower() == fmt
        assert np.array_equal(f.raw(fmt), b.numpy())
        read = gguf_dequantize(f.raw(fmt), info.qtype, info.shape)
        assert torch.equal(read, dequantize(fmt, b))


def _tiny(seed=0):
    """tiny-gemma3 with d_model 256, so that Q4_K's 256-weight rows fit most matrices."""
    config = get_config("tiny-gemma3").replace(d_model=256, n_layers=2, vocab_size=512)
    return build_model(config, seed=seed, init_std=0.08)


@pytest.mark.parametrize("mode", ["int8", "int4", "int4-g128", "q8_0", "q4_k"])
def test_quantized_model_matches_its_dequantized_reference(mode):
    model = quantize_model(_tiny(), mode)
    kinds = set(quant_summary(model)) - {"float32"}
    assert kinds == {"int4" if mode.startswith("int4") else mode}
    assert isinstance(model.embedder.weight, QuantWeight)  # the tied head too
    ref = dequantize_model(quantize_model(_tiny(), mode))
    tokens = torch.tensor(PROMPTS[1])[None]
    with torch.no_grad():
        a, b = model(tokens), ref(tokens)
    # same weights; the kernel (prompts of <= 8 tokens run it) rounds each layer's input to
    # int16 per block of 32, a relative error of at most 1/65534 per element, through 2 layers
    # and the head (with int8 activations this measured ~5e-3 of the logits' scale): bound 5e-4
    assert (a - b).abs().max() <= 5e-4 * b.abs().max()
    got = generate(model, PROMPTS, 16, stop_tokens=[])
    want = generate(ref, PROMPTS, 16, stop_tokens=[])
    assert got == want and all(len(g) == 16 for g in got)


def test_quantized_checkpoint_saves_and_loads_back(tmp_path):
    model = quantize_model(_tiny(), "int4")
    save_quantized(model, tmp_path / "q")
    kept = load_model(tmp_path / "q", quant="keep")
    for name, m in model.named_modules():
        if isinstance(m, QuantWeight):
            other = kept.get_submodule(name)
            assert other.fmt == m.fmt and torch.equal(other.qdata, m.qdata)  # packed int4
            a, b = other.state_dict(), m.state_dict()  # qdata, scale, minimum in rows
            assert a.keys() == b.keys() == {"qdata", "scale", "minimum"}
            assert all(torch.equal(a[k], b[k]) for k in a)
    plain = load_model(tmp_path / "q")  # quant=None: dequantized floats, no QuantWeight
    assert not any(isinstance(m, QuantWeight) for m in plain.modules())
    tokens = torch.tensor(PROMPTS[:1])
    with torch.no_grad():
        a, b = kept(tokens), plain(tokens)
    assert (a - b).abs().max() <= 5e-4 * b.abs().max()  # the kernel rounds x to int16


def test_int4_packing_round_trips():
    """QuantWeight's int4 memory (packed rows, tiles) gives back the row layout exactly, for
    whole and short last chunks and every group that divides a chunk; a chunk is its 128
    bytes of nibbles in lane order (4 bytes of each block in turn), then its scales, then its
    minimums; rows are held in pairs, chunk by chunk."""
    from gemmakit.errors import CheckpointError
    from gemmakit.quant.formats import int4_rows

    gen = torch.Generator().manual_seed(3)
    for k, group, tile in [
        (2208, 32, 0),
        (1152, 128, 0),
        (1536, 64, 0),
        (2048, 256, 0),
        (1536, 32, 512),
        (1024, 128, 256),
    ]:
        parts = random_weight("int4", 5, k, gen, group)
        packed = pack_int4(*parts)
        assert tuple(packed.shape) == (5, k // 2 + 4 * k // group)
        assert all(torch.equal(a, b) for a, b in zip(unpack_int4(packed, k, group), parts))
        spc = 8 * 32 // group  # scales per whole chunk
        blocks = parts[0][:, :128].reshape(5, 8, 16)  # the first chunk's blocks, row layout
        for j in range(4):  # load j: bytes 4j..4j+3 of block 0, then of block 1, ...
            run = packed[:, 32 * j : 32 * j + 32].reshape(5, 8, 4)
            assert torch.equal(run, blocks[:, :, 4 * j : 4 * j + 4])
        r = k // 32 % 8  # the short last chunk's blocks: the same order over r lanes
        if r:
            tail = packed[:, (128 + 4 * spc) * (k // 256) :][:, : 16 * r].reshape(5, 4, r, 4)
            last = parts[0][:, -16 * r :].reshape(5, r, 4, 4)
            assert torch.equal(tail, last.transpose(1, 2))
        for at, part in ((128, parts[1]), (128 + 2 * spc, parts[2])):
            assert torch.equal(packed[:, at : at + 2 * spc].view(torch.float16), part[:, :spc])
        memory = int4_memory(*parts, tile)
        assert tuple(memory.shape[:2]) == ((k // tile if tile else 1), 5)
        if not tile:  # rows 2p, 2p + 1 chunk by chunk, then their tails; the odd last row as is
            whole = (128 + 4 * spc) * (k // 256)
            pair = memory[0, :2].reshape(-1)
            assert torch.equal(pair[128 + 4 * spc : 256 + 8 * spc], packed[1, : 128 + 4 * spc])
            tails = pair[2 * whole :].reshape(2, -1)
            assert torch.equal(tails, packed[:2, whole:]) and torch.equal(memory[0, 4], packed[4])
        assert all(torch.equal(a, b) for a, b in zip(int4_rows(memory, k, group), parts))
        picked = int4_rows(memory, k, group, torch.tensor([4, 1]))
        assert all(torch.equal(a, b[[4, 1]]) for a, b in zip(picked, parts))
    q, d, m = random_weight("int4", 2, 96 * 4, gen, 96)  # groups of 96 do not divide a chunk
    with pytest.raises(CheckpointError, match="groups of 96"):
        QuantWeight("int4", (2, 384), q, d, m)


@pytest.mark.parametrize("fmt", HELD)
def test_held_weights_of_one_and_two_rows(fmt):
    """A weight of one row (no pair: a 1-output head) and of two (one pair), and a run of rows
    or picked rows of an odd count, come back from the held layout exactly, and the kernel
    computes them as their dequantized reference does."""
    gen = torch.Generator().manual_seed(5)
    for n in (1, 2, 5):
        parts = random_weight(fmt, n, 512, gen, 32)
        w = QuantWeight(fmt, (n, 512), *parts)
        for rows in (None, slice(n // 2, n), torch.tensor([n - 1, 0, -1])):
            got = w._parts(rows)
            want = [None if p is None else p if rows is None else p[rows] for p in parts]
            assert all(a is b or torch.equal(a, b) for a, b in zip(got, want))
        lib = quant_gemv.library()
        if lib is not None:
            x = torch.randn(1, 512, generator=gen)
            held = held_memory(fmt, *parts, 0)
            code = FORMATS[formats.held_format(fmt)].code
            y = quant_gemv.call(lib, code, x, held, None, n, 32, 2)
            bound = error_bound(x, dequantize(fmt, *parts))
            assert ((y - reference(x, fmt, *parts)).abs() <= bound).all()


def test_q4_k_held_layout_round_trips():
    """QuantWeight holds Q4_K as int4 is held: per super-block its 8 sub-blocks' values in
    int4's blocks (byte i: q[i] low, q[i + 16] high) in lane order, then the block's 16 bytes
    of scales;
    rows and tiles give the file's blocks back exactly, and state_dict is the file's layout."""
    gen = torch.Generator().manual_seed(4)
    blocks, _, _ = random_weight("q4_k", 5, 1536, gen)
    for tile in (0, 512):
        memory = held_memory("q4_k", blocks, None, None, tile)
        assert tuple(memory.shape) == ((1536 // tile if tile else 1), 5, 6 * 144 // len(memory))
        assert torch.equal(held_rows("q4_k", memory, 1536, 32)[0], blocks)
        picked = held_rows("q4_k", memory, 1536, 32, torch.tensor([4, 1]))[0]
        assert torch.equal(picked, blocks[[4, 1]])
    file_block, held_chunk = blocks[2, :144], held_memory("q4_k", blocks, None, None, 0)[0, 2, :144]
    qs = file_block[16:].reshape(4, 32)  # sub-block 2k in the low nibbles, 2k + 1 in the high
    want = torch.stack([qs & 0xF, qs >> 4], dim=1).reshape(8, 32)
    nib = torch.cat([held_chunk[32 * j : 32 * j + 32].reshape(8, 4) for j in range(4)], dim=1)
    assert torch.equal(torch.cat([nib & 0xF, nib >> 4], dim=1), want)  # load j: bytes 4j..4j+3
    assert torch.equal(held_chunk[128:], file_block[:16])
    w = QuantWeight("q4_k", (5, 1536), blocks)
    assert w.tile == 0 and set(w.state_dict()) == {"qdata"}
    assert torch.equal(w.state_dict()["qdata"], blocks)
    assert torch.equal(w.dequantize(), dequantize("q4_k", blocks))


def test_q5_0_is_held_as_q8_0_blocks_of_the_same_values():
    """QuantWeight holds Q5_0 as Q8_0 blocks (the same float16 scale, each 5-bit q as the int8
    q - 16) and the kernel reads those: the dequantized weight is the file's bit for bit (torch
    and C), state_dict gives the file's blocks back byte for byte and takes them, and a
    state_dict of another width is refused."""
    gen = torch.Generator().manual_seed(11)
    blocks, _, _ = random_weight("q5_0", 7, 640, gen)  # random bytes: every fifth-bit pattern
    held = formats.q5_0_as_q8_0(blocks)
    assert held.shape == (7, 640 // 32 * 34)
    assert torch.equal(formats.q8_0_as_q5_0(held), blocks)
    assert torch.equal(dequantize("q8_0", held), dequantize("q5_0", blocks))
    values = held.reshape(-1, 34)[:, 2:].contiguous().view(torch.int8)
    assert int(values.min()) == -16 and int(values.max()) == 15
    w = QuantWeight("q5_0", (7, 640), blocks)
    assert w.held_fmt == "q8_0" and w.code == FORMATS["q8_0"].code and w.tile == 0
    assert torch.equal(w.qdata, held) and "held as q8_0" in repr(w)
    want = dequantize("q5_0", blocks)
    assert torch.equal(w.dequantize(), want)
    assert torch.equal(w.dequantize(torch.tensor([6, 0, 3])), want[[6, 0, 3]])
    assert torch.equal(w.dequantize(slice(2, 5)), want[2:5])
    state = w.state_dict()
    assert set(state) == {"qdata"} and torch.equal(state["qdata"], blocks)
    other = QuantWeight("q5_0", (7, 640), torch.zeros_like(blocks))
    other.load_state_dict(state)
    assert torch.equal(other.qdata, held)
    with pytest.raises(RuntimeError, match="qdata"):
        other.load_state_dict({"qdata": blocks[:, :-22]})
    x = torch.randn(2, 640, generator=gen)
    assert (
        (w.linear(x) - reference(x, "q5_0", blocks, None, None)).abs() <= error_bound(x, want)
    ).all()
    lib = quant_gemv.library()
    if lib is not None:  # the C library has no Q5_0 of its own: its number is refused
        with pytest.raises(ValueError, match="rejected format 2"):
            quant_gemv.call(lib, FORMATS["q5_0"].code, x, blocks, None, 7, 32, 2)


@pytest.mark.parametrize("damage", ["scale float32", "minimum missing", "groups of 512"])
def test_hostile_int4_tensors_in_a_quantized_folder(tmp_path, damage):
    """int4 parts that QuantWeight cannot hold (a scale of another dtype, a missing minimum, a
    group that does not divide the 256-weight chunks of the packed layout) are refused at
    `--quant keep` in one line naming the file and the key, and the folder is left as it was."""
    from safetensors.torch import load_file, save_file

    from gemmakit.errors import CheckpointError

    folder = save_quantized(quantize_model(_tiny(), "int4"), tmp_path / "q")
    path = folder / "model.safetensors"
    state = load_file(path)
    key = next(k.removesuffix(".qdata") for k in state if "down_proj" in k and k.endswith(".qdata"))
    n = state[f"{key}.scale"].shape[0]
    if damage == "scale float32":
        state[f"{key}.scale"] = state[f"{key}.scale"].float()
    elif damage == "minimum missing":
        del state[f"{key}.minimum"]
    else:  # the 512-wide rows as one group
        state[f"{key}.scale"] = torch.ones(n, 1, dtype=torch.float16)
        state[f"{key}.minimum"] = torch.zeros(n, 1, dtype=torch.float16)
    save_file(state, path, metadata={"format": "pt"})
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    with pytest.raises(CheckpointError) as err:
        load_model(folder, quant="keep")
    message = str(err.value)
    assert "\n" not in message and str(path) in message and key in message
    assert {
        "scale float32": "float16",
        "minimum missing": "minimum",
        "groups of 512": "groups of 512",
    }[damage] in message
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def q5_0_folder(tmp_path) -> Path:
    """A quantized folder (written as q8_0) whose first down projection is Q5_0 blocks, its
    key in the config's format map. No `--to` writes Q5_0; GGUF files bring it."""
    import json

    from safetensors.torch import load_file, save_file

    from gemmakit.checkpoint.quantized import CONFIG_KEY

    folder = save_quantized(quantize_model(_tiny(), "q8_0"), tmp_path / "q")
    path, config = folder / "model.safetensors", folder / "config.json"
    state = load_file(path)
    key = next(k.removesuffix(".qdata") for k in state if "down_proj" in k and k.endswith(".qdata"))
    gen = torch.Generator().manual_seed(2)
    state[f"{key}.qdata"] = random_weight("q5_0", len(state[f"{key}.qdata"]), 512, gen)[0]
    save_file(state, path, metadata={"format": "pt"})
    hf = json.loads(config.read_text())
    hf[CONFIG_KEY]["tensors"][key] = "q5_0"
    config.write_text(json.dumps(hf))
    return folder


@pytest.mark.parametrize("fmt", ["q4_k", "q5_0"])
@pytest.mark.parametrize("damage", ["short rows", "float qdata", "3-D qdata", "scale added"])
def test_hostile_q4_k_and_q5_0_tensors_in_a_quantized_folder(tmp_path, damage, fmt):
    """Q4_K or Q5_0 blocks that QuantWeight cannot hold (rows not whole blocks, another
    dtype, a qdata of three dimensions such as Q4_K's held layout, a scale its blocks already
    hold) are refused at `--quant keep` in one line naming the file and the key, and the
    folder is left as it was (Q5_0, held as Q8_0 blocks, is checked before it is converted)."""
    from safetensors.torch import load_file, save_file

    from gemmakit.errors import CheckpointError

    if fmt == "q5_0":
        folder = q5_0_folder(tmp_path)
        kept = load_model(folder, quant="keep")  # undamaged, it loads: held as Q8_0
        held = next(m for n, m in kept.named_modules() if n.endswith("down_proj.weight"))
        assert held.fmt == "q5_0" and held.held_fmt == "q8_0"
    else:
        folder = save_quantized(quantize_model(_tiny(), "q4_k"), tmp_path / "q")
    path = folder / "model.safetensors"
    state = load_file(path)
    key = next(k.removesuffix(".qdata") for k in state if "down_proj" in k and k.endswith(".qdata"))
    q = state[f"{key}.qdata"]
    state[f"{key}.qdata"] = {
        "short rows": q[:, :-1].contiguous(),
        "float qdata": q.float(),
        "3-D qdata": q[None].contiguous(),
        "scale added": q,
    }[damage]
    if damage == "scale added":
        state[f"{key}.scale"] = torch.ones(q.shape[0], dtype=torch.float32)
    save_file(state, path, metadata={"format": "pt"})
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    with pytest.raises(CheckpointError) as err:
        load_model(folder, quant="keep")
    message = str(err.value)
    assert "\n" not in message and str(path) in message and key in message
    assert {
        "short rows": "expected",
        "float qdata": "uint8",
        "3-D qdata": "[1, ",
        "scale added": "takes no scale",
    }[damage] in message
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def test_int4_tile_sizes():
    assert int4_tile(16384, 32) == 4096  # Gemma-2B's down projection: 4 tiles
    assert int4_tile(24576, 128) == 4096  # 7B's: 6
    assert int4_tile(6912, 32) == int4_tile(6912, 128) == 2304  # Gemma 3 1B's: 3
    assert int4_tile(4096, 32) == int4_tile(2048, 32) == 0  # short rows stay in rows
    assert int4_tile(4352, 32) == 0  # 17 x 256: no equal tiles of 1024..4096 columns


@pytest.mark.parametrize("mode", ["int4", "q4_k"])
def test_held_in_tiles_is_the_same_weight(tmp_path, monkeypatch, mode):
    """With INT4_TILE at 256, the tiny model's 1024-wide down projections (int4, or Q4_K held
    as int4 is) are held in 4 tiles of 256 columns: the state_dict, the saved file,
    dequantize, the kernel's logits and the fused decode step's logits are those of the same
    weights held in rows, and a state_dict in rows loads into the tiled model."""
    from safetensors.torch import load_file

    config = get_config("tiny-gemma3").replace(
        d_model=256, n_layers=2, vocab_size=512, ffn_dim=1024
    )
    rows = quantize_model(build_model(config, seed=0, init_std=0.08), mode)
    monkeypatch.setattr(formats, "INT4_TILE", 256)
    tiled = quantize_model(build_model(config, seed=0, init_std=0.08), mode)
    down = tiled.blocks[0].mlp.down_proj.weight
    # 4 tiles of 256 rows of one 8-block chunk: 128 bytes of nibbles, then 8 scales and 8
    # minimums (int4) or the super-block's 16 bytes of scales (Q4_K)
    chunk = 160 if mode == "int4" else 144
    assert down.tile == 256 and tuple(down.qdata.shape) == (4, 256, chunk)
    assert rows.blocks[0].mlp.down_proj.weight.tile == 0
    assert torch.equal(down.dequantize(), rows.blocks[0].mlp.down_proj.weight.dequantize())
    assert torch.equal(down.dequantize(torch.tensor([7, 3])), down.dequantize()[[7, 3]])
    a, b = tiled.state_dict(), rows.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    save_quantized(tiled, tmp_path / "t")
    save_quantized(rows, tmp_path / "r")
    ft, fr = (
        load_file(tmp_path / "t" / "model.safetensors"),
        load_file(tmp_path / "r" / "model.safetensors"),
    )
    assert ft.keys() == fr.keys() and all(torch.equal(ft[k], fr[k]) for k in ft)
    kept = load_model(tmp_path / "r", quant="keep")  # rows on disk, tiles in memory
    assert kept.blocks[1].mlp.down_proj.weight.tile == 256
    tokens = torch.tensor(PROMPTS[1])[None]
    with torch.no_grad():
        lt, lr, lk = tiled(tokens), rows(tokens), kept(tokens)
    # the tiles' sums add in another order, which can move a next layer's activation across
    # an int16 rounding step (1/65534 of its block's max)
    assert (lt - lr).abs().max() <= 1e-4 * lr.abs().max()
    assert torch.equal(lk, lt)
    # the fused decode step takes the tiles too: its logits against the eager path's in rows
    for f, e in zip(
        step_logits(tiled, PROMPTS, 4, fast=True), step_logits(rows, PROMPTS, 4, fast=False)
    ):
        assert (f - e).abs().max() <= 1e-3 * e.abs().max()  # test_fast_decode's QUANT_BOUND
    other = quantize_model(build_model(config, seed=1, init_std=0.08), mode)
    other.load_state_dict(rows.state_dict())
    assert torch.equal(other.blocks[0].mlp.down_proj.weight.qdata, down.qdata)


def test_keep_on_a_q8_0_gguf_matches_its_float32_dequantization(tmp_path):
    from gemmakit.checkpoint.gguf_write import save_gguf

    path = tmp_path / "m.gguf"
    save_gguf(_tiny(), path, dtype="q8_0")
    kept = load_model(path, quant="keep")
    assert set(quant_summary(kept)) == {"q8_0", "float32"}
    exact = load_model(path)
    with torch.no_grad():
        a, b = kept(torch.tensor(PROMPTS[:1])), exact(torch.tensor(PROMPTS[:1]))
    # the kernel rounds activations to int16 per 32 (see the test above): 5e-4 of the scale
    assert (a - b).abs().max() <= 5e-4 * b.abs().max()
    assert generate(kept, PROMPTS, 16, stop_tokens=[]) == generate(
        exact, PROMPTS, 16, stop_tokens=[]
    )


def test_quantize_command_and_generate_with_quant_keep(tmp_path, capsys):
    from gemmakit.checkpoint import save_hf

    save_hf(_tiny(), tmp_path / "src")
    assert main(["quantize", str(tmp_path / "src"), str(tmp_path / "q"), "--to", "q4_k"]) == 0
    assert "q4_k" in capsys.readouterr().out
    model = load_model(tmp_path / "q", quant="keep")
    assert set(quant_summary(model)) == {"q4_k", "float32"}
    with pytest.raises(SystemExit):
        main(["quantize", str(tmp_path / "src"), str(tmp_path / "x"), "--to", "q3_k"])


def test_to_dtype_changes_the_compute_dtype_not_the_stored_scales():
    model = quantize_model(_tiny(), "int8").to(torch.bfloat16)
    w = model.blocks[0].mlp.up_proj.weight
    assert w.scale.dtype == torch.float32 and w.qdata.dtype == torch.uint8
    assert model.dtype == torch.bfloat16
    with torch.no_grad():
        assert model(torch.tensor(PROMPTS[:1])).dtype == torch.bfloat16


def test_unknown_quant_mode_is_a_usage_error():
    from gemmakit.errors import UsageError

    with pytest.raises(UsageError, match="unknown quantization"):
        load_model("tiny", quant="int3")


@needs_kernel
def test_multi_gemv_equals_one_call_per_weight():
    """quant_gemv_multi (one rounding of x, one parallel region for several weights, as the
    fused decode step's q/k/v) gives each weight's quant_gemv result, mixed formats too, and
    an int4 weight held in tiles gives what the same weight in rows does."""
    import ctypes

    lib = quant_gemv.library()
    gen = torch.Generator().manual_seed(5)
    k = 512
    fmts = ["q5_0", "q8_0", "q4_k", "int4", "int4"]
    ns = [37, 8, 300, 21, 19]
    tiles = [0, 0, 0, 0, 256]
    rows = [random_weight(f, n, k, gen) for f, n in zip(fmts, ns)]
    # as QuantWeight holds them: int4 and q4_k in chunks, the second int4 in 2 tiles
    parts = [
        (held_memory(f, *p, t), None) if f in HELD else p[:2] for f, p, t in zip(fmts, rows, tiles)
    ]
    codes = [FORMATS[formats.held_format(f)].code for f in fmts]  # q5_0: held as q8_0
    x = torch.randn(3, k, generator=gen)
    ys = [torch.full((3, n), float("nan")) for n in ns]

    def arr(ctype, values):
        return (ctype * len(values))(*values)

    rc = lib.quant_gemv_multi(
        len(fmts),
        arr(ctypes.c_int, codes),
        x.data_ptr(),
        arr(ctypes.c_void_p, [p[0].data_ptr() for p in parts]),
        arr(ctypes.c_void_p, [None if p[1] is None else p[1].data_ptr() for p in parts]),
        arr(ctypes.c_void_p, [y.data_ptr() for y in ys]),
        arr(ctypes.c_int64, ns),
        3,
        k,
        arr(ctypes.c_int64, [32] * len(fmts)),
        arr(ctypes.c_int64, tiles),
        2,
    )
    assert rc == 0
    for code, n, p, y, tile in zip(codes, ns, parts, ys, tiles):
        assert torch.equal(y, quant_gemv.call(lib, code, x, *p, n, 32, 2, tile))
    # the tiles add up each row's sums in another order than the same weight in rows
    rows4 = quant_gemv.call(lib, FORMATS["int4"].code, x, int4_memory(*rows[4]), None, 19, 32, 2)
    assert torch.allclose(ys[4], rows4, rtol=1e-5, atol=1e-5)


# every format; int4 in groups of 32 and 128 with rows of 4608 (two tiles of 2304, each with a
# short last chunk) and 9 rows (an odd last row outside the pairs); q4_k tiled the same way
PICKED = [(f, 512 if FORMATS[f].block == 256 else 96, 32) for f in FORMATS]
PICKED += [("int4", 4608, 32), ("int4", 4608, 128), ("q4_k", 4608, 32)]


@needs_kernel
@pytest.mark.parametrize("fmt,k,group", PICKED)
def test_picked_rows_and_exact_top_in_c_equal_the_torch_way(fmt, k, group, monkeypatch):
    """QuantWeight.dequantize(rows) and exact_top run one C call each on a CPU (an embedding
    lookup and a decode step's candidates); the torch way (GEMMAKIT_NO_KERNELS=1) reads the
    same held bytes with gathers and reshapes. Rows: the same floats bit for bit (negative
    indices too); exact_top (soft-capped): the same argmax, and its values agree."""
    gen = torch.Generator().manual_seed(k + group)
    w = QuantWeight(fmt, (9, k), *random_weight(fmt, 9, k, gen, group))
    assert w.tile == (2304 if k == 4608 else 0)
    rows = torch.tensor([8, 0, 3, 4, -1, 3])
    x = torch.randn(3, k, generator=gen)
    y = w.linear(x) * 0.1  # close logits: candidates to recompute
    got_rows, got_top = w.dequantize(rows), w.exact_top(x, y.clone(), 1.5)
    for bad in ([9], [-10], [0, 2**40]):  # past either end, huge: refused, nothing returned
        with pytest.raises(IndexError, match="out of range for a weight of 9 rows"):
            w.dequantize(torch.tensor(bad))
    assert w.dequantize(torch.tensor([], dtype=torch.long)).shape == (0, k)
    lib, held = quant_gemv.library(), (w.qdata, getattr(w, "scale", None))
    for code, group, tile in (
        (9, 32, 0),
        (w.code, 32, 100),
        (w.code, 0, 256),
    ):
        with pytest.raises(ValueError, match="quant_rows rejected"):  # a malformed weight
            quant_gemv.picked_rows(lib, quant_gemv.Held(code, *held, 9, k, group, tile), rows)
    monkeypatch.setenv("GEMMAKIT_NO_KERNELS", "1")
    assert quant_gemv.cpu_library(w.qdata) is None
    assert torch.equal(got_rows, w.dequantize(rows))
    assert torch.equal(got_rows, dequantize(fmt, *w._parts(None))[rows])
    want_top = w.exact_top(x, y.clone(), 1.5)
    assert torch.equal(got_top.argmax(-1), want_top.argmax(-1))
    torch.testing.assert_close(got_top, want_top, rtol=0, atol=1e-5)
    assert 0 < int((got_top != y).sum()) < y.numel()  # some entries recomputed, not all


@needs_kernel
@pytest.mark.parametrize("mode", ["q8_0", "int4"])
def test_exact_top_over_thousands_of_tied_rows(mode):
    """5000 equal rows but one, ahead by a weight whose activation is under half a rounding
    step: the kernel sees 5000 ties, and every row is a candidate (flat logits: more than a
    decode step's usual few). All are recomputed: the argmax is that row, every value the
    dequantized weight's."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, 64, generator=gen)
    x[0, 5] = 0.8 * (x[0, :32].abs().max() / 32767) / 2  # rounds to 0
    w = (0.05 * torch.sign(x[0])).repeat(5000, 1)
    w[:, 5] = 0.0
    w[3777, 5] = 0.03
    qw = quantize_weight(w, mode, torch.float32)
    with torch.inference_mode():
        y = qw.linear(x)
        assert int((y == y.amax()).sum()) >= 4999  # ties as the kernel sees them
        got = qw.exact_top(x, y.clone())
        exact = (x.double() @ qw.dequantize().double().T).float()
    assert int(got.argmax()) == 3777 == int(exact.argmax())
    torch.testing.assert_close(got, exact, rtol=0, atol=1e-6)


@needs_kernel
def test_exact_top_of_bfloat16_or_strided_logits_takes_the_c_way(monkeypatch):
    """A bfloat16 model's prefill logits (or a view) go through a float32 copy to the one C
    call, not the torch way (a float32 copy of the block norms: 40 ms for a 2B head); the
    result, rounded back in place, is the torch way's."""
    gen = torch.Generator().manual_seed(3)
    w = QuantWeight("int4", (4001, 256), *random_weight("int4", 4001, 256, gen, 32))
    x = torch.randn(3, 256, generator=gen)
    y = w.linear(x) * 0.1  # close logits: candidates to recompute
    calls = []
    real = quant_gemv.exact_top
    monkeypatch.setattr(quant_gemv, "exact_top", lambda *a: calls.append(1) or real(*a))
    wide = torch.zeros(3, 2, 4001)
    for logits in (y.bfloat16(), wide[:, 1]):  # bfloat16; float32 rows 2 x 4001 apart
        logits.copy_(y.to(logits.dtype))
        before = logits.clone()
        got = w.exact_top(x, logits, 1.5)
        assert got is logits and logits.dtype == before.dtype
        monkeypatch.setenv("GEMMAKIT_NO_KERNELS", "1")
        want = w.exact_top(x, before.clone(), 1.5)
        monkeypatch.setenv("GEMMAKIT_NO_KERNELS", "0")
        assert torch.equal(got.argmax(-1), want.argmax(-1))
        torch.testing.assert_close(got.float(), want.float(), rtol=0, atol=1e-2)
        assert 0 < int((got != before).sum()) < 100  # a few entries recomputed, in place
    assert len(calls) == 2  # one C call each
    assert torch.equal(wide[:, 0], torch.zeros(3, 4001))  # the rows between: untouched


@pytest.mark.parametrize("kernels", ["1", "0"])
def test_exact_top_makes_the_argmax_the_dequantized_weights(kernels, monkeypatch):
    """The kernel's rounded activations can flip a near-tied maximum: rows 0 and 1 differ in one
    weight, whose activation (x[0, 5]) is under half a rounding step, so the kernel sees a tie
    (and argmax takes row 0) where the dequantized weight puts row 1 ahead. exact_top recomputes
    every entry that could be the maximum under the error bound, so argmax and top value are
    the dequantized weight's, every entry stays within the bound, and only a few entries per
    row are recomputed."""
    gen = torch.Generator().manual_seed(0)
    n, k, m = 65536, 64, 64
    w = torch.randn(n, k, generator=gen).clamp(-2, 2) * 0.025
    x = torch.randn(m, k, generator=gen)
    x[:, ::32] *= 8  # an outlier per block: coarser rounding of the rest
    step = x[0, :32].abs().max() / 32767
    x[0, 5] = 0.8 * step / 2  # rounds to 0
    w[0] = 0.05 * torch.sign(x[0])  # rows 0 and 1 are row 0 of x's maximum...
    w[0, 5], w[1] = 0.0, w[0]
    w[1, 5] = 0.03  # ...and row 1 is ahead by 0.03 * x[0, 5], which the kernel cannot see
    flips, top_error = 0, {}
    for mode in ("q8_0", "int8", "int4"):
        qw = quantize_weight(w, mode, torch.float32)
        with torch.inference_mode():
            y = qw.linear(x)
            exact = (x.double() @ qw.dequantize().double().T).float()
            assert exact[0].argmax() == 1, mode
            flips += int((y.argmax(-1) != exact.argmax(-1)).sum())
            top_error[mode] = float((y.amax(-1) - exact.amax(-1)).abs().max())
            # C (one call) or torch (GEMMAKIT_NO_KERNELS=1): the same entries recomputed
            monkeypatch.setenv("GEMMAKIT_NO_KERNELS", "0" if kernels == "1" else "1")
            got = qw.exact_top(x, y.clone())
            monkeypatch.setenv("GEMMAKIT_NO_KERNELS", "0")
        assert torch.equal(got.argmax(-1), exact.argmax(-1))
        assert torch.allclose(got.amax(-1), exact.amax(-1), atol=1e-5, rtol=0)
        assert ((got - exact).abs() <= error_bound(x, qw.dequantize())).all()
        assert (got != y).sum() <= 8 * m  # a handful of candidates per row, not the vocabulary
    if quant_gemv.library() is not None:
        assert flips >= 3  # the kernel's rounding did move the maximum: the test has teeth
        assert max(top_error.values()) < 1e-3  # int16 activations: top values close already
