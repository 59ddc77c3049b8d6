"""Tokenize documents in parallel worker processes and pack them into token shards."""

from __future__ import annotations

import multiprocessing as mp
from collections.abc import Iterable, Iterator
from itertools import islice
from pathlib import Path
from typing import Any, Protocol

from gemmakit.data.readers import Document
from gemmakit.data.shards import ShardWriter
from gemmakit.data.summary import StageSummary
from gemmakit.errors import DataError


class Encoder(Protocol):
    """Anything that turns text into ids: `encode(text, bos=True, special=False) -> list[int]`.

    Documents are encoded as plain text (special=False): a corpus document that holds the
    string "<start_of_turn>" or "<eos>" trains on those characters, never on control ids,
    which only the chat format and the packer (BOS/EOS) put in."""

    def encode(self, text: str, bos: bool = True, special: bool = False) -> list[int]: ...


_worker_tokenizer: Encoder | None = None


def _init_worker(tokenizer: Encoder) -> None:
    global _worker_tokenizer
    _worker_tokenizer = tokenizer


def _encode_chunk(texts: list[str]) -> list[list[int]]:
    assert _worker_tokenizer is not None
    return [_worker_tokenizer.encode(t, bos=True, special=False) for t in texts]


def _chunks(docs: Iterable[Document], size: int) -> Iterator[list[Document]]:
    it = iter(docs)
    while chunk := list(islice(it, size)):
        yield chunk


def _pool_context() -> mp.context.BaseContext:
    # fork hands the tokenizer to workers without pickling it (any object with `encode` works)
    return mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")


def encode_documents(
    docs: Iterable[Document], tokenizer: Encoder, workers: int = 1, chunk_docs: int = 64
) -> Iterator[tuple[Document, list[int]]]:
    """(document, ids) pairs in input order; `workers` > 1 encodes chunks of `chunk_docs`
    documents in that many processes, at most a few chunks ahead of the consumer."""
    if workers <= 1:
        for doc in docs:
            yield doc, tokenizer.encode(doc.text, bos=True, special=False)
        return
    with _pool_context().Pool(workers, initializer=_init_worker, initargs=(tokenizer,)) as pool:
        chunks = _chunks(docs, chunk_docs)
        pending = []
        for chunk in chunks:  # keep 2 chunks per worker in flight: bounded memory, busy workers
            pending.append((chunk, pool.apply_async(_encode_chunk, ([d.text for d in chunk],))))
            if len(pending) >= 2 * workers:
                done, result = pending.pop(0)
                yield from zip(done, result.get(), strict=True)
        for done, result in pending:
            yield from zip(done, result.get(), strict=True)


def tokenize_to_shards(
    docs: Iterable[Document],
    tokenizer: Encoder,
    out_dir: str | Path,
    summary: StageSummary | None = None,
    workers: int = 1,
    shard_tokens: int = 1 << 26,
    val_fraction: float = 0.0,
    eos_id: int | None = None,
    meta: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Encode every document (BOS first), append EOS, and pack into `out_dir` (see
    gemmakit.data.shards for the layout). Returns the index written."""
    summary = summary if summary is not None else StageSummary("tokenize")
    eos = eos_id if eos_id is not None else getattr(tokenizer, "eos_id", None)
    if eos is None or eos < 0:
        raise DataError("tokenizer has no eos_id; pass eos_id=")
    bos = getattr(tokenizer, "bos_id", None)
    with ShardWriter(
        out_dir,
        eos_id=eos,
        bos_id=bos,
        shard_tokens=shard_tokens,
        val_fraction=val_fraction,
        meta=meta,
    ) as writer:
        for doc, ids in encode_documents(docs, tokenizer, workers):
            if len(ids) <= (1 if bos is not None else 0):
                summary.drop("empty after tokenization", doc.id)
                continue
            split = writer.add(ids, key=doc.id)
            summary.keep()
            summary.count(f"{split} documents")
            summary.count(f"{split} tokens", len(ids) + 1)
    summary.info["out_dir"] = str(out_dir)
    return writer.index
