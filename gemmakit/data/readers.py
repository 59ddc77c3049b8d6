"""Documents from the files users have (plain text, JSONL, Parquet; .gz for the text formats),
streamed one document at a time; and the JSONL the stages write between them."""

from __future__ import annotations

import gzip
import io
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from gemmakit.atomic import atomic_path
from gemmakit.errors import DataError, MissingFileError

TEXT_SUFFIXES = {".txt", ".md", ".text"}
JSONL_SUFFIXES = {".jsonl", ".ndjson", ".json"}
PARQUET_SUFFIXES = {".parquet", ".pq"}
ALL_FIELDS = "*"  # text_field value: every string field of a record, joined by newlines


@dataclass(frozen=True, slots=True)
class Document:
    """One document: a stable id (reported in summaries), its text and the source it came from."""

    id: str
    text: str
    source: str = ""


def _kind(path: Path) -> str:
    suffix = path.suffixes[-2] if path.suffix == ".gz" and len(path.suffixes) > 1 else path.suffix
    for kind, suffixes in (
        ("text", TEXT_SUFFIXES),
        ("jsonl", JSONL_SUFFIXES),
        ("parquet", PARQUET_SUFFIXES),
    ):
        if suffix.lower() in suffixes:
            if kind == "parquet" and path.suffix == ".gz":
                break
            return kind
    raise DataError(
        f"{path}: unknown document format (expected .txt/.md, .jsonl or .parquet, "
        "text formats optionally .gz)"
    )


def _open_text(path: Path) -> TextIO:
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8")
    return open(path, encoding="utf-8")


def decode_error(path: str | Path, err: UnicodeDecodeError) -> DataError:
    """A DataError naming the file and the first line (1-based) that is not UTF-8. The file is
    read again, line by line, to find it (a decoder reading in chunks does not know the line)."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                try:
                    raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    return DataError(
                        f"{path}:{lineno}: not UTF-8 text (byte {raw[e.start]:#04x} at column "
                        f"{e.start + 1})"
                    )
    except OSError:
        pass
    return DataError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})")


def read_utf8(path: str | Path) -> str:
    """The whole text of a UTF-8 file; DataError naming the file and line when it is not UTF-8."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise decode_error(path, e) from None


def _record_text(record: dict, text_field: str, where: str) -> str:
    if text_field == ALL_FIELDS:
        return "\n".join(v for v in record.values() if isinstance(v, str))
    if text_field not in record:
        raise DataError(f"{where}: no field {text_field!r} (fields: {sorted(record)})")
    text = record[text_field]
    if not isinstance(text, str):
        raise DataError(f"{where}: field {text_field!r} is {type(text).__name__}, not a string")
    return text


def read_text(path: Path, split: str = "file", source: str = "") -> Iterator[Document]:
    """A plain-text file as one document (`split="file"`) or one per blank-line-separated
    block (`split="paragraph"`), read line by line."""
    if split not in ("file", "paragraph"):
        raise DataError(f"split must be 'file' or 'paragraph', not {split!r}")
    try:
        yield from _read_text(path, split, source)
    except UnicodeDecodeError as e:
        raise decode_error(path, e) from None


def _read_text(path: Path, split: str, source: str) -> Iterator[Document]:
    with _open_text(path) as f:
        if split == "file":
            text = f.read()
            if text.strip():
                yield Document(f"{path.name}", text, source)
            return
        block: list[str] = []
        n = 0
        for line in f:
            if line.strip():
                block.append(line)
                continue
            if block:
                yield Document(f"{path.name}:{n}", "".join(block).rstrip("\n"), source)
                n += 1
                block = []
        if block:
            yield Document(f"{path.name}:{n}", "".join(block).rstrip("\n"), source)


def read_jsonl(
    path: Path, text_field: str = "text", id_field: str = "id", source: str = ""
) -> Iterator[Document]:
    """One document per JSON line; the id is `id_field` when the record has it, else file:line."""
    try:
        yield from _read_jsonl(path, text_field, id_field, source)
    except UnicodeDecodeError as e:
        raise decode_error(path, e) from None


def _read_jsonl(path: Path, text_field: str, id_field: str, source: str) -> Iterator[Document]:
    with _open_text(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e.msg})") from None
            if not isinstance(record, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
            doc_id = record.get(id_field)
            doc_id = str(doc_id) if doc_id is not None else f"{path.name}:{lineno}"
            src = source or record.get("source") or ""
            yield Document(doc_id, _record_text(record, text_field, where), str(src))


def read_parquet(
    path: Path,
    text_field: str = "text",
    id_field: str = "id",
    source: str = "",
    batch_rows: int = 1024,
) -> Iterator[Document]:
    """One document per row, read in record batches of `batch_rows` (never the whole file)."""
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:
        raise DataError(f"{path}: not a Parquet file ({e})") from e
    names = pf.schema_arrow.names
    if text_field == ALL_FIELDS:
        columns = names
    elif text_field not in names:
        raise DataError(f"{path}: no column {text_field!r} (columns: {names})")
    else:
        columns = [text_field] + ([id_field] if id_field in names else [])
    row = 0
    for batch in pf.iter_batches(batch_size=batch_rows, columns=columns):
        for record in batch.to_pylist():
            where = f"{path}: row {row}"
            doc_id = record.get(id_field)
            doc_id = str(doc_id) if doc_id is not None else f"{path.name}:{row}"
            yield Document(doc_id, _record_text(record, text_field, where), source)
            row += 1


def _expand(paths: Iterable[str | Path]) -> Iterator[Path]:
    for p in paths:
        p = Path(p)
        if p.is_dir():
            files = sorted(f for f in p.rglob("*") if f.is_file() and not f.name.startswith("."))
            if not files:
                raise MissingFileError(f"{p}: folder holds no files")
            yield from files
        elif p.exists():
            yield p
        else:
            raise MissingFileError(f"{p}: no such file or folder")


def read_documents(
    paths: str | Path | Iterable[str | Path],
    text_field: str = "text",
    id_field: str = "id",
    split: str = "file",
    source: str = "",
) -> Iterator[Document]:
    """Documents from files or folders (searched recursively, in sorted order), the format
    chosen by each file's suffix. `text_field` names the JSONL field or Parquet column holding
    the text ("*": all string fields joined); `split` applies to plain text files."""
    if isinstance(paths, str | Path):
        paths = [paths]
    for path in _expand(paths):
        kind = _kind(path)
        if kind == "text":
            yield from read_text(path, split, source)
        elif kind == "jsonl":
            yield from read_jsonl(path, text_field, id_field, source)
        else:
            yield from read_parquet(path, text_field, id_field, source)


def write_documents(docs: Iterable[Document], path: str | Path) -> int:
    """Write documents as JSONL ({"id", "text", "source"}), atomically; returns the count."""
    n = 0
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for doc in docs:
            f.write(
                json.dumps(
                    {"id": doc.id, "text": doc.text, "source": doc.source}, ensure_ascii=False
                )
                + "\n"
            )
            n += 1
    return n
