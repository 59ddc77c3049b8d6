"""How a stage plugs into train(), and what a run checks and cleans before and while it runs:
the adapt_model hook, one checkpoint open, the context length, paths named by the recipe,
leftover checkpoint temporaries, a full disk, a torn metrics line, RNG states across a resume,
and no progress bar into a file."""

from __future__ import annotations

import errno
import functools
import io
import json
import random
import warnings

import numpy as np
import pytest
import torch

from gemmakit.api import build_model
from gemmakit.checkpoint import save_hf
from gemmakit.config import get_config
from gemmakit.errors import CheckpointError, ConfigError, DataError, MissingFileError
from gemmakit.training import loop, metrics, state
from gemmakit.training.distributed import DistEnv
from gemmakit.training.losses import next_token_loss, windows_to_batch
from gemmakit.training.metrics import MetricsLog, read_metrics
from gemmakit.training.pretrain import pretrain
from gemmakit.training.recipe import RecipeError, as_recipe
from gemmakit.training.samplers import SyntheticTokens, eval_windows

SMALL = {
    "vocab_size": 256,
    "d_model": 64,
    "n_layers": 2,
    "n_heads": 2,
    "n_kv_heads": 1,
    "head_dim": 32,
    "ffn_dim": 128,
}


def recipe(run_dir, steps: int = 4, **sections) -> dict:
    r = {
        "run_dir": str(run_dir),
        "model": {"preset": "tiny", "config_overrides": SMALL},
        "data": {"synthetic": True},
        "training": {
            "steps": steps,
            "seq_len": 16,
            "batch_size": 4,
            "micro_batch_size": 2,
            "dtype": "float32",
        },
        "optimizer": {"lr": 1e-2, "min_lr": 1e-3, "warmup_steps": 1},
        "eval": {"interval": 0},
        "checkpoint": {"interval": 2, "keep": 1},
        # a known peak: no matmuls measured for MFU (seconds on a small CPU)
        "log": {"progress": False, "tensorboard": False, "peak_flops": 1e12},
    }
    for section, values in sections.items():
        r[section] = {**r.get(section, {}), **values}
    return r


def synthetic_batches(vocab: int, seq_len: int, micro: int):
    def make(env: DistEnv, start: int):
        src = SyntheticTokens(vocab).batches(seq_len, micro, env.rank, env.world_size, 0, start)
        return (windows_to_batch(torch.from_numpy(w)) for w in src)

    return make


# --- a stage plugs in -------------------------------------------------------------------------


def test_adapt_model_hook_freezes_what_a_stage_asks(tmp_path):
    seen = []

    def freeze_embedding(model, resume_from=None):
        seen.append(model)
        model.embedder.weight.requires_grad_(False)

    r = as_recipe(recipe(tmp_path / "run", steps=3))
    start = build_model(get_config("tiny").replace(**SMALL), dtype=torch.float32, seed=0)
    result = loop.train(
        r,
        functools.partial(next_token_loss, chunk_tokens=0),
        synthetic_batches(256, 16, 2),
        adapt_model=freeze_embedding,
    )
    assert len(seen) == 1 and result.steps == 3 and all(np.isfinite(result.losses))
    trained = seen[0]
    torch.testing.assert_close(trained.embedder.weight, start.embedder.weight)  # frozen
    assert not torch.equal(trained.blocks[0].mlp.up_proj.weight, start.blocks[0].mlp.up_proj.weight)


def test_pretrain_opens_a_starting_checkpoint_once(tmp_path, monkeypatch):
    ckpt = tmp_path / "start"
    save_hf(build_model(get_config("tiny").replace(**SMALL), seed=3), ckpt)
    opened = []
    real = loop.load_model
    monkeypatch.setattr(loop, "load_model", lambda *a, **k: opened.append(a) or real(*a, **k))
    r = recipe(tmp_path / "run", steps=2)
    r["model"] = {"preset": None, "checkpoint": str(ckpt)}
    result = pretrain(r)
    assert len(opened) == 1 and result.steps == 2


# --- checked before the first step ------------------------------------------------------------


def test_seq_len_beyond_the_models_context_is_a_config_error(tmp_path):
    r = recipe(tmp_path / "run", training={"seq_len": 513})  # tiny: 512 positions
    with pytest.raises(RecipeError, match=r"training.seq_len=513 is beyond the model's context"):
        pretrain(r)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # no step was run


@pytest.mark.parametrize(
    "override, names",
    [
        ("data.tokenizer={}/nonexistent.model", "nonexistent.model"),
        ("data.train={}/no-shards", "no-shards"),
        ("data.valid={}/no-val", "no-val"),
        ("model.checkpoint={}/no-model", "no-model"),
    ],
)
def test_every_path_a_recipe_names_is_checked_before_the_first_step(
    tmp_path, capsys, override, names
):
    from gemmakit.cli import main

    path = tmp_path / "r.yaml"
    r = recipe(tmp_path / "run")
    if "data.train" in override or "data.valid" in override:
        r["data"] = {"train": [str(tmp_path / "shards")]}
        from gemmakit.data.shards import ShardWriter

        with ShardWriter(tmp_path / "shards", eos_id=1, val_fraction=0.3) as w:
            for i in range(20):
                w.add(np.arange(3, 60), key=f"d{i}")
    path.write_text(json.dumps(r))
    code = main(["pretrain", str(path), "--set", override.format(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and names in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


# --- checkpoints: temporaries and a full disk ---------------------------------------------------


def test_leftover_temporaries_of_every_kind_are_removed(tmp_path):
    root = tmp_path / "run" / "checkpoints"
    leftovers = [".step_0000002.abc", "..step_0000002.abc.xyz", ".step_0000004.q"]
    for name in leftovers:
        (root / name).mkdir(parents=True)
        (root / name / "model.safetensors").write_bytes(b"partial")
    (root / "notes.txt").write_text("mine")  # not ours: kept
    pretrain(recipe(tmp_path / "run", steps=2), resume=True)
    names = sorted(p.name for p in root.iterdir())
    assert names == ["notes.txt", "step_0000002"]


def test_remove_temporaries_runs_at_every_save(tmp_path):
    root = tmp_path / "checkpoints"
    (root / "..step_0000001.a.b").mkdir(parents=True)
    (root / "step_0000001").mkdir()
    state.remove_temporaries(tmp_path)
    assert [p.name for p in root.iterdir()] == ["step_0000001"]


@pytest.mark.parametrize("failure", ["torch", "enospc"])
def test_disk_full_during_a_checkpoint_is_one_line_naming_the_path(tmp_path, monkeypatch, failure):
    if failure == "torch":  # what torch's zip writer raises when a write comes up short

        def full(*args, **kwargs):
            raise RuntimeError("[enforce fail at inline_container.cc:778] . unexpected pos 64 vs 0")

        monkeypatch.setattr(state.torch, "save", full)
        usage = state.shutil.disk_usage(tmp_path)
        monkeypatch.setattr(state.shutil, "disk_usage", lambda p: usage._replace(free=4096))
    else:

        def full(*args, **kwargs):
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(state, "save_hf", full)
    with pytest.raises(CheckpointError, match=r"step_0000002: no space left on device") as e:
        pretrain(recipe(tmp_path / "run", steps=2))
    assert "\n" not in str(e.value)
    root = tmp_path / "run" / "checkpoints"
    assert not [p for p in root.iterdir()]  # nothing half-written


def test_a_failed_write_with_space_left_keeps_its_traceback(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(state.torch, "save", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        pretrain(recipe(tmp_path / "run", steps=2))


# --- metrics.jsonl ------------------------------------------------------------------------------


def test_a_torn_last_metrics_line_does_not_block_resume(tmp_path):
    run = tmp_path / "run"
    whole = pretrain(recipe(tmp_path / "whole", steps=4))
    pretrain(recipe(run, steps=2))
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 5.1')  # killed mid-write
    with pytest.warns(UserWarning, match=r"metrics.jsonl:3: dropped a torn last line"):
        resumed = pretrain(recipe(run, steps=4), resume=True)
    assert resumed.steps == 4
    got = [r["loss"] for r in read_metrics(run)]
    torch.testing.assert_close(torch.tensor(got), torch.tensor(whole.losses), rtol=1e-5, atol=0)


def test_metrics_rewrite_on_resume_is_atomic_and_a_bad_middle_line_is_named(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n')
    MetricsLog(tmp_path, tensorboard=False, resume_step=2).close()
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]  # no temporary left
    path.write_text('{"step": 1}\nnot json\n{"step": 3}\n')
    with pytest.raises(DataError, match=r"metrics.jsonl:2: not a JSON record"):
        MetricsLog(tmp_path, tensorboard=False, resume_step=2)


# --- RNG states ---------------------------------------------------------------------------------


def rng_after(fn) -> tuple:
    fn()
    return torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()


def test_measuring_the_peak_for_mfu_leaves_the_global_rng_alone():
    """It runs once per process, so a resumed process would otherwise draw from the RNG
    after restoring it, where the uninterrupted one drew before saving."""
    before = torch.get_rng_state()
    metrics._matmul_rate.__wrapped__("cpu", torch.float32, 1)
    assert torch.equal(torch.get_rng_state(), before)


def test_rng_states_after_resume_equal_an_uninterrupted_runs(tmp_path):
    torch.manual_seed(123)  # whatever state the caller left: the run seeds its own
    whole = rng_after(lambda: pretrain(recipe(tmp_path / "whole", steps=4)))
    rng_after(lambda: pretrain(recipe(tmp_path / "cut", steps=2)))
    torch.manual_seed(456)
    np.random.seed(7)
    random.seed(8)
    resumed = rng_after(lambda: pretrain(recipe(tmp_path / "cut", steps=4), resume=True))
    assert torch.equal(whole[0], resumed[0])
    np.testing.assert_array_equal(whole[1], resumed[1])
    assert whole[2] == resumed[2]


def test_python_and_numpy_rngs_are_seeded_from_the_recipe_and_saved(tmp_path):
    result = pretrain(recipe(tmp_path / "run", steps=2, training={"seed": 5}))
    assert random.random() == random.Random(5).random()
    assert np.random.random() == np.random.RandomState(5).random()
    saved = state.read_train_state(result.checkpoint)
    assert len(saved["rng"]) == 1 and {"python", "numpy", "torch"} <= set(saved["rng"][0])


# --- output -------------------------------------------------------------------------------------


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_no_progress_bar_unless_output_is_a_terminal(tmp_path, monkeypatch):
    r = as_recipe(recipe(tmp_path / "run", log={"progress": True}))
    env = DistEnv(0, 1, 0, torch.device("cpu"))
    monkeypatch.setattr("sys.stdout", io.StringIO())
    monkeypatch.setattr("sys.stderr", io.StringIO())
    assert loop._progress_bar(r, 0, env) is None
    monkeypatch.setattr("sys.stdout", Terminal())
    assert loop._progress_bar(r, 0, env) is None  # the bar would go to a redirected stderr
    monkeypatch.setattr("sys.stderr", Terminal())
    bar = loop._progress_bar(r, 0, env)
    assert bar is not None
    bar.close()


def test_a_run_into_a_file_writes_log_lines_only(tmp_path, capfd):
    pretrain(recipe(tmp_path / "run", steps=4, log={"progress": True, "interval": 2}))
    out, err = capfd.readouterr()
    assert "\r" not in out + err
    assert [line.split()[1] for line in out.splitlines() if line.startswith("step")] == [
        "2/4",
        "4/4",
    ]


# --- samplers -----------------------------------------------------------------------------------


def test_eval_windows_take_every_window_once_or_as_many_as_asked(tmp_path):
    from gemmakit.data.shards import ShardWriter, TokenShards

    with ShardWriter(tmp_path / "s", eos_id=1, val_fraction=0.5) as w:
        for i in range(40):
            w.add(np.arange(3, 40), key=f"d{i}")
    val = TokenShards(tmp_path / "s").held_out()[0]
    finite = list(eval_windows([val], 16, 2, 0, 1, max_batches=10_000))
    assert sum(len(b) for b in finite) == val.num_windows(16)
    endless = list(eval_windows(SyntheticTokens(50).held_out(), 16, 2, 0, 1, max_batches=6))
    assert len(endless) == 6


def test_unknown_model_override_and_errors_name_the_key():
    with pytest.raises(ConfigError, match="model.config_overrides.vocab"):
        loop.model_config(as_recipe(recipe("x", model={"config_overrides": {"vocab": 3}})))


def test_missing_train_dir_fails_before_the_model_is_built(tmp_path, monkeypatch):
    built = []
    monkeypatch.setattr(loop, "build_model_for", lambda *a: built.append(a))
    r = recipe(tmp_path / "run", data={"synthetic": False, "train": [str(tmp_path / "none")]})
    with pytest.raises(MissingFileError, match="none"):
        pretrain(r)
    assert not built


def test_no_warning_on_a_clean_resume(tmp_path):
    pretrain(recipe(tmp_path / "run", steps=2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pretrain(recipe(tmp_path / "run", steps=4), resume=True)
