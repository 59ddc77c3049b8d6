"""`gemmakit run`: the report's recipe end to end at tiny scale, on the embedded corpus.

tokenizer training -> data filtering, dedup, decontamination, tokenization -> pretraining ->
samples -> memorization -> instruction tuning (SFT on the shipped conversations, a reward model
on the shipped preference pairs, RLHF with RLOO from the SFT model) -> instruction-following
evaluation of the pretrained, SFT and RLHF models (IFEval's strict/loose prompt-level accuracy
on the shipped eval set) -> report (report.json, report.html with the loss curves).
No network; a few minutes on 2 CPU cores. Each stage is also its own command (gemmakit pretrain,
sft, reward, rlhf, instruct eval).
"""

from __future__ import annotations

import html
import json
import math
import time
from pathlib import Path
from typing import Any

from gemmakit.api import load_model
from gemmakit.atomic import write_json
from gemmakit.data.pipeline import DEFAULT_CONFIG, prepare
from gemmakit.data.shards import TokenShards
from gemmakit.errors import UsageError
from gemmakit.evaluation.memorization import measure_sources
from gemmakit.generation import generate
from gemmakit.instruct.evaluate import evaluate_instruction_following
from gemmakit.instruct.generate import data_dir
from gemmakit.instruct.scoring import read_eval
from gemmakit.tokenizer import train_tokenizer
from gemmakit.training.pretrain import pretrain
from gemmakit.training.reward import reward
from gemmakit.training.rlhf import rlhf
from gemmakit.training.sft import sft

DEFAULT_STEPS = 200
DEFAULT_SFT_STEPS = 100
DEFAULT_REWARD_STEPS = 60
DEFAULT_RLHF_STEPS = 20


def _stage(name: str) -> float:
    print(f"\n== {name} ==", flush=True)
    return time.perf_counter()


def run_all(
    out: str | Path = "runs/main",
    steps: int = DEFAULT_STEPS,
    vocab_size: int = 4096,
    seed: int = 0,
    sft_steps: int = DEFAULT_SFT_STEPS,
    reward_steps: int = DEFAULT_REWARD_STEPS,
    rlhf_steps: int = DEFAULT_RLHF_STEPS,
    instruct: bool = True,
    eval_limit: int | None = None,
) -> dict[str, Any]:
    """Run every stage into `out`; returns the report (also written as report.json/.html).

    `steps` are pretraining's optimizer steps; `sft_steps`, `reward_steps` and `rlhf_steps`
    those of the instruction-tuning stages, left out (with their evaluation) when `instruct` is
    False; `eval_limit` keeps the first N prompts of the instruction-following eval set.
    """

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

    if instruct:
        # 4. Instruction tuning (the report's section 4) and its evaluation.
        instruction_tune(
            out, report, result.checkpoint, (sft_steps, reward_steps, rlhf_steps), seed
        )
        t = _stage("instruction following: pretrained, SFT and RLHF models")
        report["instruct_eval"] = ev = evaluate_models(out, report, tok, eval_limit)
        ev["verdict"] = _rlhf_verdict(ev["models"], ev["prompts"])
        print(ev["verdict"])
        seconds["instruct_eval"] = time.perf_counter() - t

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


def tuning_recipe(
    out: Path,
    stage: str,
    checkpoint: str | Path,
    train: list[str],
    steps: int,
    seed: int,
    **sections,
) -> dict:
    """The recipe dict of one instruction-tuning stage of the main job: full fine-tuning of
    `checkpoint` (its own tokenizer) on the `train` files, run in out/STAGE, only the final
    checkpoint kept; `sections` ({"optimizer": {...}, "rlhf": {...}}) add to the defaults."""
    recipe = {
        "run_dir": str(out / stage),
        "model": {"preset": None, "checkpoint": str(checkpoint)},
        "data": {"train": train},
        "training": {"steps": steps, "seq_len": 256, "seed": seed},
        "optimizer": {"warmup_steps": max(1, steps // 10), "weight_decay": 0.0},
        "eval": {"interval": 0},
        "checkpoint": {"interval": 0, "keep": 1},
        "log": {"interval": 10, "tensorboard": False},
    }
    for name, values in sections.items():
        recipe[name] = {**recipe.get(name, {}), **values}
    return recipe


def instruction_tune(
    out: Path, report: dict, pretrained: Path, steps: tuple[int, int, int], seed: int
) -> None:
    """SFT of the pretrained model on the shipped conversations, a reward model from the SFT
    model on the shipped preference pairs, then RLHF (RLOO) of the SFT model against it; fills
    report["sft"], ["reward"], ["rlhf"] and their seconds."""
    sft_steps, reward_steps, rlhf_steps = steps
    shipped = data_dir()
    seconds = report["seconds"]

    t = _stage(f"sft: the pretrained model on the shipped conversations, {sft_steps} steps")
    r = sft(
        tuning_recipe(
            out,
            "sft",
            pretrained,
            [str(shipped / "sft_train.jsonl")],
            sft_steps,
            seed,
            data={"valid": str(shipped / "sft_valid.jsonl")},
            training={"batch_size": 16, "micro_batch_size": 16},
            optimizer={"lr": 1e-3, "min_lr": 1e-4},
            eval={"interval": max(1, sft_steps // 4), "batches": 4},
        )
    )
    report["sft"] = {
        "steps": r.steps,
        "first_loss": r.losses[0],
        "final_loss": r.losses[-1],
        "losses": r.losses,
        "val_losses": r.val_losses,
        "checkpoint": str(r.checkpoint),
    }
    print(f"sft: loss {r.losses[0]:.3f} -> {r.losses[-1]:.3f}")
    seconds["sft"] = time.perf_counter() - t
    sft_model = r.checkpoint

    t = _stage(
        f"reward model: from the SFT model, on the shipped preference pairs, {reward_steps} steps"
    )
    r = reward(
        tuning_recipe(
            out,
            "reward",
            sft_model,
            [str(shipped / "prefs_train.jsonl")],
            reward_steps,
            seed,
            data={"valid": str(shipped / "prefs_valid.jsonl")},
            training={"batch_size": 16, "micro_batch_size": 16},
            optimizer={"lr": 3e-4, "min_lr": 3e-5},
            # the whole held-out file (200 pairs), once, at the end
            eval={"interval": reward_steps, "batches": 13},
        )
    )
    val = r.val_metrics[-1][1]
    report["reward"] = {
        "steps": r.steps,
        "first_loss": r.losses[0],
        "final_loss": r.losses[-1],
        "train_accuracy": r.metrics[-1]["accuracy"],
        "val_accuracy": val["accuracy"],
        "val_margin": val["margin"],
        "checkpoint": str(r.checkpoint),
    }
    print(f"reward model: held-out pairwise accuracy {val['accuracy']:.1%}")
    seconds["reward"] = time.perf_counter() - t

    t = _stage(f"rlhf: RLOO from the SFT model against the reward model, {rlhf_steps} steps")
    r = rlhf(
        tuning_recipe(
            out,
            "rlhf",
            sft_model,
            [str(shipped / "prefs_train.jsonl")],  # its prompts
            rlhf_steps,
            seed,
            # beta 0.3, lr 2e-5 keep the policy within about 2 nats of the SFT model; beta 0.05
            # at lr 5e-5 drifted 5-7 nats in 20 steps, to answers of one repeated character
            # that the tiny reward model (about 60% held-out accuracy) scores high
            rlhf={"reward_model": str(report["reward"]["checkpoint"]), "k": 4, "beta": 0.3},
            training={"batch_size": 32, "micro_batch_size": 16},
            optimizer={"lr": 2e-5, "min_lr": 2e-5, "warmup_steps": 0},
        )
    )
    rewards = [m["reward"] for m in r.metrics]
    kls = [m["kl"] for m in r.metrics]
    report["rlhf"] = {
        "steps": r.steps,
        "rewards": rewards,
        "kl": kls,
        "first_reward": rewards[0],
        "final_reward": rewards[-1],
        "final_kl": kls[-1],
        "checkpoint": str(r.checkpoint),
    }
    print(f"rlhf: reward {rewards[0]:.3f} -> {rewards[-1]:.3f}, kl {kls[-1]:.3f}")
    seconds["rlhf"] = time.perf_counter() - t


def evaluate_models(out: Path, report: dict, tok, limit: int | None) -> dict:
    """IFEval-style scores (prompt- and instruction-level, strict and loose) of the pretrained,
    SFT and RLHF models on the shipped eval set (greedy answers in the chat format); the
    per-sample answers go to out/instruct_eval/MODEL.json, the scores into the report."""
    rows = read_eval(data_dir() / "eval.jsonl")[:limit]
    scores = {}
    keys = ("prompt_strict", "prompt_loose", "instruction_strict", "instruction_loose")
    for name in ("pretrain", "sft", "rlhf"):
        result = evaluate_instruction_following(
            load_model(report[name]["checkpoint"]), tok, rows, max_new_tokens=64, batch_size=50
        )
        write_json(out / "instruct_eval" / f"{name}.json", result)
        scores[name] = {k: result[k] for k in keys}
        scores[name]["per_category"] = result["per_category"]
        scores[name]["example"] = result["samples"][0]["response"]
        print(
            f"{name:9} prompt-level strict {result['prompt_strict']:.1%}, "
            f"loose {result['prompt_loose']:.1%}; instruction-level strict "
            f"{result['instruction_strict']:.1%}, loose {result['instruction_loose']:.1%}"
        )
    return {"prompts": len(rows), "example_prompt": rows[0]["prompt"], "models": scores}


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
        "</table>",
        *(_instruct_sections(report) if "instruct_eval" in report else []),
        "<h2>Time</h2><table>",
        rows((k, f"{v:.1f} s") for k, v in report["seconds"].items()),
        "</table>",
    ]
    (out / "report.html").write_text("\n".join(parts), encoding="utf-8")


def _instruct_sections(report: dict) -> list[str]:
    """The HTML of instruction tuning (SFT, reward model, RLHF) and of the instruction-following
    scores of the three models side by side."""
    e = html.escape
    sft, rm, rl, ev = report["sft"], report["reward"], report["rlhf"], report["instruct_eval"]
    models = ev["models"]
    names = {"pretrain": "pretrained", "sft": "SFT", "rlhf": "RLHF (from SFT)"}
    val = ", ".join(f"step {s}: {v:.3f}" for s, v in sft["val_losses"])
    verdict = ev["verdict"]
    return [
        "<h2>Instruction tuning</h2>",
        "<h3>SFT on the shipped conversations (loss on the model's turns)</h3><table>",
        f"<tr><td>steps</td><td>{sft['steps']}</td></tr>",
        f"<tr><td>loss</td><td>{sft['first_loss']:.3f} &rarr; {sft['final_loss']:.3f}</td></tr>",
        f"<tr><td>held-out loss</td><td>{e(val)}</td></tr>",
        "</table><h3>Reward model on the shipped preference pairs (from the SFT model)</h3><table>",
        f"<tr><td>steps</td><td>{rm['steps']}</td></tr>",
        f"<tr><td>loss</td><td>{rm['first_loss']:.3f} &rarr; {rm['final_loss']:.3f}</td></tr>",
        f"<tr><td>held-out pairwise accuracy</td><td>{rm['val_accuracy']:.1%}</td></tr>",
        f"<tr><td>held-out mean margin</td><td>{rm['val_margin']:.3f}</td></tr>",
        "</table><h3>RLHF with RLOO (SFT model, k=4, KL penalty to it)</h3><table>",
        f"<tr><td>steps</td><td>{rl['steps']}</td></tr>",
        f"<tr><td>mean reward of the samples</td><td>{rl['first_reward']:.3f} &rarr; "
        f"{rl['final_reward']:.3f}</td></tr>",
        f"<tr><td>KL to the SFT model (final step)</td><td>{rl['final_kl']:.3f}</td></tr>",
        "</table>",
        f"<h2>Instruction following ({ev['prompts']} held-out prompts, IFEval's scoring)</h2>",
        "<table><tr><th>model</th><th>prompt strict</th><th>prompt loose</th>"
        "<th>instruction strict</th><th>instruction loose</th></tr>",
        "".join(
            f"<tr><td>{e(names[n])}</td><td>{m['prompt_strict']:.1%}</td>"
            f"<td>{m['prompt_loose']:.1%}</td><td>{m['instruction_strict']:.1%}</td>"
            f"<td>{m['instruction_loose']:.1%}</td></tr>"
            for n, m in models.items()
        ),
        f"</table><p>{e(verdict)}</p>",
        f"<h3>One prompt, three answers</h3><p><i>{e(ev['example_prompt'])}</i></p><table>",
        "".join(
            f"<tr><td>{e(names[n])}</td><td><pre>{e(m['example'])}</pre></td></tr>"
            for n, m in models.items()
        ),
        "</table>",
    ]


def _rlhf_verdict(models: dict, n: int) -> str:
    """One honest sentence on what SFT and RLHF did to the prompt-level strict score of `n`
    prompts: a change within two standard errors of a difference of two proportions is called
    noise (at 200 prompts and ~5%, about 4.5 points)."""
    p, s, r = (models[m]["prompt_strict"] for m in ("pretrain", "sft", "rlhf"))

    def moved(a: float, b: float) -> bool:
        q = (a + b) / 2
        return abs(b - a) > 2 * math.sqrt(max(q * (1 - q), 1e-12) * 2 / n)

    if moved(p, s):
        first = f"SFT {'raised' if s > p else 'lowered'} prompt-level strict accuracy from "
        first += f"{p:.1%} to {s:.1%}"
    else:
        first = f"SFT did not move prompt-level strict accuracy beyond noise ({p:.1%} -> {s:.1%})"
    if moved(s, r):
        second = f"RLHF {'raised' if r > s else 'lowered'} it to {r:.1%}"
    else:
        second = f"RLHF did not move it beyond noise at this scale ({s:.1%} -> {r:.1%})"
    return f"{first}; {second} (on {n} prompts)."
