"""Helpers shared by several test files (not a test file itself: test files import this,
never each other)."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from gemmakit.kernels import build
from gemmakit.training.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]

# the C kernels build here; a kernel whose self-test fails then fails its tests (not skipped)
CAN_BUILD = build.cpu_supported() and shutil.which("cc") is not None
needs_kernel = pytest.mark.skipif(not CAN_BUILD, reason="needs x86-64 AVX2/FMA and a C compiler")

# --------------------------------------------------------------------------- tokenizer texts

WORDS = {
    "en": "the quick brown fox jumps over a lazy dog while models learn from data".split(),
    "de": "über straße größe mädchen schön fünf äpfel".split(),
    "ru": "привет мир модель данные обучение слово".split(),
    "el": "γειά σου κόσμε μοντέλο δεδομένα".split(),
    "ar": "مرحبا بالعالم نموذج بيانات".split(),
    "he": "שלום עולם מודל".split(),
    "hi": "नमस्ते दुनिया मॉडल डेटा".split(),
    "th": "สวัสดี โลก".split(),
    "zh": ["你好", "世界", "模型", "数据", "训练", "中文"],
    "ja": ["こんにちは", "世界", "カタカナ", "日本語"],
    "ko": ["안녕하세요", "세계", "모델"],
    "emoji": ["🙂", "🚀", "👍🏽", "🇫🇷", "👩‍💻"],
    "code": ["def f(x):", "return x + 1", "if (a[i] == b) {", "}", "x = 12345 * 678;", "->"],
}


def multilingual_texts(n_docs: int, seed: int = 0) -> list[str]:
    """Documents of random lines, each in one script (or code), with varied whitespace and
    numbers: the scripts, spaces, tabs and newlines a Gemma-style vocabulary has to learn."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        lines = []
        for _ in range(rng.randint(1, 6)):
            words = WORDS[rng.choice(list(WORDS))]
            sep = rng.choice([" ", " ", " ", "  ", "\t"])
            line = sep.join(rng.choice(words) for _ in range(rng.randint(1, 12)))
            if rng.random() < 0.3:
                line += f" {rng.randint(0, 10**6)}"
            lines.append(rng.choice(["", "    ", "\t"]) + line)
        docs.append("\n".join(lines) + "\n")
    return docs


# ------------------------------------------------------------------------------ training runs

# a tiny model's shape (overrides of the "tiny" preset)
SMALL = {
    "vocab_size": 256,
    "d_model": 64,
    "n_layers": 2,
    "n_heads": 2,
    "n_kv_heads": 1,
    "head_dim": 32,
    "ffn_dim": 128,
}


def tiny_recipe(run_dir, **sections) -> dict:
    recipe = {
        "run_dir": str(run_dir),
        "model": {"preset": "tiny", "config_overrides": SMALL},
        "data": {"synthetic": True},
        "training": {
            "steps": 6,
            "seq_len": 16,
            "batch_size": 4,
            "micro_batch_size": 2,
            "loss_chunk_tokens": 8,
            "dtype": "float32",
        },
        "optimizer": {"lr": 1e-2, "min_lr": 1e-3, "warmup_steps": 2},
        "eval": {"interval": 3, "batches": 2},
        "checkpoint": {"interval": 3},
        "log": {"progress": False, "tensorboard": False},
    }
    for section, values in sections.items():
        recipe[section] = {**recipe.get(section, {}), **values}
    return recipe


def write_recipe(path: Path, recipe: dict) -> Path:
    path.write_text(yaml.safe_dump(recipe))
    return path


def losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(run_dir) if "loss" in r]


def subprocess_env() -> dict:
    """The environment for a gemmakit subprocess: this checkout first, one thread."""
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


CONSTANT_LR = {"lr": 1e-2, "min_lr": 1e-2, "warmup_steps": 0}  # so a run may be extended


def kill_after_checkpoint(cmd: list[str], run_dir: Path, step: int) -> None:
    """Run `cmd` (a gemmakit training command) and SIGKILL it as soon as the checkpoint of
    `step` is complete in run_dir; fails if the run ended before it could be killed."""
    proc = subprocess.Popen(cmd, env=subprocess_env(), stdout=subprocess.DEVNULL)
    first = Path(run_dir) / "checkpoints" / f"step_{step:07d}" / "train_state.pt"
    deadline = time.time() + 120
    while not first.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run ended before it could be killed"


def torchrun(command: str, recipe_path: Path, *args: str) -> str:
    """`gemmakit COMMAND RECIPE ARGS` in 2 CPU processes (gloo) under torchrun: their stdout;
    fails with their output unless both exit 0."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node"]
    cmd += ["2", "-m", "gemmakit.cli", command, str(recipe_path), *args]
    out = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout


# --------------------------------------------------------------------------- preference pairs

TOPICS = "river apple music winter garden bridge candle forest ocean pencil".split()
FILLER = "it is very often quite near the old small red blue green".split()
GOOD = "bright calm kind warm clear".split()  # the preferred answers hold one of these
BAD = "dull loud cold harsh vague".split()  # the rejected ones one of these instead


def preference_task(folder: Path, n_train: int = 300, n_valid: int = 60, seed: int = 0):
    """Pairs whose preference only the pairs reveal: both answers are the same filler words
    about the prompt's topic, the chosen one with a word of GOOD and the rejected one with a
    word of BAD at the same (random) place. Writes train.jsonl, valid.jsonl and a 512-piece
    tokenizer (tok.model); returns (tokenizer, valid rows)."""
    import json

    from gemmakit.tokenizer import train_tokenizer

    rng = random.Random(seed)

    def row():
        topic = rng.choice(TOPICS)
        words = [topic] + rng.sample(FILLER, 4)
        at = rng.randrange(1, len(words) + 1)
        good, bad = (words[:at] + [w] + words[at:] for w in (rng.choice(GOOD), rng.choice(BAD)))
        return {
            "prompt": f"Tell me about the {topic}.",
            "chosen": " ".join(good),
            "rejected": " ".join(bad),
        }

    rows = [row() for _ in range(n_train + n_valid)]
    train, valid = rows[:n_train], rows[n_train:]
    for name, part in (("train", train), ("valid", valid)):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    text = [r[k] for r in rows for k in ("prompt", "chosen", "rejected")]
    tok = train_tokenizer(text * 2, vocab_size=512, output=folder / "tok")
    return tok, valid


def preference_recipe(folder: Path, **sections) -> dict:
    """A short run of a small tiny-preset model on preference_task's files."""
    recipe = {
        "run_dir": str(folder / "run"),
        "model": {"preset": "tiny", "config_overrides": {**SMALL, "vocab_size": 512}},
        "data": {
            "train": [str(folder / "train.jsonl")],
            "valid": str(folder / "valid.jsonl"),
            "tokenizer": str(folder / "tok.model"),
        },
        "training": {
            "steps": 60,
            "seq_len": 64,
            "batch_size": 16,
            "micro_batch_size": 16,
            "dtype": "float32",
        },
        "optimizer": {"lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 5, "weight_decay": 0.0},
        "eval": {"interval": 20, "batches": 4},
        "checkpoint": {"interval": 0},
        "log": {"progress": False, "tensorboard": False, "interval": 20},
    }
    for name, values in sections.items():
        recipe[name] = {**recipe.get(name, {}), **values} if isinstance(values, dict) else values
    return recipe


# --------------------------------------------------------------------------- decode steps


def step_logits(model, prompts, steps: int, fast: bool) -> list:
    """Logits [B, V] of `steps` decode steps after an eager prefill, feeding the same fixed
    tokens to both paths so that their logits compare step by step."""
    import torch

    from gemmakit.generation import left_pad
    from gemmakit.model import KVCache
    from gemmakit.model.fast_decode import fast_decoder

    span = min(4000, model.config.vocab_size - 5)  # the fed tokens: 5 .. span + 4
    tokens, valid = left_pad(prompts, 0)
    B, T = tokens.shape
    cache = KVCache(model.config, B, T + steps + 1, model.dtype)
    cache.key_valid[:, :T] = valid
    positions = (valid.long().cumsum(-1) - 1).clamp(min=0)
    out = []
    with torch.inference_mode():
        model(tokens, positions=positions, cache=cache)
        decoder = fast_decoder(model, cache) if fast else None
        assert (decoder is not None) == fast
        pos = positions[:, -1:] + 1
        for i in range(steps):
            nxt = torch.tensor([[(37 * i + 11 * b) % span + 5] for b in range(B)])
            if fast:
                out.append(decoder.step(nxt, pos, cache))
            else:
                out.append(model(nxt, positions=pos, cache=cache)[:, -1].float())
            pos = pos + 1
    return out
