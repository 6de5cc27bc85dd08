"""Prefetched streams against the synchronous ones, batch for batch (torch.equal) and state for state, for
every source buildable here: as is, after a resume at a saved position, after a fork with another batch;
failures in the background thread reach the trainer; the thread ends."""

from __future__ import annotations

import gc
import json
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from goldenpath.config import ConfigError, load_config
from goldenpath.config.identity import identity_key
from goldenpath.data import build_stream, prefetch as pf, StreamExhausted
from goldenpath.data.prefetch import Prefetched
from goldenpath.data.streams import SourceInfo, Stream
from tests.test_sources import DOCS, write_idx

FASHION = Path("/usr/share/datasets/fashion-mnist")


def prefetch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "goldenpath-prefetch"]


@pytest.fixture(autouse=True)
def no_thread_left():
    yield
    gc.collect()
    for t in prefetch_threads():
        t.join(timeout=5)
    assert not prefetch_threads(), "a prefetch thread outlived its test"


# ----------------------------------------------------------------------------- the sources


@pytest.fixture
def sources(tmp_path):
    """{name: overrides} for every source: embedded, files written in their real formats, datasets."""
    rng = np.random.default_rng(0)
    idx = tmp_path / "idx"
    idx.mkdir()
    for name, a in {"train-images-idx3-ubyte": rng.integers(0, 256, (300, 28, 28)),
                    "train-labels-idx1-ubyte": np.arange(300) % 10,
                    "t10k-images-idx3-ubyte": rng.integers(0, 256, (100, 28, 28)),
                    "t10k-labels-idx1-ubyte": np.arange(100) % 10}.items():
        write_idx(idx / name, a)
    cifar = tmp_path / "cifar5m"
    cifar.mkdir()
    for part, (lo, hi) in enumerate([(0, 150), (150, 260)]):
        x = rng.integers(0, 256, (hi - lo, 32, 32, 3), dtype=np.uint8)
        (np.savez if part == 0 else np.savez_compressed)(cifar / f"cifar5m_part{part}.npz", X=x,
                                                         Y=np.arange(lo, hi) % 10)
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": d * 3}) + "\n" for d in DOCS))
    import datasets
    import pandas as pd
    from PIL import Image

    pd.DataFrame({"text": [d * 2 for d in DOCS]}).to_parquet(tmp_path / "docs.parquet")
    images = [Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)) for _ in range(120)]
    features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(num_classes=3)})
    datasets.Dataset.from_dict({"img": images, "label": [i % 3 for i in range(120)]},
                               features=features).to_parquet(tmp_path / "images.parquet")
    text = ["data.source=hf_text", "data.seq_len=15", "data.eval_size=3", "data.probe_size=2",
            "data.shuffle_buffer=8"]  # shuffled: the iterator state must be the synchronous one to resume alike
    out = {
        "teacher": ["data.source=teacher", "data.image_size=8"],
        "teacher-offline": ["data.source=teacher", "data.image_size=8", "data.epochs=3", "data.train_size=48"],
        "markov": ["data.source=markov", "data.vocab_size=8", "data.seq_len=12"],
        "fashion-mnist-idx": ["data.source=fashion_mnist", f"data.path={idx}", "data.eval_size=40",
                              "data.probe_size=20"],
        "cifar5m-npz": ["data.source=cifar5m", f"data.path={cifar}", "data.eval_size=20", "data.probe_size=10"],
        "hf-text-json": [*text, "data.path=json", f"data.data_files={tmp_path / 'docs.jsonl'}"],
        "hf-text-parquet": [*text, "data.path=parquet", f"data.data_files={tmp_path / 'docs.parquet'}",
                            "data.pack=false"],
        "hf-text-offline": [*text, "data.path=json", f"data.data_files={tmp_path / 'docs.jsonl'}",
                            "data.epochs=2", "data.train_size=40"],
        "hf-image-parquet": ["data.source=hf_image", "data.path=parquet", "data.eval_size=8", "data.probe_size=4",
                             f"data.data_files={tmp_path / 'images.parquet'}", "data.shuffle_buffer=8"],
    }
    if (FASHION / "train-images-idx3-ubyte.gz").exists() or (FASHION / "train-images-idx3-ubyte").exists():
        out["fashion-mnist"] = ["data.source=fashion_mnist"]
    return out


SOURCES = ["teacher", "teacher-offline", "markov", "fashion-mnist-idx", "fashion-mnist", "cifar5m-npz",
           "hf-text-json", "hf-text-parquet", "hf-text-offline", "hf-image-parquet"]


def streams(overrides, prefetch: int, *, batch_size=8, micro_batch_size=4, **kw):
    """A stream of its own source (built anew: nothing is shared with the other stream)."""
    data = load_config(None, [*overrides, f"data.prefetch={prefetch}", "budget.steps=1"]).data
    return build_stream(data.build(), data, seed=3, batch_size=batch_size, micro_batch_size=micro_batch_size, **kw)


def take(stream, n: int) -> list:
    """``n`` steps of (micro-batches, state after the step), or the exception a step raised."""
    out = []
    for _ in range(n):
        try:
            batches = stream.next_step()
        except StreamExhausted as e:
            out.append(type(e))
            continue
        out.append((batches, stream.state_dict()))
    return out


def assert_same(got: list, want: list) -> None:
    assert len(got) == len(want)
    for step, (g, w) in enumerate(zip(got, want)):
        assert type(g) is type(w), f"step {step}: {g!r} / {w!r}"
        if not isinstance(w, tuple):
            assert g is w, f"step {step}"
            continue
        assert g[1] == w[1], f"step {step}: state {g[1]} != {w[1]}"
        assert len(g[0]) == len(w[0]), f"step {step}"
        for a, b in zip(g[0], w[0]):
            assert a.keys() == b.keys(), f"step {step}"
            for k in a:
                assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), f"step {step}: {k} differs"


def json_round_trip(state: dict) -> dict:
    return json.loads(json.dumps(state))  # as checkpoints/last keeps it


@pytest.mark.parametrize("name", SOURCES)
def test_prefetched_stream_is_the_synchronous_one_through_resume_and_fork(name, sources):
    if name not in sources:
        pytest.skip("Debian package dataset-fashion-mnist not installed")
    overrides = sources[name]
    plain, fast = streams(overrides, 0), streams(overrides, 2)
    assert isinstance(fast, Prefetched) and not isinstance(plain, Prefetched)
    want, got = take(plain, 4), take(fast, 4)
    assert_same(got, want)
    saved = plain.state_dict()
    assert fast.state_dict() == saved and fast.position == plain.position == 4 * 8
    # rewound to step 1 (a replay), then on past where the pool or the offline epochs end
    rewind = want[0][1]
    plain.load_state_dict(rewind), fast.load_state_dict(rewind)
    assert_same(take(fast, 12), take(plain, 12))
    fast.close()
    # a resume: new streams from the saved state, as a restarted process builds them
    plain, fast = streams(overrides, 0), streams(overrides, 3)
    plain.load_state_dict(json_round_trip(saved)), fast.load_state_dict(json_round_trip(saved))
    assert_same(take(fast, 5), take(plain, 5))
    fast.close()
    # a fork: a child with twice the batch reads on from where the parent stopped
    plain, fast = (streams(overrides, p, batch_size=16, micro_batch_size=8) for p in (0, 1))
    plain.load_state_dict(json_round_trip(saved)), fast.load_state_dict(json_round_trip(saved))
    assert_same(take(fast, 4), take(plain, 4))
    fast.close()


def test_a_sharded_step_with_accumulation_is_the_synchronous_one(sources):
    for overrides in (sources["teacher"], sources["hf-text-json"]):
        kw = dict(batch_size=16, micro_batch_size=4, rank=1, world=2)
        plain, fast = streams(overrides, 0, **kw), streams(overrides, 2, **kw)
        assert_same(take(fast, 5), take(plain, 5))
        fast.close()


def test_a_copied_stream_resumes_from_the_trainer_s_position_not_the_thread_s():
    import copy
    import pickle

    data = load_config(None, ["data.image_size=8", "budget.steps=1"]).data
    fast = build_stream(data.build(), data, seed=0, batch_size=8, micro_batch_size=8)
    take(fast, 2)
    assert fast.position == 16  # the thread's own stream may stand further on
    for clone in (copy.deepcopy(fast), pickle.loads(pickle.dumps(fast))):
        assert clone.position == 16 and clone.next_step()[0]["ids"].tolist() == list(range(16, 24))
        clone.close()
    assert fast.next_step()[0]["ids"].tolist() == list(range(16, 24))
    fast.close()


# ----------------------------------------------------------------------------- failures and the thread


class Failing:
    """A random-access source whose ``fail_at``-th micro-batch raises."""

    info = SourceInfo("classification", (1,), 2)
    size = None

    def __init__(self, fail_at: int):
        self.calls, self.fail_at = 0, fail_at

    def train_batch(self, index):
        self.calls += 1
        if self.calls == self.fail_at:
            raise OSError("disk read failed")
        return {"ids": index.clone()}


def stream_of(source, steps=2, **kw) -> Prefetched:
    args = dict(seed=0, data_seed=0, epochs=1, train_size=None, batch_size=4, micro_batch_size=4)
    return Prefetched(Stream(source, **{**args, **kw}), steps=steps)


def test_an_exception_in_the_thread_reaches_the_trainer_at_its_step():
    fast = stream_of(Failing(fail_at=4))
    outcome = []

    def consume():
        for _ in range(6):
            try:
                outcome.append(fast.next_step()[0]["ids"][0].item())
            except OSError as e:
                outcome.append(str(e))

    consumer = threading.Thread(target=consume)
    consumer.start()
    consumer.join(timeout=30)
    assert not consumer.is_alive(), "the trainer hangs on a failed producer"
    # steps 0-2, the failure at the 4th, then the stream goes on from where it stood (as the synchronous one)
    assert outcome == [0, 4, 8, "disk read failed", 12, 16]
    fast.close()


def test_the_thread_ends_at_close_at_exhaustion_and_when_the_stream_is_dropped():
    fast = stream_of(Failing(fail_at=0))
    fast.next_step()
    assert len(prefetch_threads()) == 1
    fast.close()
    assert not prefetch_threads()
    fast.stream.close()  # every stream has close(), so the trainer closes whichever it has
    with stream_of(Failing(fail_at=0)) as fast:  # closed by the with block, with a full queue
        fast.next_step()
    assert not prefetch_threads()
    from tests.test_streams import IdSource

    finite = stream_of(IdSource(size=12))
    assert len(take(finite, 4)) == 4 and take(finite, 1) == [StreamExhausted]
    for t in prefetch_threads():
        t.join(timeout=5)
    assert not prefetch_threads()  # exhaustion ended it
    dropped = stream_of(Failing(fail_at=0))
    dropped.next_step()
    del dropped
    gc.collect()
    for t in prefetch_threads():
        t.join(timeout=5)
    assert not prefetch_threads()


def test_batches_are_pinned_for_a_cuda_device(monkeypatch):
    pinned = []

    def pin_memory(self, *args):
        pinned.append(self)
        return self.clone()

    monkeypatch.setattr(torch.Tensor, "pin_memory", pin_memory)  # CPU-only torch: pinning is recorded, not done
    from tests.test_streams import IdSource

    source = IdSource()
    plain = Stream(source, seed=0, data_seed=0, epochs=1, train_size=None, batch_size=4, micro_batch_size=2)
    fast = Prefetched(Stream(source, seed=0, data_seed=0, epochs=1, train_size=None, batch_size=4,
                             micro_batch_size=2), steps=2, pin_device=torch.device("cuda"))
    assert_same(take(fast, 3), take(plain, 3))
    fast.close()
    assert len(pinned) >= 6  # every tensor of every micro-batch handed out went through pinning


def test_a_broken_prefetcher_is_caught(monkeypatch, sources):
    """The comparison fails on a producer that drops a step and on one that swaps two."""
    produce = pf._produce

    def faulty(kind):
        def producer(stream, out, halt, pin_device):
            class Broken:
                def __init__(self):
                    self.n, self.held = 0, None

                def next_step(self):
                    self.n += 1
                    if kind == "drop" and self.n == 3:
                        stream.next_step()
                    if kind == "swap" and self.n == 2:
                        self.held = (stream.next_step(), stream.state_dict())
                    if kind == "swap" and self.n == 3:
                        return self.held[0]
                    return stream.next_step()

                def state_dict(self):
                    return stream.state_dict()

            produce(Broken(), out, halt, pin_device)
        return producer

    for kind in ("drop", "swap"):
        monkeypatch.setattr(pf, "_produce", faulty(kind))
        plain, fast = streams(sources["teacher"], 0), streams(sources["teacher"], 2)
        with pytest.raises(AssertionError):
            assert_same(take(fast, 4), take(plain, 4))
        fast.close()


# ----------------------------------------------------------------------------- the config field


def test_prefetch_is_checked_and_does_not_change_what_a_run_computes():
    with pytest.raises(ConfigError, match=r"^data.prefetch: got -1; use 0"):
        load_config(None, ["data.prefetch=-1"])
    assert load_config(None).data.prefetch == 2
    assert identity_key(load_config(None, ["data.prefetch=0"])) == identity_key(load_config(None, ["data.prefetch=4"]))
    from goldenpath.config.identity import RESUMABLE

    assert "data.prefetch" in RESUMABLE  # a run may be resumed with another value
