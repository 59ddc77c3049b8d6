"""The floating-point dtypes a user may name (`--dtype`, a recipe's `training.dtype`): one
table from name to torch dtype. torch is imported only when a name is turned into a dtype, so
the command line can list the names without it."""

from __future__ import annotations

from typing import TYPE_CHECKING

from gemmakit.errors import UsageError

if TYPE_CHECKING:
    import torch

DTYPES = ("float32", "bfloat16", "float16")


def torch_dtype(name: str | None) -> torch.dtype | None:
    """The torch dtype called `name` (one of DTYPES); None for None."""
    if name is None:
        return None
    if name not in DTYPES:
        raise UsageError(f"unknown dtype {name!r}; choose from {', '.join(DTYPES)}")
    import torch

    return getattr(torch, name)
