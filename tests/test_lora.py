"""LoRA: adapters that share the frozen base, PEFT's on-disk format read and written both ways
(HF PEFT on HF transformers gives our logits), merging, and a LoRA SFT run that saves the
adapter alone and resumes exactly."""

from __future__ import annotations

import json

import pytest
import torch
from test_sft import format_task, sft_recipe

from gemmakit.api import build_model, load_model
from gemmakit.checkpoint import save_hf
from gemmakit.checkpoint.peft import CONFIG_FILE, WEIGHTS_FILE, load_lora, save_lora
from gemmakit.cli import main
from gemmakit.config import get_config
from gemmakit.errors import CheckpointError, ConfigError
from gemmakit.model.lora import LoRASpec, apply_lora, lora_layers, merge_lora
from gemmakit.training.loop import build_optimizer
from gemmakit.training.recipe import OptimizerSection

SMALL = dict(vocab_size=128, d_model=32, n_layers=2, n_heads=2, head_dim=16, ffn_dim=64)


def randomize_lora(model, seed: int = 0) -> None:
    """B is zero at first (no change): make it random so the adapter does something."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=gen) * 0.1)


def test_adapters_share_the_frozen_base_and_only_they_train():
    model = build_model(get_config("tiny").replace(**SMALL), dtype=torch.float32)
    q = model.blocks[0].attn.q_proj.weight
    names = apply_lora(model, LoRASpec(rank=4, targets=("q_proj", "down_proj")))
    assert names == [f"blocks.{i}.{p}" for i in range(2) for p in ("attn.q_proj", "mlp.down_proj")]
    assert model.blocks[0].attn.q_proj.weight is q  # the same Parameter: nothing copied
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.lora_{x}.weight" for n in names for x in "AB"}
    opt = build_optimizer(model, OptimizerSection())
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert in_opt == {id(p) for p in model.parameters() if p.requires_grad}
    # Base state-dict names are unchanged (checkpoint layouts still apply).
    assert "blocks.0.attn.q_proj.weight" in model.state_dict()
    with pytest.raises(ConfigError, match="lora.targets: qkv_proj"):
        apply_lora(
            build_model(get_config("tiny").replace(**SMALL)), LoRASpec(targets=("qkv_proj",))
        )


@pytest.mark.parametrize("kind", ["gemma-mq", "gemma2", "gemma3"])
def test_hf_peft_loads_our_adapter_and_we_load_peft_s(hf_checkpoints, tmp_path, kind):
    """Our adapter saved, then loaded by HF PEFT onto HF transformers' model: the same logits
    as ours. And an adapter made by PEFT, loaded by gemmakit: the same logits as PEFT's."""
    import transformers as tf
    from peft import LoraConfig, PeftModel, get_peft_model

    _, path = hf_checkpoints[kind]
    tokens = torch.randint(0, 512, (2, 19), generator=torch.Generator().manual_seed(1))
    ours = load_model(path, dtype=torch.float32)
    base_logits = ours(tokens)
    apply_lora(ours, LoRASpec(rank=4, alpha=8, targets=("q_proj", "v_proj", "o_proj", "up_proj")))
    randomize_lora(ours)
    save_lora(ours, tmp_path / "ours", base=str(path))
    cfg = json.loads((tmp_path / "ours" / CONFIG_FILE).read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 8

    hf = tf.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(hf, tmp_path / "ours").eval()
    with torch.no_grad():
        want = ours(tokens)
        torch.testing.assert_close(peft_model(tokens).logits, want, rtol=1e-4, atol=1e-4)
    assert (want - base_logits).abs().max() > 0.1  # the adapter changed something

    hf = tf.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    spec = LoraConfig(r=8, lora_alpha=32, target_modules=["k_proj", "gate_proj", "down_proj"])
    made = get_peft_model(hf, spec)
    with torch.no_grad():
        for name, p in made.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    made.save_pretrained(tmp_path / "theirs")
    loaded = load_model(path, dtype=torch.float32, adapter=tmp_path / "theirs")
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens), made.eval()(tokens).logits, rtol=1e-4, atol=1e-4)


def test_merge_keeps_logits_and_merge_lora_command_exports(hf_checkpoints, tmp_path):
    _, path = hf_checkpoints["gemma3"]
    tokens = torch.randint(0, 512, (2, 15))
    model = load_model(path, dtype=torch.float32)
    apply_lora(model, LoRASpec(rank=4, alpha=4))
    randomize_lora(model)
    save_lora(model, tmp_path / "ad")
    with torch.no_grad():
        want = model(tokens)
        merged = merge_lora(model)
        assert not lora_layers(merged)
        torch.testing.assert_close(merged(tokens), want, rtol=1e-5, atol=1e-5)
    assert main(["merge-lora", str(path), str(tmp_path / "ad"), str(tmp_path / "out")]) == 0
    exported = load_model(tmp_path / "out", dtype=torch.float32)
    assert set(exported.state_dict()) == set(load_model(path).state_dict())
    with torch.no_grad():
        torch.testing.assert_close(exported(tokens), want, rtol=1e-5, atol=1e-5)


def test_model_commands_load_an_adapter(hf_checkpoints, tmp_path):
    """--adapter (generate, chat, instruct eval) puts a LoRA folder onto the checkpoint."""
    import argparse

    from gemmakit.commands.common import add_model_args, load_model_and_tokenizer
    from gemmakit.tokenizer import train_tokenizer

    _, path = hf_checkpoints["gemma3"]
    tokens = torch.randint(0, 512, (1, 9))
    model = load_model(path, dtype=torch.float32)
    apply_lora(model, LoRASpec(rank=4, alpha=8))
    randomize_lora(model)
    save_lora(model, tmp_path / "ad")
    tok = train_tokenizer(
        ["one two three four five six"] * 40, vocab_size=420, output=tmp_path / "t"
    )
    parser = argparse.ArgumentParser()
    add_model_args(parser)
    given = ["--checkpoint", str(path), "--tokenizer", str(tok.path), "--dtype", "float32"]
    with torch.no_grad():
        tuned, _ = load_model_and_tokenizer(
            parser.parse_args([*given, "--adapter", str(tmp_path / "ad")])
        )
        torch.testing.assert_close(tuned(tokens), model.eval()(tokens), rtol=1e-5, atol=1e-5)
        base, _ = load_model_and_tokenizer(parser.parse_args(given))
        assert not torch.allclose(base(tokens), tuned(tokens), atol=1e-3)


def test_bad_adapters_are_checkpoint_errors(hf_checkpoints, tmp_path):
    from safetensors.torch import load_file, save_file

    _, path = hf_checkpoints["gemma-mq"]
    model = load_model(path, dtype=torch.float32)
    apply_lora(model, LoRASpec(rank=2, targets=("q_proj",)))
    save_lora(model, tmp_path / "ad")
    cfg = json.loads((tmp_path / "ad" / CONFIG_FILE).read_text())
    (tmp_path / "ad" / CONFIG_FILE).write_text(json.dumps({**cfg, "use_dora": True}))
    with pytest.raises(CheckpointError, match="use_dora"):
        load_lora(load_model(path), tmp_path / "ad")
    (tmp_path / "ad" / CONFIG_FILE).write_text(json.dumps(cfg))
    tensors = load_file(tmp_path / "ad" / WEIGHTS_FILE)
    key = next(iter(tensors))
    save_file({**tensors, key: torch.zeros(3, 3)}, tmp_path / "ad" / WEIGHTS_FILE)
    with pytest.raises(CheckpointError, match=r"has shape \[3, 3\]"):
        load_lora(load_model(path), tmp_path / "ad")


def test_lora_sft_saves_the_adapter_alone_and_resumes_exactly(tmp_path):
    """A LoRA run on a saved tiny base: its checkpoints are PEFT folders (no base weights), the
    run resumed from its middle checkpoint repeats the uninterrupted losses (adapter dropout
    included), and load_model(base, adapter=checkpoint) is the trained model."""
    import shutil

    from gemmakit.training.metrics import read_metrics
    from gemmakit.training.sft import sft

    format_task(tmp_path)
    base = build_model(get_config("tiny").replace(vocab_size=512), dtype=torch.float32, seed=5)
    save_hf(base, tmp_path / "base", extra_files={"tokenizer.model": tmp_path / "tok.model"})
    recipe = sft_recipe(
        tmp_path,
        model={"preset": None, "checkpoint": str(tmp_path / "base"), "config_overrides": {}},
        data={"tokenizer": None},
        training={"steps": 6, "seq_len": 64, "batch_size": 4, "micro_batch_size": 2},
        optimizer={"lr": 1e-2, "warmup_steps": 1},
        eval={"interval": 3, "batches": 2},
        checkpoint={"interval": 3, "keep": 5},
        lora={"rank": 4, "alpha": 8, "dropout": 0.1, "targets": ["q_proj", "v_proj", "up_proj"]},
    )
    torch.set_num_threads(1)  # the same float sums in both runs
    try:
        whole = sft(recipe)
        ckpt = whole.checkpoint
        files = {p.name for p in ckpt.iterdir()}
        assert files == {CONFIG_FILE, WEIGHTS_FILE, "train_state.pt", "tokenizer.model"}
        state = torch.load(ckpt / "train_state.pt", weights_only=True)
        assert len(state["optimizer"]["state"]) == 2 * 3 * 4  # A and B of 3 targets x 4 layers
        shutil.rmtree(ckpt)  # as if killed after step 3
        resumed = sft(recipe, resume=True)
    finally:
        torch.set_num_threads(2)
    assert resumed.steps == 6 and len(resumed.losses) == 3
    torch.testing.assert_close(resumed.losses, whole.losses[3:], rtol=1e-6, atol=0)
    val = [r["val_loss"] for r in read_metrics(tmp_path / "run") if "val_loss" in r]
    assert val[-1] < val[0]

    tokens = torch.randint(0, 512, (1, 20))
    tuned = load_model(tmp_path / "base", dtype=torch.float32, adapter=resumed.checkpoint)
    with torch.no_grad():
        assert (tuned(tokens) - base(tokens)).abs().max() > 1e-3
