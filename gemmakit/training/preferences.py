"""Preference pairs for the reward model and DPO: JSONL rows -> encoded pairs -> batches.

A row is one pair, in TRL's convention:
    {"prompt": str | messages, "chosen": str | messages, "rejected": str | messages}
    {"messages": messages, "chosen": ..., "rejected": ...}      ("messages" is the prompt)
    {"chosen": messages, "rejected": messages}                  (the shared first messages
                                                                 are the prompt)
A string prompt is a user turn, a string answer an assistant turn. Other keys are ignored.
Each side is the whole conversation encoded by `encode_chat`; its response is the part after
the prompt. A micro-batch of m pairs has 2m rows: the m chosen sides, then the m rejected ones
(each pair's two sides in the same micro-batch), right-padded with the pad id.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from gemmakit.chat import encode_chat
from gemmakit.config import TokenIds
from gemmakit.errors import DataError
from gemmakit.training.conversations import as_messages, jsonl_rows
from gemmakit.training.losses import IGNORE


@dataclass(frozen=True)
class Pair:
    prompt: list[dict]
    chosen: list[dict]  # the answer's messages (after the prompt)
    rejected: list[dict]
    where: str  # "file:line", for errors


@dataclass(frozen=True)
class Side:
    """One answer with its prompt: ids [L] and the response mask [L] (True on the answer's
    model-turn tokens, which DPO scores)."""

    ids: np.ndarray
    response: np.ndarray


@dataclass(frozen=True)
class EncodedPair:
    chosen: Side
    rejected: Side


def row_pair(row: object, where: str) -> Pair:
    """The pair of one JSONL row; a DataError names `where` and the field."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    for key in ("chosen", "rejected"):
        if key not in row:
            raise DataError(
                f"{where}: expected fields 'chosen' and 'rejected' "
                f"(found: {', '.join(map(repr, row)) or 'none'})"
            )
    chosen = as_messages(row["chosen"], "assistant", "chosen", where)
    rejected = as_messages(row["rejected"], "assistant", "rejected", where)
    key = "prompt" if "prompt" in row else "messages" if "messages" in row else None
    if key is not None:
        prompt = as_messages(row[key], "user", key, where)
    else:  # implicit prompt: the messages both sides begin with
        n = 0
        while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
            n += 1
        if n == 0:
            raise DataError(
                f"{where}: expected field 'prompt' (or 'messages'), or chosen and rejected "
                f"conversations that begin with the same messages"
            )
        prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
    return Pair(prompt, chosen, rejected, where)


def read_pairs(path: str | Path) -> list[Pair]:
    """Every pair of a JSONL file (blank lines skipped); a bad line is a DataError naming the
    file, the line and the field."""
    return [row_pair(row, where) for row, where in jsonl_rows(path, "preference pairs")]


def _side(tokenizer, prompt: list[dict], answer: list[dict], token_ids, where, field) -> Side:
    try:
        full = encode_chat(tokenizer, prompt + answer, token_ids=token_ids)
        head = encode_chat(tokenizer, prompt, token_ids=token_ids).ids
    except DataError as e:
        raise DataError(f"{where}: {field}: {e}") from None
    mask = np.asarray(full.target_mask, dtype=bool)
    mask[: len(head)] = False  # the prompt's own model turns are context, not the answer
    if not mask.any():
        raise DataError(f"{where}: field {field!r} has no assistant message")
    return Side(np.asarray(full.ids, dtype=np.int64), mask)


@dataclass
class PairStats:
    pairs: int = 0
    dropped: int = 0  # a side longer than seq_len


def encode_pairs(
    pairs: Sequence[Pair], tokenizer, token_ids: TokenIds | None, seq_len: int, vocab_size: int
) -> tuple[list[EncodedPair], PairStats]:
    """Both sides of each pair encoded; a pair with a side longer than seq_len is dropped
    (cutting it would cut off the answer its score or log-probability is about)."""
    stats, out = PairStats(), []
    for p in pairs:
        sides = [
            _side(tokenizer, p.prompt, ans, token_ids, p.where, field)
            for ans, field in ((p.chosen, "chosen"), (p.rejected, "rejected"))
        ]
        stats.pairs += 1
        top = max(int(s.ids.max()) for s in sides)
        if top >= vocab_size:
            raise DataError(
                f"{p.where}: token id {top} is outside the model's vocabulary of {vocab_size} "
                "(does the tokenizer match the model?)"
            )
        if max(len(s.ids) for s in sides) > seq_len:
            stats.dropped += 1
            continue
        out.append(EncodedPair(*sides))
    if not out:
        raise DataError(f"no preference pairs fit in training.seq_len={seq_len} tokens")
    return out, stats


def collate_pairs(pairs: Sequence[EncodedPair], pad_id: int, targets: bool = True) -> dict:
    """Pairs as one batch of 2m rows (chosen sides, then rejected), right-padded:
    tokens [2m, T] int64, lengths [2m] int64 and, with `targets`, targets [2m, T] int64 (the
    next id on response tokens, IGNORE elsewhere: what DPO sums log-probabilities over; a
    reward model takes no next-token logits, and the loop's MFU counts them where given)."""
    sides = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    T = max(len(s.ids) for s in sides)
    tokens = np.full((len(sides), T), pad_id, dtype=np.int64)
    next_ids = np.full((len(sides), T), IGNORE, dtype=np.int64)
    for b, s in enumerate(sides):
        n = len(s.ids)
        tokens[b, :n] = s.ids
        next_ids[b, : n - 1] = np.where(s.response[1:], s.ids[1:], IGNORE)
    batch = {
        "tokens": torch.from_numpy(tokens),
        "lengths": torch.tensor([len(s.ids) for s in sides]),
    }
    if targets:
        batch["targets"] = torch.from_numpy(next_ids)
    return batch


class PairOrder:
    """The endless, seeded order of pair indices: epoch e visits every pair once in the order
    of permutation(seed, e). Step s of rank r (world w, m pairs a micro-batch) reads global
    positions (s * w + r) * m + j, so a resumed run reads what the uninterrupted one did."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed = n, seed
        self._perms: dict[int, np.ndarray] = {}

    def __getitem__(self, d: int) -> int:
        epoch, i = divmod(d, self.n)
        if epoch not in self._perms:
            self._perms = {epoch: np.random.default_rng([self.seed, epoch]).permutation(self.n)}
        return int(self._perms[epoch][i])

    def batches(self, m: int, rank: int, world: int, start: int) -> Iterator[list[int]]:
        step = start
        while True:
            first = (step * world + rank) * m
            yield [self[first + j] for j in range(m)]
            step += 1


def eval_indices(n: int, m: int, rank: int, world: int, max_batches: int) -> list[list[int]]:
    """This rank's share of at most max_batches held-out micro-batches of m pairs (in file
    order; rank r takes batches r, r + w, ...; every rank gets as many)."""
    count = min(max_batches, -(-n // m)) // world
    return [
        list(range(b * m, min(n, (b + 1) * m))) for b in (k * world + rank for k in range(count))
    ]


def split_valid(items: list, fraction: float, seed: int) -> tuple[list, list]:
    """(train, held out): a seeded share `fraction` held out, the same on every rank."""
    if fraction <= 0:
        return items, []
    n = max(1, round(len(items) * fraction))
    held = set(np.random.default_rng([seed, 1]).permutation(len(items))[:n].tolist())
    return (
        [x for i, x in enumerate(items) if i not in held],
        [x for i, x in enumerate(items) if i in held],
    )


class PreferenceData:
    """The recipe's preference pairs, encoded: the training stream and the held-out batches.

    data.train: JSONL files of pairs; data.valid: a held-out file, else `valid_fraction` of
    train held out (seeded). `extra(pairs, indices, split)` may add entries to each batch (DPO's
    reference log-probabilities); split is "train" or "valid". `targets`: batches carry them
    (collate_pairs).
    """

    def __init__(
        self, recipe, tokenizer, config, valid_fraction: float, targets: bool = True
    ) -> None:
        t = recipe.training
        self.recipe, self.pad_id = recipe, tokenizer.token_ids(config.tokens).pad
        self.targets = targets
        pairs = [p for f in recipe.data.train for p in read_pairs(f)]
        valid = read_pairs(recipe.data.valid) if recipe.data.valid else []
        if not valid:
            pairs, valid = split_valid(pairs, valid_fraction, t.seed)

        def encode(items):
            return encode_pairs(items, tokenizer, config.tokens, t.seq_len, config.vocab_size)

        self.train, self.stats = encode(pairs)
        self.valid = encode(valid)[0] if valid else []
        self.order = PairOrder(len(self.train), t.seed)
        self.extra = None

    def summary(self, name: str) -> str:
        s = self.stats
        return (
            f"{name} data: {len(self.train)} training pairs ({s.dropped} of {s.pairs} dropped: "
            f"longer than {self.recipe.training.seq_len} tokens); {len(self.valid)} held out"
        )

    def _batch(self, indices: list[int], split: str) -> dict:
        pairs = self.train if split == "train" else self.valid
        batch = collate_pairs([pairs[i] for i in indices], self.pad_id, self.targets)
        if self.extra is not None:
            batch |= self.extra(indices, split)
        return batch

    def make_batches(self, env, start: int) -> Iterator[dict]:
        m = self.recipe.training.micro_batch_size
        for indices in self.order.batches(m, env.rank, env.world_size, start):
            yield self._batch(indices, "train")

    def make_eval_batches(self, env) -> Iterator[dict]:
        r = self.recipe
        m = r.training.micro_batch_size
        for indices in eval_indices(len(self.valid), m, env.rank, env.world_size, r.eval.batches):
            yield self._batch(indices, "valid")
