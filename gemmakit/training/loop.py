"""The training loop, top to bottom: setup, model, optimizer, resume, steps, eval, checkpoints.

One loop serves every stage: pretraining, SFT, reward model and RLHF are each a loss
(`loss_fn(model, batch) -> scalar`) and a batch stream (`make_batches(env, start) -> batches`).
`pretrain(recipe)` is the pretraining instance: next-token loss over token shards.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from gemmakit.api import build_model, load_model
from gemmakit.config import GemmaConfig, get_config
from gemmakit.errors import ConfigError
from gemmakit.model.transformer import Gemma
from gemmakit.training import allocator, distributed, state
from gemmakit.training.data import eval_windows, train_source, valid_shards
from gemmakit.training.distributed import DistEnv
from gemmakit.training.losses import (
    WORKSPACE,
    LossFn,
    LossModule,
    next_token_loss,
    windows_to_batch,
)
from gemmakit.training.metrics import MetricsLog, peak_flops, train_flops_per_token
from gemmakit.training.recipe import OptimizerSection, Recipe, RecipeError, as_recipe
from gemmakit.training.schedule import lr_at

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def compute_dtype(name: str, device: torch.device) -> torch.dtype:
    """The autocast dtype for training.dtype; auto is bfloat16 where the hardware has it."""
    if name != "auto":
        return DTYPES[name]
    if device.type == "cuda":
        return torch.bfloat16
    try:
        native = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    except (AttributeError, RuntimeError):
        native = False
    return torch.bfloat16 if native else torch.float32


BatchFn = Callable[[DistEnv, int], Iterator[dict]]  # (env, first micro-step) -> this rank's
EvalFn = Callable[[DistEnv], Iterable[dict]]  # env -> this rank's validation batches


@dataclass
class RunResult:
    run_dir: Path
    checkpoint: Path | None  # the final checkpoint (loadable with gemmakit.load_model)
    steps: int  # optimizer steps done, counting those before a resume
    losses: list[float] = field(default_factory=list)  # train loss of each step run here
    val_losses: list[tuple[int, float]] = field(default_factory=list)  # (step, loss)
    tokens_per_s: float = 0.0  # over all ranks, first step (warm-up, compile) left out
    mfu: float = 0.0


# --- pieces the loop uses ---------------------------------------------------------------------


def model_config(recipe: Recipe) -> GemmaConfig:
    """The preset with the recipe's config overrides; a bad field name is a RecipeError."""
    cfg = get_config(recipe.model.preset)
    overrides = recipe.model.config_overrides
    known = set(GemmaConfig.__dataclass_fields__) - {"tokens"}
    for key in overrides:
        if key not in known:
            raise RecipeError(
                f"recipe: unknown key 'model.config_overrides.{key}' "
                f"(GemmaConfig fields: {', '.join(sorted(known))})"
            )
    return cfg.replace(**overrides) if overrides else cfg


def build_model_for(recipe: Recipe, resume_from: Path | None) -> Gemma:
    """float32 weights on the CPU: from the checkpoint being resumed, the recipe's starting
    checkpoint, or the preset at random (seeded by training.seed). A checkpoint without
    config.json (a LoRA run's: the adapter alone) gives the recipe's base."""
    if resume_from is not None and (resume_from / "config.json").is_file():
        return load_model(resume_from, dtype=torch.float32)
    if recipe.model.checkpoint:
        return load_model(recipe.model.checkpoint, dtype=torch.float32)
    cfg, seed = model_config(recipe), recipe.training.seed
    return build_model(cfg, dtype=torch.float32, seed=seed, init_std=recipe.model.init_std)


def checkpoint_blocks(model: Gemma) -> None:
    """Recompute each block's activations in backward instead of storing them.
    Patches the instance's forward, so parameter names (and checkpoints) are unchanged."""
    for block in model.blocks:
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)


def build_optimizer(module: nn.Module, opt: OptimizerSection) -> torch.optim.AdamW:
    """AdamW with decoupled weight decay on matrices only: norms (1-D) and the embedding get
    none, since decaying the tied embedding shrinks every token's input and output alike."""
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or name.endswith("embedder.weight") else decay).append(p)
    groups = [
        {"params": decay, "weight_decay": opt.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=opt.lr, betas=(opt.beta1, opt.beta2), eps=opt.eps)


def to_device(batch, device: torch.device):
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, list | tuple):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def evaluate(train_module: nn.Module, batches: Iterable[dict], env: DistEnv, autocast) -> float:
    """Mean loss over the batches (each weighted by its rows), averaged over ranks.
    Every rank must get the same number of batches (each forward is collective under FSDP)."""
    total, rows = 0.0, 0
    with torch.no_grad():
        for batch in batches:
            batch = to_device(batch, env.device)
            n = len(next(iter(batch.values()))) if isinstance(batch, dict) else 1
            with autocast():
                total += train_module(batch).item() * n
            rows += n
    total, rows = distributed.mean_over_ranks([total, float(rows)], env)
    return total / rows if rows else math.nan


# --- the loop ---------------------------------------------------------------------------------


def train(
    recipe: Recipe,
    loss_fn: LossFn,
    make_batches: BatchFn,
    make_eval_batches: EvalFn | None = None,
    resume: bool = False,
    env: DistEnv | None = None,
    prepare_model: Callable[[Gemma, Path | None], None] | None = None,
) -> RunResult:
    """Minimize `loss_fn` over `make_batches` as the recipe says; returns what happened.

    make_batches(env, start) yields this rank's micro-batches (dicts of tensors) from
    micro-step `start` on; it must resume exactly: micro-step k of a fresh run and of a
    resumed one are the same batch. With resume, the run continues from the newest
    checkpoint in recipe.run_dir (or starts fresh when there is none).
    prepare_model(model, resume_from) changes the built model in place before the optimizer
    sees it (LoRA: adds adapters, freezes the base, loads the resumed adapter).
    """
    env = env or distributed.init(recipe.training.device, recipe.distributed.backend)
    if env.device.type == "cpu":
        allocator.keep_freed_memory()  # no page faults re-touching each step's activations
    t, opt_cfg = recipe.training, recipe.optimizer
    run_dir = Path(recipe.run_dir)
    per_step = t.micro_batch_size * env.world_size
    if t.batch_size % per_step:
        raise RecipeError(
            f"recipe: training.batch_size={t.batch_size} is not a multiple of "
            f"micro_batch_size * world_size = {t.micro_batch_size} * {env.world_size}"
        )
    accum = t.batch_size // per_step

    # Resume point: the newest complete checkpoint (rank 0 decides, every rank follows).
    resume_from = state.latest_checkpoint(run_dir) if resume else None
    if not resume and state.latest_checkpoint(run_dir) is not None:
        raise ConfigError(
            f"{run_dir}: already holds checkpoints; pass --resume to continue that run, or "
            f"choose another run_dir (--set run_dir=...)"
        )
    resume_from = distributed.broadcast_object(resume_from, env)
    sharded = env.distributed and recipe.distributed.mode == "fsdp"
    # Under FSDP rank 0 sends the other ranks their shards of the optimizer state: they map
    # the file without reading its tensors.
    lazy = sharded and not env.is_main
    saved = state.read_train_state(resume_from, mmap=lazy) if resume_from else None

    # Model (float32 weights; autocast computes in bf16), the loss around it, then sharding.
    torch.manual_seed(t.seed)
    model = build_model_for(recipe, resume_from) if env.is_main or not sharded else None
    if prepare_model is not None and model is not None:
        prepare_model(model, resume_from)
    if sharded:
        # Only rank 0 builds or loads the whole weights, and keeps them aside: every rank
        # trains a meta-device model, which FSDP shards before each rank gets its shard.
        weights = model.state_dict() if env.is_main else {}
        config = distributed.broadcast_object(model.config if env.is_main else None, env)
        model = build_model(config, dtype=torch.float32, device="meta")
        if prepare_model is not None:
            prepare_model(model, None)  # the same structure; weights come from rank 0
    loss_module = LossModule(model, loss_fn)
    if saved and saved["loss_params"]:
        loss_module.load_state_dict(saved["loss_params"], strict=False)
    if t.activation_checkpointing:
        checkpoint_blocks(model)
    if t.compile:
        for block in model.blocks:
            block.compile()
    if not sharded:
        loss_module.to(env.device)
    train_module = distributed.wrap(loss_module, model.blocks, recipe.distributed.mode, env)
    if sharded:
        distributed.load_full_state(model, weights, env)
        del weights
    optimizer = build_optimizer(loss_module, opt_cfg)

    step = 0
    if saved:
        state.restore(saved, loss_module, optimizer, env)
        step = saved["step"]
    # Data position in sequences, so a resume may use another world size or micro-batch.
    data_position = saved["data_position"] if saved else 0
    if data_position % per_step:
        raise ConfigError(
            f"{resume_from}: data position {data_position} does not fall on a "
            f"micro-batch of {per_step} sequences"
        )
    batches = make_batches(env, data_position // per_step)

    dtype = compute_dtype(t.dtype, env.device)
    autocast = functools.partial(
        torch.autocast, env.device.type, dtype=dtype, enabled=dtype != torch.float32
    )
    tokens_per_step = t.batch_size * t.seq_len
    flops_per_step = train_flops_per_token(model.config, t.seq_len) * tokens_per_step
    peak = peak_flops(env.device, dtype, recipe.log.peak_flops) * env.world_size

    log = MetricsLog(run_dir, recipe.log.tensorboard, step) if env.is_main else None
    result = RunResult(run_dir, None, step)
    if env.is_main:
        _announce(recipe, model, env, accum, resume_from, dtype)
    bar = _progress(recipe, step, env)
    timed_s, timed_steps, last_ckpt = 0.0, 0, None

    while step < t.steps:
        lr = lr_at(step, opt_cfg.lr, opt_cfg.min_lr, opt_cfg.warmup_steps, t.steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        start = time.perf_counter()

        # Forward/backward over the micro-batches; gradients sync on the last one only.
        loss_sum = torch.zeros((), device=env.device)
        for micro in range(accum):
            batch = to_device(next(batches), env.device)
            distributed.set_grad_sync(train_module, micro == accum - 1)
            with autocast():
                loss = train_module(batch)
            (loss / accum).backward()
            loss_sum += loss.detach()
        grad_norm = _clip(loss_module, t.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        data_position += t.batch_size

        loss_value, grad_norm = distributed.mean_over_ranks(
            [loss_sum.item() / accum, grad_norm], env
        )  # .item() waits for the step, so the time below is the step's
        dt = time.perf_counter() - start
        if step > result.steps + 1 or t.steps - result.steps == 1:  # first step: warm-up
            timed_s, timed_steps = timed_s + dt, timed_steps + 1
        tok_s = tokens_per_step / dt
        mfu = flops_per_step / dt / peak
        result.losses.append(loss_value)
        record = {
            "step": step,
            "loss": loss_value,
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens": step * tokens_per_step,
            "tokens_per_s": tok_s,
            "mfu": mfu,
            "step_s": dt,
        }
        if log:
            log.write(record)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.3f}", tok_s=f"{tok_s:,.0f}", mfu=f"{mfu:.1%}")
        if env.is_main and (step % recipe.log.interval == 0 or step == t.steps):
            _say(
                bar,
                f"step {step}/{t.steps}  loss {loss_value:.4f}  lr {lr:.2e}  "
                f"grad {grad_norm:.2f}  {tok_s:,.0f} tok/s  mfu {mfu:.1%}",
            )
        if not math.isfinite(loss_value):
            raise FloatingPointError(f"loss is {loss_value} at step {step}; lower optimizer.lr")

        if (
            make_eval_batches
            and recipe.eval.interval
            and (step % recipe.eval.interval == 0 or step == t.steps)
        ):
            val = evaluate(train_module, make_eval_batches(env), env, autocast)
            result.val_losses.append((step, val))
            if log:
                log.write({"step": step, "val_loss": val})
            if env.is_main:
                _say(bar, f"step {step}/{t.steps}  val_loss {val:.4f}")

        every = recipe.checkpoint.interval
        if step == t.steps or (every and step % every == 0):
            info = {
                "data_position": data_position,
                "world_size": env.world_size,
                "recipe": recipe.to_dict(),
            }
            last_ckpt = state.save_checkpoint(
                run_dir,
                step,
                loss_module,
                optimizer,
                env,
                info,
                tokenizer=recipe.data.tokenizer,
                keep=recipe.checkpoint.keep,
            )

    if bar is not None:
        bar.close()
    if log:
        log.close()
    WORKSPACE.release()
    result.steps = step
    result.checkpoint = last_ckpt or state.latest_checkpoint(run_dir)
    if timed_steps:
        result.tokens_per_s = tokens_per_step * timed_steps / timed_s
        result.mfu = flops_per_step * timed_steps / timed_s / peak
    return result


def _clip(module: nn.Module, max_norm: float) -> float:
    """Clip the global gradient norm (over all shards under FSDP); returns the norm before."""
    params = [p for p in module.parameters() if p.grad is not None]
    if max_norm > 0:
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    if hasattr(norm, "full_tensor"):  # a DTensor under FSDP
        norm = norm.full_tensor()
    return float(norm)


def _progress(recipe: Recipe, step: int, env: DistEnv):
    if not (recipe.log.progress and env.is_main):
        return None
    from tqdm import tqdm

    return tqdm(total=recipe.training.steps, initial=step, unit="step", dynamic_ncols=True)


def _say(bar, text: str) -> None:
    if bar is not None:
        bar.write(text)
    else:
        print(text, flush=True)


def _announce(recipe: Recipe, model: Gemma, env: DistEnv, accum: int, resume_from, dtype) -> None:
    t = recipe.training
    n = sum(p.numel() for p in model.parameters())
    where = f"resuming {resume_from}" if resume_from else "from the start"
    print(
        f"{model.config.name}: {n:,} parameters on {env.world_size} x {env.device.type} "
        f"({recipe.distributed.mode if env.distributed else 'single process'}); batch "
        f"{t.batch_size} x {t.seq_len} tokens = {t.micro_batch_size} x {accum} accumulation x "
        f"{env.world_size} ranks; {str(dtype).removeprefix('torch.')}; {where}; "
        f"run dir {recipe.run_dir}",
        flush=True,
    )


# --- pretraining --------------------------------------------------------------------------------


def pretrain(recipe: Recipe | dict | str | Path, resume: bool = False) -> RunResult:
    """Pretrain as the recipe says (a Recipe, a nested dict, or a YAML path): next-token
    cross-entropy over the recipe's token shards. Works alone or under torchrun."""
    recipe = as_recipe(recipe)
    t = recipe.training
    vocab = _vocab_size(recipe)

    def make_batches(env: DistEnv, start: int) -> Iterator[dict]:
        accum = t.batch_size // (t.micro_batch_size * env.world_size)
        source = train_source(recipe.data, vocab, t.steps * accum)
        windows = source.batches(
            t.seq_len, t.micro_batch_size, env.rank, env.world_size, t.seed, start
        )
        for w in windows:
            if w.max() >= vocab:
                raise ConfigError(
                    f"{', '.join(recipe.data.train)}: token id {int(w.max())} is "
                    f"outside the model's vocabulary of {vocab}"
                )
            yield windows_to_batch(torch.from_numpy(w))

    vals = valid_shards(recipe.data, train_source(recipe.data, vocab, t.steps), t.seq_len)

    def make_eval(env: DistEnv) -> Iterator[dict]:
        windows = eval_windows(
            vals, t.seq_len, t.micro_batch_size, env.rank, env.world_size, recipe.eval.batches
        )
        return (windows_to_batch(torch.from_numpy(w)) for w in windows)

    loss_fn = functools.partial(next_token_loss, chunk_tokens=t.loss_chunk_tokens)
    joined = torch.distributed.is_initialized()  # a caller's process group is left open
    env = distributed.init(t.device, recipe.distributed.backend)
    try:
        return train(recipe, loss_fn, make_batches, make_eval if vals else None, resume, env)
    finally:
        if not joined:
            distributed.close()


def _vocab_size(recipe: Recipe) -> int:
    if recipe.model.checkpoint:
        from gemmakit.checkpoint import open_source
        from gemmakit.checkpoint.load import resolve_config
        from gemmakit.installed import installed_model_path

        name = recipe.model.checkpoint
        path = installed_model_path(str(name)) or Path(name)
        return resolve_config(open_source(path), path, None).vocab_size
    return model_config(recipe).vocab_size
