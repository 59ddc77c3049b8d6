"""Token shards: exact round trip, windows across shard boundaries, rank sharding, resuming,
atomic writes, parallel tokenization."""

from itertools import islice

import numpy as np
import pytest

from gemmakit.data.readers import Document
from gemmakit.data.shards import INDEX, ShardWriter, TokenShards, permute
from gemmakit.data.tokenize import encode_documents, tokenize_to_shards


class CharTokenizer:
    """One id per character, offset past 65535 so uint16 storage would corrupt them."""

    bos_id, eos_id = 2, 1

    def encode(self, text: str, bos: bool = True, special: bool = False) -> list[int]:
        return ([self.bos_id] if bos else []) + [70_000 + ord(c) for c in text]


def write_counting(directory, n_docs=40, doc_len=37, shard_tokens=100, val_fraction=0.0):
    """Documents whose ids count up 10, 11, 12, ...: every window is identifiable."""
    docs, nxt = [], 10
    with ShardWriter(
        directory, eos_id=1, bos_id=2, shard_tokens=shard_tokens, val_fraction=val_fraction
    ) as w:
        for i in range(n_docs):
            ids = list(range(nxt, nxt + doc_len))
            nxt += doc_len
            docs.append(ids)
            w.add(ids, key=f"doc-{i}")
    return docs


def test_round_trip_exact_with_large_ids_and_document_boundaries(tmp_path):
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 2**32, rng.integers(1, 300)).tolist() for _ in range(25)]
    docs[0][0] = 2**32 - 1
    with ShardWriter(tmp_path, eos_id=1, bos_id=2, shard_tokens=257) as w:
        for i, d in enumerate(docs):
            w.add(d, key=str(i))
    ts = TokenShards(tmp_path)
    stream = np.concatenate([np.array(d + [1], dtype=np.int64) for d in docs])
    assert ts.num_tokens == len(stream) and ts.num_documents == len(docs)
    assert len(ts.index["splits"]["train"]["shards"]) == -(-len(stream) // 257)
    assert np.array_equal(ts.read(0, ts.num_tokens).astype(np.int64), stream)
    for i in (0, 7, 24):  # documents come back whole, EOS appended, even across shards
        assert ts.document(i).tolist() == docs[i] + [1]


def test_windows_at_arbitrary_offsets_cross_shard_boundaries(tmp_path):
    write_counting(tmp_path, shard_tokens=64)
    ts = TokenShards(tmp_path)
    full = ts.read(0, ts.num_tokens)
    for offset, length in [(0, 1), (63, 2), (60, 200), (127, 129), (ts.num_tokens - 5, 5)]:
        assert np.array_equal(ts.read(offset, length), full[offset : offset + length])
    with pytest.raises(IndexError):
        ts.read(ts.num_tokens - 3, 4)


def test_write_rejects_ids_outside_uint32(tmp_path):
    with pytest.raises(ValueError, match="2\\*\\*32"), ShardWriter(tmp_path, eos_id=1) as w:
        w.add([1, 2**32], key="bad")
    assert not list(tmp_path.iterdir())


def test_permutation_is_a_bijection():
    for n in (1, 2, 3, 10, 1000, 4097):
        p = permute(np.arange(n), n, np.uint64(7))
        assert sorted(p.tolist()) == list(range(n))
    assert not np.array_equal(permute(np.arange(50), 50, np.uint64(1)), np.arange(50))


def test_an_epoch_reads_every_window_once(tmp_path):
    write_counting(tmp_path)
    ts = TokenShards(tmp_path)
    seq = 16
    n = ts.num_windows(seq)
    rows = np.concatenate(list(islice(ts.batches(seq, 1, seed=3), n)))
    window_of = {tuple(ts.read(i * seq, seq + 1).tolist()): i for i in range(n)}
    assert rows.shape == (n, seq + 1)
    assert sorted(window_of[tuple(r)] for r in rows.tolist()) == list(range(n))


def test_two_ranks_are_disjoint_and_together_equal_one_rank(tmp_path):
    write_counting(tmp_path)
    ts = TokenShards(tmp_path)
    one = list(islice(ts.batches(8, 6, rank=0, world_size=1, seed=1), 4))
    r0 = list(islice(ts.batches(8, 3, rank=0, world_size=2, seed=1), 4))
    r1 = list(islice(ts.batches(8, 3, rank=1, world_size=2, seed=1), 4))
    for a, b, both in zip(r0, r1, one, strict=True):
        assert np.array_equal(np.concatenate([a, b]), both)
        assert not {tuple(r) for r in a} & {tuple(r) for r in b}


def test_resume_at_step_k_matches_an_uninterrupted_run(tmp_path):
    write_counting(tmp_path)
    ts = TokenShards(tmp_path)
    straight = list(islice(ts.batches(8, 4, seed=5), 30))  # several epochs
    resumed = list(islice(ts.batches(8, 4, seed=5, start_step=17), 13))
    assert all(np.array_equal(a, b) for a, b in zip(straight[17:], resumed, strict=True))
    other_seed = next(ts.batches(8, 4, seed=6))
    assert not np.array_equal(straight[0], other_seed)


def test_validation_split_and_eval_windows(tmp_path):
    docs = write_counting(tmp_path, n_docs=200, val_fraction=0.2)
    train, val = TokenShards(tmp_path, "train"), TokenShards(tmp_path, "val")
    assert train.num_documents + val.num_documents == len(docs)
    assert 20 <= val.num_documents <= 60
    train_ids = set(train.read(0, train.num_tokens).tolist()) - {1}
    val_ids = set(val.read(0, val.num_tokens).tolist()) - {1}
    assert not train_ids & val_ids  # held-out documents never appear in training
    batches = list(val.eval_batches(32, 5))
    rows = np.concatenate(batches)
    assert len(rows) == val.num_windows(32) and all(len(b) <= 5 for b in batches)
    assert np.array_equal(rows[:, 0], [val.read(i * 32, 1)[0] for i in range(len(rows))])
    halves = [np.concatenate(list(val.eval_batches(32, 5, r, 2))) for r in (0, 1)]
    assert sum(map(len, halves)) == len(rows)


def test_exception_leaves_no_partial_files_and_keeps_the_old_index(tmp_path):
    write_counting(tmp_path, n_docs=5)
    before = sorted(p.name for p in tmp_path.iterdir())
    old = TokenShards(tmp_path).read(0, 10)
    with pytest.raises(RuntimeError), ShardWriter(tmp_path, eos_id=1, shard_tokens=16) as w:
        for i in range(50):  # several shards written, then a failure
            w.add(list(range(100, 120)), key=str(i))
        raise RuntimeError("killed mid-write")
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert np.array_equal(TokenShards(tmp_path).read(0, 10), old)
    write_counting(tmp_path, n_docs=3)  # a successful rewrite replaces the old shards
    names = [p.name for p in tmp_path.iterdir()]
    assert not any(n.endswith(".tmp") for n in names)
    assert len([n for n in names if n.endswith(".bin")]) == len(
        TokenShards(tmp_path).index["splits"]["train"]["shards"]
    )


def test_bad_index_gives_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no shard index"):
        TokenShards(tmp_path)
    (tmp_path / INDEX).write_text("{not json")
    with pytest.raises(ValueError, match="index.json"):
        TokenShards(tmp_path)


def test_parallel_tokenization_equals_serial_and_packs_bos_eos(tmp_path):
    tok = CharTokenizer()
    docs = [Document(f"d{i}", "word " * (i % 7 + 1) + str(i)) for i in range(150)]
    serial = [ids for _, ids in encode_documents(docs, tok, workers=1)]
    parallel = [ids for _, ids in encode_documents(docs, tok, workers=2, chunk_docs=8)]
    assert parallel == serial
    tokenize_to_shards(docs, tok, tmp_path, workers=2, shard_tokens=500)
    ts = TokenShards(tmp_path)
    assert ts.bos_id == 2 and ts.eos_id == 1
    for i in (0, 77, 149):
        assert ts.document(i).tolist() == tok.encode(docs[i].text) + [1]
