"""Training recipes: every knob of a run, with its default, in one nested dataclass.

A recipe file is YAML with the same nesting; `--set optimizer.lr=1e-3` overrides one leaf.
Unknown keys and values of the wrong type are errors that name the key.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from gemmakit.errors import ConfigError, MissingFileError


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
    dtype: str = "auto"
    compile: bool = False  # torch.compile each block
    activation_checkpointing: bool = False  # recompute each block's activations in backward
    # Tokens per logits chunk of the cross-entropy; 0: auto, chunks of at most 512 MiB of
    # float32 logits (524 tokens at a 256k vocabulary, the whole batch at a small one).
    loss_chunk_tokens: int = 0
    grad_clip: float = 1.0  # max global gradient norm (0: no clipping)
    device: str = "auto"  # auto (cuda when present), cpu, cuda
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
    mode: str = "fsdp"  # under torchrun: fsdp (FSDP2 fully_shard) or ddp
    backend: str = "auto"  # auto: nccl on GPU, gloo on CPU


@dataclass
class SFTSection:
    # Supervised fine-tuning (gemmakit sft): data.train lists JSONL files of conversations,
    # data.valid an optional held-out one, data.tokenizer the vocabulary (default: the model
    # checkpoint's).
    valid_fraction: float = 0.0  # held out of data.train when data.valid is null
    pack: bool = True  # several conversations per sequence, attending only within their own


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
    lora: LoRASection | None = None  # null: full fine-tuning

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


CHOICES = {
    "training.dtype": ("auto", "bfloat16", "float32"),
    "training.device": ("auto", "cpu", "cuda"),
    "distributed.mode": ("fsdp", "ddp"),
    "distributed.backend": ("auto", "gloo", "nccl"),
}


class RecipeError(ConfigError):
    """A recipe key or value that is not valid; the message names the key and the source."""


def _coerce(value: Any, hint: Any, key: str, where: str) -> Any:
    """`value` converted to the annotated type `hint`, or a RecipeError naming `key`."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (types.UnionType, typing.Union):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key, where)
    if origin is list:
        if not isinstance(value, list | tuple):
            value = [value]  # a single shard dir is a list of one
        return [_coerce(v, args[0], f"{key}[{i}]", where) for i, v in enumerate(value)]
    if hint is dict:
        if not isinstance(value, dict):
            raise RecipeError(f"{where}: {key} must be a mapping, got {value!r}")
        return dict(value)
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(float(value)) if float(value).is_integer() else int(value)
            except ValueError:
                pass
    elif hint is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads 3e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif hint is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
    name = getattr(hint, "__name__", str(hint))
    raise RecipeError(f"{where}: {key} must be {name}, got {value!r}")


def _fill(obj: Any, values: dict, prefix: str, where: str) -> None:
    if not isinstance(values, dict):
        raise RecipeError(f"{where}: {prefix.rstrip('.') or 'recipe'} must be a mapping")
    hints = typing.get_type_hints(type(obj))
    fields = {f.name for f in dataclasses.fields(obj)}
    for name, value in values.items():
        key = f"{prefix}{name}"
        if name not in fields:
            raise RecipeError(
                f"{where}: unknown key {key!r} (known under {prefix.rstrip('.') or 'the top'}: "
                f"{', '.join(sorted(fields))})"
            )
        current = getattr(obj, name)
        section = _optional_section(hints[name])
        if section is not None and current is None and isinstance(value, dict):
            current = section()  # an optional section (lora) switched on: defaults, then values
            setattr(obj, name, current)
        if dataclasses.is_dataclass(current) and (value is not None or section is None):
            _fill(current, value, f"{key}.", where)
            continue
        if section is not None:
            if value is not None:
                raise RecipeError(f"{where}: {key} must be a mapping or null, got {value!r}")
            setattr(obj, name, None)
            continue
        value = _coerce(value, hints[name], key, where)
        if key in CHOICES and value not in CHOICES[key]:
            raise RecipeError(f"{where}: {key} must be one of {CHOICES[key]}, got {value!r}")
        setattr(obj, name, value)


def _optional_section(hint: Any) -> type | None:
    """The dataclass of a `Section | None` field (a section that may be switched off)."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (types.UnionType, typing.Union) and type(None) in args:
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1 and dataclasses.is_dataclass(inner[0]):
            return inner[0]
    return None


def _nest(dotted: str, value: Any) -> dict:
    out: dict = {}
    node = out
    parts = dotted.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out


def parse_override(text: str) -> tuple[str, Any]:
    """'optimizer.lr=1e-3' -> ('optimizer.lr', 0.001); the value is read as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise RecipeError(f"--set {text!r}: expected key=value, e.g. optimizer.lr=1e-3")
    return key.strip(), yaml.safe_load(raw) if raw.strip() else None


def build_recipe(
    values: dict | None = None, overrides: list[str] | None = None, where: str = "recipe"
) -> Recipe:
    """A Recipe from nested `values` (defaults for what is missing), then `key=value` overrides."""
    recipe = Recipe()
    _fill(recipe, values or {}, "", where)
    for text in overrides or []:
        key, value = parse_override(text)
        _fill(recipe, _nest(key, value), "", f"--set {text}")
    _check(recipe, where)
    return recipe


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read a YAML recipe file and apply `--set` overrides."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"{path}: no such recipe file")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise RecipeError(f"{path}: not valid YAML ({e})") from e
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
    if r.lora is not None:
        if r.lora.rank < 1:
            raise RecipeError(f"{where}: lora.rank must be >= 1, got {r.lora.rank}")
        if not 0.0 <= r.lora.dropout < 1.0:
            raise RecipeError(f"{where}: lora.dropout must be in [0, 1), got {r.lora.dropout}")
