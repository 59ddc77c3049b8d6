"""Checkpoint formats: round trips, conversion, streaming memory, and clear errors."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file

import gemmakit
from gemmakit.checkpoint import (
    CheckpointError,
    load_checkpoint,
    save_hf,
)
from gemmakit.cli import main as cli


def same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture()
def model():
    return gemmakit.load_model("tiny-gemma3")


def test_hf_round_trip_single_and_sharded(model, tmp_path):
    save_hf(model, tmp_path / "one")
    save_hf(model, tmp_path / "many", max_shard_bytes=400_000)
    index = json.loads((tmp_path / "many" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    for d in ("one", "many"):
        back = gemmakit.load_model(tmp_path / d)
        assert back.config == model.config.replace(name=d)
        assert same_weights(model, back)


def test_saved_hf_checkpoint_loads_in_transformers(model, tmp_path):
    AutoModelForCausalLM = pytest.importorskip("transformers").AutoModelForCausalLM

    save_hf(model, tmp_path / "m")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    tokens = torch.randint(0, 4096, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (hf(tokens).logits - model(tokens)).abs().max() <= 1e-4


def test_gemma_pytorch_ckpt_fuses_qkv_and_round_trips(tmp_path):
    model = gemmakit.load_model("tiny")
    path = save_hf(model, tmp_path / "src")
    ckpt = tmp_path / "m.ckpt"
    assert cli(["convert", str(path), str(ckpt)]) == 0
    state = torch.load(ckpt, weights_only=True)["model_state_dict"]
    qkv = state["model.layers.0.self_attn.qkv_proj.weight"]
    attn = model.blocks[0].attn
    assert torch.equal(qkv, torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]))
    assert "embedder.weight" in state
    back = load_checkpoint(ckpt)  # config inferred from shapes
    assert same_weights(model, back)
    # and back to HF, through the CLI
    assert cli(["convert", str(ckpt), str(tmp_path / "x"), "--preset", "gemma-2b"]) == 2
    assert not (tmp_path / "x").exists()  # a preset mismatch writes nothing
    assert cli(["convert", str(ckpt), str(tmp_path / "hf")]) == 0
    assert same_weights(model, gemmakit.load_model(tmp_path / "hf"))


def test_ckpt_is_never_unpickled(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.ckpt"
    path.write_bytes(pickle.dumps({"model_state_dict": Evil()}))
    with pytest.raises(CheckpointError, match="evil.ckpt"):
        load_checkpoint(path)


@pytest.fixture()
def saved(model, tmp_path):
    save_hf(model, tmp_path / "m")
    return tmp_path / "m" / "model.safetensors"


def test_missing_key_is_named(saved):
    state = load_file(saved)
    del state["model.layers.2.mlp.up_proj.weight"]
    save_file(state, saved)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(saved.parent)
    assert "model.layers.2.mlp.up_proj.weight" in str(e.value) and "missing" in str(e.value)
    assert str(saved) in str(e.value)


def test_unexpected_key_is_named(saved):
    state = load_file(saved)
    state["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(3)
    save_file(state, saved)
    with pytest.raises(
        CheckpointError, match="unexpected key 'model.layers.0.self_attn.q_proj.bias'"
    ):
        load_checkpoint(saved.parent)


def test_wrong_shape_names_key_and_both_shapes(saved):
    state = load_file(saved)
    state["model.layers.1.mlp.down_proj.weight"] = torch.zeros(128, 100)
    save_file(state, saved)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(saved.parent)
    msg = str(e.value)
    assert (
        "model.layers.1.mlp.down_proj.weight" in msg and "[128, 100]" in msg and "[128, 512]" in msg
    )


def test_truncated_and_corrupt_files(saved):
    data = saved.read_bytes()
    saved.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_checkpoint(saved.parent)
    saved.write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_checkpoint(saved.parent)


def test_checkpoint_that_does_not_match_the_preset(saved):
    with pytest.raises(CheckpointError, match="gemma3-270m"):
        load_checkpoint(saved.parent, config="gemma3-270m")


def test_failed_save_leaves_nothing_half_written(model, tmp_path, monkeypatch):
    import gemmakit.checkpoint.save as save_mod

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr("safetensors.torch.save_file", boom)
    with pytest.raises(OSError):
        save_mod.save_hf(model, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_loading_streams_peak_memory_near_model_size(tmp_path):
    """Load a ~170 MB float32 checkpoint in a fresh process: the peak resident memory added by
    loading must stay near one copy of the weights, not two."""
    cfg = gemmakit.get_config("tiny").replace(
        d_model=512, ffn_dim=4096, n_layers=6, vocab_size=32_000, n_heads=8, head_dim=64
    )
    model = gemmakit.build_model(cfg)
    nbytes = sum(p.numel() * 4 for p in model.parameters())
    save_hf(model, tmp_path / "big", max_shard_bytes=60_000_000)
    save_hf(gemmakit.build_model(gemmakit.get_config("tiny")), tmp_path / "warm")
    del model
    code = textwrap.dedent(f"""
        import gemmakit, torch
        def status(field):  # kB, from the kernel's own accounting of this process
            line = next(l for l in open("/proc/self/status") if l.startswith(field + ":"))
            return int(line.split()[1]) * 1024
        warm = gemmakit.load_model({str(tmp_path / "warm")!r})  # libraries paged in first
        with torch.no_grad():
            sum(float(p.sum()) for p in warm.parameters())
        before = status("VmRSS")
        m = gemmakit.load_model({str(tmp_path / "big")!r})
        with torch.no_grad():
            total = sum(float(p.sum()) for p in m.parameters())  # touch every page
        print(status("VmHWM") - before)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    added = int(out.stdout.strip().splitlines()[-1])
    assert nbytes * 0.9 < added < nbytes * 1.25, (added, nbytes)


def test_big_preset_is_built_on_meta_without_allocating():
    with torch.device("meta"):
        model = gemmakit.model.Gemma(gemmakit.get_config("gemma-7b"))
    assert all(p.is_meta for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) == 8_537_680_896
