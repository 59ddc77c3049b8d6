"""The training loop every stage runs: pretraining, SFT, reward model, RLHF, DPO, distillation.

A stage is a loss and a batch stream, handed to `train`:
- loss_fn(model, batch) -> scalar loss, or {"loss": scalar, name: scalar, ...} whose other
  entries are metrics logged with the loss (averaged over micro-batches and ranks; in
  validation `val_<name>`, e.g. a reward model's pairwise accuracy), and optionally
  LOSS_TERMS: how many terms the loss is the mean of (SFT: its target tokens), so that the
  step's loss and gradients are the mean over all the step's terms, whatever the split into
  micro-batches and ranks (without it each micro-batch weighs the same); an nn.Module when it has
  parameters of its own (a reward head), which are then optimized, sharded and checkpointed
  with the model's, and whose `checkpoint_head(params)` (if defined) says how they are saved
  (gemmakit.training.state);
- make_batches(env, start) -> this rank's micro-batches (dicts of tensors) from micro-step
  `start` on, resuming exactly (micro-step k is the same batch in a fresh and a resumed run).
  Throughput and MFU read two of their entries when present: "lengths" [B] (the tokens of
  each right-padded row, padding not counted; else every position of "tokens" counts) and
  "targets" [B, T] (IGNORE where the loss takes no next-token logits; without it none); and
  MFU counts a third, "flops" (a number), when present: the model FLOPs spent on the
  micro-batch outside the trained model's forward and backward (RLHF's sampling, reference and
  reward passes, a distillation teacher's forward: metrics.forward_flops), which the step's
  time includes;
- make_eval_batches(env) -> this rank's validation batches (optional);
- adapt_model(model) (optional): change the model before it is sharded and the optimizer is
  made (freeze parameters, add adapters), or learn what the batch stream needs from it.
`gemmakit/training/pretrain.py` is the pretraining stage, the pattern the others follow.

`train` itself reads top to bottom: set up (`plan_run`), build / shard / resume the model
(`build_run`), then per step `optimizer_step`, `Progress.record`, `evaluate` and
`save_checkpoint`.
"""

from __future__ import annotations

import functools
import math
import random
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from gemmakit.api import build_model, load_model
from gemmakit.config import GemmaConfig, get_config
from gemmakit.dtypes import torch_dtype
from gemmakit.errors import ConfigError, DataError, MissingFileError
from gemmakit.model.transformer import Gemma
from gemmakit.training import allocator, distributed, state
from gemmakit.training.distributed import DistEnv
from gemmakit.training.losses import FLOPS, IGNORE, LOSS_TERMS, WORKSPACE, LossFn, LossModule
from gemmakit.training.metrics import MetricsLog, StepFlops, peak_flops
from gemmakit.training.recipe import OptimizerSection, Recipe, RecipeError
from gemmakit.training.schedule import lr_at

BatchFn = Callable[[DistEnv, int], Iterator[dict]]  # (env, first micro-step) -> this rank's
EvalFn = Callable[[DistEnv], Iterable[dict]]  # env -> this rank's validation batches
AdaptFn = Callable[[Gemma, Path | None], None]  # (model, checkpoint resumed or None)


@dataclass
class RunResult:
    run_dir: Path
    checkpoint: Path | None  # the final checkpoint (loadable with gemmakit.load_model)
    steps: int  # optimizer steps done, counting those before a resume
    losses: list[float] = field(default_factory=list)  # train loss of each step run here
    val_losses: list[tuple[int, float]] = field(default_factory=list)  # (step, loss)
    metrics: list[dict] = field(default_factory=list)  # the loss's metrics of each step run here
    val_metrics: list[tuple[int, dict]] = field(default_factory=list)  # (step, its metrics)
    tokens_per_s: float = 0.0  # tokens (not padding) over all ranks, first step left out
    mfu: float = 0.0


# --- the loop ---------------------------------------------------------------------------------


def train(
    recipe: Recipe,
    loss_fn: LossFn,
    make_batches: BatchFn,
    make_eval_batches: EvalFn | None = None,
    resume: bool = False,
    env: DistEnv | None = None,
    *,
    adapt_model: AdaptFn | None = None,
) -> RunResult:
    """Minimize `loss_fn` over `make_batches` as the recipe says; returns what happened.

    With resume, the run continues from the newest checkpoint in recipe.run_dir (or starts
    fresh when there is none). adapt_model is called on each model built before it is
    sharded: under FSDP on rank 0's full model (whose weights it then sends) and on every
    rank's meta-device shell, so both must come out with the same parameters.
    """
    env = env or distributed.init(recipe.training.device, recipe.distributed.backend)
    plan = plan_run(recipe, env, resume)
    run = build_run(recipe, env, plan, loss_fn, adapt_model)
    batches = make_batches(env, run.data_position // plan.per_step)
    progress = Progress(recipe, env, run, plan.resume_from)
    last_ckpt = None
    while run.step < recipe.training.steps:
        stats = optimizer_step(run, batches)
        progress.record(stats)  # a loss that is not finite is logged, then stops the run
        if not math.isfinite(stats.loss):
            raise FloatingPointError(
                f"loss is {stats.loss} at step {stats.step}; lower optimizer.lr"
            )
        if make_eval_batches and _due(run.step, recipe.eval.interval, recipe.training.steps):
            val, val_metrics = evaluate(run.train_module, make_eval_batches(env), env, run.autocast)
            progress.record_eval(val, val_metrics)
        if _due(run.step, recipe.checkpoint.interval, recipe.training.steps, always_last=True):
            last_ckpt = save(run)
    return progress.finish(last_ckpt or state.latest_checkpoint(recipe.run_dir))


# --- set-up: the batch split, the resume point ------------------------------------------------


@dataclass
class Plan:
    """What train decides before building anything."""

    per_step: int  # sequences per micro-step over all ranks
    accum: int  # micro-batches per optimizer step on each rank
    resume_from: Path | None  # the checkpoint resumed (every rank agrees)
    saved: dict | None  # its train_state (tensors mapped, not read, on FSDP ranks but 0)


def plan_run(recipe: Recipe, env: DistEnv, resume: bool) -> Plan:
    """Check the batch split and the recipe's files; find the checkpoint to resume from."""
    if env.device.type == "cpu":
        allocator.keep_freed_memory()  # no page faults re-touching each step's activations
    t = recipe.training
    per_step = t.micro_batch_size * env.world_size
    if t.batch_size % per_step:
        raise RecipeError(
            f"recipe: training.batch_size={t.batch_size} is not a multiple of "
            f"micro_batch_size * world_size = {t.micro_batch_size} * {env.world_size}"
        )
    check_files(recipe)
    run_dir = Path(recipe.run_dir)
    if env.is_main:
        state.remove_temporaries(run_dir)  # of a save killed midway
    latest = state.latest_checkpoint(run_dir)
    if not resume and latest is not None:
        raise ConfigError(
            f"{run_dir}: already holds checkpoints; pass --resume to continue that run, or "
            f"choose another run_dir (--set run_dir=...)"
        )
    resume_from = distributed.broadcast_object(latest if resume else None, env)
    # Under FSDP rank 0 sends the other ranks their shards of the optimizer state: they map
    # the file without reading its tensors.
    lazy = env.distributed and recipe.distributed.mode == "fsdp" and not env.is_main
    saved = state.read_train_state(resume_from, mmap=lazy) if resume_from else None
    return Plan(per_step, t.batch_size // per_step, resume_from, saved)


def check_files(recipe: Recipe) -> None:
    """The files a run reads late (the tokenizer, copied into each checkpoint) exist now, so
    a typo fails before the first step rather than at the first checkpoint."""
    tok = recipe.data.tokenizer
    if tok and not Path(tok).is_file():
        raise MissingFileError(f"data.tokenizer: {tok}: no such file")


# --- build, shard and resume the model --------------------------------------------------------


@dataclass
class Run:
    """The state one call of train() carries from step to step."""

    recipe: Recipe
    env: DistEnv
    accum: int  # micro-batches per optimizer step on each rank
    model: Gemma  # the model trained (under FSDP: its sharded shell)
    loss_module: LossModule  # the model and the loss as one module
    train_module: nn.Module  # loss_module wrapped for DDP (itself alone or under FSDP)
    optimizer: torch.optim.Optimizer
    autocast: Callable  # () -> the autocast context of training.dtype
    step: int = 0  # optimizer steps done
    data_position: int = 0  # sequences read, over all ranks


def build_run(
    recipe: Recipe, env: DistEnv, plan: Plan, loss_fn: LossFn, adapt_model: AdaptFn | None
) -> Run:
    """The model (float32 weights; autocast computes in bf16) with its loss, sharded or
    wrapped for the world, its optimizer, and the resumed state when there is one."""
    t, saved = recipe.training, plan.saved
    seed_rngs(t.seed)
    model, weights = build_model_to_train(recipe, env, plan.resume_from, adapt_model)
    check_context(recipe, model.config)
    loss_module = LossModule(model, loss_fn)
    if saved and saved["loss_params"]:
        loss_module.load_state_dict(saved["loss_params"], strict=False)
    if t.activation_checkpointing:
        checkpoint_blocks(model)
    if t.compile:
        for block in model.blocks:
            block.compile()
    if weights is None:
        loss_module.to(env.device)
    train_module = distributed.wrap(loss_module, model.blocks, recipe.distributed.mode, env)
    if weights is not None:
        distributed.load_full_state(model, weights, env)  # empties rank 0's weights
        del weights
    optimizer = build_optimizer(loss_module, recipe.optimizer)
    dtype = compute_dtype(t.dtype, env.device)
    autocast = functools.partial(
        torch.autocast, env.device.type, dtype=dtype, enabled=dtype != torch.float32
    )
    run = Run(recipe, env, plan.accum, model, loss_module, train_module, optimizer, autocast)
    if saved:
        state.restore(saved, loss_module, optimizer, env)
        run.step = saved["step"]
        # Data position in sequences, so a resume may use another world size or micro-batch.
        run.data_position = saved["data_position"]
        if run.data_position % plan.per_step:
            raise ConfigError(
                f"{plan.resume_from}: data position {run.data_position} does not fall on a "
                f"micro-batch of {plan.per_step} sequences"
            )
    return run


def seed_rngs(seed: int) -> None:
    """torch's, numpy's and Python's global RNGs from training.seed (a resume then restores
    each rank's saved states)."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def build_model_to_train(
    recipe: Recipe, env: DistEnv, resume_from: Path | None, adapt_model: AdaptFn | None
) -> tuple[Gemma, dict | None]:
    """(the model to train, adapted; the weights to send it under FSDP, else None).

    Under FSDP only rank 0 builds or loads the whole weights and keeps them aside (its
    weights; {} on other ranks): every rank trains a meta-device model, which FSDP shards
    before each rank gets its shard."""
    sharded = env.distributed and recipe.distributed.mode == "fsdp"
    model = None
    if env.is_main or not sharded:
        model = build_model_for(recipe, resume_from)
        if adapt_model:
            adapt_model(model, resume_from)
    if not sharded:
        return model, None
    weights = model.state_dict() if env.is_main else {}
    config = distributed.broadcast_object(model.config if env.is_main else None, env)
    shell = build_model(config, dtype=torch.float32, device="meta")
    if adapt_model:
        adapt_model(shell, None)  # the same structure; its weights come from rank 0
    return shell, weights


def check_context(recipe: Recipe, config: GemmaConfig) -> None:
    """A training window must fit the model's context (its RoPE tables and masks)."""
    seq_len = recipe.training.seq_len
    if seq_len > config.max_seq_len:
        raise RecipeError(
            f"recipe: training.seq_len={seq_len} is beyond the model's context of "
            f"{config.max_seq_len} tokens ({config.name})"
        )


# --- one optimizer step -------------------------------------------------------------------


@dataclass
class StepStats:
    step: int
    loss: float  # mean over micro-batches and ranks
    grad_norm: float  # before clipping
    lr: float
    seconds: float
    metrics: dict = field(default_factory=dict)  # the loss's own, averaged like the loss
    tokens: float = 0.0  # positions holding a token (not padding), over all ranks
    logits: float = 0.0  # positions whose next-token logits the loss took, over all ranks
    extra_flops: float = 0.0  # the batches' "flops" (outside the trained model), all ranks


def optimizer_step(run: Run, batches: Iterator[dict]) -> StepStats:
    """Forward/backward over the step's micro-batches (gradients sync on the last one only),
    clip, step the optimizer at the schedule's learning rate."""
    t, opt = run.recipe.training, run.recipe.optimizer
    lr = lr_at(run.step, opt.lr, opt.min_lr, opt.warmup_steps, t.steps)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    start = time.perf_counter()
    loss_sum = torch.zeros((), device=run.env.device)
    terms_sum = torch.zeros((), device=run.env.device)
    metric_sums: dict[str, torch.Tensor] = {}
    counts = [0, 0, 0.0]  # tokens, logits, FLOPs outside the trained model
    weighted = False  # the loss gives its LOSS_TERMS (the same on every rank: the same loss_fn)
    for micro in range(run.accum):
        batch = next(batches)
        counts = [a + b for a, b in zip(counts, (*count_positions(batch), extra_flops(batch)))]
        batch = to_device(batch, run.env.device)
        distributed.set_grad_sync(run.train_module, micro == run.accum - 1)
        with run.autocast():
            loss, terms, metrics = split_loss(run.train_module(batch))
        weighted = terms is not None
        if not weighted:
            (loss / run.accum).backward()
            loss_sum += loss.detach()
        else:  # the summed loss now; divided by the step's terms once they are all counted
            (loss * terms).backward()
            loss_sum += loss.detach() * terms
            terms_sum += terms
        for k, v in metrics.items():
            metric_sums[k] = metric_sums.get(k, 0.0) + v.detach().float()
    if weighted:
        # The ranks' gradients were averaged (DDP, FSDP): dividing by the ranks' mean count
        # makes them the mean over every term of the step, as one process taking the whole
        # batch gets; so does the loss, once averaged over ranks below.
        (per_rank,) = distributed.mean_over_ranks([terms_sum.item()], run.env)
        per_rank = per_rank or 1.0  # no terms anywhere: zero gradients, zero loss
        _scale_grads(run.loss_module, 1.0 / per_rank)
        loss_mean = loss_sum.item() / per_rank
    else:
        loss_mean = loss_sum.item() / run.accum
    grad_norm = _clip(run.loss_module, t.grad_clip)
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.step += 1
    run.data_position += t.batch_size
    names = list(metric_sums)
    loss_value, grad_norm, tokens, logits, extra, *values = distributed.mean_over_ranks(
        [
            loss_mean,
            grad_norm,
            *counts,
            *(metric_sums[k].item() / run.accum for k in names),
        ],
        run.env,
    )  # .item() waits for the step, so the time taken is the step's
    seconds = time.perf_counter() - start
    world = run.env.world_size
    return StepStats(
        run.step,
        loss_value,
        grad_norm,
        lr,
        seconds,
        dict(zip(names, values)),
        tokens * world,
        logits * world,
        extra * world,
    )


def split_loss(out) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, torch.Tensor]]:
    """(the loss, its LOSS_TERMS or None, the other metrics) of what a loss_fn returns: a
    scalar, or a dict with "loss"."""
    if isinstance(out, dict):
        metrics = dict(out)
        return metrics.pop("loss"), metrics.pop(LOSS_TERMS, None), metrics
    return out, None, {}


def count_positions(batch: dict) -> tuple[int, int]:
    """(positions holding a token, not padding; positions whose next-token logits the loss
    takes) of a micro-batch, from its "lengths" / "tokens" and "targets" (module docstring)."""
    if not isinstance(batch, dict) or "tokens" not in batch:
        return 0, 0
    if "lengths" in batch:
        tokens = int(batch["lengths"].sum())
    else:
        tokens = batch["tokens"].numel()
    logits = int((batch["targets"] != IGNORE).sum()) if "targets" in batch else 0
    return tokens, logits


def extra_flops(batch: dict) -> float:
    """The model FLOPs a micro-batch says were spent on it outside the trained model (its
    "flops" entry, module docstring), 0 without one. DataError unless a finite number >= 0."""
    value = batch.get(FLOPS, 0.0) if isinstance(batch, dict) else 0.0
    try:
        flops = float(value)
    except (TypeError, ValueError):
        flops = math.nan
    if not math.isfinite(flops) or flops < 0:
        raise DataError(f'batch entry "{FLOPS}" must be a finite number >= 0, got {value!r}')
    return flops


def _scale_grads(module: nn.Module, factor: float) -> None:
    for p in module.parameters():
        if p.grad is not None:
            p.grad.mul_(factor)


def _due(step: int, interval: int, last: int, always_last: bool = False) -> bool:
    """Whether `step` ends an interval (0: never), or is the run's last (with an interval, or
    always when asked: the final checkpoint)."""
    if step == last:
        return bool(interval) or always_last
    return bool(interval) and step % interval == 0


# --- checkpoint ---------------------------------------------------------------------------


def save(run: Run) -> Path:
    """A checkpoint of the run at its step (collective: every rank calls it)."""
    r = run.recipe
    info = {
        "data_position": run.data_position,
        "world_size": run.env.world_size,
        "recipe": r.to_dict(),
    }
    return state.save_checkpoint(
        r.run_dir,
        run.step,
        run.loss_module,
        run.optimizer,
        run.env,
        info,
        tokenizer=r.data.tokenizer,
        keep=r.checkpoint.keep,
    )


# --- what a run reports -------------------------------------------------------------------


class Progress:
    """Log lines, metrics.jsonl (rank 0), a progress bar (rank 0 on a terminal) and the
    RunResult the run returns, with throughput and MFU."""

    def __init__(self, recipe: Recipe, env: DistEnv, run: Run, resume_from: Path | None):
        self.recipe, self.env, self.run = recipe, env, run
        t = recipe.training
        dtype = compute_dtype(t.dtype, env.device)
        self.positions_per_step = t.batch_size * t.seq_len
        self.flops = StepFlops.of(run.model, t.seq_len)
        self.peak = peak_flops(env.device, dtype, recipe.log.peak_flops) * env.world_size
        self.first_step = run.step
        self.result = RunResult(Path(recipe.run_dir), None, run.step)
        self.timed_s, self.timed_tokens, self.timed_flops = 0.0, 0.0, 0.0
        self.log = (
            MetricsLog(recipe.run_dir, recipe.log.tensorboard, run.step) if env.is_main else None
        )
        if env.is_main:
            _announce(recipe, run.model, env, run.accum, resume_from, dtype)
        self.bar = _progress_bar(recipe, run.step, env)

    def record(self, s: StepStats) -> None:
        t = self.recipe.training
        flops = self.flops(s.tokens, s.logits) + s.extra_flops
        if s.step > self.first_step + 1 or t.steps - self.first_step == 1:  # 1st: warm-up
            self.timed_s += s.seconds
            self.timed_tokens += s.tokens
            self.timed_flops += flops
        tok_s = s.tokens / s.seconds  # real tokens: a padded position is no work done
        mfu = flops / s.seconds / self.peak
        self.result.losses.append(s.loss)
        self.result.metrics.append(s.metrics)
        if self.log:
            self.log.write(
                {
                    "step": s.step,
                    "loss": s.loss,
                    **s.metrics,
                    "lr": s.lr,
                    "grad_norm": s.grad_norm,
                    "tokens": s.step * self.positions_per_step,  # positions, padding too
                    "tokens_per_s": tok_s,
                    "mfu": mfu,
                    "step_s": s.seconds,
                }
            )
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{s.loss:.3f}", tok_s=f"{tok_s:,.0f}", mfu=f"{mfu:.1%}")
        if self.env.is_main and (s.step % self.recipe.log.interval == 0 or s.step == t.steps):
            self.say(
                f"step {s.step}/{t.steps}  loss {s.loss:.4f}{_shown(s.metrics)}  lr {s.lr:.2e}  "
                f"grad {s.grad_norm:.2f}  {tok_s:,.0f} tok/s  mfu {mfu:.1%}"
            )

    def record_eval(self, val: float, metrics: dict | None = None) -> None:
        step, metrics = self.run.step, metrics or {}
        self.result.val_losses.append((step, val))
        self.result.val_metrics.append((step, metrics))
        named = {f"val_{k}": v for k, v in metrics.items()}
        if self.log:
            self.log.write({"step": step, "val_loss": val, **named})
        if self.env.is_main:
            self.say(f"step {step}/{self.recipe.training.steps}  val_loss {val:.4f}{_shown(named)}")

    def say(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def finish(self, checkpoint: Path | None) -> RunResult:
        if self.bar is not None:
            self.bar.close()
        if self.log:
            self.log.close()
        WORKSPACE.release()
        r = self.result
        r.steps, r.checkpoint = self.run.step, checkpoint
        if self.timed_s:
            r.tokens_per_s = self.timed_tokens / self.timed_s
            r.mfu = self.timed_flops / self.timed_s / self.peak
        return r


def _shown(metrics: dict) -> str:
    return "".join(f"  {k} {v:.4f}" for k, v in metrics.items())


def _progress_bar(recipe: Recipe, step: int, env: DistEnv):
    """A tqdm bar on rank 0 when output goes to a terminal; none into a file or a pipe, where
    each redraw would be one more carriage-return frame (the log lines say the same)."""
    if not (recipe.log.progress and env.is_main and sys.stdout.isatty() and sys.stderr.isatty()):
        return None
    from tqdm import tqdm

    return tqdm(total=recipe.training.steps, initial=step, unit="step", dynamic_ncols=True)


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


# --- pieces the loop uses -----------------------------------------------------------------------


def compute_dtype(name: str, device: torch.device) -> torch.dtype:
    """The autocast dtype for training.dtype; auto is bfloat16 where the hardware has it."""
    if name != "auto":
        return torch_dtype(name)
    if device.type == "cuda":
        return torch.bfloat16
    try:
        native = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    except (AttributeError, RuntimeError):
        native = False
    return torch.bfloat16 if native else torch.float32


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


def evaluate(
    train_module: nn.Module, batches: Iterable[dict], env: DistEnv, autocast
) -> tuple[float, dict[str, float]]:
    """(mean loss, mean of each of the loss's metrics) over the batches, each weighted by its
    rows (the loss by its LOSS_TERMS when it gives them), averaged over ranks. Every rank must
    get the same number of batches (each forward is collective under FSDP)."""
    sums: dict[str, float] = {"loss": 0.0}
    rows, terms = 0, 0.0
    with torch.no_grad():
        for batch in batches:
            batch = to_device(batch, env.device)
            n = len(next(iter(batch.values()))) if isinstance(batch, dict) else 1
            with autocast():
                loss, n_terms, metrics = split_loss(train_module(batch))
            weight = n if n_terms is None else float(n_terms)
            sums["loss"] += float(loss) * weight
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + float(v) * n
            rows += n
            terms += weight
    names = list(sums)
    *totals, rows, terms = distributed.mean_over_ranks(
        [*(sums[k] for k in names), float(rows), terms], env
    )
    means = {k: t / rows if rows else math.nan for k, t in zip(names, totals)}
    means["loss"] = totals[0] / terms if terms else math.nan
    return means.pop("loss"), means


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
