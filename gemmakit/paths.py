"""Paths read from files: a name inside an index or manifest is confined to that file's folder.

A shard index, a data mixture or a checkpoint index names other files by path. Such a file may
come from someone else, so a name in it must not reach outside its folder (`../../x`, `/etc/x`,
a symlink pointing out): it is resolved and checked before anything is read, written or deleted.
"""

from __future__ import annotations

from pathlib import Path

from gemmakit.errors import DataError


def confined(
    base: str | Path,
    name: object,
    source_file: str | Path,
    error: type[Exception] = DataError,
) -> Path:
    """`base / name`, resolved (symlinks followed), when it lies inside `base` (not `base`
    itself).

    base: the folder the name is relative to (usually `source_file`'s folder).
    name: the entry as read from `source_file` (must be a non-empty string).
    source_file: the file the name came from, named in the error.
    error: the exception type raised (a GemmakitError subclass, e.g. CheckpointError).
    Raises `error` naming `source_file` and the entry when the name is not a string, is
    absolute, or leads outside `base`."""
    if not isinstance(name, str) or not name or "\0" in name:
        raise error(f"{source_file}: entry {name!r} is not a file name")
    if Path(name).is_absolute():
        raise error(f"{source_file}: entry {name!r} is an absolute path; it must lie in {base}")
    root = Path(base).resolve()
    path = (root / name).resolve()
    if path == root or not path.is_relative_to(root):
        raise error(f"{source_file}: entry {name!r} points outside {base}")
    return path
