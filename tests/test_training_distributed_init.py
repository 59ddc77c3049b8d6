"""Under FSDP no rank but 0 ever holds the whole model: every rank builds the model on the meta
device, FSDP shards it, and rank 0 sends each rank its shard of the weights (a fresh init, a
starting checkpoint or a resumed run), which train exactly as one process does."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch
from helpers import CONSTANT_LR, SMALL, losses, subprocess_env, tiny_recipe, write_recipe

from gemmakit.api import build_model
from gemmakit.checkpoint import save_hf
from gemmakit.config import get_config
from gemmakit.training.pretrain import pretrain

# Runs pretrain under torchrun and records, on each rank, the devices of the parameters that
# fully_shard receives and how many whole models the rank built or loaded.
PROBE = """
import json, os, sys
import torch.distributed.fsdp as fsdp
import gemmakit.api as api
from gemmakit.training.pretrain import pretrain

seen = {"devices": set(), "whole_models": 0}
def counted(fn):
    def run(*args, **kwargs):
        seen["whole_models"] += 1
        return fn(*args, **kwargs)
    return run
api.init_weights, api.load_checkpoint = counted(api.init_weights), counted(api.load_checkpoint)
shard = fsdp.fully_shard
def probe_shard(module, **kwargs):
    seen["devices"].update(str(p.device) for p in module.parameters())
    return shard(module, **kwargs)
fsdp.fully_shard = probe_shard

pretrain(sys.argv[1], resume="--resume" in sys.argv)
seen["devices"] = sorted(seen["devices"])
with open(os.path.join(sys.argv[2], f"rank{os.environ['RANK']}.json"), "w") as f:
    json.dump(seen, f)
"""


def torchrun_probe(tmp_path: Path, recipe: dict, *args: str) -> list[dict]:
    """Two gloo ranks of FSDP pretraining on `recipe`; what each rank's probe saw."""
    script, out = tmp_path / "probe.py", tmp_path / "probe"
    script.write_text(PROBE)
    out.mkdir(exist_ok=True)
    for old in out.glob("rank*.json"):
        old.unlink()
    path = write_recipe(tmp_path / "r.yaml", {**recipe, "distributed": {"mode": "fsdp"}})
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        str(script),
        str(path),
        str(out),
        *args,
    ]
    run = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def assert_only_rank0_held_the_model(seen: list[dict]) -> None:
    for rank in seen:
        assert rank["devices"] == ["meta"]  # sharded before any weight existed
    assert seen[0]["whole_models"] == 1  # rank 0 builds or loads the weights once
    assert seen[1]["whole_models"] == 0  # rank 1 only ever gets its shards


def test_fresh_fsdp_init_on_meta_matches_one_process(tmp_path):
    base = dict(optimizer=CONSTANT_LR, eval={"interval": 0}, checkpoint={"interval": 0})
    single = pretrain(tiny_recipe(tmp_path / "one", training={"steps": 2}, **base))
    seen = torchrun_probe(tmp_path, tiny_recipe(tmp_path / "fsdp", training={"steps": 2}, **base))
    assert_only_rank0_held_the_model(seen)
    got = torch.tensor(losses(tmp_path / "fsdp"))
    torch.testing.assert_close(got, torch.tensor(single.losses), rtol=1e-4, atol=0)


def test_fsdp_start_from_checkpoint_then_resume_matches_one_process(tmp_path):
    """Both loads (the starting checkpoint, then the run's own with its optimizer state) are
    rank 0's alone; the losses are one process's."""
    start = tmp_path / "start"
    save_hf(build_model(get_config("tiny").replace(**SMALL), seed=7), start)
    base = dict(optimizer=CONSTANT_LR, eval={"interval": 0}, checkpoint={"interval": 2})

    def recipe(run: str, steps: int) -> dict:
        r = tiny_recipe(tmp_path / run, training={"steps": steps}, **base)
        return {**r, "model": {"preset": None, "checkpoint": str(start)}}

    single = pretrain(recipe("one", 3))
    assert_only_rank0_held_the_model(torchrun_probe(tmp_path, recipe("fsdp", 2)))
    assert_only_rank0_held_the_model(torchrun_probe(tmp_path, recipe("fsdp", 3), "--resume"))
    got = torch.tensor(losses(tmp_path / "fsdp"))
    torch.testing.assert_close(got, torch.tensor(single.losses), rtol=1e-4, atol=0)
