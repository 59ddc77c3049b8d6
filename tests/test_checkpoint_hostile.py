"""Checkpoints handed to us by someone else, and outputs written over something: paths inside
an index confined to its folder, config fields in range, legacy `.ckpt` files, `convert`
replacing what was there (or refusing, naming it), no temporary tokenizer file, and a tokenizer
that must fit the model's embedding. Each bad input is one CheckpointError or one CLI line."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import tempfile

import pytest
import torch

import gemmakit
from gemmakit.checkpoint import CheckpointError, load_checkpoint, save_gguf, save_hf
from gemmakit.cli import main as cli
from gemmakit.tokenizer import load_tokenizer, train_tokenizer

TEXTS = ["hello world, the quick brown fox", "x = 12345 + 678;\n\tif (a) {}", "é€😀 and more"]


def same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def tiny(seed: int = 0, vocab: int = 512):
    cfg = gemmakit.get_config("tiny").replace(vocab_size=vocab, n_layers=2)
    return gemmakit.build_model(cfg, seed=seed)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok") / "tok"
    return train_tokenizer(TEXTS * 20, vocab_size=420, output=out)


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


# --- paths read from an index ---------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    ["../outside.safetensors", "../../outside.safetensors", "sub/../../outside.safetensors"],
)
def test_index_naming_a_file_outside_its_folder_is_refused(tmp_path, name):
    model = tiny()
    save_hf(model, tmp_path / "outside_model")  # a valid shard outside the checkpoint folder
    os.replace(tmp_path / "outside_model" / "model.safetensors", tmp_path / "outside.safetensors")
    ckpt = tmp_path / "a" / "ckpt"
    save_hf(model, ckpt, max_shard_bytes=200_000)
    index_path = ckpt / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"] = {k: name for k in index["weight_map"]}
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="outside the folder"):
        load_checkpoint(ckpt)


@pytest.mark.parametrize("name", ["ABSOLUTE", 7, None, ""])
def test_index_with_an_absolute_or_non_string_name_is_refused(tmp_path, name):
    save_hf(tiny(), tmp_path / "other")
    ckpt = tmp_path / "ckpt"
    save_hf(tiny(), ckpt, max_shard_bytes=200_000)
    index_path = ckpt / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    if name == "ABSOLUTE":  # a real, loadable file, named by its absolute path
        name = str(tmp_path / "other" / "model.safetensors")
    index["weight_map"] = {k: name for k in index["weight_map"]}
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="index.json"):
        load_checkpoint(ckpt)


def test_index_whose_weight_map_is_not_a_mapping(tmp_path):
    ckpt = tmp_path / "ckpt"
    save_hf(tiny(), ckpt, max_shard_bytes=200_000)
    (ckpt / "model.safetensors.index.json").write_text('{"weight_map": ["a", "b"]}')
    with pytest.raises(CheckpointError, match="weight_map"):
        load_checkpoint(ckpt)


# --- config.json fields ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "key, value",
    [
        ("num_attention_heads", 0),
        ("num_attention_heads", -4),
        ("vocab_size", -1),
        ("vocab_size", 0),
        ("hidden_size", "big"),
        ("hidden_size", 128.5),
        ("num_key_value_heads", 3),  # 4 query heads: not a multiple
        ("num_key_value_heads", 0),
        ("head_dim", 0),
        ("head_dim", 31),  # odd: RoPE turns pairs
        ("intermediate_size", None),
        ("max_position_embeddings", 0),
        ("num_hidden_layers", -2),
        ("rms_norm_eps", -1.0),
        ("rope_theta", 0),
        ("pad_token_id", None),  # ignored field: fine either way, must not crash
        ("num_attention_heads", True),
    ],
)
def test_config_json_out_of_range_is_one_line(tmp_path, capsys, key, value):
    ckpt = tmp_path / "ckpt"
    save_hf(tiny(), ckpt)
    hf = json.loads((ckpt / "config.json").read_text())
    hf[key] = value
    (ckpt / "config.json").write_text(json.dumps(hf))
    if key == "pad_token_id":
        load_checkpoint(ckpt)
        return
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(ckpt)
    assert "config.json" in str(e.value)
    assert cli(["generate", "--checkpoint", str(ckpt), "hi"]) == 2
    assert "config.json" in one_line_error(capsys)


@pytest.mark.parametrize("text", ["[1, 2]", "{", '"text"', '{"model_type": "gemma"}'])
def test_config_json_that_is_not_a_config(tmp_path, text):
    ckpt = tmp_path / "ckpt"
    save_hf(tiny(), ckpt)
    (ckpt / "config.json").write_text(text)
    with pytest.raises(CheckpointError, match="config.json"):
        load_checkpoint(ckpt)


def test_config_error_names_the_json_key(tmp_path):
    ckpt = tmp_path / "ckpt"
    save_hf(tiny(), ckpt)
    hf = json.loads((ckpt / "config.json").read_text())
    hf["num_attention_heads"] = 0
    (ckpt / "config.json").write_text(json.dumps(hf))
    with pytest.raises(CheckpointError, match="num_attention_heads=0"):
        load_checkpoint(ckpt)


@pytest.mark.parametrize(
    "field, value",
    [("n_heads", 0), ("vocab_size", -1), ("d_model", 2.0), ("norm_eps", float("nan"))],
)
def test_gemma_config_checks_its_fields(field, value):
    with pytest.raises(gemmakit.errors.ConfigError, match=field):
        gemmakit.get_config("tiny").replace(**{field: value})


# --- legacy .ckpt -----------------------------------------------------------------------------


def test_legacy_non_zip_ckpt_loads(tmp_path):
    model = tiny()
    ckpt = tmp_path / "m.ckpt"
    assert cli(["convert", str(save_hf(model, tmp_path / "hf")), str(ckpt)]) == 0
    state = torch.load(ckpt, weights_only=True)
    legacy = tmp_path / "legacy.ckpt"
    torch.save(state, legacy, _use_new_zipfile_serialization=False)
    assert legacy.read_bytes()[:2] != b"PK"  # not a zip file: cannot be memory-mapped
    assert same_weights(model, load_checkpoint(legacy))


# --- convert: writers own their output ----------------------------------------------------


def test_convert_into_a_folder_replaces_the_old_checkpoint(tmp_path):
    """A sharded model, then another model unsharded, into one folder: only the second is
    there (no stale index or shard that the loader would prefer)."""
    first, second = tiny(seed=1), tiny(seed=2)
    out = tmp_path / "out"
    save_hf(first, out, max_shard_bytes=200_000)
    assert (out / "model.safetensors.index.json").exists()
    src = save_hf(second, tmp_path / "src")
    assert cli(["convert", str(src), str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert same_weights(second, gemmakit.load_model(out))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]  # no temporaries


def test_convert_refuses_a_folder_holding_other_files(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    src = save_hf(tiny(), tmp_path / "src")
    assert cli(["convert", str(src), str(out)]) == 2
    assert "notes.txt" in one_line_error(capsys)
    assert (out / "notes.txt").read_text() == "mine" and len(list(out.iterdir())) == 1


def test_convert_output_has_normal_permissions(tmp_path):
    src = save_hf(tiny(), tmp_path / "src")
    assert cli(["convert", str(src), str(tmp_path / "out")]) == 0
    umask = os.umask(0)
    os.umask(umask)
    mode = stat.S_IMODE((tmp_path / "out").stat().st_mode)
    assert mode == 0o777 & ~umask, oct(mode)  # what mkdir gives, not mkdtemp's 0700


@pytest.mark.parametrize("dst", ["file/out", "file/out.ckpt", "file/out.gguf", "file/a/b"])
def test_convert_under_a_regular_file_is_one_line(tmp_path, capsys, dst):
    (tmp_path / "file").write_text("a file")
    src = save_hf(tiny(), tmp_path / "src")
    assert cli(["convert", str(src), str(tmp_path / dst)]) == 2
    assert "is a file, not a folder" in one_line_error(capsys)
    assert (tmp_path / "file").read_text() == "a file"


def test_convert_to_a_file_name_that_is_a_folder_or_back(tmp_path, capsys):
    src = save_hf(tiny(), tmp_path / "src")
    (tmp_path / "x.ckpt").mkdir()
    assert cli(["convert", str(src), str(tmp_path / "x.ckpt")]) == 2
    assert "is a folder" in one_line_error(capsys)
    (tmp_path / "plain").write_text("a file")
    assert cli(["convert", str(src), str(tmp_path / "plain"), "--to", "hf"]) == 2
    assert "is a file" in one_line_error(capsys)
    assert (tmp_path / "plain").read_text() == "a file"


# --- GGUF tokenizer: no temporary file ----------------------------------------------------


def test_gguf_vocabulary_is_never_read_from_a_planted_file(tmp_path, monkeypatch, tokenizer):
    """The vocabulary used to go through $TMPDIR/gemmakit-<hash>.model, reused if present:
    another user could plant one. Now it stays in memory; a planted file changes nothing and
    no file is written to the temporary directory."""
    from gemmakit.checkpoint.gguf_vocab import sentencepiece_proto_from_gguf

    gguf = save_gguf(tiny(), tmp_path / "m.gguf", tokenizer=tokenizer, dtype="f32")
    proto = sentencepiece_proto_from_gguf(gguf)
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmpdir))
    monkeypatch.setenv("TMPDIR", str(tmpdir))
    other = train_tokenizer(["a completely different corpus " * 5] * 30, vocab_size=500)
    planted = tmpdir / f"gemmakit-{hashlib.sha256(proto).hexdigest()[:16]}.model"
    planted.write_bytes(other.sp.serialized_model_proto())
    assert cli(["convert", str(gguf), str(tmp_path / "hf")]) == 0
    for tok in (load_tokenizer(gguf), load_tokenizer(tmp_path / "hf")):
        for text in TEXTS:
            assert tok.encode(text) == tokenizer.encode(text)
    assert os.listdir(tmpdir) == [planted.name]  # nothing written there


# --- the tokenizer must fit the model ---------------------------------------------------------


def test_tokenizer_larger_than_the_embedding_is_refused(tmp_path, capsys, tokenizer):
    assert tokenizer.vocab_size > 300
    ckpt = save_hf(tiny(vocab=300), tmp_path / "small")
    assert (
        cli(["generate", "--checkpoint", str(ckpt), "--tokenizer", str(tokenizer.path), "hi"]) == 2
    )
    err = one_line_error(capsys)
    assert str(tokenizer.path) in err and "300" in err and str(tokenizer.vocab_size) in err
    assert (
        cli(["convert", str(ckpt), str(tmp_path / "out"), "--tokenizer", str(tokenizer.path)]) == 2
    )
    assert "300" in one_line_error(capsys)
    assert not (tmp_path / "out").exists()


def test_tokenizer_beside_a_checkpoint_file_is_found(tmp_path, tokenizer):
    ckpt = save_hf(tiny(), tmp_path / "m", extra_files={"tokenizer.model": tokenizer.path})
    for source in (ckpt, ckpt / "model.safetensors"):
        assert load_tokenizer(source).encode("hello") == tokenizer.encode("hello")
    with pytest.raises(FileNotFoundError, match="typo.model"):
        load_tokenizer(ckpt / "typo.model")  # not the tokenizer.model beside it
