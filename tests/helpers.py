"""Helpers shared by several test files (not a test file itself: test files import this,
never each other)."""

from __future__ import annotations

import os
import random
from pathlib import Path

import yaml

from gemmakit.training.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]

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
