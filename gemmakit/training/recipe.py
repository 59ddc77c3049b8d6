"""Training recipes: every knob of a run, with its default, in one nested dataclass.

A recipe file is YAML with the same nesting; `--set optimizer.lr=1e-3` overrides one leaf.
Unknown keys and values of the wrong type are errors that name the file and key
(gemmakit.typed_config). A later stage (sft, reward, rlhf, ...) adds its own section: a
dataclass with defaults, and a field of that type on Recipe.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from gemmakit import typed_config
from gemmakit.errors import ConfigError


@dataclass
class ModelSection:
    preset: str | None = "tiny"  # a name from gemmakit.config.PRESETS (random init)
    checkpoint: str | None = None  # or start from these weights (HF dir, .safetensors, ...)
    config_overrides: dict = field(default_factory=dict)  # GemmaConfig fields, e.g. vocab_size
    init_std: float = 0.02


@dataclass
class DataSection:
    # Token shard dirs (gemmakit.data.shards), or one dir with a mixture.json (gemmakit data).
    train: list[str] = field(default_factory=list)
    weights: list[float] | None = None  # mixture weights, one per train dir
    # Or a staged mixture over the train dirs, named by their folder names:
    # [{until: 0.8, weights: {web: 0.7, code: 0.3}}, {until: 1.0, weights: {...}}]
    stages: list[dict] | None = None
    valid: str | None = None  # shard dir whose val split is used (None: the train dirs' own)
    tokenizer: str | None = None  # copied into every checkpoint as tokenizer.model
    synthetic: bool = False  # a built-in learnable token stream instead of shards (tests, benches)


@dataclass
class TrainingSection:
    steps: int = 1000  # optimizer steps
    seq_len: int = 256
    batch_size: int = 32  # sequences per optimizer step, over all ranks and micro-batches
    micro_batch_size: int = 8  # sequences per forward on one rank
    # Compute dtype under autocast (weights stay float32): bfloat16, float32, or auto:
    # bfloat16 on GPUs and on CPUs with native bf16 matmul, float32 on others (where bf16 is
    # emulated and tens of times slower).
    dtype: Literal["auto", "bfloat16", "float32"] = "auto"
    compile: bool = False  # torch.compile each block
    activation_checkpointing: bool = False  # recompute each block's activations in backward
    # Tokens per logits chunk of the cross-entropy; 0: auto, chunks of at most 512 MiB of
    # float32 logits (524 tokens at a 256k vocabulary, the whole batch at a small one).
    loss_chunk_tokens: int = 0
    grad_clip: float = 1.0  # max global gradient norm (0: no clipping)
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto (cuda when present), cpu, cuda
    seed: int = 0  # model init and data order


@dataclass
class OptimizerSection:
    lr: float = 1e-3  # peak learning rate
    min_lr: float = 1e-4  # the cosine decays to this
    warmup_steps: int = 100  # linear warmup from 0
    weight_decay: float = 0.1  # decoupled (AdamW), on matrices only; not on norms, embedding
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8


@dataclass
class EvalSection:
    interval: int = 100  # steps between validation losses (0: never)
    batches: int = 8  # micro-batches per validation, over all ranks


@dataclass
class CheckpointSection:
    interval: int = 500  # steps between checkpoints (0: only the final one)
    keep: int = 2  # newest checkpoints kept (the final one always)


@dataclass
class LogSection:
    interval: int = 10  # steps between log lines
    tensorboard: bool = True  # also write TensorBoard events when it is installed
    peak_flops: float | None = None  # per-device peak for MFU (None: table or measured)
    progress: bool = True  # tqdm bar


@dataclass
class DistributedSection:
    mode: Literal["fsdp", "ddp"] = "fsdp"  # under torchrun: fsdp (FSDP2 fully_shard) or ddp
    backend: Literal["auto", "gloo", "nccl"] = "auto"  # auto: nccl on GPU, gloo on CPU


@dataclass
class SFTSection:
    # Supervised fine-tuning (gemmakit sft): data.train lists JSONL files of conversations,
    # data.valid an optional held-out one, data.tokenizer the vocabulary (default: the model
    # checkpoint's).
    valid_fraction: float = 0.0  # held out of data.train when data.valid is null
    pack: bool = True  # several conversations per sequence, attending only within their own


@dataclass
class RewardSection:
    # Reward model (gemmakit reward): data.train lists JSONL files of preference pairs
    # ({"prompt"|"messages", "chosen", "rejected"}), data.valid an optional held-out one.
    # training.batch_size and micro_batch_size count pairs (a micro-batch: 2 x that many rows).
    valid_fraction: float = 0.0  # held out of data.train when data.valid is null


@dataclass
class DPOSection:
    # Direct preference optimization (gemmakit dpo), on the same preference files as reward.
    beta: float = 0.1  # the implicit reward's scale (the KL regularization's strength)
    valid_fraction: float = 0.0  # held out of data.train when data.valid is null


@dataclass
class LoRASection:
    # Low-rank adapters on the chosen projections; the base stays frozen (gemmakit.model.lora).
    rank: int = 8
    alpha: float = 16.0  # the update is scaled by alpha / rank
    dropout: float = 0.0  # on the adapter's input, in training only
    targets: list[str] = field(
        default_factory=lambda: [
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        ]
    )


@dataclass
class DistillSection:
    # Knowledge distillation (gemmakit distill): the student (model.*) learns a frozen
    # teacher's next-token distributions over the data.train token stream.
    teacher: str  # a checkpoint gemmakit.load_model reads, or an installed model name
    temperature: float = 1.0  # KL between softmax(logits / T) of both, scaled by T^2
    alpha: float = 1.0  # loss = alpha * KL + (1 - alpha) * next-token cross-entropy
    # null: KL over the whole vocabulary; k: over the teacher's k likeliest tokens plus one
    # bucket holding the rest of its mass (and the student's mass on those other tokens)
    top_k: int | None = None


@dataclass
class RLHFSection:
    # RLHF with RLOO (gemmakit rlhf): data.train lists JSONL files of prompts ({"prompt": str
    # or messages} or {"messages": [...]}, a trailing assistant message dropped); the policy
    # samples k answers to each, the reward model scores them. training.batch_size and
    # micro_batch_size count answers (prompts x k); training.seq_len bounds prompt + answer.
    reward_model: str | None = None  # a reward model folder (gemmakit reward)
    k: int = 4  # answers sampled per prompt (>= 2: each one's baseline is the others' mean)
    beta: float = 0.05  # weight of the KL penalty to the starting (reference) model
    max_new_tokens: int = 64  # answer length limit
    temperature: float = 1.0  # sampling; log-probabilities use the same temperature
    top_p: float = 1.0
    top_k: int | None = None


@dataclass
class Recipe:
    run_dir: str = "runs/pretrain"
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    training: TrainingSection = field(default_factory=TrainingSection)
    optimizer: OptimizerSection = field(default_factory=OptimizerSection)
    eval: EvalSection = field(default_factory=EvalSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    log: LogSection = field(default_factory=LogSection)
    distributed: DistributedSection = field(default_factory=DistributedSection)
    sft: SFTSection = field(default_factory=SFTSection)
    reward: RewardSection = field(default_factory=RewardSection)
    dpo: DPOSection = field(default_factory=DPOSection)
    lora: LoRASection | None = None  # null: full fine-tuning
    distill: DistillSection | None = None  # gemmakit distill's teacher and loss
    rlhf: RLHFSection = field(default_factory=RLHFSection)

    def to_dict(self) -> dict:
        return typed_config.to_dict(self)


class RecipeError(ConfigError):
    """A recipe key or value that is not valid; the message names the key and the source."""


def build_recipe(
    values: dict | None = None, overrides: list[str] | None = None, where: str = "recipe"
) -> Recipe:
    """A Recipe from nested `values` (defaults for what is missing), then `key=value` overrides."""
    recipe = typed_config.build(Recipe, values, overrides, where, RecipeError)
    _check(recipe, where)
    return recipe


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read a YAML recipe file and apply `--set` overrides."""
    values = typed_config.read_yaml(path, "recipe file", RecipeError)
    return build_recipe(values, overrides, where=str(path))


def as_recipe(recipe: Recipe | dict | str | Path) -> Recipe:
    """Accept a Recipe, a nested dict or a YAML path."""
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, dict):
        return build_recipe(recipe)
    return load_recipe(recipe)


def _check(r: Recipe, where: str) -> None:
    t = r.training
    for key, value in [
        ("training.steps", t.steps),
        ("training.seq_len", t.seq_len),
        ("training.batch_size", t.batch_size),
        ("training.micro_batch_size", t.micro_batch_size),
    ]:
        if value < 1:
            raise RecipeError(f"{where}: {key} must be >= 1, got {value}")
    if t.loss_chunk_tokens < 0:
        raise RecipeError(f"{where}: training.loss_chunk_tokens must be >= 0 (0: auto)")
    if r.model.preset is None and r.model.checkpoint is None:
        raise RecipeError(f"{where}: set model.preset or model.checkpoint")
    if not r.data.synthetic and not r.data.train:
        raise RecipeError(f"{where}: data.train names no shard dir (or set data.synthetic)")
    if r.data.weights is not None and len(r.data.weights) != len(r.data.train):
        raise RecipeError(
            f"{where}: data.weights has {len(r.data.weights)} entries for "
            f"{len(r.data.train)} data.train dirs"
        )
    if not 0.0 <= r.sft.valid_fraction < 1.0:
        raise RecipeError(
            f"{where}: sft.valid_fraction must be in [0, 1), got {r.sft.valid_fraction}"
        )
    h = r.rlhf
    if h.k < 2:
        raise RecipeError(f"{where}: rlhf.k must be >= 2 (the leave-one-out baseline), got {h.k}")
    if h.beta < 0:
        raise RecipeError(f"{where}: rlhf.beta must be >= 0, got {h.beta}")
    if h.max_new_tokens < 1:
        raise RecipeError(f"{where}: rlhf.max_new_tokens must be >= 1, got {h.max_new_tokens}")
    if not h.temperature > 0:
        raise RecipeError(f"{where}: rlhf.temperature must be > 0, got {h.temperature}")
    if not 0.0 < h.top_p <= 1.0:
        raise RecipeError(f"{where}: rlhf.top_p must be in (0, 1], got {h.top_p}")
    if h.top_k is not None and h.top_k < 1:
        raise RecipeError(f"{where}: rlhf.top_k must be >= 1, got {h.top_k}")
    for key, fraction in [
        ("reward.valid_fraction", r.reward.valid_fraction),
        ("dpo.valid_fraction", r.dpo.valid_fraction),
    ]:
        if not 0.0 <= fraction < 1.0:
            raise RecipeError(f"{where}: {key} must be in [0, 1), got {fraction}")
    if r.dpo.beta <= 0:
        raise RecipeError(f"{where}: dpo.beta must be > 0, got {r.dpo.beta}")
    if r.lora is not None:
        if r.lora.rank < 1:
            raise RecipeError(f"{where}: lora.rank must be >= 1, got {r.lora.rank}")
        if not 0.0 <= r.lora.dropout < 1.0:
            raise RecipeError(f"{where}: lora.dropout must be in [0, 1), got {r.lora.dropout}")
    d = r.distill
    if d is not None:
        if not d.temperature > 0:
            raise RecipeError(f"{where}: distill.temperature must be > 0, got {d.temperature}")
        if not 0 <= d.alpha <= 1:
            raise RecipeError(f"{where}: distill.alpha must be in [0, 1], got {d.alpha}")
        if d.top_k is not None and d.top_k < 1:
            raise RecipeError(f"{where}: distill.top_k must be >= 1 (or null), got {d.top_k}")
