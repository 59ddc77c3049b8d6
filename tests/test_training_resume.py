"""A run killed with SIGKILL and resumed gives the losses of an uninterrupted run, and two
processes (FSDP2 or DDP over gloo) give the losses of one process with the same global batch."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from helpers import (
    CONSTANT_LR,
    kill_after_checkpoint,
    losses,
    tiny_recipe,
    torchrun,
    write_recipe,
)

from gemmakit.training.metrics import read_metrics
from gemmakit.training.pretrain import pretrain
from gemmakit.training.state import latest_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "gemmakit.cli", "pretrain", *args]


def test_kill_9_then_resume_matches_uninterrupted_run(tmp_path):
    steps = 40
    sections = dict(
        training={"steps": steps}, checkpoint={"interval": 10, "keep": 1}, eval={"interval": 0}
    )
    torch.set_num_threads(1)  # the same threads as the subprocess, so the same float sums
    try:
        whole = pretrain(tiny_recipe(tmp_path / "whole", **sections))
        recipe_path = write_recipe(tmp_path / "r.yaml", tiny_recipe(tmp_path / "cut", **sections))
        kill_after_checkpoint(cli(str(recipe_path)), tmp_path / "cut", 10)
        done = losses(tmp_path / "cut")
        assert 10 <= len(done) < steps
        # A checkpoint save cut short leaves a hidden temporary, which resume ignores.
        (tmp_path / "cut" / "checkpoints" / ".step_0000099.x").mkdir()
        resumed = pretrain(tiny_recipe(tmp_path / "cut", **sections), resume=True)
    finally:
        torch.set_num_threads(2)
    assert resumed.steps == steps and len(resumed.losses) < steps
    got = losses(tmp_path / "cut")
    assert len(got) == steps  # the steps after the checkpoint were dropped, then rerun
    torch.testing.assert_close(torch.tensor(got), torch.tensor(whole.losses), rtol=1e-5, atol=0)
    assert latest_checkpoint(tmp_path / "cut").name == f"step_{steps:07d}"
    assert not list((tmp_path / "cut" / "checkpoints").glob(".step_*"))


@pytest.mark.parametrize("mode", ["fsdp", "ddp"])
def test_two_processes_match_one(tmp_path, mode):
    """Micro-batch 2: one process accumulates 2 of them, two processes take one each. The
    FSDP run is stopped after 2 steps and resumed from its gathered checkpoint."""
    from gemmakit import load_model

    base = dict(optimizer=CONSTANT_LR, eval={"interval": 2}, checkpoint={"interval": 2})
    steps = 4 if mode == "fsdp" else 2
    single = pretrain(tiny_recipe(tmp_path / "one", training={"steps": steps}, **base))

    recipe = tiny_recipe(tmp_path / mode, training={"steps": 2}, **base)
    recipe["distributed"] = {"mode": mode}
    path = write_recipe(tmp_path / "r.yaml", recipe)
    torchrun("pretrain", path)
    if mode == "fsdp":
        # load a sharded run's state
        torchrun("pretrain", path, "--resume", "--set", "training.steps=4")
    got = losses(tmp_path / mode)
    torch.testing.assert_close(torch.tensor(got), torch.tensor(single.losses), rtol=1e-4, atol=0)
    val = [r["val_loss"] for r in read_metrics(tmp_path / mode) if "val_loss" in r]
    want = torch.tensor([v for _, v in single.val_losses])
    torch.testing.assert_close(torch.tensor(val), want, rtol=1e-4, atol=0)
    a = load_model(latest_checkpoint(tmp_path / mode)).state_dict()
    b = load_model(single.checkpoint).state_dict()
    for key in b:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)
