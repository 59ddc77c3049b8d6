"""The training loop's pieces: chunked cross-entropy, schedule, recipes, optimizer groups,
activation checkpointing, and a short run on real token shards."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import SMALL, tiny_recipe

from gemmakit.api import build_model
from gemmakit.config import get_config
from gemmakit.training.loop import build_optimizer, checkpoint_blocks
from gemmakit.training.losses import IGNORE, chunked_cross_entropy, next_token_loss
from gemmakit.training.pretrain import pretrain
from gemmakit.training.recipe import RecipeError, build_recipe, load_recipe
from gemmakit.training.samplers import SyntheticTokens
from gemmakit.training.schedule import lr_at


def small_model(preset: str = "tiny"):
    return build_model(get_config(preset).replace(**SMALL), dtype=torch.float32, seed=0)


@pytest.mark.parametrize("preset", ["tiny", "tiny-gemma2"])  # gemma2: final soft-cap
def test_chunked_ce_equals_full_logits_ce(preset):
    model = small_model(preset)
    tokens = torch.randint(0, 256, (3, 11))
    targets = torch.randint(0, 256, (3, 11))
    targets[0, :4] = IGNORE  # masked positions count for nothing, in either loss

    def grads(loss):
        model.zero_grad()
        loss.backward()
        return [p.grad.clone() for p in model.parameters()]

    full = F.cross_entropy(model(tokens).flatten(0, 1), targets.flatten(), ignore_index=IGNORE)
    g_full = grads(full)
    # 7 does not divide the 33 positions: the last chunk is short.
    hidden = model(tokens, return_hidden=True)
    chunked = chunked_cross_entropy(
        hidden, targets, model.embedder.weight, model.config.final_logit_softcap, 7
    )
    g_chunked = grads(chunked)
    torch.testing.assert_close(chunked, full, rtol=1e-6, atol=1e-6)
    for a, b in zip(g_chunked, g_full):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_chunked_ce_under_bf16_autocast_matches_full_logits():
    """Under autocast the head's matmuls run in bf16, as F.linear's would; loss and gradients
    stay within bf16 rounding of the full-logits loss under the same autocast."""
    model = small_model("tiny-gemma2")
    tokens, targets = torch.randint(0, 256, (2, 24)), torch.randint(0, 256, (2, 24))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        full = F.cross_entropy(model(tokens).float().flatten(0, 1), targets.flatten())
    (g_full,) = torch.autograd.grad(full, [model.embedder.weight])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        hidden = model(tokens, return_hidden=True)
        chunked = chunked_cross_entropy(
            hidden, targets, model.embedder.weight, model.config.final_logit_softcap, 5
        )
    (g_chunked,) = torch.autograd.grad(chunked, [model.embedder.weight])
    assert g_chunked.dtype == torch.float32
    torch.testing.assert_close(chunked, full, rtol=2e-2, atol=2e-2)
    assert (g_chunked - g_full).norm() < 0.05 * g_full.norm()


def test_chunked_ce_keeps_no_logits_for_backward():
    """What the graph keeps for backward is gradients the size of the hidden states [N, D] and
    of the embedding [V, D], never logits [N, V]."""
    model = small_model()
    hidden = model(torch.randint(0, 256, (2, 64)), return_hidden=True)
    targets = torch.randint(0, 256, (2, 64))
    loss = chunked_cross_entropy(hidden, targets, model.embedder.weight, None, 16)
    node = loss.grad_fn
    while "ChunkedHeadLoss" not in type(node).__name__:
        node = node.next_functions[0][0]
    shapes = {tuple(t.shape) for t in node.saved_tensors}
    assert shapes == {(128, 64), (256, 64)}


def test_activation_checkpointing_same_loss_and_grads():
    model, tokens = small_model(), torch.randint(0, 256, (2, 16))
    batch = {"tokens": tokens, "targets": tokens.roll(-1, 1)}
    loss = next_token_loss(model, batch)
    loss.backward()
    want = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    checkpoint_blocks(model)
    loss2 = next_token_loss(model, batch)
    loss2.backward()
    assert loss2.item() == pytest.approx(loss.item(), rel=1e-6)
    for p, g in zip(model.parameters(), want):
        torch.testing.assert_close(p.grad, g)
    assert "blocks.0.attn.q_proj.weight" in model.state_dict()  # names unchanged


def test_schedule_warmup_then_cosine_to_floor():
    kw = dict(lr=1.0, min_lr=0.1, warmup_steps=10, total_steps=110)
    assert lr_at(0, **kw) == pytest.approx(0.1)
    assert lr_at(9, **kw) == pytest.approx(1.0)
    assert lr_at(10, **kw) == pytest.approx(1.0)
    assert lr_at(60, **kw) == pytest.approx(0.55)  # halfway down the cosine
    assert lr_at(110, **kw) == pytest.approx(0.1)
    assert lr_at(500, **kw) == pytest.approx(0.1)
    assert all(lr_at(s, **kw) >= lr_at(s + 1, **kw) for s in range(10, 120))


def test_optimizer_decays_matrices_only():
    model = small_model()
    opt = build_optimizer(model, build_recipe({"data": {"synthetic": True}}).optimizer)
    decayed = {id(p) for p in opt.param_groups[0]["params"]}
    names = {n for n, p in model.named_parameters() if id(p) in decayed}
    assert "blocks.0.mlp.gate_proj.weight" in names
    assert "embedder.weight" not in names
    assert not any("norm" in n for n in names)
    assert opt.param_groups[1]["weight_decay"] == 0.0


def test_recipe_overrides_and_errors(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("data:\n  train: shards\noptimizer:\n  lr: 3e-4\n")
    r = load_recipe(path, ["optimizer.lr=1e-3", "training.compile=true", "eval.interval=5"])
    assert r.optimizer.lr == 1e-3 and r.training.compile is True and r.eval.interval == 5
    assert r.data.train == ["shards"]  # one dir is a list of one
    assert load_recipe(path).optimizer.lr == 3e-4  # YAML reads 3e-4 as a string
    with pytest.raises(RecipeError, match="'optimizer.lrr'"):
        load_recipe(path, ["optimizer.lrr=1"])
    path.write_text("data:\n  train: s\ntraining:\n  stepz: 3\n")
    with pytest.raises(RecipeError, match=r"r\.yaml: unknown key 'training\.stepz'"):
        load_recipe(path)
    with pytest.raises(RecipeError, match="training.steps must be int"):
        build_recipe({"data": {"synthetic": True}, "training": {"steps": "many"}})
    with pytest.raises(RecipeError, match="distributed.mode must be one of"):
        build_recipe({"data": {"synthetic": True}}, ["distributed.mode=zero"])


def test_cli_reports_unknown_key(tmp_path, capsys):
    from gemmakit.cli import main

    path = tmp_path / "r.yaml"
    path.write_text("data:\n  synthetic: true\n")
    assert main(["pretrain", str(path), "--set", "optimizer.nope=1"]) == 2
    assert "unknown key 'optimizer.nope'" in capsys.readouterr().err


def test_synthetic_batches_match_sampler_contract():
    """World 2 at step s holds the rows a world of 1 reads at steps 2s and 2s+1."""
    src = SyntheticTokens(97)
    one = src.batches(8, 2, seed=3)
    rows = np.concatenate([next(one), next(one)])
    r0 = next(src.batches(8, 2, 0, 2, seed=3))
    r1 = next(src.batches(8, 2, 1, 2, seed=3))
    np.testing.assert_array_equal(np.concatenate([r0, r1]), rows)
    assert rows.max() < 97 and rows.shape == (4, 9)


def write_shards(directory, seed=0, docs=60):
    from gemmakit.data.shards import ShardWriter

    rng = np.random.default_rng(seed)
    with ShardWriter(directory, eos_id=1, bos_id=2, shard_tokens=500, val_fraction=0.2) as w:
        for i in range(docs):
            w.add(np.concatenate([[2], rng.integers(3, 256, 40)]), key=f"doc{i}")


def test_pretrain_on_token_shards(tmp_path):
    from gemmakit import load_model

    write_shards(tmp_path / "shards")
    recipe = tiny_recipe(
        tmp_path / "run", data={"synthetic": False, "train": [str(tmp_path / "shards")]}
    )
    result = pretrain(recipe)
    assert result.steps == 6 and len(result.losses) == 6
    assert all(math.isfinite(x) for x in result.losses)
    assert [s for s, _ in result.val_losses] == [3, 6]
    model = load_model(result.checkpoint)  # the checkpoint is a plain HF directory
    assert model.config.vocab_size == 256 and model.config.n_layers == 2
    with pytest.raises(ValueError, match="already holds checkpoints"):
        pretrain(recipe)


def test_pretrain_rejects_token_ids_beyond_vocab(tmp_path):
    from gemmakit.data.shards import ShardWriter

    with ShardWriter(tmp_path / "shards", eos_id=1) as w:
        w.add(np.arange(200, 300), key="big")
    recipe = tiny_recipe(
        tmp_path / "run", data={"synthetic": False, "train": [str(tmp_path / "shards")]}
    )
    with pytest.raises(ValueError, match="outside the model's vocabulary of 256"):
        pretrain(recipe)


def test_pretrain_on_a_weighted_mixture(tmp_path):
    write_shards(tmp_path / "web", seed=1)
    write_shards(tmp_path / "code", seed=2)
    dirs = [str(tmp_path / "web"), str(tmp_path / "code")]
    recipe = tiny_recipe(
        tmp_path / "run",
        training={"steps": 3},
        data={"synthetic": False, "train": dirs, "weights": [0.7, 0.3]},
    )
    result = pretrain(recipe)
    assert len(result.losses) == 3 and result.val_losses[-1][0] == 3


@pytest.mark.parametrize("name", ["tiny", "gemma-2b", "gemma-7b"])
def test_shipped_recipes_load(name):
    from pathlib import Path

    recipe = load_recipe(Path(__file__).parents[1] / "recipes" / f"{name}.yaml")
    assert recipe.model.preset == name
    if name != "tiny":
        assert recipe.training.seq_len == 8192  # the report's context length
        assert recipe.training.activation_checkpointing and recipe.distributed.mode == "fsdp"


def test_recipe_init_std_and_installed_checkpoint_vocab():
    from gemmakit.installed import installed_model_path
    from gemmakit.training.loop import build_model_for
    from gemmakit.training.recipe import as_recipe

    wide = as_recipe({"model": {"preset": "tiny", "init_std": 0.5}, "data": {"synthetic": True}})
    std = build_model_for(wide, None).blocks[0].mlp.up_proj.weight.std().item()
    assert 0.45 < std < 0.55  # the recipe's init_std, not the default 0.02
    try:
        have_270m = installed_model_path("gemma3-270m") is not None
    except ModuleNotFoundError:
        have_270m = False
    if have_270m:  # an installed model's name works as model.checkpoint
        named = as_recipe({"model": {"checkpoint": "gemma3-270m"}, "data": {"synthetic": True}})
        assert build_model_for(named, None).config.vocab_size == 262144


def test_cpu_peak_for_mfu_is_never_below_the_float32_rate(monkeypatch):
    from gemmakit.training import metrics

    rates = {torch.float32: 100e9, torch.bfloat16: 1e9}  # an AVX2 CPU emulating bf16
    monkeypatch.setattr(metrics, "measured_peak_flops", lambda dev, dtype: rates[dtype])
    assert metrics.peak_flops(torch.device("cpu"), torch.bfloat16) == 100e9
    assert metrics.peak_flops(torch.device("cpu"), torch.float32) == 100e9
    rates[torch.bfloat16] = 300e9  # native bf16 (AMX): its own, higher rate
    assert metrics.peak_flops(torch.device("cpu"), torch.bfloat16) == 300e9
    assert metrics.peak_flops(torch.device("cpu"), torch.bfloat16, override=5.0) == 5.0


# --- what MFU and tokens/s count --------------------------------------------------------------


def test_flops_leave_out_frozen_weights_gradients_and_logits_without_a_target():
    """Full training at every position is PaLM's 6N + attention per token. LoRA's frozen base
    computes no weight gradients: 4 FLOPs per base weight, not 6 (counting 6 made the real
    270M's LoRA MFU read 211% on a CPU); the head costs only where the loss takes logits."""
    from gemmakit.model.lora import LoRASpec, apply_lora
    from gemmakit.training.metrics import StepFlops, train_flops_per_token

    model = small_model()
    cfg, T = model.config, 16
    full = StepFlops.of(model, T)
    assert full(1, 1) == pytest.approx(train_flops_per_token(cfg, T), rel=1e-12)
    apply_lora(model, LoRASpec(4, 8.0, 0.0, ("q_proj", "down_proj")))
    adapters = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    base = cfg.non_embedding_params()
    head = cfg.vocab_size * cfg.d_model
    lora = StepFlops.of(model, T)
    assert adapters > 0 and lora.per_logit == 4 * head
    assert lora.per_token == full.per_token - 2 * base + 6 * adapters
    # Per trained token the LoRA step is the full one less the weight-gradient share.
    assert full(1, 1) - lora(1, 1) == 2 * base + 2 * head - 6 * adapters
    # Prompt tokens (no target) cost the body alone.
    assert lora(10, 4) == 10 * lora.per_token + 4 * lora.per_logit


def test_forward_flops_are_a_third_of_full_training():
    """A forward pass without gradients (a teacher, a reference, sampling) is 2 FLOPs per
    weight per token and a third of the attention of a trained token: a third of what full
    training costs per token and per logit."""
    from gemmakit.training.metrics import StepFlops, forward_flops

    model = small_model()
    cfg, T = model.config, 16
    full = StepFlops.of(model, T)
    assert forward_flops(cfg, 1, 0, T) == pytest.approx(full.per_token / 3, rel=1e-12)
    assert forward_flops(cfg, 0, 1, T) == pytest.approx(full.per_logit / 3, rel=1e-12)
    assert forward_flops(cfg, 7, 3, T) == pytest.approx(full(7, 3) / 3, rel=1e-12)
    # attention grows with the keys attended to
    assert forward_flops(cfg, 1, 0, 2 * T) > forward_flops(cfg, 1, 0, T)


def test_a_batchs_flops_entry_counts_in_mfu(tmp_path):
    """What a stage spends outside the trained model (its batches' "flops": sampling, a
    reference, a teacher) is added to the step's FLOPs, once per micro-batch."""
    from gemmakit.training.loop import train
    from gemmakit.training.losses import FLOPS, windows_to_batch
    from gemmakit.training.metrics import StepFlops, read_metrics
    from gemmakit.training.recipe import as_recipe

    recipe = tiny_recipe(tmp_path, eval={"interval": 0}, checkpoint={"interval": 0})
    recipe["training"]["steps"] = 2
    recipe["log"]["peak_flops"] = 1e12
    extra = 3.5e6

    def batches(env, start):
        gen = torch.Generator().manual_seed(start)
        while True:
            yield {**windows_to_batch(torch.randint(0, 64, (2, 17), generator=gen)), FLOPS: extra}

    train(as_recipe(recipe), next_token_loss, batches)
    model = small_model()
    per_step = StepFlops.of(model, 16)(64, 64) + 2 * extra  # 2 micro-batches of 2 x 16
    steps = [r for r in read_metrics(tmp_path) if "loss" in r]
    assert len(steps) == 2
    for r in steps:
        assert r["mfu"] * r["step_s"] * 1e12 == pytest.approx(per_step, rel=1e-9)


@pytest.mark.parametrize("bad", ["lots", None, -1.0, float("nan"), float("inf"), [1, 2]])
def test_a_bad_flops_entry_is_refused_naming_it(tmp_path, bad):
    """A stage's batch whose "flops" is not a finite number >= 0 stops the run at its first
    step with one line naming the entry and the value; no checkpoint is written."""
    from gemmakit.errors import DataError
    from gemmakit.training.loop import train
    from gemmakit.training.losses import FLOPS, windows_to_batch
    from gemmakit.training.recipe import as_recipe

    recipe = tiny_recipe(tmp_path / "run", eval={"interval": 0}, checkpoint={"interval": 1})

    def batches(env, start):
        while True:
            yield {**windows_to_batch(torch.zeros(2, 17, dtype=torch.long)), FLOPS: bad}

    with pytest.raises(DataError) as err:
        train(as_recipe(recipe), next_token_loss, batches)
    message = str(err.value)
    assert '"flops"' in message and repr(bad) in message and "\n" not in message
    assert not list((tmp_path / "run").rglob("step_*"))


def test_peak_is_measured_with_the_runs_threads(monkeypatch):
    """The CPU peak is measured (and cached) per thread count: a peak taken with 1 thread
    for a 2-thread run would halve it and double MFU."""
    from gemmakit.training import metrics

    calls = []

    def rate(device_type, dtype, threads):
        calls.append(threads)
        return threads * 1e9

    monkeypatch.setattr(metrics, "_matmul_rate", rate)
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            assert metrics.peak_flops(torch.device("cpu"), torch.float32) == n * 1e9
    finally:
        torch.set_num_threads(threads)
    assert calls == [1, 2]


def test_count_positions_of_each_stages_batches():
    """tokens/s counts positions holding a token (not padding) and MFU's head term the
    positions with a target: packed SFT rows, unpacked ones, preference pairs (a reward model
    takes no next-token logits), pretraining windows (all of both)."""
    from gemmakit.training.conversations import Example, collate
    from gemmakit.training.loop import count_positions
    from gemmakit.training.losses import windows_to_batch
    from gemmakit.training.preferences import EncodedPair, Side, collate_pairs

    def ex(n, targets):
        return Example(np.arange(n) + 4, np.array([IGNORE] * (n - targets) + [5] * targets))

    examples = [ex(5, 2), ex(3, 1), ex(7, 4)]
    for packed in (True, False):
        rows = [[0, 1], [2]] if packed else [[0], [1], [2]]
        batch = collate(examples, rows, 16, 0, packed)
        assert count_positions(batch) == (15, 7)
    side = Side(np.arange(6) + 4, np.array([False] * 3 + [True] * 3))
    short = Side(np.arange(4) + 4, np.array([False] * 3 + [True]))
    pairs = [EncodedPair(side, short)]
    assert count_positions(collate_pairs(pairs, 0)) == (10, 3 + 1)  # predicting a response id
    assert count_positions(collate_pairs(pairs, 0, targets=False)) == (10, 0)
    assert count_positions(windows_to_batch(torch.zeros(2, 9, dtype=torch.long))) == (16, 16)
