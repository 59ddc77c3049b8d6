"""Atomic file writes: write to a temporary name beside the target, rename when complete."""

from __future__ import annotations

import errno
import json
import math
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path in `path`'s folder; on a clean exit rename it to `path`, on an
    exception delete it, so `path` is either the old file or the complete new one."""
    path = Path(path)
    if path.is_dir():  # else the rename fails naming the temporary file, not `path`
        raise IsADirectoryError(errno.EISDIR, "is a folder, not a file", str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    # a fresh unique name (not mkstemp, whose files are private 0600) gets the usual permissions
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex[:12]}.tmp"
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def strict_json(obj: object) -> object:
    """`obj` with every NaN or infinite float replaced by None (JSON null): Python's json
    module writes them as the bare words NaN/Infinity, which strict JSON readers reject."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: strict_json(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [strict_json(v) for v in obj]
    return obj


def write_json(path: str | Path, obj: object) -> Path:
    """Write `obj` as indented strict JSON (non-finite floats as null), atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(strict_json(obj), indent=2, allow_nan=False) + "\n")
    return Path(path)
