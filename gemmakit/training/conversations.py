"""SFT data: JSONL conversations -> token ids with the model-turn targets -> packed rows.

A row of a JSONL file is one conversation, in either of the formats the field uses:
    {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}
    {"prompt": str | messages, "completion": str | messages}
`encode_chat` turns it into ids; the targets are the next ids on model-turn tokens and IGNORE
elsewhere, so the loss is on what the model says only. Short conversations are packed into
rows of `seq_len` tokens, each with its own segment id (the model keeps them apart: see
`Gemma.forward`). Which conversations share a row, and the row order, are a function of the
seed and the epoch alone, so a resumed run reads exactly the rows the uninterrupted one did.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from gemmakit.chat import encode_chat
from gemmakit.config import TokenIds
from gemmakit.errors import DataError, MissingFileError
from gemmakit.evaluation.datafiles import read_rows
from gemmakit.training.losses import IGNORE

OPEN_ROWS = 16  # rows a packer keeps open for a conversation to fit into (first fit)


@dataclass(frozen=True)
class Conversation:
    messages: list[dict]
    where: str  # "file:line", for errors


@dataclass(frozen=True)
class Example:
    """One conversation as the model sees it: tokens [L] and targets [L] (int64), targets[t]
    = tokens[t + 1] on model-turn tokens, IGNORE elsewhere."""

    tokens: np.ndarray
    targets: np.ndarray


def as_messages(value, role: str, field: str, where: str) -> list[dict]:
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if isinstance(value, list):
        return value
    raise DataError(f"{where}: field {field!r} must be a string or a list of messages")


def row_messages(row: object, where: str) -> list[dict]:
    """The messages of one JSONL row in either format; a DataError names `where` and the field."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    if "messages" in row:
        messages = row["messages"]
        if not isinstance(messages, list):
            raise DataError(f"{where}: field 'messages' must be a list of messages")
        return messages
    if "prompt" in row and "completion" in row:
        prompt = as_messages(row["prompt"], "user", "prompt", where)
        return prompt + as_messages(row["completion"], "assistant", "completion", where)
    raise DataError(
        f"{where}: expected field 'messages', or fields 'prompt' and 'completion' "
        f"(found: {', '.join(map(repr, row)) or 'none'})"
    )


def jsonl_rows(path: str | Path, what: str) -> list[tuple[object, str]]:
    """(row, "file:line") for each record of a JSONL file of `what` (conversations, prompts,
    preference pairs; also a JSON array or Parquet, as `datafiles.read_rows` reads them); a
    missing file, bad JSON or no rows is an error naming it."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"{path}: no such {what} file")
    out = [(row.data, row.where) for row in read_rows(path)]
    if not out:
        raise DataError(f"{path}: no {what}")
    return out


def read_conversations(path: str | Path) -> list[Conversation]:
    """Every conversation of a JSONL file (blank lines skipped); a bad line is a DataError
    naming the file, the line and the field."""
    rows = jsonl_rows(path, "conversations")
    return [Conversation(row_messages(row, where), where) for row, where in rows]


@dataclass
class EncodeStats:
    conversations: int = 0
    truncated: int = 0  # longer than seq_len: cut to it
    dropped: int = 0  # nothing left to learn after the cut
    target_tokens: int = 0


def encode_conversations(
    conversations: Sequence[Conversation],
    tokenizer,
    token_ids: TokenIds,
    seq_len: int,
    vocab_size: int,
) -> tuple[list[Example], EncodeStats]:
    """Examples of at most seq_len positions each, and what happened to the conversations.

    A conversation whose messages are out of order, or without a model turn, is a DataError
    naming its file and line; one longer than seq_len keeps its first seq_len positions.
    """
    stats = EncodeStats()
    examples = []
    for conv in conversations:
        try:
            enc = encode_chat(tokenizer, conv.messages, token_ids=token_ids)
        except DataError as e:
            raise DataError(f"{conv.where}: {e}") from None
        if not any(enc.target_mask):
            raise DataError(f"{conv.where}: no assistant message to learn from")
        ids = np.asarray(enc.ids, dtype=np.int64)
        if ids.max() >= vocab_size:
            raise DataError(
                f"{conv.where}: token id {int(ids.max())} is outside the model's vocabulary "
                f"of {vocab_size} (does the tokenizer match the model?)"
            )
        mask = np.asarray(enc.target_mask[1:], dtype=bool)
        tokens, targets = ids[:-1], np.where(mask, ids[1:], IGNORE)
        stats.conversations += 1
        if len(tokens) > seq_len:
            stats.truncated += 1
            tokens, targets = tokens[:seq_len], targets[:seq_len]
            if (targets == IGNORE).all():
                stats.dropped += 1
                continue
        stats.target_tokens += int((targets != IGNORE).sum())
        examples.append(Example(tokens, targets))
    return examples, stats


def pack(lengths: Sequence[int], order: Sequence[int], seq_len: int) -> list[list[int]]:
    """Rows of example indices, each row's lengths summing to at most seq_len: examples are
    taken in `order` and put into the first of the last OPEN_ROWS rows with room (a new row
    when none has). Deterministic; any fill loss comes from the rows' ends only."""
    rows: list[list[int]] = []
    room: list[int] = []  # free positions of each row
    first_open = 0
    for i in order:
        n = lengths[i]
        for r in range(first_open, len(rows)):
            if room[r] >= n:
                rows[r].append(i)
                room[r] -= n
                break
        else:
            rows.append([i])
            room.append(seq_len - n)
            first_open = max(first_open, len(rows) - OPEN_ROWS)
    return rows


def collate(
    examples: Sequence[Example],
    rows: Sequence[list[int]],
    seq_len: int,
    pad_id: int,
    segments: bool,
) -> dict:
    """Rows of examples as a batch: tokens, targets [B, seq_len] int64 (padding: pad_id and
    IGNORE), lengths [B] int64 (each row's tokens before its padding) and, with `segments`,
    segment_ids [B, seq_len] (1, 2, ... per example, 0 on padding)."""
    B = len(rows)
    tokens = np.full((B, seq_len), pad_id, dtype=np.int64)
    targets = np.full((B, seq_len), IGNORE, dtype=np.int64)
    seg = np.zeros((B, seq_len), dtype=np.int64)
    for b, row in enumerate(rows):
        at = 0
        for k, i in enumerate(row, 1):
            ex = examples[i]
            n = len(ex.tokens)
            tokens[b, at : at + n] = ex.tokens
            targets[b, at : at + n] = ex.targets
            seg[b, at : at + n] = k
            at += n
    batch = {
        "tokens": torch.from_numpy(tokens),
        "targets": torch.from_numpy(targets),
        "lengths": torch.from_numpy((seg != 0).sum(axis=1)),
    }
    if segments:
        batch["segment_ids"] = torch.from_numpy(seg)
    return batch


class PackedRows:
    """The endless, seeded stream of training rows over the examples.

    Epoch e visits every example once in the order of permutation(seed, e), packed into rows
    (or one example per row without packing); global row d is the d-th row of epoch 0, 1, ...
    in turn. Step s of rank r (of world w, m rows per micro-batch) reads rows
    (s * w + r) * m + j, as the shard sampler does, so any split of the global batch reads
    the same rows and a resumed run continues exactly.
    """

    def __init__(self, examples: list[Example], seq_len: int, seed: int, packed: bool = True):
        if not examples:
            raise DataError("no training conversations left (all were too long?)")
        self.examples, self.seq_len, self.seed, self.packed = examples, seq_len, seed, packed
        self.lengths = [len(e.tokens) for e in examples]
        self._epochs: list[list[list[int]]] = []
        self._ends: list[int] = []  # rows before the end of each epoch

    def epoch_rows(self, epoch: int) -> list[list[int]]:
        while len(self._epochs) <= epoch:
            e = len(self._epochs)
            order = np.random.default_rng([self.seed, e]).permutation(len(self.examples))
            rows = (
                pack(self.lengths, order.tolist(), self.seq_len)
                if self.packed
                else [[int(i)] for i in order]
            )
            self._epochs.append(rows)
            self._ends.append((self._ends[-1] if self._ends else 0) + len(rows))
        return self._epochs[epoch]

    def row(self, d: int) -> list[int]:
        """Example indices of global row d."""
        epoch = 0
        while True:
            rows = self.epoch_rows(epoch)
            if d < self._ends[epoch]:
                return rows[d - (self._ends[epoch] - len(rows))]
            epoch += 1

    def batches(
        self, batch_size: int, pad_id: int, rank: int = 0, world_size: int = 1, start: int = 0
    ) -> Iterator[dict]:
        step = start
        while True:
            first = (step * world_size + rank) * batch_size
            rows = [self.row(first + j) for j in range(batch_size)]
            yield collate(self.examples, rows, self.seq_len, pad_id, self.packed)
            step += 1

    def fill(self) -> float:
        """Share of the first epoch's row positions that hold a token (not padding)."""
        rows = self.epoch_rows(0)
        return sum(self.lengths) / (len(rows) * self.seq_len)


def eval_batches(
    examples: list[Example],
    seq_len: int,
    batch_size: int,
    pad_id: int,
    rank: int,
    world_size: int,
    max_batches: int,
    packed: bool = True,
) -> Iterator[dict]:
    """This rank's share of at most `max_batches` held-out batches (over all ranks) of the
    examples in file order: rank r takes batches r, r + w, ...; every rank gets as many."""
    order = list(range(len(examples)))
    lengths = [len(e.tokens) for e in examples]
    rows = pack(lengths, order, seq_len) if packed else [[i] for i in order]
    n = min(max_batches, -(-len(rows) // batch_size)) // world_size
    for k in range(n):
        b = k * world_size + rank
        yield collate(
            examples, rows[b * batch_size : (b + 1) * batch_size], seq_len, pad_id, packed
        )
