"""Shared fixtures: each test's global state restored after it (torch threads, GEMMAKIT_*
environment variables, the working folder), and small HF transformers Gemma models with random
weights, saved to disk (skipped where transformers is not installed)."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _private_temp_dir(tmp_path_factory):
    """The temporary folder (tempfile's and $TMPDIR, which subprocesses inherit) is one inside
    pytest's own for the session, so whatever code under test writes there (a tokenizer cache,
    a library's scratch files) goes when pytest prunes its old folders, not left in /tmp."""
    folder = tmp_path_factory.mktemp("tmpdir")
    before = tempfile.tempdir, os.environ.get("TMPDIR")
    tempfile.tempdir = str(folder)
    os.environ["TMPDIR"] = str(folder)
    yield folder
    tempfile.tempdir = before[0]
    if before[1] is None:
        os.environ.pop("TMPDIR", None)
    else:
        os.environ["TMPDIR"] = before[1]


@pytest.fixture(autouse=True)
def _restore_global_state():
    """Whatever a test does to torch's thread count, GEMMAKIT_* variables or the current
    folder, the next test starts from what was there before."""
    threads = torch.get_num_threads()
    env = {k: v for k, v in os.environ.items() if k.startswith("GEMMAKIT_")}
    cwd = os.getcwd()
    yield
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    for k in [k for k in os.environ if k.startswith("GEMMAKIT_")]:
        if k not in env:
            del os.environ[k]
    os.environ.update(env)
    os.chdir(cwd)


VOCAB = 512


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Every weight random, every norm weight non-zero (so the 1 + w of RMSNorm is tested)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            std = 0.5 if "norm" in name else 0.1
            p.copy_(torch.randn(p.shape, generator=gen) * std)


def make_hf_model(kind: str, seed: int = 0):
    """kind: gemma-mq (2B-shaped), gemma-mh (7B-shaped), gemma2, gemma3. The calling test is
    skipped where transformers is not installed."""
    tf = pytest.importorskip("transformers")

    common = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        head_dim=16,
        max_position_embeddings=256,
        num_attention_heads=4,
    )
    if kind == "gemma-mq":
        model = tf.GemmaForCausalLM(
            tf.GemmaConfig(num_hidden_layers=3, num_key_value_heads=1, **common)
        )
    elif kind == "gemma-mh":
        model = tf.GemmaForCausalLM(
            tf.GemmaConfig(num_hidden_layers=3, num_key_value_heads=4, **common)
        )
    elif kind == "gemma2":
        cfg = tf.Gemma2Config(
            num_hidden_layers=4,
            num_key_value_heads=2,
            sliding_window=8,
            query_pre_attn_scalar=24,
            **common,
        )
        model = tf.Gemma2ForCausalLM(cfg)
    elif kind == "gemma3":
        cfg = tf.Gemma3TextConfig(
            num_hidden_layers=7, num_key_value_heads=1, sliding_window=8, **common
        )
        model = tf.Gemma3ForCausalLM(cfg)
    else:
        raise ValueError(kind)
    _randomize(model, seed)
    return model.eval()


@pytest.fixture(scope="session")
def hf_checkpoints(tmp_path_factory):
    """kind -> (HF model, directory it was saved to with save_pretrained)."""
    out = {}
    for kind in ("gemma-mq", "gemma-mh", "gemma2", "gemma3"):
        model = make_hf_model(kind)
        path = tmp_path_factory.mktemp(kind)
        model.save_pretrained(path)
        out[kind] = (model, path)
    return out
