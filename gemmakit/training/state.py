"""Training checkpoints: save and resume a run, atomically.

A checkpoint is a directory `RUN/checkpoints/step_0000100/` holding
- config.json + model.safetensors (gemmakit.checkpoint.save_hf), so `gemmakit.load_model(dir)`
  loads the trained model directly; in a LoRA run instead the adapter alone, in PEFT's format
  (gemmakit.checkpoint.peft), for `load_model(base, adapter=dir)`;
- train_state.pt (torch.save, read back with weights_only=True): optimizer state keyed by
  parameter name, the step, the data position, each rank's RNG states, the recipe, and the
  parameters of the loss itself if it has any (a reward head);
- tokenizer.model when the recipe names one.
A loss with parameters of its own says how they are saved beside the model with
`checkpoint_head(params) -> (HF key -> tensor, config.json fields, PEFT task_type)`: a reward
model's checkpoint is then HF's Gemma*ForSequenceClassification (or its PEFT adapter).
It is written under a hidden temporary name and renamed into place when complete, so a run
killed at any moment leaves either the whole checkpoint or none.
"""

from __future__ import annotations

import errno
import os
import random
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from gemmakit.checkpoint import save_hf
from gemmakit.checkpoint.peft import spec_of, write_lora
from gemmakit.errors import CheckpointError, MissingFileError
from gemmakit.model.transformer import Gemma
from gemmakit.training.distributed import DistEnv, barrier

STATE_FILE = "train_state.pt"
_STEP_DIR = re.compile(r"^step_(\d+)$")
# What a save killed midway leaves: the checkpoint's temporary folder `.step_N.XXXX`, and
# save_hf's own temporary beside it, `..step_N.XXXX.YYYY`.
_TEMPORARY = re.compile(r"^\.+step_\d+\.")
_LOW_SPACE = 64 << 20  # bytes free under which a failed write is taken for a full disk


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The complete checkpoint with the highest step under `run_dir`, or None."""
    root = checkpoint_root(run_dir)
    found = []
    for d in root.glob("step_*") if root.is_dir() else []:
        m = _STEP_DIR.match(d.name)
        if m and (d / STATE_FILE).is_file():
            found.append((int(m.group(1)), d))
    return max(found)[1] if found else None


def remove_temporaries(run_dir: str | Path) -> None:
    """Delete the temporaries of checkpoint saves killed midway (rank 0, at start and save)."""
    root = checkpoint_root(run_dir)
    for d in root.iterdir() if root.is_dir() else []:
        if _TEMPORARY.match(d.name):
            shutil.rmtree(d, ignore_errors=True)


# --- RNG -----------------------------------------------------------------------------------


def rng_state() -> dict:
    """This process's RNG states, in types that torch.load(weights_only=True) accepts."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --- gather (collective under FSDP) ----------------------------------------------------------


def _full_state(loss_module: nn.Module, optimizer: torch.optim.Optimizer, env: DistEnv):
    """Full (unsharded) model and optimizer state dicts on rank 0 (None elsewhere), keyed by
    parameter name. Every rank must call this: under FSDP it gathers the shards."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    if not env.distributed:
        opts = StateDictOptions(full_state_dict=True)
    else:
        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_sd = get_model_state_dict(loss_module, options=opts)
    optim_sd = get_optimizer_state_dict(loss_module, optimizer, options=opts)
    if not env.is_main:
        return None, None
    model_sd = {k: v.detach().cpu() for k, v in model_sd.items()}
    return model_sd, optim_sd


def _gather_rng(env: DistEnv) -> list[dict]:
    state = rng_state()
    if not env.distributed:
        return [state]
    out: list = [None] * env.world_size
    dist.all_gather_object(out, state)
    return out


# --- save ------------------------------------------------------------------------------------


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    loss_module: nn.Module,
    optimizer: torch.optim.Optimizer,
    env: DistEnv,
    info: dict,
    tokenizer: str | Path | None = None,
    keep: int = 2,
) -> Path:
    """Write RUN/checkpoints/step_{step}/ atomically and prune older ones beyond `keep`.

    loss_module: the (possibly FSDP-sharded) LossModule whose `.model` is a Gemma.
    info: what the loop needs to resume (data position, recipe, ...), stored in train_state.pt.
    Every rank must call this; only rank 0 writes. Returns the checkpoint directory.
    """
    model_sd, optim_sd = _full_state(loss_module, optimizer, env)
    rngs = _gather_rng(env)
    root = checkpoint_root(run_dir)
    final = root / f"step_{step:07d}"
    if env.is_main:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=root))
        try:
            with _disk_full_names(final):
                _write(tmp, loss_module, model_sd, tokenizer, info)
                state = {
                    "step": step,
                    "optimizer": optim_sd,
                    "loss_params": {
                        k: v for k, v in model_sd.items() if not k.startswith("model.")
                    },
                    "rng": rngs,
                    **info,
                }
                torch.save(state, tmp / STATE_FILE)
            tmp.chmod(0o755)  # mkdtemp makes it private
            if final.exists():  # the same step saved again (a resumed run's final step)
                shutil.rmtree(final)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        _prune(root, keep, final)
    barrier(env)
    return final


def _write(
    tmp: Path, loss_module: nn.Module, model_sd: dict, tokenizer: str | Path | None, info: dict
) -> None:
    """The model half of a checkpoint into tmp: config.json, model.safetensors and
    tokenizer.model; in a LoRA run the adapter alone (PEFT's format), never the frozen base.
    The loss's own parameters go beside the model where the loss says how (checkpoint_head)."""
    model = loss_module.model
    gemma_sd = {k.removeprefix("model."): v for k, v in model_sd.items() if k.startswith("model.")}
    extra = {"tokenizer.model": Path(tokenizer)} if tokenizer else None
    head, config, task = {}, {}, "CAUSAL_LM"
    export = getattr(loss_module.loss_fn, "checkpoint_head", None)
    if export is not None:
        own = {
            k.removeprefix("loss_fn."): v for k, v in model_sd.items() if k.startswith("loss_fn.")
        }
        head, config, task = export(own)
    lora = {k: v for k, v in gemma_sd.items() if ".lora_" in k}
    if lora:
        base = info.get("recipe", {}).get("model", {}).get("checkpoint")
        write_lora(lora, model.config, spec_of(model), tmp, base, extra, head, task)
        return
    with torch.device("meta"):
        holder = Gemma(model.config)  # a module around the gathered tensors, for save_hf
    holder.load_state_dict(gemma_sd, assign=True)
    save_hf(holder, tmp, extra_files=extra, extra_tensors=head, config_updates=config)


@contextmanager
def _disk_full_names(final: Path) -> Iterator[None]:
    """A write that fails for want of space (ENOSPC, or torch's zip writer's "unexpected pos"
    on a full disk) becomes one CheckpointError saying so and naming the checkpoint."""
    try:
        yield
    except (OSError, RuntimeError) as e:
        full = isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)
        if not full:
            try:
                full = shutil.disk_usage(final.parent).free < _LOW_SPACE
            except OSError:
                full = False
        if not full:
            raise
        raise CheckpointError(
            f"{final}: no space left on device while writing the checkpoint "
            f"(free space on {final.parent} and --resume)"
        ) from e


def _prune(root: Path, keep: int, newest: Path) -> None:
    steps = sorted(d for d in root.glob("step_*") if _STEP_DIR.match(d.name))
    for d in steps[: max(0, len(steps) - max(keep, 1))]:
        if d != newest:
            shutil.rmtree(d, ignore_errors=True)
    remove_temporaries(root.parent)


# --- load ------------------------------------------------------------------------------------


def read_train_state(ckpt_dir: str | Path, mmap: bool = False) -> dict:
    """train_state.pt; with mmap its tensors are mapped from the file, read only when used."""
    path = Path(ckpt_dir) / STATE_FILE
    if not path.is_file():
        raise MissingFileError(f"{path}: no training state (not a training checkpoint)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # a truncated or foreign file
        raise CheckpointError(f"{path}: cannot read training state ({e})") from e


def restore(
    state: dict, loss_module: nn.Module, optimizer: torch.optim.Optimizer, env: DistEnv
) -> None:
    """Load the optimizer state (into a possibly sharded module) and this rank's RNG states.
    The model weights come from the checkpoint's safetensors when the model is built.
    Under FSDP only rank 0's optimizer state is read: it sends each rank its shards."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    from torch.distributed.tensor import DTensor

    sharded = env.distributed and any(isinstance(p, DTensor) for p in loss_module.parameters())
    full = state["optimizer"] if env.is_main or not sharded else {}
    opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=sharded)
    set_optimizer_state_dict(loss_module, optimizer, full, options=opts)
    rngs = state["rng"]
    set_rng_state(rngs[env.rank] if env.rank < len(rngs) else rngs[0])
