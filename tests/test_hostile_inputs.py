"""Hostile input, class by class (issue 10): every bad file or option ends in one line naming
what is wrong (exit 2 from the CLI, a GemmakitError from the library), and nothing outside the
output folder changes.

Classes covered here: file names read from files (token-shard indexes, data mixtures, source
folders of a data config) confined to their folder; writers replacing what was there (shard
folders, `data corpus`, an output that is a folder); sampling option ranges and max tokens
(API, Session, `generate`, `chat`); the context limit; bad UTF-8 in data files; malformed
JSON/YAML configs and indexes. Checkpoint indexes and GGUF metadata are not confined yet
(gemmakit/checkpoint, another change), so they have no case here.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
from helpers import multilingual_texts

from gemmakit.api import build_model
from gemmakit.checkpoint import save_hf
from gemmakit.cli import main
from gemmakit.config import get_config
from gemmakit.data.mixture import MixtureSampler
from gemmakit.data.readers import read_documents
from gemmakit.data.safety import Blocklist
from gemmakit.data.shards import INDEX, ShardWriter, TokenShards
from gemmakit.errors import ConfigError, DataError, GemmakitError, UsageError
from gemmakit.generation import Session, generate, stream_generate
from gemmakit.paths import confined
from gemmakit.tokenizer import train_tokenizer

CONTEXT = 64  # the test model's context length


# ------------------------------------------------------------------------------------ helpers


def snapshot(root: Path, skip: Path | None = None) -> dict[str, str]:
    """relative path -> content hash (or link target) of everything under root but `skip`."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            if skip is not None and (p == skip or skip in p.parents):
                continue
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = "-> " + os.readlink(p)
            elif p.is_file():
                out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
            else:
                out[rel] = "dir"
    return out


def one_line_error(capsys, argv: list[str], *needles: str) -> str:
    """Run the CLI; assert exit 2, exactly one line on stderr, naming each needle."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.endswith("\n"), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, (needle, err)
    return err


def write_index(folder: Path, shards: list) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    index = {
        "format": "gemmakit-token-shards",
        "version": 1,
        "dtype": "uint32",
        "eos_id": 1,
        "splits": {"train": {"tokens": 4, "documents": 1, "shards": shards}},
    }
    (folder / INDEX).write_text(json.dumps(index))
    return folder / INDEX


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tok"
    return train_tokenizer(multilingual_texts(300), vocab_size=800, output=path)


@pytest.fixture(scope="module")
def model():
    return build_model(get_config("tiny").replace(max_seq_len=CONTEXT), seed=0)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tok, model):
    folder = tmp_path_factory.mktemp("ckpt") / "tiny64"
    save_hf(model, folder, extra_files={"tokenizer.model": tok.path})
    return folder


@pytest.fixture
def docs(tmp_path) -> Path:
    path = tmp_path / "in" / "docs.jsonl"
    path.parent.mkdir()
    rows = [{"id": f"d{i}", "text": f"document {i} " + "words here " * 10} for i in range(20)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# --------------------------------------------------------------- file names read from files

# entries of a hostile index: each would reach outside the shard folder
OUTSIDE = ["../victim.txt", "../../victim.txt", "sub/../../victim.txt", "ABSOLUTE", "LINK", "."]


def hostile_entry(tmp_path: Path, folder: Path, kind: str) -> str:
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    if kind == "ABSOLUTE":
        return str(victim)
    if kind == "LINK":  # a name inside the folder that is a link to a file outside it
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "train-link.bin").symlink_to(victim)
        return "train-link.bin"
    return kind


@pytest.mark.parametrize("kind", OUTSIDE)
def test_shard_writer_never_deletes_what_an_old_index_names_outside(tmp_path, kind, capsys):
    out = tmp_path / "out"
    folder = out / "s"
    entry = hostile_entry(tmp_path, folder, kind)
    write_index(folder, [{"file": entry, "docs": entry, "tokens": 1}])
    before = snapshot(tmp_path, skip=out)
    with pytest.raises(DataError, match="index.json: entry .* (points outside|absolute)"):
        with ShardWriter(folder, eos_id=1) as w:
            w.add([2, 5, 6])
    assert snapshot(tmp_path, skip=out) == before
    assert (tmp_path / "victim.txt").read_text() == "keep me"


def test_data_prepare_with_a_hostile_shard_folder(tmp_path, docs, tok, capsys):
    """The reproduction of issue 10: `data prepare` into a folder whose old index names files
    outside it stops with one line, and both files are still there."""
    out = tmp_path / "o_evil"
    for name in ("victim1.txt", "victim2.txt"):
        (tmp_path / name).write_text("v")
    write_index(out / "s", [{"file": "../../victim1.txt", "docs": "../../victim2.txt"}])
    config = tmp_path / "c.yaml"
    config.write_text(f"sources:\n  s: {{paths: [{docs}]}}\ntokenizer: {tok.path}\n")
    before = snapshot(tmp_path, skip=out)
    one_line_error(
        capsys,
        ["data", "prepare", str(config), "--out", str(out)],
        "index.json",
        "../../victim1.txt",
    )
    assert snapshot(tmp_path, skip=out) == before


@pytest.mark.parametrize("kind", OUTSIDE)
def test_token_shards_refuse_to_read_outside(tmp_path, kind, capsys):
    folder = tmp_path / "s"
    entry = hostile_entry(tmp_path, folder, kind)
    write_index(folder, [{"file": entry, "docs": entry, "tokens": 1}])
    with pytest.raises(DataError, match="entry"):
        TokenShards(folder)
    one_line_error(capsys, ["data", "inspect", str(folder)], "index.json", "entry")


@pytest.mark.parametrize(
    "shards",
    [
        [{"file": 5, "docs": "a.npy", "tokens": 1}],  # not a name
        [{"file": "", "docs": "a.npy", "tokens": 1}],
        [{"file": "a.bin", "docs": "a.npy", "tokens": -1}],  # not a count
        [{"file": "a.bin", "docs": "a.npy", "tokens": "many"}],
        ["a.bin"],  # not an entry
    ],
)
def test_malformed_index_entries_are_named(tmp_path, shards, capsys):
    folder = tmp_path / "s"
    write_index(folder, shards)
    one_line_error(capsys, ["data", "inspect", str(folder)], str(folder / INDEX))


@pytest.mark.parametrize(
    "text", ["{not json", "[]", '{"format": "gemmakit-token-shards", "dtype": "uint32"}', "\xff"]
)
def test_malformed_index_json(tmp_path, text, capsys):
    (tmp_path / INDEX).write_bytes(text.encode("latin-1"))
    one_line_error(capsys, ["data", "inspect", str(tmp_path)], str(tmp_path / INDEX))


def test_docs_offsets_are_never_unpickled(tmp_path):
    folder = tmp_path / "s"
    with ShardWriter(folder, eos_id=1) as w:
        w.add([2, 5, 6])
    docs = folder / w.index["splits"]["train"]["shards"][0]["docs"]
    np.save(docs, np.array([{"x": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(DataError, match=r"\.npy"):
        TokenShards(folder).doc_starts()


@pytest.mark.parametrize("source", ["../elsewhere", "/tmp", "."])
def test_mixture_sources_stay_in_their_folder(tmp_path, source):
    folder = tmp_path / "data"
    folder.mkdir()
    spec = {"sources": {"web": source}, "stages": [{"until": 1.0, "weights": {"web": 1}}]}
    (folder / "mixture.json").write_text(json.dumps(spec))
    with pytest.raises(DataError, match="mixture.json: entry"):
        MixtureSampler.from_dir(folder, 10)


@pytest.mark.parametrize("text", ["{bad", "[1, 2]", '{"sources": {}, "stages": 5}'])
def test_malformed_mixture_file(tmp_path, text):
    (tmp_path / "mixture.json").write_text(text)
    with pytest.raises(DataError, match="mixture.json"):
        MixtureSampler.from_dir(tmp_path, 10)


def test_a_source_name_cannot_leave_the_output_folder(tmp_path, docs, capsys):
    config = tmp_path / "c.yaml"
    config.write_text(f"sources:\n  ../escaped: {{paths: [{docs}]}}\n")
    out = tmp_path / "out"
    before = snapshot(tmp_path, skip=out)
    one_line_error(capsys, ["data", "prepare", str(config), "--out", str(out)], "../escaped")
    assert snapshot(tmp_path, skip=out) == before


def test_confined_keeps_names_inside(tmp_path):
    assert confined(tmp_path, "a/b.bin", "x.json") == (tmp_path / "a" / "b.bin").resolve()
    for bad in ("..", "../x", "a/../../x", str(tmp_path / "abs"), ".", None, 3, ""):
        with pytest.raises(DataError, match="x.json: entry"):
            confined(tmp_path, bad, "x.json")
    with pytest.raises(ConfigError):
        confined(tmp_path, "../x", "x.json", ConfigError)


# ------------------------------------------------------------------ writers and what was there


def test_shard_writer_replaces_its_own_old_shards_only(tmp_path):
    folder = tmp_path / "s"
    with ShardWriter(folder, eos_id=1) as w:
        w.add([2, 5, 6])
    first = {s["file"] for s in w.index["splits"]["train"]["shards"]}
    (folder / "notes.txt").write_text("mine")
    with ShardWriter(folder, eos_id=1) as w:
        w.add([2, 7, 8, 9])
    assert not any((folder / f).exists() for f in first)
    assert (folder / "notes.txt").read_text() == "mine"
    assert TokenShards(folder).read(0, 5).tolist() == [2, 7, 8, 9, 1]


def test_data_corpus_refuses_to_overwrite(tmp_path, capsys):
    folder = tmp_path / "corpus"
    assert main(["data", "corpus", str(folder)]) == 0
    capsys.readouterr()
    (folder / "default.yaml").write_text("my edits")
    before = snapshot(tmp_path)
    one_line_error(capsys, ["data", "corpus", str(folder)], "default.yaml", "--force")
    assert snapshot(tmp_path) == before
    assert main(["data", "corpus", str(folder), "--force"]) == 0
    assert (folder / "default.yaml").read_text() != "my edits"


@pytest.mark.parametrize("out", ["a_file/below", "a_folder"])
def test_outputs_that_cannot_be_written_are_named(tmp_path, docs, out, capsys):
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "a_folder").mkdir()
    before = snapshot(tmp_path)
    argv = ["data", "read", str(docs), "--out", str(tmp_path / out)]
    one_line_error(capsys, argv, "a_f")
    assert snapshot(tmp_path) == before


# ------------------------------------------------------------------------ option ranges


BAD_OPTIONS = [
    {"temperature": -1.0},
    {"temperature": math.inf},
    {"temperature": math.nan},
    {"top_p": -1.0},
    {"top_p": 0.0},
    {"top_p": 5.0},
    {"top_p": math.nan},
    {"top_k": 0},
    {"top_k": -3},
    {"top_k": 2.5},
    {"max_new_tokens": -5},
    {"max_new_tokens": 1.5},
    {"seed": "x"},
    {"seed": 2**70},
]


@pytest.mark.parametrize("bad", BAD_OPTIONS, ids=lambda d: f"{next(iter(d))}={d[next(iter(d))]}")
def test_sampling_options_are_checked_in_the_api(model, bad):
    opts = {"max_new_tokens": 3, "temperature": 1.0, **bad}
    n = opts.pop("max_new_tokens")
    name = next(iter(bad))
    with pytest.raises(UsageError, match=name):
        generate(model, [[2, 5]], n, **opts)
    with pytest.raises(UsageError, match=name):
        stream_generate(model, [[2, 5]], n, **opts)  # at the call, not at the first step
    with pytest.raises(UsageError, match=name):
        Session(model).stream([2, 5], n, **opts)


def test_edge_values_are_accepted(model):
    assert generate(model, [[2, 5]], 0) == [[]]
    out = generate(model, [[2, 5]], 2, temperature=1e-3, top_k=1, top_p=1.0, seed=0)
    assert out == generate(model, [[2, 5]], 2)  # top_k=1 is greedy
    out = generate(model, [[2, 5]], 2, temperature=5.0, top_p=1e-9, seed=np.int64(3))
    assert out == generate(model, [[2, 5]], 2)  # the most likely token alone crosses top_p
    assert all(0 <= t < model.config.vocab_size for t in out[0])


CLI_BAD = [
    ("--temperature", "-1"),
    ("--temperature", "inf"),
    ("--temperature", "nan"),
    ("--top-p", "-1"),
    ("--top-p", "5"),
    ("--top-k", "-3"),
    ("--top-k", "0"),
    ("--max-new-tokens", "-5"),
]


@pytest.mark.parametrize("command", ["generate", "chat"])
@pytest.mark.parametrize("option,value", CLI_BAD)
def test_sampling_options_are_checked_in_the_cli(checkpoint, command, option, value, capsys):
    argv = [command, "--checkpoint", str(checkpoint), f"{option}={value}"]
    one_line_error(capsys, argv + (["hi"] if command == "generate" else []), option)


def test_bad_device_is_one_line(checkpoint, capsys):
    argv = ["generate", "--checkpoint", str(checkpoint), "--device", "nodevice", "hi"]
    one_line_error(capsys, argv, "--device", "nodevice")


# ---------------------------------------------------------------------------- context limit


def test_a_prompt_longer_than_the_context_is_refused_or_truncated(model):
    prompt = [2] + [5 + i % 50 for i in range(CONTEXT + 20)]
    with pytest.raises(UsageError, match=f"{CONTEXT}-token context"):
        generate(model, [prompt], 4)
    with pytest.raises(UsageError, match=f"{CONTEXT}-token context"):
        Session(model).stream(prompt, 4)
    # truncate keeps the end: the same as giving the last tokens yourself
    got = generate(model, [prompt], 4, truncate=True, stop_tokens=[])
    assert got == generate(model, [prompt[-(CONTEXT - 4) :]], 4, stop_tokens=[])
    assert len(got[0]) == 4


def test_generation_stops_at_the_context(model):
    prompt = [2] + [7] * (CONTEXT - 4)
    out = generate(model, [prompt], 100, stop_tokens=[])
    assert len(prompt) + len(out[0]) == CONTEXT
    steps = list(Session(model).stream(prompt, 100, stop_tokens=[]))
    assert len(steps) == CONTEXT - len(prompt)
    # a prompt that fills the context exactly leaves no room for a token
    with pytest.raises(UsageError):
        generate(model, [[2] * CONTEXT], 1)


def test_cli_generate_context(checkpoint, tok, capsys):
    long = "hello world " * 200
    assert len(tok.encode(long)) > CONTEXT
    one_line_error(
        capsys, ["generate", "--checkpoint", str(checkpoint), long], "--truncate", str(CONTEXT)
    )
    argv = ["generate", "--checkpoint", str(checkpoint), "--max-new-tokens", "3", "--truncate"]
    assert main([*argv, long]) == 0
    err = capsys.readouterr().err
    assert "keeps its last" in err and f"{CONTEXT}-token context" in err
    argv = ["generate", "--checkpoint", str(checkpoint), "--max-new-tokens", "1000", "hi"]
    assert main(argv) == 0
    assert "at most" in capsys.readouterr().err


# ------------------------------------------------------------------------------- bad UTF-8


def write_bad(path: Path, lines: list[bytes]) -> Path:
    data = b"".join(lines)
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return path


@pytest.mark.parametrize("name", ["bad.jsonl", "bad.txt", "bad.jsonl.gz", "bad.md"])
@pytest.mark.parametrize("split", ["file", "paragraph"])
def test_bad_utf8_names_file_and_line(tmp_path, name, split, capsys):
    lines = [b'{"text": "fine"}\n', b'{"text": "caf\xe9"}\n', b'{"text": "more"}\n']
    path = write_bad(tmp_path / name, lines)
    with pytest.raises(DataError, match=f"{name}:2: not UTF-8"):
        list(read_documents(path, split=split))
    out = tmp_path / "out.jsonl"
    argv = ["data", "read", str(path), "--split", split, "--out", str(out)]
    one_line_error(capsys, argv, f"{name}:2")
    assert not out.exists()


def test_bad_utf8_blocklist_and_prepare(tmp_path, docs, capsys):
    block = write_bad(tmp_path / "block.txt", [b"word\n", b"\n", b"\xff\xfe\n"])
    with pytest.raises(DataError, match="block.txt:3"):
        Blocklist.from_file(block)
    bad = write_bad(tmp_path / "in" / "bad.jsonl", [b'{"text": "\x80"}\n'])
    config = tmp_path / "c.yaml"
    config.write_text(f"sources:\n  s: {{paths: [{bad}]}}\n")
    one_line_error(capsys, ["data", "prepare", str(config), "--out", str(tmp_path / "o")], ":1:")


# ------------------------------------------------------------------- malformed configs


@pytest.mark.parametrize(
    "text,needle",
    [
        ("sources: [\n", "not valid YAML"),
        ("sources:\n  s: {paths: [x]}\nnope: 1\n", "nope"),
        ("sources:\n  s: {paths: [x], colour: red}\n", "colour"),
        ("dedup: {exact: true}\n", "no sources"),
        ("[1, 2]\n", "mapping"),
    ],
)
def test_malformed_data_config(tmp_path, text, needle, capsys):
    config = tmp_path / "c.yaml"
    config.write_text(text)
    out = tmp_path / "out"
    before = snapshot(tmp_path, skip=out)
    one_line_error(capsys, ["data", "prepare", str(config), "--out", str(out)], needle)
    assert snapshot(tmp_path, skip=out) == before


@pytest.mark.parametrize("text", ["training: [\n  steps: 3\n", "a:\n\tb: 1\n"])
def test_malformed_recipe_yaml_is_one_line(tmp_path, text, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(text)
    one_line_error(capsys, ["pretrain", str(recipe)], "r.yaml")


def test_every_user_error_type_is_a_gemmakit_error():
    # what the CLI turns into one line; library callers may still catch ValueError
    for err in (ConfigError, DataError, UsageError):
        assert issubclass(err, GemmakitError) and issubclass(err, ValueError)
