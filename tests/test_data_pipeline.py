"""Readers, the whole `prepare` chain on the embedded corpus, and the `gemmakit data` command."""

import gzip
import io
import json

import numpy as np
import pytest

from gemmakit.data.generated_corpus import CORPUS_DIR, generate
from gemmakit.data.mixture import MixtureSampler
from gemmakit.data.pipeline import load_config, prepare_default_corpus
from gemmakit.data.readers import read_documents, write_documents
from gemmakit.data.shards import TokenShards, is_validation


@pytest.fixture(scope="module")
def tokenizer():
    """A tiny SentencePiece BPE model trained on the embedded web text (well under a second)."""
    import sentencepiece as spm

    from gemmakit.tokenizer import Tokenizer

    texts = [json.loads(line)["text"] for line in open(CORPUS_DIR / "web.jsonl")][:60]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_writer=buf,
        vocab_size=400,
        model_type="bpe",
        pad_id=0,
        eos_id=1,
        bos_id=2,
        unk_id=3,
        byte_fallback=True,
        minloglevel=2,
    )
    return Tokenizer(model_proto=buf.getvalue())


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tokenizer):
    out = tmp_path_factory.mktemp("prepared")
    return out, prepare_default_corpus(out, tokenizer, workers=2)


def test_readers_text_jsonl_parquet_and_gzip(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "a.txt").write_text("First block\nstill first.\n\n\nSecond block.\n")
    assert [d.text for d in read_documents(tmp_path / "a.txt")] == [
        "First block\nstill first.\n\n\nSecond block.\n"
    ]
    paras = list(read_documents(tmp_path / "a.txt", split="paragraph"))
    assert [d.text for d in paras] == ["First block\nstill first.", "Second block."]
    assert [d.id for d in paras] == ["a.txt:0", "a.txt:1"]
    with gzip.open(tmp_path / "b.jsonl.gz", "wt") as f:
        f.write('{"body": "hello", "id": 7}\n\n{"body": "world"}\n')
    docs = list(read_documents(tmp_path / "b.jsonl.gz", text_field="body"))
    assert [(d.id, d.text) for d in docs] == [("7", "hello"), ("b.jsonl.gz:3", "world")]
    table = pa.table({"content": [f"row {i}" for i in range(2500)], "n": list(range(2500))})
    pq.write_table(table, tmp_path / "c.parquet", row_group_size=700)
    rows = list(read_documents(tmp_path / "c.parquet", text_field="content"))
    assert len(rows) == 2500 and rows[2499].text == "row 2499"
    both = list(read_documents(tmp_path, text_field="*", split="paragraph"))  # a whole folder
    assert len(both) == 2 + 2 + 2500 and both[2].text == "hello"
    write_documents(docs, tmp_path / "out" / "d.jsonl")
    assert [d.text for d in read_documents(tmp_path / "out" / "d.jsonl")] == ["hello", "world"]


def test_readers_name_the_file_and_field_in_errors(tmp_path):
    (tmp_path / "x.jsonl").write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(ValueError, match=r"x.jsonl:2: no field 'text'"):
        list(read_documents(tmp_path / "x.jsonl"))
    (tmp_path / "y.jsonl").write_text("{broken\n")
    with pytest.raises(ValueError, match="y.jsonl:1: not valid JSON"):
        list(read_documents(tmp_path / "y.jsonl"))
    (tmp_path / "z.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="z.csv: unknown document format"):
        list(read_documents(tmp_path / "z.csv"))
    with pytest.raises(FileNotFoundError, match="nope"):
        list(read_documents(tmp_path / "nope.jsonl"))


def test_shipped_corpus_is_the_generator_output():
    for name, records in generate().items():
        lines = (CORPUS_DIR / f"{name}.jsonl").read_text().splitlines()
        assert [json.loads(line) for line in lines] == records, name
    assert sum(p.stat().st_size for p in CORPUS_DIR.iterdir()) < 400_000


def test_prepare_default_corpus_catches_every_planted_document(prepared):
    out, report = prepared
    dropped = {}
    for src in report["sources"].values():
        for st in src["stages"]:
            for reason, examples in st["examples"].items():
                for e in examples:
                    dropped[e["id"] if isinstance(e, dict) else e] = f"{st['stage']}: {reason}"
    planted = [
        r["id"]
        for recs in generate().values()
        for r in recs
        if "-bad-" in r["id"]
        or "-dup-" in r["id"]
        or "-eval-copy-" in r["id"]
        or "-blocklisted-" in r["id"]
    ]
    assert planted and all(p in dropped for p in planted), set(planted) - set(dropped)
    assert not [
        d for d in dropped if not any(k in d for k in ("-bad-", "-dup-", "-eval-", "-blocklisted-"))
    ]
    assert dropped["web-eval-copy-0"] == "decontaminate: contains eval"
    assert dropped["web-blocklisted-1"] == "safety: blocklist"
    assert dropped["web-dup-near-2"] == "dedup: near duplicate"
    pii = next(s for s in report["sources"]["web"]["stages"] if s["stage"] == "pii")
    assert pii["counts"] == {
        "documents changed": 4,
        "email": 2,
        "phone": 2,
        "ipv4": 1,
        "ipv6": 1,
        "credit_card": 1,
        "ssn": 1,
    }
    summary = json.loads((out / "summary.json").read_text())
    assert summary["totals"] == report["totals"] and summary["totals"]["train_tokens"] > 50_000
    texts = (out / "web" / "documents.jsonl").read_text()
    assert "<EMAIL>" in texts and "zorblax" not in texts and "@example" not in texts


def test_prepared_shards_decode_and_feed_the_mixture(prepared, tokenizer):
    out, report = prepared
    web = TokenShards(out / "web")
    assert web.num_tokens == report["sources"]["web"]["tokens"]["train"]
    lines = (out / "web" / "documents.jsonl").read_text().splitlines()
    kept = [json.loads(line) for line in lines]
    train = [d for d in kept if not is_validation(d["id"], 0.05)]
    assert web.num_documents == len(train) and 0 < len(kept) - len(train) < 30
    for i in (0, len(train) - 1):
        assert web.document(i).tolist() == tokenizer.encode(train[i]["text"]) + [1]
    m = MixtureSampler.from_dir(out, total_steps=10)
    batch = next(m.batches(32, 4, seed=0))
    assert batch.shape == (4, 33) and batch.dtype == np.int64
    assert m.weights_at(9) == {"web": 0.4, "math": 0.3, "code": 0.3}
    assert sum(1 for _ in m.eval_batches(32, 4)) > 0


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ValueError, match="unknown key.*'sourcs'"):
        load_config({"sourcs": {}})
    with pytest.raises(ValueError, match="sources.web needs paths"):
        load_config({"sources": {"web": {"path": "x"}}})
    with pytest.raises(ValueError, match=r"under dedup.near"):
        load_config({"sources": {"web": {"paths": ["x"]}}, "dedup": {"near": {"jacard": 1}}})


def test_cli_prepare_and_stage_commands(tmp_path, tokenizer, capsys):
    from gemmakit.cli import main

    model = tmp_path / "tok.model"
    model.write_bytes(tokenizer.sp.serialized_model_proto())
    (tmp_path / "eval.txt").write_text(
        "Solve for x in the equation that the teacher wrote on the board this morning\n"
    )
    (tmp_path / "docs.jsonl").write_text(
        json.dumps(
            {
                "text": "Today the teacher asked us to solve for x in the equation that "
                "the teacher wrote on the board this morning, quickly."
            }
        )
        + "\n"
        + json.dumps({"text": "A clean document about gardens."})
        + "\n"
    )
    rc = main(
        [
            "data",
            "decontaminate",
            str(tmp_path / "docs.jsonl"),
            "--out",
            str(tmp_path / "clean.jsonl"),
            "--eval",
            str(tmp_path / "eval.txt"),
        ]
    )
    assert rc == 0
    s = json.loads((tmp_path / "clean.jsonl.summary.json").read_text())
    assert s["kept"] == 1 and s["details"][0]["eval_set"] == "eval"
    rc = main(
        [
            "data",
            "tokenize",
            str(tmp_path / "clean.jsonl"),
            "--out",
            str(tmp_path / "tok"),
            "--tokenizer",
            str(model),
            "--val-fraction",
            "0",
        ]
    )
    assert rc == 0 and TokenShards(tmp_path / "tok").num_documents == 1
    assert (
        main(
            [
                "data",
                "quality",
                str(tmp_path / "docs.jsonl"),
                "--out",
                str(tmp_path / "q.jsonl"),
                "--set",
                "min_wrds=3",
            ]
        )
        == 2
    )
    assert "min_wrds" in capsys.readouterr().err
    assert not (tmp_path / "q.jsonl").exists()
