"""torch.distributed setup: one process per device under torchrun; FSDP2 or DDP wrapping.

A single process (no WORLD_SIZE in the environment) is world size 1 and wraps nothing.
Multi-node runs use torchrun's rendezvous, e.g. on each of 2 nodes:
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d \
        --rdzv-endpoint HOST:29500 --rdzv-id RUN -m gemmakit.cli pretrain recipes/gemma-2b.yaml
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from gemmakit.errors import CheckpointError, ConfigError


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("training.device is cuda but no CUDA device is available")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device(name)


def init(device: str = "auto", backend: str = "auto") -> DistEnv:
    """Join the process group that torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_*),
    or return a world of one. backend auto: nccl on GPU, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device, local_rank)
    if world > 1 and not dist.is_initialized():
        if backend == "auto":
            backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend, rank=rank, world_size=world)
    return DistEnv(rank, world, local_rank, dev)


def close() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def wrap(module: nn.Module, blocks: nn.ModuleList, mode: str, env: DistEnv) -> nn.Module:
    """The module to call for training. fsdp: FSDP2 `fully_shard` on each block, then on the
    root (in place: `module` itself becomes the sharded module); ddp: a DDP wrapper around
    `module`. A world of one gets `module` back unchanged."""
    if not env.distributed:
        return module
    if mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in blocks:
            fully_shard(block)
        fully_shard(module)
        return module
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [env.device.index] if env.device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=ids)
    raise ConfigError(f"distributed.mode must be fsdp or ddp, got {mode!r}")


def load_full_state(module: nn.Module, full_state: dict[str, torch.Tensor], env: DistEnv) -> None:
    """Give `module`, FSDP-sharded while still on the meta device, storage on env.device and
    its weights: rank 0 passes the full (unsharded) state dict, which this empties, the other
    ranks {}. Rank 0 scatters one tensor at a time, each rank receiving only its own shard:
    no rank but 0 ever holds a whole tensor's data, and rank 0 frees each tensor once sent.
    The shards are exactly rank 0's tensors."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    local_state = module.state_dict(keep_vars=True)  # parameters and persistent buffers
    lost = [name for name, _ in module.named_buffers() if name not in local_state]
    if lost:  # to_empty leaves them uninitialized and nothing below loads them
        raise NotImplementedError(
            f"FSDP meta-device init cannot restore the non-persistent buffer {lost[0]!r}"
        )
    if env.is_main and set(full_state) != set(local_state):
        raise CheckpointError(
            f"weights and model differ in {sorted(set(full_state) ^ set(local_state))}"
        )
    module.to_empty(device=env.device)
    # Smallest first: the largest tensor (the embedding) goes once rank 0 has freed the others.
    order = sorted(module.state_dict(keep_vars=True).items(), key=lambda kv: kv[1].numel())
    with torch.no_grad():
        for name, target in order:
            if env.is_main:
                full = full_state.pop(name).to(env.device, target.dtype)
            else:  # never written: only its shape and dtype are read (no memory touched on CPU)
                full = torch.empty(target.shape, dtype=target.dtype, device=env.device)
            if isinstance(target, DTensor):  # scattered from rank 0
                shard = distribute_tensor(full, target.device_mesh, target.placements)
                target.to_local().copy_(shard.to_local())
            else:  # a buffer FSDP does not shard
                dist.broadcast(full, src=0)
                target.copy_(full)
            del full


def set_grad_sync(train_module: nn.Module, sync: bool) -> None:
    """Skip (False) or do (True) the gradient all-reduce of the next backward: accumulation
    steps before the last one need no communication."""
    if hasattr(train_module, "set_requires_gradient_sync"):  # FSDP2
        train_module.set_requires_gradient_sync(sync)
    elif hasattr(train_module, "require_backward_grad_sync"):  # DDP
        train_module.require_backward_grad_sync = sync


def mean_over_ranks(values: list[float], env: DistEnv) -> list[float]:
    """Each value averaged over all ranks (for logging losses); identity for a world of one."""
    if not env.distributed:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=env.device)
    dist.all_reduce(t)
    return (t / env.world_size).tolist()


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


def broadcast_object(obj, env: DistEnv):
    """rank 0's `obj` on every rank."""
    if not env.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
