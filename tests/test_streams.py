"""Streams: online never repeats, offline repeats exactly `epochs` times, sharding partitions, resume."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from goldenpath.data import Stream, StreamExhausted
from goldenpath.data.streams import SourceInfo


class IdSource:
    """A random-access source whose samples are their own ids (cheap, so streams can be long)."""

    info = SourceInfo("classification", (1,), 2)

    def __init__(self, size=None):
        self.size = size

    def train_batch(self, index):
        return {"ids": index.clone()}


def drain(stream, steps=None):
    out = []
    while steps is None or len(out) < steps:
        try:
            out.append(torch.cat([b["ids"] for b in stream.next_step()]))
        except StreamExhausted:
            break
    return out


def make(source, **kw):
    args = dict(seed=0, data_seed=0, epochs=1, train_size=None, batch_size=64, micro_batch_size=64)
    args.update(kw)
    return Stream(source, **args)


def test_online_unbounded_never_repeats_over_100k_samples():
    ids = torch.cat(drain(make(IdSource(), batch_size=500, micro_batch_size=125), steps=240))
    assert len(ids) == 120_000
    assert len(torch.unique(ids)) == len(ids)


def test_online_seeds_read_disjoint_samples():
    a = torch.cat(drain(make(IdSource(), seed=0), steps=50))
    b = torch.cat(drain(make(IdSource(), seed=1), steps=50))
    assert not set(a.tolist()) & set(b.tolist())


def test_online_finite_pool_is_a_permutation_then_exhausts():
    stream = make(IdSource(size=1000), batch_size=100, micro_batch_size=50, seed=3)
    ids = torch.cat(drain(stream))
    assert sorted(ids.tolist()) == list(range(1000))
    assert not torch.equal(ids, torch.arange(1000))  # shuffled by the run seed
    with pytest.raises(StreamExhausted):
        stream.next_step()


@pytest.mark.parametrize("pool", [None, 5000])
def test_offline_repeats_the_subset_exactly_epochs_times(pool):
    n, epochs = 300, 4
    stream = make(IdSource(size=pool), epochs=epochs, train_size=n, batch_size=30, micro_batch_size=10, seed=1,
                  data_seed=7)
    ids = torch.cat(drain(stream))
    assert len(ids) == n * epochs
    counts = torch.bincount(ids - ids.min())
    assert set(counts[counts > 0].tolist()) == {epochs} and int((counts > 0).sum()) == n
    per_epoch = ids.view(epochs, n)
    assert all(torch.equal(per_epoch[e].sort().values, per_epoch[0].sort().values) for e in range(epochs))
    assert not torch.equal(per_epoch[0], per_epoch[1])  # reshuffled each epoch
    # The subset is fixed by the data seed, shared by every run seed; only the order changes.
    other = torch.cat(drain(make(IdSource(size=pool), epochs=epochs, train_size=n, batch_size=30,
                                 micro_batch_size=10, seed=2, data_seed=7)))
    assert set(other.tolist()) == set(ids.tolist()) and not torch.equal(other, ids)


@settings(max_examples=40, deadline=None)
@given(world=st.integers(1, 4), accumulation=st.integers(1, 4), micro=st.integers(1, 8),
       pool=st.sampled_from([None, 10_000]), epochs=st.sampled_from([1, 3]))
def test_shards_partition_the_logical_batch(world, accumulation, micro, pool, epochs):
    batch = world * accumulation * micro
    train_size = 131 if epochs > 1 else None  # 3 epochs hold 3 steps of the largest batch (128)
    single = make(IdSource(size=pool), batch_size=batch, micro_batch_size=batch, epochs=epochs,
                  train_size=train_size)
    ranks = [make(IdSource(size=pool), batch_size=batch, micro_batch_size=micro, rank=r, world=world,
                  epochs=epochs, train_size=train_size) for r in range(world)]
    for _ in range(3):
        expected = single.next_step()[0]["ids"]
        parts = [rank.next_step() for rank in ranks]
        assert all(len(p) == accumulation and all(len(b["ids"]) == micro for b in p) for p in parts)
        got = torch.cat([b["ids"] for p in parts for b in p])
        assert torch.equal(got, expected)  # same samples, whatever the number of processes


def test_resume_continues_exactly():
    kw = dict(epochs=3, train_size=200, batch_size=32, micro_batch_size=8, seed=5)
    reference = drain(make(IdSource(size=1000), **kw))
    first = make(IdSource(size=1000), **kw)
    head = drain(first, steps=7)
    resumed = make(IdSource(size=1000), **kw)
    resumed.load_state_dict(first.state_dict())
    tail = drain(resumed)
    assert all(torch.equal(a, b) for a, b in zip(head + tail, reference, strict=True))


def test_real_embedded_stream_ids_are_pool_indices():
    from goldenpath.config import load_config
    from goldenpath.data import build_stream

    config = load_config(None, ["data.image_size=8", "budget.steps=1"])
    stream = build_stream(config.data.build(), config.data, seed=2, batch_size=16, micro_batch_size=4)
    batches = stream.next_step()
    assert [len(b["ids"]) for b in batches] == [4, 4, 4, 4]
    assert torch.equal(torch.cat([b["ids"] for b in batches]), 2 * 2**40 + torch.arange(16))
    assert batches[0]["x"].shape == (4, 3, 8, 8)


@pytest.mark.parametrize("size", [None, 1000])
def test_offline_subsets_are_disjoint_blocks_of_the_pool(size):
    from goldenpath.data.streams import Stream

    class Pool:
        def __init__(self, n):
            self.size = n

        def train_batch(self, index):
            return {"ids": index.clone()}

    seen = []
    for subset in (0, 1, 2):
        stream = Stream(Pool(size), seed=3, data_seed=7, epochs=2, train_size=100, batch_size=50,
                        micro_batch_size=50, subset=subset)
        ids = torch.cat([b["ids"] for _ in range(4) for b in stream.next_step()])
        assert len(set(ids.tolist())) == 100 and len(ids) == 200  # its own 100 samples, twice
        seen.append(set(ids.tolist()))
    assert not (seen[0] & seen[1]) and not (seen[0] & seen[2]) and not (seen[1] & seen[2])


def embedded(*overrides):
    from goldenpath.config import load_config

    return load_config(None, [*overrides, "budget.steps=1"]).data.build()


def test_teacher_samples_depend_on_their_index_alone():
    """Consecutive indices are cut from aligned blocks, each made whole in one call: however a run of indices is
    asked for (one call, uneven pieces, across block edges), every sample is bit for bit the same, and the
    source makes only whole aligned blocks, each once while it is read."""
    from goldenpath.data.synthetic import TeacherStream

    src = embedded("data.image_size=8", "data.mix=0.3")
    size, lo = TeacherStream.BLOCK_CPU, 3 * 2**40 + 100
    made = []
    real = src._batch
    src._batch = lambda split, index: made.append((int(index[0]), len(index))) or real(split, index)
    whole = src.train_batch(torch.arange(lo, lo + 3 * size))
    assert made == [(b * size, size) for b in range(lo // size, lo // size + 4)]
    fresh = embedded("data.image_size=8", "data.mix=0.3")
    pieces, at = [], lo
    for n in (1, 7, size - 30, size + 5, 3 * size - 1 - 7 - (size - 30) - (size + 5)):
        pieces.append(fresh.train_batch(torch.arange(at, at + n)))
        at += n
    assert at == lo + 3 * size
    for k in ("ids", "x", "y"):
        assert torch.equal(torch.cat([p[k] for p in pieces]), whole[k])
    one = fresh.train_batch(torch.arange(lo + 5, lo + 6))
    assert torch.equal(one["y"], whole["y"][5:6]) and torch.equal(one["x"], whole["x"][5:6])


@pytest.mark.parametrize("world, micro", [(1, 16), (2, 8), (4, 4)])
def test_teacher_batches_are_the_same_samples_bit_for_bit_whatever_the_sharding(world, micro):
    """Labels no longer depend on the micro-batch they are made in: one process at batch 64 and ``world``
    processes of micro-batches of ``micro`` read the same images and labels."""
    from goldenpath.config import load_config
    from goldenpath.data import build_stream

    config = load_config(None, ["data.image_size=8", "budget.steps=1", "data.prefetch=0"])
    single = build_stream(config.data.build(), config.data, seed=4, batch_size=64, micro_batch_size=64)
    ranks = [build_stream(config.data.build(), config.data, seed=4, batch_size=64, micro_batch_size=micro,
                          rank=r, world=world) for r in range(world)]
    for _ in range(20):  # 1280 samples: across the aligned blocks' edges
        (expected,) = single.next_step()
        parts = [b for rank in ranks for b in rank.next_step()]
        for k in ("ids", "x", "y"):
            assert torch.equal(torch.cat([b[k] for b in parts]), expected[k])


@pytest.mark.parametrize("source", [("data.source=markov", "data.seq_len=16"), ("data.image_size=8",)])
def test_an_embedded_offline_subset_is_held_and_reads_as_made_step_by_step(monkeypatch, source):
    """Offline on an embedded source: the subset is made once and held; each step gathers its rows. The batches
    are those the stream makes step by step (the subset too large to hold): the same ids in the same order,
    tokens and images bit for bit, teacher labels the online stream's for the same indices (a label made in
    another batch may differ where its uniform lies within float32 error of a class boundary: none here);
    sharded, resumed and over epoch edges alike."""
    import goldenpath.data.streams as streams

    kw = dict(seed=5, data_seed=2, epochs=3, train_size=600, batch_size=64, micro_batch_size=16)
    src = embedded(*source)
    held = make(src, **kw)
    got = [held.next_step() for _ in range(28)]  # 1792 of 1800 samples: three epochs, across their edges
    assert held._pool is not False and len(next(iter(held._pool.values()))) == 600
    with pytest.raises(StreamExhausted):
        held.next_step()
    online = embedded(*source).train_batch(torch.arange(600))  # the subset's indices, as the online stream makes them
    monkeypatch.setattr(streams, "POOL_MOST_BYTES", 0)
    stepwise = make(embedded(*source), **kw)
    for step, batches in enumerate(got):
        assert stepwise._pool is False or step == 0
        for a, b in zip(batches, stepwise.next_step(), strict=True):
            assert a.keys() == b.keys() and torch.equal(a["ids"], b["ids"])
            assert all(torch.equal(a[k], online[k][a["ids"]]) for k in a)
            assert all(torch.equal(a[k], b[k]) for k in a if k != "y")
            if "y" in a:
                assert int((a["y"] != b["y"]).sum()) == 0
    monkeypatch.setattr(streams, "POOL_MOST_BYTES", 2**31)
    resumed = make(embedded(*source), **{**kw, "micro_batch_size": 8}, rank=1, world=2)
    resumed.load_state_dict({"position": 64 * 11})
    for batches in got[11:20]:
        mine = resumed.next_step()
        assert len(mine) == 4 and all(len(b["ids"]) == 8 for b in mine)  # rank 1: the second half, 4 x 8
        for k in batches[0]:
            assert torch.equal(torch.cat([b[k] for b in mine]), torch.cat([b[k] for b in batches])[32:])
