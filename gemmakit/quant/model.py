"""Putting quantized weights into a Gemma model: quantize a float model's linear layers and
tied embedding (int8, int4, q8_0, q4_k), or keep a checkpoint's stored blocks at load.

Every linear weight of the blocks (q, k, v, o, gate, up, down) and the embedding table, which
is also the output head, become QuantWeight modules; norms stay float.
"""

from __future__ import annotations

import torch
from torch import nn

from gemmakit.errors import UsageError
from gemmakit.quant.formats import FORMATS, quantize_int4, quantize_int8
from gemmakit.quant.weight import QuantEmbedding, QuantWeight

# load_model(quant=...) / --quant: "keep" keeps what the file stores quantized; the others
# quantize float weights at load ("int4" in groups of 32, "int4-g128" in groups of 128)
QUANT_MODES = ("keep", "int8", "int4", "int4-g128", "q8_0", "q4_k")


def check_mode(mode: str | None) -> None:
    if mode is not None and mode not in QUANT_MODES:
        raise UsageError(f"unknown quantization {mode!r}; choose from {', '.join(QUANT_MODES)}")


def quantize_weight(w: torch.Tensor, mode: str, dtype: torch.dtype) -> QuantWeight | None:
    """float [N, K] -> a QuantWeight in `mode`, or None when K does not fit its blocks."""
    from gemmakit.quant.ggml import quantize_q4_k, quantize_q8_0

    n, k = w.shape
    w = w.detach().float().cpu()
    if mode == "int8":
        q, s = quantize_int8(w)
        return QuantWeight("int8", (n, k), q, s, dtype=dtype)
    if mode in ("int4", "int4-g128"):
        group = 128 if mode == "int4-g128" else 32
        if k % group:
            return None
        return QuantWeight("int4", (n, k), *quantize_int4(w, group), dtype=dtype)
    if mode in ("q8_0", "q4_k"):
        if k % FORMATS[mode].block:
            return None
        blocks = (quantize_q8_0 if mode == "q8_0" else quantize_q4_k)(w)
        return QuantWeight(mode, (n, k), blocks, dtype=dtype)
    raise UsageError(f"cannot quantize to {mode!r}; choose from int8, int4, int4-g128, q8_0, q4_k")


def quantizable(name: str) -> bool:
    """True for the parameter names that are held quantized: block linears and the embedder."""
    return name == "embedder.weight" or (
        name.startswith("blocks.") and name.endswith("_proj.weight")
    )


def swap_weight(model: nn.Module, name: str, weight: QuantWeight) -> None:
    """Put `weight` in place of parameter `name` (a Linear's weight or embedder.weight)."""
    if name == "embedder.weight":
        model.embedder = QuantEmbedding(weight)
        return
    path, _, attr = name.rpartition(".")
    module = model.get_submodule(path)
    del module._parameters[attr]
    setattr(module, attr, weight)


def quantize_model(model: nn.Module, mode: str) -> nn.Module:
    """Replace the model's float linear weights and embedding with QuantWeights in `mode`
    (one at a time, so the float copy of only one tensor exists beside the quantized model).
    Weights already quantized, and those whose width does not fit the blocks, stay as they are.
    """
    check_mode(mode)
    dtype = model.dtype
    device = model.device
    for name, p in list(model.named_parameters()):
        if quantizable(name):
            q = quantize_weight(p, mode, dtype)
            if q is not None:
                swap_weight(model, name, q.to(device))
    return model


def quant_summary(model: nn.Module) -> dict[str, int]:
    """Format name (or float dtype) -> bytes of the model's weights held that way."""
    out: dict[str, int] = {}
    seen = set()
    for m in model.modules():
        if isinstance(m, QuantWeight):
            out[m.fmt] = out.get(m.fmt, 0) + m.nbytes
            seen.update(id(b) for b in m.buffers())
    for p in model.parameters():
        if id(p) not in seen:
            key = str(p.dtype).removeprefix("torch.")
            out[key] = out.get(key, 0) + p.numel() * p.element_size()
    return out


def dequantize_model(model: nn.Module) -> nn.Module:
    """The reverse of quantize_model: every QuantWeight replaced by a float parameter of its
    dequantized values (in its compute dtype): the reference a quantized model is checked
    against, computing the same function in torch's own ops."""
    if isinstance(model.embedder, QuantEmbedding):
        w = model.embedder.weight
        emb = nn.Embedding(*w.shape, device=w.device, dtype=w.dtype)
        emb.weight = nn.Parameter(w.dequantize().to(w.dtype), requires_grad=False)
        model.embedder = emb
    for name, m in list(model.named_modules()):
        if isinstance(m, QuantWeight):
            path, _, attr = name.rpartition(".")
            parent = model.get_submodule(path)
            delattr(parent, attr)
            parent.register_parameter(
                attr, nn.Parameter(m.dequantize().to(m.dtype), requires_grad=False)
            )
    return model
