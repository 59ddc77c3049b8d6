"""Write tests/data/lm_eval_hf_reference.json: what lm-evaluation-harness's own `hf` backend,
loading the real Gemma 3 270M GGUF with HF transformers (BOS added), answers on three
small tasks whose data is a local JSON file (multiple choice, greedy generation until a stop
sequence, rolling log-likelihood): log-likelihoods in float64 (and the choice task's in float32
as well, "gk_choice_float32"), greedy generation in float32; so that
tests/test_lm_eval_adapter.py checks the gemmakit adapter against it in seconds instead of HF's
minutes of loading the GGUF.

    .venv/bin/python tests/make_lm_eval_reference.py      # needs lm-eval, transformers, gguf

The rolling values are a plain HF forward over BOS + the text's tokens (lm-eval's hf backend
puts a second BOS into its rolling windows when add_bos_token is set, which the adapter,
following its docs, does not: BOS, then every token of the text).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

OUT = Path(__file__).parent / "data" / "lm_eval_hf_reference.json"

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
    {
        "question": "1, 2, 3, 4,",
        "choices": [" 5", " 6", " five"],
        "gold": 0,
        "answer": "5",
        "text": "Le chat est sur la table.",
    },
]

TASKS = {
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


def write_tasks(folder: Path) -> None:
    """The three tasks as lm-eval task files in `folder`, their data in `folder`/docs.jsonl
    (the `datasets` cache too: nothing is written elsewhere)."""
    data = folder / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    common = {
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data)}, "cache_dir": str(folder / "hf")},
        "test_split": "test",
    }
    for name, spec in TASKS.items():
        # JSON is YAML: lm-eval reads these as task configs
        (folder / f"{name}.yaml").write_text(json.dumps({"task": name, **common, **spec}))


def run_tasks(lm, folder: Path, tasks: list[str]) -> dict:
    """lm-eval's simple_evaluate of `tasks` with per-request samples."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(folder), include_defaults=False)
    return lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=manager, log_samples=True)


def answers(out: dict) -> dict:
    """Per task, each document's arguments and responses, from simple_evaluate's samples."""
    samples = out["samples"]
    return {
        "gk_choice": [
            {"arguments": [list(a) for a in s["arguments"]], "resps": [r[0] for r in s["resps"]]}
            for s in samples["gk_choice"]
        ],
        "gk_gen": [s["resps"][0][0] for s in samples["gk_gen"]],
    }


def hf_lm(dtype: str = "float32"):
    from lm_eval.models.huggingface import HFLM

    from gemmakit.installed import installed_model_path

    path = installed_model_path("gemma3-270m")
    return HFLM(
        pretrained=str(path.parent),
        gguf_file=path.name,
        dtype=dtype,
        device="cpu",
        add_bos_token=True,  # Gemma needs its BOS, which gemmakit always prepends
        batch_size=4,
    )


def rolling_reference(lm) -> list[float]:
    """log p(text | BOS) of each document's text by a plain forward of lm's HF model."""
    import torch

    tok = lm.tokenizer
    out = []
    for doc in DOCS:
        ids = tok(doc["text"], add_special_tokens=False).input_ids
        x = torch.tensor([[tok.bos_token_id, *ids]])
        with torch.no_grad():
            logp = lm.model(x).logits[0].float().log_softmax(-1)
        out.append(float(logp[torch.arange(len(ids)), torch.tensor(ids)].sum()))
    return out


def main() -> int:
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory() as tmp:
        write_tasks(Path(tmp))
        # log-likelihoods from the backend in float64: in float32 its one full-vocabulary
        # matmul is up to 4e-4 off the float64 values on these requests (gemmakit's tiled
        # head 2e-5), so the float64 run is the reference to hold gemmakit to 1e-4
        lm64 = hf_lm("float64")
        out64 = answers(run_tasks(lm64, Path(tmp), ["gk_choice", "gk_gen"]))
        ref = {"gk_choice": out64["gk_choice"]}
        ref["rolling"] = rolling_reference(lm64)
        del lm64
        lm = hf_lm("float32")  # greedy generation as users run it
        out32 = answers(run_tasks(lm, Path(tmp), ["gk_choice", "gk_gen"]))
        ref["gk_gen"] = out32["gk_gen"]
        ref["gk_choice_float32"] = out32["gk_choice"]
    OUT.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = OUT.with_suffix(".tmp")
    tmp_out.write_text(json.dumps(ref, ensure_ascii=False, indent=1))
    tmp_out.replace(OUT)
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
