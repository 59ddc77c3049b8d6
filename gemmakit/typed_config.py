"""Typed YAML configs: a tree of dataclasses filled from nested dicts, with `--set key=value`.

Every config file the project reads (training recipes, data pipeline configs, and each later
stage's section) is a dataclass tree; a file holds the same nesting. What the field annotations
allow is what a file may say:
- int, float, str, bool: YAML's value, or a string that reads as one (YAML reads 3e-4 as a str);
- Literal["a", "b"]: one of those values;
- list[X]: a list (a single value is a list of one); dict: any mapping; dict[str, D]: a mapping
  of names to dataclasses D (each filled from its defaults);
- a dataclass: a mapping of its fields; an empty section (YAML null) keeps the defaults;
- X | None: also null; D | Literal[False]: false turns a section off.
A field without a default is required. Unknown keys and values of the wrong type raise
ConfigError (or the caller's subclass), naming the file and the dotted key.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from gemmakit.errors import ConfigError, MissingFileError

T = TypeVar("T")
Off = Literal[False]  # `section: false` in a file: a stage that is skipped


def read_yaml(path: str | Path, what: str = "config file", error=ConfigError) -> dict:
    """The mapping a YAML file holds ({} when empty); a missing file or bad YAML names it."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"{path}: no such {what}")
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise error(f"{path}: not valid YAML ({e})") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise error(f"{path}: expected a mapping at the top level, got {type(values).__name__}")
    return values


def parse_override(text: str, error=ConfigError) -> tuple[str, Any]:
    """'optimizer.lr=1e-3' -> ('optimizer.lr', 0.001); the value is read as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise error(f"--set {text!r}: expected key=value, e.g. optimizer.lr=1e-3")
    return key.strip(), yaml.safe_load(raw) if raw.strip() else None


def nest(dotted: str, value: Any) -> dict:
    """'a.b.c', v -> {'a': {'b': {'c': v}}}."""
    out: dict = {}
    node = out
    parts = dotted.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out


def build(
    cls: type[T],
    values: dict | None = None,
    overrides: list[str] | None = None,
    where: str = "config",
    error: type[ConfigError] = ConfigError,
) -> T:
    """A `cls` from nested `values` (defaults for what is missing), then `key=value` overrides.
    `where` names the source in errors (a file path); an override's errors name the --set."""
    obj = new(cls, values or {}, "", where, error)
    for text in overrides or []:
        key, value = parse_override(text, error)
        fill(obj, nest(key, value), "", f"--set {text}", error)
    return obj


def new(cls: type[T], values: Any, key: str, where: str, error=ConfigError) -> T:
    """A fresh `cls` filled from `values`; a missing required field is an error naming it."""
    if not isinstance(values, dict):
        raise error(f"{where}: {key or 'the top level'} must be a mapping, got {values!r}")
    required = [
        f.name
        for f in dataclasses.fields(cls)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    missing = [name for name in required if name not in values]
    if missing:
        raise error(f"{where}: {key or 'the top level'} needs {', '.join(missing)}")
    hints = typing.get_type_hints(cls)
    given = {
        name: coerce(values[name], hints[name], _join(key, name), where, error=error)
        for name in required
    }
    obj = cls(**given)
    fill(obj, {k: v for k, v in values.items() if k not in required}, key, where, error)
    return obj


def updated(obj: T, values: Any, key: str, where: str, error=ConfigError) -> T:
    """A copy of `obj` (a dataclass, frozen or not) with the fields `values` names, typed and
    checked as `fill` does."""
    if not isinstance(values, dict):
        raise error(f"{where}: {key or 'the top level'} must be a mapping, got {values!r}")
    hints = typing.get_type_hints(type(obj))
    _check_keys(obj, values, key, where, error)
    changes = {
        name: coerce(v, hints[name], _join(key, name), where, getattr(obj, name), error)
        for name, v in values.items()
    }
    return dataclasses.replace(obj, **changes)


def fill(obj: Any, values: Any, key: str, where: str, error=ConfigError) -> None:
    """Set `obj`'s fields (a dataclass, in place) from `values`; nested sections are filled in
    place too, so later overrides change only the leaves they name."""
    if not isinstance(values, dict):
        raise error(f"{where}: {key or 'the top level'} must be a mapping, got {values!r}")
    hints = typing.get_type_hints(type(obj))
    _check_keys(obj, values, key, where, error)
    for name, value in values.items():
        current = getattr(obj, name)
        setattr(obj, name, coerce(value, hints[name], _join(key, name), where, current, error))


def coerce(
    value: Any, hint: Any, key: str, where: str, current: Any = None, error=ConfigError
) -> Any:
    """`value` as the annotated type `hint` (see the module docstring), or an error naming
    `key`. `current`: the field's present value; a section given as a mapping is filled into
    it when it is one (so overrides keep its other fields)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        if _is_choice(value, args):
            return value
        raise error(f"{where}: {key} must be one of {args}, got {value!r}")
    if origin in (types.UnionType, typing.Union):
        if value is None and type(None) in args:
            return None
        for arg in args:  # false for a section that may be off, a choice among others
            if typing.get_origin(arg) is Literal and _is_choice(value, typing.get_args(arg)):
                return value
        inner = [a for a in args if a is not type(None) and typing.get_origin(a) is not Literal]
        return coerce(value, inner[0], key, where, current, error)
    if dataclasses.is_dataclass(hint):
        if value is None:  # an empty section: the defaults
            return (
                current if dataclasses.is_dataclass(current) else new(hint, {}, key, where, error)
            )
        if dataclasses.is_dataclass(current) and isinstance(value, dict):
            fill(current, value, key, where, error)
            return current
        return new(hint, value, key, where, error)
    if origin is list:
        if not isinstance(value, list | tuple):
            value = [value]  # a single shard dir is a list of one
        return [coerce(v, args[0], f"{key}[{i}]", where, error=error) for i, v in enumerate(value)]
    if hint is dict or origin is dict:
        if value is None:  # an empty section
            return {}
        if not isinstance(value, dict):
            raise error(f"{where}: {key} must be a mapping, got {value!r}")
        if not args:
            return dict(value)
        return {
            coerce(k, args[0], key, where, error=error): coerce(
                v, args[1], _join(key, str(k)), where, error=error
            )
            for k, v in value.items()
        }
    if hint is Any:
        return value
    scalar = _scalar(value, hint)
    if scalar is not None:
        return scalar
    name = getattr(hint, "__name__", str(hint))
    raise error(f"{where}: {key} must be {name}, got {value!r}")


def _scalar(value: Any, hint: Any) -> Any:
    """`value` as bool, int, float or str, or None when it does not read as one."""
    number = isinstance(value, int | float) and not isinstance(value, bool)
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
        if number:
            return float(value)
        if isinstance(value, str):  # YAML reads 3e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif hint is str:
        if isinstance(value, str):
            return value
        if number:
            return str(value)
    return None


def to_dict(obj: Any) -> dict:
    """A dataclass tree as nested plain dicts (what a file would say)."""
    return dataclasses.asdict(obj)


def _check_keys(obj: Any, values: dict, key: str, where: str, error) -> None:
    names = [f.name for f in dataclasses.fields(obj)]
    for name in values:
        if name not in names:
            raise error(
                f"{where}: unknown key {_join(key, str(name))!r} "
                f"(known under {key or 'the top'}: {', '.join(sorted(names))})"
            )


def _is_choice(value: Any, choices: tuple) -> bool:
    # by type too: False == 0, but `threshold: 0` is not `false`
    return any(type(value) is type(c) and value == c for c in choices)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name
