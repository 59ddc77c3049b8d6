"""`gemmakit run`: the report's recipe end to end at tiny scale, on the embedded corpus.

tokenizer training -> data filtering, dedup, decontamination, tokenization -> pretraining ->
samples -> memorization -> report (report.json, report.html with the loss curve).
No network; a few minutes on 2 CPU cores. Each stage is also its own command.
"""

from __future__ import annotations

import html
import json
import time
from pathlib import Path
from typing import Any

from gemmakit.api import load_model
from gemmakit.data.pipeline import DEFAULT_CONFIG, prepare
from gemmakit.data.shards import TokenShards
from gemmakit.errors import UsageError
from gemmakit.evaluation.memorization import measure_sources
from gemmakit.generation import generate
from gemmakit.tokenizer import train_tokenizer
from gemmakit.training.pretrain import pretrain

DEFAULT_STEPS = 200


def _stage(name: str) -> float:
    print(f"\n== {name} ==", flush=True)
    return time.perf_counter()


def run_all(
    out: str | Path = "runs/main", steps: int = DEFAULT_STEPS, vocab_size: int = 4096, seed: int = 0
) -> dict[str, Any]:
    """Run every stage into `out`; returns the report (also written as report.json/.html)."""

    out = Path(out)
    if (out / "pretrain").exists():
        raise UsageError(f"{out}: a run is already there; choose another --out or remove it")
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"out": str(out), "stages": {}}
    seconds = report["seconds"] = {}

    # 1. The data pipeline's cleaning stages, then a tokenizer trained on the cleaned text.
    t = _stage("data: quality, safety, personal data, dedup, decontamination")
    clean = prepare(DEFAULT_CONFIG, out / "clean", tokenizer=None, verbose=True)
    texts = []
    for name in clean["sources"]:
        with open(out / "clean" / name / "documents.jsonl", encoding="utf-8") as f:
            texts += [json.loads(line)["text"] for line in f]
    seconds["clean"] = time.perf_counter() - t

    t = _stage("tokenizer: SentencePiece BPE with Gemma's options")
    tok = train_tokenizer(texts, vocab_size=vocab_size, output=out / "tokenizer", seed=seed)
    chars = sum(len(x) for x in texts)
    n_tokens = sum(len(tok.encode(x, bos=False, special=False)) for x in texts)
    report["tokenizer"] = {
        "vocab_size": tok.vocab_size,
        "chars_per_token": chars / n_tokens,
        "round_trip_exact": all(tok.decode(tok.encode(x, special=False)) == x for x in texts),
    }
    print(f"vocab {tok.vocab_size}, {chars / n_tokens:.2f} characters per token")
    seconds["tokenizer"] = time.perf_counter() - t

    t = _stage("data: tokenize and pack into token shards")
    data = prepare(DEFAULT_CONFIG, out / "data", tokenizer=tok, verbose=False)
    report["data"] = {
        "sources": {
            n: {"documents": s["documents"], "tokens": s["tokens"], "stages": s["stages"]}
            for n, s in data["sources"].items()
        },
        "totals": data["totals"],
    }
    tt = data["totals"]
    print(f"{tt['read']} documents read, {tt['kept']} kept, {tt['train_tokens']} train tokens")
    seconds["data"] = time.perf_counter() - t

    # 2. Pretraining the tiny preset on the staged mixture.
    t = _stage(f"pretrain: tiny preset, {steps} steps")
    result = pretrain_tiny(out, tok.vocab_size, steps, seed)
    report["pretrain"] = {
        "steps": result.steps,
        "first_loss": result.losses[0],
        "final_loss": result.losses[-1],
        "losses": result.losses,
        "val_losses": result.val_losses,
        "tokens_per_s": result.tokens_per_s,
        "checkpoint": str(result.checkpoint),
    }
    seconds["pretrain"] = time.perf_counter() - t

    # 3. What the model learned, and what it memorized (report section on memorization).

    t = _stage("samples and memorization")
    model = load_model(result.checkpoint)
    prompts = ["The ", "def ", "Question: What is 12 + 7?"]
    outs = generate(model, [tok.encode(p) for p in prompts], 40, seed=seed)
    report["samples"] = [
        {"prompt": p, "continuation": tok.decode(o)} for p, o in zip(prompts, outs)
    ]
    for s in report["samples"]:
        print(f"{s['prompt']!r} -> {s['continuation']!r}")
    sources = {name: TokenShards(out / "data" / name) for name in data["sources"]}
    memo = {
        n: r.to_dict()
        for n, r in measure_sources(
            model, sources, per_source=64, decode=tok.decode
        ).sources.items()
    }
    for name, m in memo.items():
        print(
            f"{name}: {m['documents']} documents, exact {m['exact_rate']:.1%}, "
            f"approximate {m['approximate_rate']:.1%}"
        )
    report["memorization"] = memo
    seconds["evaluate"] = time.perf_counter() - t

    write_report(out, report)
    print(f"\nreport: {out / 'report.html'} and {out / 'report.json'}")
    return report


def pretrain_tiny(out: Path, vocab_size: int, steps: int, seed: int):

    recipe = {
        "run_dir": str(out / "pretrain"),
        "model": {"preset": "tiny", "config_overrides": {"vocab_size": vocab_size}},
        "data": {"train": [str(out / "data")], "tokenizer": str(out / "tokenizer.model")},
        "training": {
            "steps": steps,
            "seq_len": 256,
            "batch_size": 16,
            "micro_batch_size": 16,
            "seed": seed,
        },
        "optimizer": {"lr": 3e-3, "min_lr": 3e-4, "warmup_steps": max(1, steps // 10)},
        "eval": {"interval": max(1, steps // 4), "batches": 4},
        "checkpoint": {"interval": 0, "keep": 1},
        "log": {"interval": 10, "tensorboard": False},
    }
    return pretrain(recipe)


def _loss_plot(out: Path, report: dict) -> str | None:
    """loss.png beside the report; None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    p = report["pretrain"]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=110)
    ax.plot(range(1, len(p["losses"]) + 1), p["losses"], label="train")
    if p["val_losses"]:
        ax.plot(*zip(*p["val_losses"]), "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title("Pretraining the tiny preset on the embedded corpus")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "loss.png")
    plt.close(fig)
    return "loss.png"


def write_report(out: Path, report: dict) -> None:
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str))
    plot = _loss_plot(out, report)
    e = html.escape

    def rows(pairs) -> str:
        return "".join(f"<tr><td>{e(str(a))}</td><td>{e(str(b))}</td></tr>" for a, b in pairs)

    drops = report["data"]["totals"]["dropped_by_reason"]
    p = report["pretrain"]
    memo = report["memorization"]
    parts = [
        "<!doctype html><meta charset=utf-8><title>gemmakit run</title>",
        "<style>body{font-family:sans-serif;max-width:60em;margin:2em auto}"
        "td,th{padding:2px 10px;border-bottom:1px solid #ddd;text-align:left}</style>",
        "<h1>gemmakit run: the Gemma recipe at tiny scale</h1>",
        "<h2>Data</h2><table>",
        rows(
            [
                ("documents read", report["data"]["totals"]["read"]),
                ("documents kept", report["data"]["totals"]["kept"]),
                ("train tokens", report["data"]["totals"]["train_tokens"]),
                ("validation tokens", report["data"]["totals"]["val_tokens"]),
            ]
        ),
        "</table><h3>Dropped, by reason</h3><table>",
        rows(sorted(drops.items())),
        "</table>",
        "<h2>Tokenizer</h2><table>",
        rows(report["tokenizer"].items()),
        "</table>",
        "<h2>Pretraining</h2><table>",
        rows(
            [
                ("steps", p["steps"]),
                ("first loss", f"{p['first_loss']:.3f}"),
                ("final loss", f"{p['final_loss']:.3f}"),
                ("validation", ", ".join(f"step {s}: {v:.3f}" for s, v in p["val_losses"])),
                ("tokens/s", f"{p['tokens_per_s']:.0f}"),
                ("checkpoint", p["checkpoint"]),
            ]
        ),
        "</table>",
        f'<p><img src="{plot}" alt="loss curve"></p>' if plot else "",
        "<h2>Samples (greedy)</h2><table>",
        rows((s["prompt"], s["continuation"]) for s in report["samples"]),
        "</table>",
        "<h2>Memorization (50-token prompt, 50 greedy tokens)</h2>",
        "<table><tr><th>source</th><th>documents</th><th>exact</th><th>approximate</th></tr>",
        "".join(
            f"<tr><td>{e(n)}</td><td>{m['documents']}</td><td>{m['exact_rate']:.1%}</td>"
            f"<td>{m['approximate_rate']:.1%}</td></tr>"
            for n, m in memo.items()
        ),
        "</table><h2>Time</h2><table>",
        rows((k, f"{v:.1f} s") for k, v in report["seconds"].items()),
        "</table>",
    ]
    (out / "report.html").write_text("\n".join(parts), encoding="utf-8")
