"""LoRA (Hu et al. 2021): a frozen projection W plus a trainable low-rank update B @ A.

    y = x W^T + (alpha / r) * dropout(x) A^T B^T        A: [r, in], B: [out, r] (zeros at first)

`apply_lora` swaps the chosen projections of a Gemma for `LoRALinear` modules that hold the
base weight by reference (the same Parameter: nothing is copied) and freezes every base
parameter, so an optimizer built over the trainable parameters sees only the A/B matrices.
The adapter's own names (`...q_proj.lora_A.weight`) are PEFT's, less its adapter name; its
on-disk format lives in `gemmakit.checkpoint.peft`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from gemmakit.errors import ConfigError
from gemmakit.model.layers import Linear, linear

# The projections of a Gemma block, by the name HF transformers and PEFT use for them.
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class LoRASpec:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = TARGETS
    rslora: bool = False  # scale alpha / sqrt(rank) instead of alpha / rank (rank-stabilized)

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)


class LoRALinear(nn.Module):
    """A frozen Linear plus alpha/r * B(A(dropout(x))). x [..., in] -> [..., out].

    `weight` (and `bias`) are the base module's own Parameters, so the base stays shared and
    keeps its state-dict name; lora_A / lora_B are nn.Linear so that their names are PEFT's.
    Dropout acts only in training mode with gradients on (never in evaluation or decoding).
    """

    def __init__(self, base: nn.Linear, spec: LoRASpec) -> None:
        super().__init__()
        self.spec = spec
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        kw = dict(bias=False, device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Linear(self.in_features, spec.rank, **kw)
        self.lora_B = nn.Linear(spec.rank, self.out_features, **kw)
        self.dropout = nn.Dropout(spec.dropout) if spec.dropout > 0 else nn.Identity()
        self.scaling = spec.scaling
        self.reset_lora()

    def reset_lora(self) -> None:
        """PEFT's default start: A as nn.Linear initializes it, B zero (no change at step 0)."""
        if self.lora_A.weight.is_meta:
            return
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = linear(x, self.weight, self.bias)
        if self.training and torch.is_grad_enabled():
            x = self.dropout(x)
        return y + self.lora_B(self.lora_A(x)) * self.scaling

    def delta(self) -> torch.Tensor:
        """The update to the weight, scaling * B @ A: [out, in] in float32."""
        a, b = self.lora_A.weight.float(), self.lora_B.weight.float()
        return (b @ a) * self.scaling

    def merged(self) -> Linear:
        """A plain Linear holding W + scaling * B @ A (a new tensor; the base is untouched)."""
        w = self.weight.detach()
        with torch.device("meta"):
            out = Linear(self.in_features, self.out_features, bias=self.bias is not None)
        out.weight = nn.Parameter((w.float() + self.delta()).to(w.dtype))
        if self.bias is not None:
            out.bias = nn.Parameter(self.bias.detach().clone())
        return out

    def extra_repr(self) -> str:
        r = self.lora_A.out_features
        return f"{self.in_features} -> {self.out_features}, rank {r}, scaling {self.scaling:g}"


def projection_names(model: nn.Module, targets: Iterable[str]) -> list[str]:
    """Names (e.g. 'blocks.0.attn.q_proj') of the model's Linear modules whose last name part
    is one of `targets`; an unknown target is a ConfigError naming the known ones."""
    targets = list(targets)
    found = {}
    for name, module in model.named_modules():
        short = name.rsplit(".", 1)[-1]
        if isinstance(module, nn.Linear | LoRALinear) and short in TARGETS:
            found.setdefault(short, []).append(name)
    unknown = [t for t in targets if t not in found]
    if unknown or not targets:
        raise ConfigError(
            f"lora.targets: {', '.join(unknown) or '(none)'} not a projection of this model "
            f"(choose from {', '.join(TARGETS)})"
        )
    return sorted(
        (n for t in targets for n in found[t]),
        key=lambda n: [int(p) if p.isdigit() else p for p in n.split(".")],
    )


def freeze(model: nn.Module) -> None:
    """Every parameter frozen except LoRA's A and B."""
    for name, p in model.named_parameters():
        p.requires_grad_(".lora_A." in name or ".lora_B." in name)


def apply_lora(model: nn.Module, spec: LoRASpec) -> list[str]:
    """Put a LoRALinear on each target projection (in place) and freeze the rest; returns the
    names of the adapted modules. A and B take the base weight's device and dtype (A is drawn
    from torch's global RNG: seed it for a repeatable start)."""
    if spec.rank < 1:
        raise ConfigError(f"lora.rank must be >= 1, got {spec.rank}")
    if not 0.0 <= spec.dropout < 1.0:
        raise ConfigError(f"lora.dropout must be in [0, 1), got {spec.dropout}")
    names = projection_names(model, spec.targets)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        base = getattr(parent, child)
        if isinstance(base, LoRALinear):
            raise ConfigError(f"{name}: already has a LoRA adapter")
        setattr(parent, child, LoRALinear(base, spec))
    freeze(model)
    return names


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """name -> LoRALinear of every adapted projection (empty for a plain model)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def has_lora(model: nn.Module) -> bool:
    return any(isinstance(m, LoRALinear) for m in model.modules())


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its projection's weight (W + scaling * B @ A), leaving a plain
    model with the same outputs and the checkpoint layout of the base. In place; returns it."""
    for name, layer in lora_layers(model).items():
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, layer.merged())
    return model


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter alone: {'blocks.0.attn.q_proj.lora_A.weight': [r, in], ...}."""
    out = {}
    for name, layer in lora_layers(model).items():
        out[f"{name}.lora_A.weight"] = layer.lora_A.weight.detach()
        out[f"{name}.lora_B.weight"] = layer.lora_B.weight.detach()
    return out


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """Within the block the model computes as its frozen base (every adapter's update scaled
    by 0): the reference model of RLHF or DPO, without a second copy of the weights."""
    layers = list(lora_layers(model).values())
    scales = [layer.scaling for layer in layers]
    for layer in layers:
        layer.scaling = 0.0
    try:
        yield
    finally:
        for layer, s in zip(layers, scales):
            layer.scaling = s
