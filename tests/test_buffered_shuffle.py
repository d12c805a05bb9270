"""`data.pipeline.buffered_shuffle`: the streaming shuffle of the shard readers."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from data.pipeline import buffered_shuffle


@pytest.mark.parametrize("n, size", [(0, 4), (1, 4), (7, 2), (50, 8), (50, 50), (50, 200)])
def test_is_a_permutation_and_reproducible(n, size):
    items = list(range(n))
    first = list(buffered_shuffle(iter(items), size, random.Random(5)))
    assert sorted(first) == items
    assert list(buffered_shuffle(iter(items), size, random.Random(5))) == first
    if n >= 7:
        assert first != items
        assert list(buffered_shuffle(iter(items), size, random.Random(6))) != first


@pytest.mark.parametrize("size", [-1, 0, 1])
def test_small_buffer_keeps_the_order(size):
    assert list(buffered_shuffle(iter(range(10)), size, random.Random(0))) == list(range(10))


def test_an_item_moves_at_most_size_places_earlier():
    size = 5
    for seed in range(20):
        out = list(buffered_shuffle(iter(range(60)), size, random.Random(seed)))
        assert all(position >= item - size for position, item in enumerate(out))


def test_buffer_as_large_as_the_stream_is_random_shuffle():
    """Nothing leaves the buffer before the end: the order is Random.shuffle's with the same seed."""
    items = list(range(30))
    reference = list(items)
    random.Random(11).shuffle(reference)
    assert list(buffered_shuffle(iter(items), 30, random.Random(11))) == reference


def test_distribution_of_a_two_item_buffer():
    """a, b, c with a buffer of 2: c replaces a or b (1/2 each), the other two then come out in a uniform order:
    the four orders that do not start with c have probability 1/4 each."""
    counts = Counter("".join(buffered_shuffle(iter("abc"), 2, random.Random(seed))) for seed in range(8000))
    assert set(counts) == {"abc", "acb", "bac", "bca"}
    for order in counts:
        assert abs(counts[order] / 8000 - 0.25) < 0.02, counts


def test_ode_pair_stream_shuffles_and_batches_every_pair_once(tmp_path):
    """`ODEPairStream` (its own reader, same shuffle): every pair once, in batches of 2 plus the remainder, in an
    order other than the stored one that repeats with the seed."""
    import torch

    from data.ode_pairs import ODEPairStream
    from data.shards import ShardSink

    with ShardSink(str(tmp_path / "ode-%06d.tar"), maxcount=4) as sink:
        for i in range(9):
            sink.write({"__key__": f"ode-{i:09d}", "ode.pth": torch.full((2, 1, 1, 1, 1), float(i)),
                        "text.pth": torch.ones(1, 3), "txt": f"prompt {i}", "json": {"text_length": 2}})
        urls = sink.urls

    def keys(seed: int) -> tuple[list[str], list[int]]:
        stream = ODEPairStream(urls, batch_size=2, resampled=False, shuffle_buffer=4, seed=seed, drop_last=False)
        batches = list(stream)
        for batch in batches:  # each pair's tensor still belongs to its key
            assert [int(k[4:]) for k in batch["key"]] == batch["ode"][:, 0].flatten().int().tolist()
        return [k for b in batches for k in b["key"]], [len(b["key"]) for b in batches]

    order, sizes = keys(0)
    assert sizes == [2, 2, 2, 2, 1]
    assert sorted(order) == [f"ode-{i:09d}" for i in range(9)] != order
    assert keys(0)[0] == order
