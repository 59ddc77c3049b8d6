"""The staged mixture: proportions follow the schedule, change at the stage boundary, and the
sampler is deterministic, rank-sharded and resumable like TokenShards."""

from itertools import islice

import numpy as np
import pytest

from gemmakit.data.mixture import MixtureSampler
from gemmakit.data.shards import ShardWriter

STAGES = [
    {"until": 0.5, "weights": {"web": 0.7, "code": 0.2, "math": 0.1}},
    {"until": 1.0, "weights": {"web": 0.2, "code": 0.3, "math": 0.5}},
]
BASE = {"web": 1_000_000, "code": 2_000_000, "math": 3_000_000}  # a source's ids start here


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    out = {}
    for name, base in BASE.items():
        d = tmp_path_factory.mktemp(name)
        with ShardWriter(d, eos_id=base, shard_tokens=300) as w:
            for i in range(30):
                w.add(list(range(base + 1 + 50 * i, base + 1 + 50 * (i + 1))), key=str(i))
        out[name] = d
    return out


def source_of(rows: np.ndarray) -> list[str]:
    names = sorted(BASE, key=BASE.get)
    return [names[int(r[0]) // 1_000_000 - 1] for r in rows]


def test_proportions_follow_the_schedule_and_switch_at_the_boundary(sources):
    m = MixtureSampler(sources, STAGES, total_steps=200)
    batches = list(islice(m.batches(8, 16, seed=0), 200))
    assert m.stage_at(99) == 0 and m.stage_at(100) == 1 and m.stage_at(10_000) == 1
    for lo, hi, stage in ((0, 100, 0), (100, 200, 1)):
        names = [n for b in batches[lo:hi] for n in source_of(b)]
        for name, want in STAGES[stage]["weights"].items():
            got = names.count(name) / len(names)
            assert abs(got - want) < 0.04, (stage, name, got, want)
    # the row just before and just after the boundary use different weights
    assert m.weights_at(99)["web"] == pytest.approx(0.7)
    assert m.weights_at(100)["web"] == pytest.approx(0.2)
    assert source_of(batches[120]) == m.batch_sources(120, 16)


def test_resume_and_ranks_match_an_uninterrupted_single_rank_run(sources):
    m = MixtureSampler(sources, STAGES, total_steps=40)
    straight = list(islice(m.batches(8, 6, seed=2), 40))
    resumed = list(islice(m.batches(8, 6, seed=2, start_step=23), 17))  # across the boundary
    assert all(np.array_equal(a, b) for a, b in zip(straight[23:], resumed, strict=True))
    r0 = list(islice(m.batches(8, 3, rank=0, world_size=2, seed=2, start_step=15), 10))
    r1 = list(islice(m.batches(8, 3, rank=1, world_size=2, seed=2, start_step=15), 10))
    for a, b, both in zip(r0, r1, straight[15:25], strict=True):
        assert np.array_equal(np.concatenate([a, b]), both)


def test_each_source_is_read_without_replacement_within_an_epoch(sources):
    m = MixtureSampler({"web": sources["web"]}, [{"weights": {"web": 1}}], total_steps=10)
    n = m.sources["web"].num_windows(8)
    rows = np.concatenate(list(islice(m.batches(8, 1, seed=0), n)))
    assert len({tuple(r) for r in rows.tolist()}) == n


def test_bad_schedules_are_rejected(sources):
    with pytest.raises(ValueError, match="unknown source"):
        MixtureSampler(sources, [{"until": 1.0, "weights": {"wiki": 1.0}}], 10)
    with pytest.raises(ValueError, match="until"):
        MixtureSampler(
            sources,
            [{"until": 0.8, "weights": {"web": 1}}, {"until": 0.5, "weights": {"web": 1}}],
            10,
        )
    with pytest.raises(ValueError, match="positive sum"):
        MixtureSampler(sources, [{"until": 1.0, "weights": {"web": 0}}], 10)
