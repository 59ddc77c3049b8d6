"""LoRA adapters in HF PEFT's on-disk format, so PEFT and gemmakit read each other's adapters.

    DIR/adapter_config.json          {"peft_type": "LORA", "r": 8, "lora_alpha": 16, ...}
    DIR/adapter_model.safetensors    base_model.model.<HF module path>.lora_A.weight  [r, in]
                                     base_model.model.<HF module path>.lora_B.weight  [out, r]

The HF module path is the projection's name in HF transformers' Gemma*ForCausalLM, e.g.
`model.layers.0.self_attn.q_proj` (`gemmakit.checkpoint.layouts.hf_layout` gives the mapping).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from gemmakit.checkpoint.layouts import hf_layout
from gemmakit.config import GemmaConfig
from gemmakit.errors import CheckpointError, MissingFileError
from gemmakit.model.lora import LoRASpec, apply_lora, lora_layers, lora_state_dict

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."


def is_adapter_dir(path: str | Path) -> bool:
    return (Path(path) / CONFIG_FILE).is_file()


def hf_module_names(config: GemmaConfig) -> dict[str, str]:
    """Our projection name ('blocks.0.attn.q_proj') -> HF's ('model.layers.0.self_attn.q_proj')."""
    return {
        ours.removesuffix(".weight"): spec.key.removesuffix(".weight")
        for ours, spec in hf_layout(config).items()
        if ours.endswith("_proj.weight")
    }


def adapter_config(spec: LoRASpec, base: str | None, task_type: str = "CAUSAL_LM") -> dict:
    """adapter_config.json as PEFT writes it for a plain LoRA (on a causal LM by default)."""
    return {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base,
        "r": spec.rank,
        "lora_alpha": spec.alpha,
        "lora_dropout": spec.dropout,
        "target_modules": list(spec.targets),
        "use_rslora": spec.rslora,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "use_dora": False,
        "revision": None,
    }


def spec_of(model: nn.Module) -> LoRASpec:
    """The LoRASpec the model's adapters were made with (they all share one)."""
    layers = lora_layers(model)
    if not layers:
        raise CheckpointError("the model has no LoRA adapter to save")
    first = next(iter(layers.values()))
    return first.spec


def save_lora(
    model: nn.Module,
    directory: str | Path,
    base: str | None = None,
    extra_files: dict[str, Path] | None = None,
) -> Path:
    """Write the model's LoRA adapter alone (not the base) as a PEFT folder, atomically.

    model: a Gemma with `apply_lora` adapters; base: recorded as base_model_name_or_path;
    extra_files: more files for the folder (name -> file to copy, e.g. tokenizer.model).
    """
    return write_lora(
        lora_state_dict(model), model.config, spec_of(model), directory, base, extra_files
    )


def write_lora(
    tensors: dict[str, torch.Tensor],
    config: GemmaConfig,
    spec: LoRASpec,
    directory: str | Path,
    base: str | None = None,
    extra_files: dict[str, Path] | None = None,
    modules_to_save: dict[str, torch.Tensor] | None = None,
    task_type: str = "CAUSAL_LM",
) -> Path:
    """Write adapter tensors under our names ('blocks.0.attn.q_proj.lora_A.weight', as
    `lora_state_dict` gives them) as a PEFT folder. modules_to_save: fully trained tensors
    beside the adapter under their HF names (a reward model's {'score.weight': [1, d]}),
    stored as PEFT stores its modules_to_save. Files are written under temporary names and
    renamed into `directory` (which may exist) when complete."""
    from safetensors.torch import save_file

    directory = Path(directory)
    names = hf_module_names(config)
    out = {}
    for name, t in tensors.items():
        module, _, leaf = name.rpartition(".lora_")
        out[f"{PREFIX}{names[module]}.lora_{leaf}"] = t.detach().float().contiguous().cpu()
    for key, t in (modules_to_save or {}).items():
        out[f"{PREFIX}{key}"] = t.detach().float().contiguous().cpu()
    cfg = adapter_config(spec, base, task_type)
    if modules_to_save:
        cfg["modules_to_save"] = sorted({k.rpartition(".")[0] for k in modules_to_save})
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        (tmp / CONFIG_FILE).write_text(json.dumps(cfg, indent=2) + "\n")
        save_file(out, tmp / WEIGHTS_FILE, metadata={"format": "pt"})
        for fname, src in (extra_files or {}).items():
            shutil.copyfile(src, tmp / fname)
        if directory.exists():
            for f in tmp.iterdir():
                os.replace(f, directory / f.name)
            shutil.rmtree(tmp)
        else:
            tmp.chmod(0o755)  # mkdtemp makes it private
            os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def read_adapter_config(directory: str | Path) -> tuple[LoRASpec, dict]:
    """(LoRASpec, the raw config) of a PEFT folder; what gemmakit cannot apply is an error."""
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise MissingFileError(f"{path}: no adapter config (not a PEFT LoRA folder)")
    try:
        cfg = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(cfg, dict) or cfg.get("peft_type", "LORA") != "LORA":
        raise CheckpointError(f"{path}: peft_type {cfg.get('peft_type')!r} is not LORA")
    unsupported = {
        "use_dora": bool(cfg.get("use_dora")),
        "rank_pattern": bool(cfg.get("rank_pattern")),
        "alpha_pattern": bool(cfg.get("alpha_pattern")),
        "bias": cfg.get("bias", "none") != "none",
        "fan_in_fan_out": bool(cfg.get("fan_in_fan_out")),
    }
    for key, bad in unsupported.items():
        if bad:
            raise CheckpointError(f"{path}: {key}={cfg.get(key)!r} is not supported by gemmakit")
    targets = cfg.get("target_modules")
    if isinstance(targets, str):
        raise CheckpointError(
            f"{path}: target_modules as a regex ({targets!r}) is not supported; list the names"
        )
    try:
        spec = LoRASpec(
            rank=int(cfg["r"]),
            alpha=float(cfg.get("lora_alpha", 8)),
            dropout=float(cfg.get("lora_dropout", 0.0)),
            targets=tuple(targets or ()),
            rslora=bool(cfg.get("use_rslora", False)),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: bad field ({e!r})") from e
    return spec, cfg


def _saved_names(cfg: dict, path: Path) -> list[str]:
    names = cfg.get("modules_to_save") or []
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise CheckpointError(f"{path}: modules_to_save must be a list of module names")
    return names


def saved_modules(directory: str | Path) -> dict[str, torch.Tensor]:
    """The fully trained modules stored beside a PEFT folder's adapter (its modules_to_save,
    e.g. a reward model's head), HF key -> tensor: {'score.weight': [1, d]}."""
    from safetensors.torch import load_file

    directory = Path(directory)
    _, cfg = read_adapter_config(directory)
    names = _saved_names(cfg, directory / CONFIG_FILE)
    weights = directory / WEIGHTS_FILE
    try:
        tensors = load_file(weights)
    except Exception as e:  # a truncated or foreign file
        raise CheckpointError(f"{weights}: cannot read ({e})") from e
    out = {}
    for key, t in tensors.items():
        stem = key.removeprefix(PREFIX).replace(".modules_to_save.default.", ".")
        if any(stem.startswith(f"{n}.") for n in names):
            out[stem] = t
    return out


def load_lora(model: nn.Module, directory: str | Path) -> nn.Module:
    """Put the PEFT folder's adapter onto a Gemma (in place; returns it): LoRA modules are
    added on the listed targets unless the model has them already, and their A/B set from the
    file. Every tensor must name one of the model's projections with the right shape, or a
    module of modules_to_save (left to `saved_modules`: a reward head is not the Gemma's)."""
    from safetensors.torch import load_file

    directory = Path(directory)
    spec, cfg = read_adapter_config(directory)
    kept = _saved_names(cfg, directory / CONFIG_FILE)
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        raise MissingFileError(f"{weights}: no adapter weights")
    if not lora_layers(model):
        with torch.random.fork_rng(devices=[]):  # A is overwritten below: leave the RNG alone
            apply_lora(model, spec)
    layers = lora_layers(model)
    ours = {theirs: mine for mine, theirs in hf_module_names(model.config).items()}
    try:
        tensors = load_file(weights)
    except Exception as e:  # a truncated or foreign file
        raise CheckpointError(f"{weights}: cannot read ({e})") from e
    seen = set()
    for key, t in tensors.items():
        stem = key.removeprefix(PREFIX)
        if any(stem.startswith(f"{n}.") for n in kept):
            continue
        module, sep, leaf = stem.rpartition(".lora_")
        module = ours.get(module)
        leaf = leaf.removesuffix(".weight").removesuffix(".default")
        if not sep or module not in layers or leaf not in ("A", "B"):
            raise CheckpointError(f"{weights}: key {key!r} names no adapted projection")
        target = getattr(layers[module], f"lora_{leaf}").weight
        if tuple(t.shape) != tuple(target.shape):
            raise CheckpointError(
                f"{weights}: key {key!r} has shape {list(t.shape)}, expected {list(target.shape)}"
            )
        with torch.no_grad():
            target.copy_(t)
        seen.add((module, leaf))
    missing = [f"{m}.lora_{x}" for m in layers for x in "AB" if (m, x) not in seen]
    if missing:
        raise CheckpointError(f"{weights}: no tensor for {missing[0]} ({len(missing)} missing)")
    return model
