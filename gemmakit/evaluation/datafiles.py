"""Benchmark rows from the local files people have them in.

A benchmark path is one of:
- a data file: Parquet (`datasets`' hub exports), JSON Lines or a JSON array (`to_json`, the
  original releases), an Arrow file (a `datasets` cache or `save_to_disk` shard), CSV;
- a folder holding such files for several splits: a `save_to_disk` folder
  (`validation/data-00000-of-00001.arrow`), a hub snapshot (`data/test-00000-of-00001.parquet`),
  a `datasets` cache folder (`hellaswag-validation.arrow`) or an original release
  (`hellaswag_val.jsonl`, `dev_rand_split.jsonl`, `data/test/*_test.csv`).

A file belongs to a split when the split's name is a word of its path below the folder (words
are split at `-`, `_`, `.` and `/`), so `test-00000-of-00001.parquet`, `ARC-Easy-Test.jsonl`
and `validation/data-00000-of-00001.arrow` are found alike.

Rows are dicts with the location they came from (`file:line` or `file: row N`), which every
error about them names.
"""

from __future__ import annotations

import csv
import gzip
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gemmakit.data.readers import decode_error
from gemmakit.errors import DataError, MissingFileError, UsageError

DATA_SUFFIXES = {".parquet", ".pq", ".jsonl", ".json", ".ndjson", ".arrow", ".csv"}
# metadata files of `datasets` folders, never rows
METADATA_NAMES = {"dataset_info.json", "state.json", "dataset_dict.json", "dataset_infos.json"}


def need_path(name: str, path: Path | None) -> Path:
    """The PATH of `--tasks name:PATH`, checked: UsageError when none was given,
    MissingFileError when nothing is there."""
    if path is None:
        raise UsageError(f"{name} needs its data: --tasks {name}:PATH (a data file or folder)")
    if not path.exists():
        raise MissingFileError(f"{path}: no such file or folder (for {name})")
    return path


def load_json(path: Path) -> Any:
    """The JSON value of a file; DataError naming the file and line when it is not JSON."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None


@dataclass(frozen=True)
class Row:
    """One record of a benchmark file and where it is (`file:line` or `file: row N`)."""

    data: dict[str, Any]
    where: str

    def get(self, name: str, kinds: type | tuple[type, ...] = object) -> Any:
        """The field `name`, checked to be of `kinds`; DataError naming the row otherwise."""
        if name not in self.data:
            raise DataError(f"{self.where}: no field {name!r} (fields: {sorted(self.data)})")
        value = self.data[name]
        if not isinstance(value, kinds) or (isinstance(value, bool) and kinds in (int, float)):
            named = (kinds,) if isinstance(kinds, type) else kinds
            want = "/".join(k.__name__ for k in named)
            raise DataError(
                f"{self.where}: field {name!r} is {type(value).__name__}, expected {want}"
            )
        return value

    def text(self, name: str) -> str:
        return self.get(name, str)

    def has(self, name: str) -> bool:
        return self.data.get(name) is not None

    def error(self, message: str) -> DataError:
        return DataError(f"{self.where}: {message}")


def read_rows(path: str | Path, csv_fields: Sequence[str] | None = None) -> list[Row]:
    """Every row of one data file, chosen by suffix. `csv_fields` names the columns of a CSV
    without a header row (MMLU's release files); None reads the header."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"{path}: no such file")
    suffix = path.suffix.lower()
    try:
        if suffix in (".parquet", ".pq"):
            return _parquet_rows(path)
        if suffix == ".arrow":
            return _arrow_rows(path)
        if suffix == ".csv":
            return _csv_rows(path, csv_fields)
        if suffix in (".jsonl", ".json", ".ndjson"):
            return _json_rows(path, path.read_text(encoding="utf-8"))
        if suffix == ".gz" and path.stem.lower().endswith((".jsonl", ".json")):
            return _json_rows(path, gzip.decompress(path.read_bytes()).decode("utf-8"))
    except UnicodeDecodeError as e:
        raise decode_error(path, e) from None
    raise DataError(
        f"{path}: unknown data format (expected .parquet, .jsonl, .json, .jsonl.gz, .arrow, .csv)"
    )


def _parquet_rows(path: Path) -> list[Row]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for a file that is not Parquet
        raise DataError(f"{path}: not a Parquet file ({e})") from None
    return [Row(r, f"{path}: row {i}") for i, r in enumerate(table.to_pylist())]


def _arrow_rows(path: Path) -> list[Row]:
    """`datasets` writes Arrow IPC streams; the random-access file format is read as well."""
    import pyarrow as pa

    table = None
    for opener in (pa.ipc.open_stream, pa.ipc.open_file):
        try:
            with opener(path) as reader:
                table = reader.read_all()
            break
        except (pa.ArrowInvalid, OSError):
            continue
    if table is None:
        raise DataError(f"{path}: not an Arrow file")
    return [Row(r, f"{path}: row {i}") for i, r in enumerate(table.to_pylist())]


def _json_rows(path: Path, text: str) -> list[Row]:
    if text.lstrip().startswith("["):  # one JSON array of records
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
        rows = [Row(r, f"{path}: record {i}") for i, r in enumerate(records)]
    else:
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(Row(json.loads(line), f"{path}:{n}"))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: not valid JSON ({e.msg})") from None
    for row in rows:
        if not isinstance(row.data, dict):
            raise DataError(f"{row.where}: expected a JSON object, got {type(row.data).__name__}")
    return rows


def _csv_rows(path: Path, fields: Sequence[str] | None) -> list[Row]:
    rows = []
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.reader(f)
        header = list(fields) if fields is not None else next(reader, None)
        if header is None:
            return []
        for record in reader:
            where = f"{path}:{reader.line_num}"
            if len(record) != len(header):
                raise DataError(
                    f"{where}: {len(record)} columns, expected {len(header)} ({', '.join(header)})"
                )
            rows.append(Row(dict(zip(header, record, strict=True)), where))
    return rows


def read_labels(path: Path) -> list[str]:
    """An original release's labels file (`valid-labels.lst`, `dev-labels.lst`): one a line."""
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def with_labels(rows: list[Row], data_file: Path, field: str) -> list[Row]:
    """`rows` with `field` set from the labels file beside `data_file` (`valid.jsonl` ->
    `valid-labels.lst`), when it has one and the rows lack the field; the counts must agree."""
    labels_file = data_file.with_name(data_file.stem + "-labels.lst")
    if not labels_file.is_file() or all(r.has(field) for r in rows):
        return rows
    labels = read_labels(labels_file)
    if len(labels) != len(rows):
        raise DataError(f"{labels_file}: {len(labels)} labels for {len(rows)} rows of {data_file}")
    return [Row({**r.data, field: lab}, r.where) for r, lab in zip(rows, labels, strict=True)]


def eval_and_shot_files(
    path: Path,
    eval_splits: Sequence[str],
    shot_splits: Sequence[str] = ("train",),
    prefer: Sequence[str] = (),
) -> tuple[list[Path], list[Path]]:
    """(evaluation files, shot files) of an existing benchmark path (see `need_path`): a file
    is the evaluation set and no shot files (its shots come from itself); a folder gives the
    first split found of `eval_splits` and of `shot_splits` (no shot files when it has none),
    each narrowed by `prefer` as `split_files` does."""
    if path.is_file():
        return [path], []
    evals = split_files(path, eval_splits, prefer)
    return evals, split_files(path, shot_splits, prefer, required=False)


def _words(path: Path, root: Path) -> set[str]:
    rel = path.relative_to(root).as_posix().lower()
    return set(re.split(r"[-_./\s]+", rel))


def data_files(folder: Path) -> list[Path]:
    """The data files under `folder` (recursively, sorted), without `datasets`' metadata files,
    labels files and hidden files."""
    return sorted(
        f
        for f in folder.rglob("*")
        if f.is_file()
        and f.suffix.lower() in DATA_SUFFIXES
        and f.name not in METADATA_NAMES
        and not any(part.startswith(".") for part in f.relative_to(folder).parts)
    )


def split_files(
    folder: Path, splits: Iterable[str], prefer: Iterable[str] = (), required: bool = True
) -> list[Path]:
    """The files of the first of `splits` (names in order of preference) found under `folder`.
    Among them, those whose path also has every word of `prefer` (a subset name such as
    "challenge") when any does. [] when none is found and not `required`."""
    files = data_files(folder)
    splits = list(splits)
    for split in splits:
        found = [f for f in files if split in _words(f, folder)]
        if found:
            preferred = [f for f in found if set(prefer) <= _words(f, folder)]
            return preferred or found
    if required:
        raise MissingFileError(
            f"{folder}: no data file of split {' or '.join(map(repr, splits))} "
            f"(files: {', '.join(f.relative_to(folder).as_posix() for f in files[:8]) or 'none'})"
        )
    return []
