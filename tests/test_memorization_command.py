"""`gemmakit memorization`: a small model trained on a few documents planted many times finds
them (a high exact rate, with the personal data they hold), and finds nothing in documents it
never saw; source discovery from run, data and shard folders; the report's table and JSON."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from gemmakit.cli import main
from gemmakit.data.mixture import MIXTURE_FILE
from gemmakit.data.shards import ShardWriter, TokenShards
from gemmakit.evaluation.memorization import Probe, sample_probes, score_output, split_document
from gemmakit.evaluation.metrics import wilson_interval
from gemmakit.evaluation.training_sources import find_sources
from gemmakit.tokenizer import train_tokenizer
from gemmakit.training.pretrain import pretrain
from tests.helpers import SMALL

EMAIL = "alice@example.com"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return planted_run(tmp_path_factory.mktemp("memo"))


def planted_run(root):
    """A data folder and a short run of a small model on it. planted: 2 documents of random
    distinct pieces (so each token names its successor: quick to memorize), one holding an
    e-mail address in its continuation half, 24 copies each; unseen: 3 random orderings of the
    same pieces, weight 0 in the mixture, so never trained on."""
    words = "river apple music winter garden bridge candle forest ocean pencil".split()
    secret_text = f" write to {EMAIL} now"
    corpus = [" ".join(words) + secret_text] * 20
    tok = train_tokenizer(corpus, vocab_size=700, output=root / "tok")
    secret = tok.encode(secret_text, bos=False, special=False)
    assert len(set(secret)) == len(secret)  # whole words: each piece once
    rng = random.Random(0)
    # pieces past the control ones, none of the secret's
    pieces = [i for i in range(110, tok.vocab_size) if i not in secret]
    rng.shuffle(pieces)
    planted = [pieces[:100], pieces[100:200]]
    planted[0] = planted[0][:60] + secret + planted[0][60:]
    unseen = [rng.sample(pieces[:300], 100) for _ in range(3)]
    data = root / "data"
    for name, docs, copies in (("planted", planted, 24), ("unseen", unseen, 1)):
        with ShardWriter(data / name, tok.eos_id, tok.bos_id, meta={"source": name}) as w:
            for c in range(copies):
                for i, doc in enumerate(docs):
                    w.add([tok.bos_id, *doc], key=f"{name}-{i}-{c}")
    mixture = {"sources": {"planted": "planted", "unseen": "unseen"}}
    mixture["stages"] = [{"until": 1.0, "weights": {"planted": 1.0, "unseen": 0.0}}]
    (data / MIXTURE_FILE).write_text(json.dumps(mixture))
    recipe = {
        "run_dir": str(root / "run"),
        "model": {"preset": "tiny", "config_overrides": {**SMALL, "vocab_size": tok.vocab_size}},
        "data": {"train": [str(data)], "tokenizer": str(root / "tok.model")},
        "training": {
            "steps": 30,
            "seq_len": 64,
            "batch_size": 8,
            "micro_batch_size": 8,
            "dtype": "float32",
        },
        "optimizer": {"lr": 3e-2, "min_lr": 5e-3, "warmup_steps": 4, "weight_decay": 0.0},
        "eval": {"interval": 0},
        "checkpoint": {"interval": 0},
        "log": {"progress": False, "tensorboard": False, "interval": 10},
    }
    result = pretrain(recipe)
    return root, tok, result


def test_planted_documents_are_found_and_unseen_ones_are_not(trained, capsys):
    root, tok, result = trained
    out = root / "report"
    code = main(["memorization", str(root / "run"), "--per-source", "12", "--out", str(out)])
    assert code == 0
    table = capsys.readouterr().out
    assert "planted" in table and "unseen" in table
    report = json.loads((out / "memorization.json").read_text())
    planted, unseen = report["sources"]["planted"], report["sources"]["unseen"]
    assert planted["documents"] == 12 and planted["eligible"] == 48
    assert planted["exact_rate"] >= 0.9
    assert planted["exact_ci95"][0] > 0.5
    assert unseen["documents"] == 3 and unseen["approximate"] == 0
    assert unseen["exact_ci95"] == [0.0, pytest.approx(wilson_interval(0, 3)[1])]
    # the planted e-mail address comes back in the memorized outputs of its document
    assert planted["pii"]["email"] >= 1 and planted["pii_any"] >= planted["pii"]["email"]
    rows = [json.loads(x) for x in (out / "memorized.jsonl").read_text().splitlines()]
    assert any(EMAIL in r["text"] and r["pii"] == {"email": 1} for r in rows)
    assert {r["source"] for r in rows} == {"planted"}
    assert report["overall"]["documents"] == 15


def test_source_discovery_from_run_data_and_shard_folders(trained):
    root, _, result = trained
    sources, ckpt = find_sources(root / "run")
    assert sorted(sources) == ["planted", "unseen"] and ckpt == result.checkpoint
    assert sorted(find_sources(root / "data")[0]) == ["planted", "unseen"]
    one, none = find_sources(root / "data" / "unseen")
    assert list(one) == ["unseen"] and one["unseen"].num_documents == 3 and none is None


def test_a_shard_folder_needs_a_model_and_bad_options_are_one_line(trained, capsys):
    root, _, _ = trained
    assert main(["memorization", str(root / "data")]) == 2
    assert "name the model (--model/--checkpoint)" in capsys.readouterr().err
    assert main(["memorization", str(root / "run"), "--per-source", "0"]) == 2
    assert "--per-source must be at least 1" in capsys.readouterr().err
    assert main(["memorization", str(root / "nothing"), "--model", "tiny"]) == 2
    assert "no such folder" in capsys.readouterr().err


def test_split_document_strips_bos_and_eos():
    doc = [2, *range(10, 20), 1]  # BOS, 10 text tokens, EOS
    assert split_document(doc, 4, 6, bos_id=2, eos_id=1) == (
        [2, 10, 11, 12, 13],
        list(range(14, 20)),
    )
    assert split_document(doc, 4, 7, bos_id=2, eos_id=1) is None  # EOS is not text
    assert split_document(list(range(10)), 4, 6) == ([0, 1, 2, 3], [4, 5, 6, 7, 8, 9])


def test_approximate_threshold_and_personal_data_by_kind():
    probe = Probe("web", 0, [2, 5], list(range(100, 150)))
    near = list(range(100, 145)) + [0] * 5  # 5 substitutions: 10% of 50
    far = list(range(100, 144)) + [0] * 6
    text = "mail bob@example.org or call 415-555-0134"
    o = score_output(probe, near, decode=lambda ids: text)
    assert (o.exact, o.approximate, o.distance) == (False, True, 5)
    assert o.pii == {"email": 1, "phone": 1}
    o = score_output(probe, far, decode=lambda ids: text)
    assert (o.approximate, o.text, o.pii) == (False, None, {})  # not memorized: not decoded


def test_wilson_interval_by_hand():
    # 8 of 10: centre (0.8 + 1.92/10) / 1.384, half-width 1.96 * sqrt(0.016 + 0.0096) / 1.384
    lo, hi = wilson_interval(8, 10)
    assert lo == pytest.approx(0.4902, abs=1e-4) and hi == pytest.approx(0.9433, abs=1e-4)
    assert wilson_interval(0, 5)[0] == 0.0 and wilson_interval(5, 5)[1] == 1.0
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_sampling_is_seeded_per_source_and_skips_short_documents(tmp_path):
    with ShardWriter(tmp_path / "s", eos_id=1, bos_id=2) as w:
        for i in range(30):
            w.add([2, *([7] * (4 if i % 3 == 0 else 12))], key=str(i))
    shards = TokenShards(tmp_path / "s")
    probes, eligible = sample_probes(shards, "s", 5, seed=3, prompt_len=5, continuation_len=5)
    assert eligible == 20 and len(probes) == 5 and all(p.doc % 3 for p in probes)
    again, _ = sample_probes(shards, "s", 5, seed=3, prompt_len=5, continuation_len=5)
    other, _ = sample_probes(shards, "s", 5, seed=4, prompt_len=5, continuation_len=5)
    assert [p.doc for p in again] == [p.doc for p in probes] != [p.doc for p in other]
    assert probes[0].prompt == [2] + [7] * 5 and probes[0].truth == [7] * 5


def test_a_recipe_path_relative_to_another_cwd_is_found_above_the_run(tmp_path):
    from gemmakit.errors import MissingFileError
    from gemmakit.evaluation.training_sources import _locate

    (tmp_path / "runs" / "main" / "data").mkdir(parents=True)
    run = tmp_path / "runs" / "main" / "pretrain"
    found = _locate(Path("runs/main/data"), run, "recipe")
    assert found == (tmp_path / "runs" / "main" / "data").resolve()
    with pytest.raises(MissingFileError, match="runs/other: no such folder"):
        _locate(Path("runs/other"), run, "recipe")
