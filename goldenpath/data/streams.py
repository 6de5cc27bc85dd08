"""Streams: the order in which a run sees its training samples, sharded across processes, resumable.

Two kinds of source feed a stream:

* a *random-access* :class:`Source` (embedded streams, CIFAR-5m parts, idx files): sample ``i`` of the
  training pool is ``source.train_batch(tensor([i]))``. The stream maps global positions 0, 1, 2, ... to
  pool indices, so its whole state is one integer (``position``, samples consumed by all processes);
* a *sequential* :class:`SequentialSource` (Hugging Face ``datasets`` streaming): each process iterates
  its own shard and the state is that iterator's ``state_dict``.

Regimes (docs/science.md): **online** (``epochs == 1``) never yields a pool index twice; **offline**
(``epochs > 1``) fixes a subset of ``train_size`` samples, chosen by the data seed so every run of a sweep
shares it, and visits it ``epochs`` times, reshuffled each epoch by the run seed. An embedded source's
subset (consecutive indices) is made once and held where the source makes its training batches, each step a
gather of its rows (up to POOL_MOST_BYTES; a larger one is made step by step), each sample made once.

Sharding: the optimizer step at global position ``p`` takes positions ``[p, p + batch_size)``; process
``r`` of ``world`` takes the contiguous slice ``[p + r*A*m, p + (r+1)*A*m)`` split into ``A`` micro-batches
of ``m``. A logical batch is therefore the same set of samples whatever the number of processes.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal, Protocol

import torch

from goldenpath.config import accumulation_steps
from goldenpath.data.prefetch import Prefetched
from goldenpath.seeding import Purpose, seeded_generator

Batch = dict[str, torch.Tensor]
"""A micro-batch: always ``ids`` (int64 sample ids); ``x``/``y`` for images, ``input_ids``/``labels`` for text
(labels -100 where no token is predicted)."""

ONLINE_STRIDE = 2**40  # unbounded pools: run seed s reads indices s * 2**40 + position (disjoint across seeds)
POOL_MOST_BYTES = 2**31  # an embedded source's offline subset up to this size is made once and held (Stream)
POOL_CHUNK = 2**16      # samples made per call while the subset is made


@dataclass(frozen=True)
class SourceInfo:
    """What a model needs to know about the data."""

    task: Literal["classification", "lm"]
    input_shape: tuple[int, ...]   # (C, H, W) for images, (T,) for text
    num_classes: int               # classes, or vocabulary size for language models


class Source(Protocol):
    """A random-access training pool plus fixed held-out sets (eval and probe)."""

    info: SourceInfo
    size: int | None  # training pool size; None: unbounded

    def train_batch(self, index: torch.Tensor) -> Batch:
        """The samples at these pool indices (int64), with ``ids`` = index."""

    def heldout(self, split: Literal["eval", "probe"]) -> Batch:
        """The fixed eval or probe set, disjoint from the pool and from each other."""

    def loss_floor(self) -> float | None:
        """Exact Bayes-optimal mean loss on the eval set, where the source knows it."""


class SequentialSource(Protocol):
    """A source read in order (datasets streaming); no random access."""

    info: SourceInfo

    def iterate(self, *, seed: int, rank: int, world: int) -> ExampleIterator:
        """This process's shard of the training stream, shuffled by ``seed``."""

    def collate(self, examples: list[Batch]) -> Batch:
        """Stack single examples into a micro-batch."""

    def heldout(self, split: Literal["eval", "probe"]) -> Batch: ...

    def loss_floor(self) -> float | None: ...


class ExampleIterator(Protocol):
    def __iter__(self) -> Iterator[Batch]: ...
    def __next__(self) -> Batch: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


class StreamExhausted(Exception):
    """The stream has no full logical batch left (finite pool or last offline epoch done)."""


class Stream:
    """This process's micro-batches, one optimizer step at a time, from a random-access source.

    Args:
        source: the training pool.
        seed: the run seed (stream order).
        data_seed: picks the offline subset of a finite pool (shared by all runs of a sweep).
        subset: which disjoint block of ``train_size`` samples of the pool is the offline subset.
        epochs, train_size: the regime (see module docstring).
        batch_size: logical batch (all processes); micro_batch_size: per forward/backward.
    """

    rewinds = True  # loading a state costs nothing (a position): a loss target's replay reads the stream again

    def __init__(self, source: Source, *, seed: int, data_seed: int, epochs: int, train_size: int | None,
                 batch_size: int, micro_batch_size: int, rank: int = 0, world: int = 1, subset: int = 0):
        accumulation = accumulation_steps(batch_size, micro_batch_size, world)
        if train_size is not None and source.size is not None and (subset + 1) * train_size > source.size:
            raise ValueError(f"subset {subset} of train_size {train_size} exceeds the pool size {source.size}")
        self.source, self.seed, self.epochs = source, seed, epochs
        self.batch_size, self.micro_batch_size = batch_size, micro_batch_size
        self.accumulation = accumulation
        self.rank, self.world = rank, world
        self.position = 0
        self._subset: torch.Tensor | None = None
        self._order: tuple[int, torch.Tensor] | None = None  # (epoch, permutation of the subset)
        # an embedded (unbounded) source's offline subset, made once on first use and held where the source makes
        # training batches, its rows gathered each step; False: too large (POOL_MOST_BYTES), made step by step
        self._pool: Batch | None | bool = None if train_size is not None and source.size is None else False
        self._rows: tuple[int, torch.Tensor] | None = None  # (epoch, that epoch's order where the pool is)
        if train_size is not None:
            lo, hi = subset * train_size, (subset + 1) * train_size  # disjoint blocks of one permutation
            pool = None if source.size is None else seeded_generator(data_seed, Purpose.SUBSET)
            self._subset = (torch.arange(lo, hi) if source.size is None
                            else torch.randperm(source.size, generator=pool)[lo:hi])
            self.limit = epochs * train_size
        elif source.size is not None:
            self._permutation = torch.randperm(source.size, generator=seeded_generator(seed, Purpose.ORDER))
            self.limit = source.size
        else:
            self.limit = None

    def indices(self, start: int, stop: int) -> torch.Tensor:
        """Pool indices at global positions [start, stop)."""
        pos = torch.arange(start, stop, dtype=torch.int64)
        if self._subset is not None:
            n = len(self._subset)
            out = torch.empty_like(pos)
            for epoch in torch.unique(pos // n).tolist():
                sel = pos // n == epoch
                out[sel] = self._subset[self._epoch_order(epoch)[pos[sel] % n]]
            return out
        if self.source.size is not None:
            return self._permutation[pos]
        return self.seed * ONLINE_STRIDE + pos

    def _epoch_order(self, epoch: int) -> torch.Tensor:
        order = self._order  # read once: another thread may replace it
        if order is None or order[0] != epoch:
            perm = torch.randperm(len(self._subset), generator=seeded_generator(self.seed, Purpose.EPOCH, epoch))
            order = self._order = (epoch, perm)
        return order[1]

    def next_step(self) -> list[Batch]:
        """This process's micro-batches for the next optimizer step; advances the position."""
        if self.limit is not None and self.position + self.batch_size > self.limit:
            raise StreamExhausted
        if self._pool is None:
            self._pool = self._made_pool()
        if self._pool is False:
            index = self._step_index(self.position)
            batches = [self.source.train_batch(chunk) for chunk in index.split(self.micro_batch_size)]
        else:
            batch = self._pooled(*self._step_span(self.position))
            batches = [{k: v[lo : lo + self.micro_batch_size] for k, v in batch.items()}
                       for lo in range(0, len(batch["ids"]), self.micro_batch_size)]
        self.position += self.batch_size
        return batches

    def _step_span(self, position: int) -> tuple[int, int]:
        """This process's global positions [start, stop) for the step at global ``position``."""
        start = position + self.rank * self.accumulation * self.micro_batch_size
        return start, start + self.accumulation * self.micro_batch_size

    def _step_index(self, position: int) -> torch.Tensor:
        """This process's pool indices for the step at global ``position``."""
        return self.indices(*self._step_span(position))

    def _made_pool(self) -> Batch | bool:
        """An embedded source's offline subset, made once (in runs of consecutive indices: an embedded source
        makes such a run from its own aligned blocks, so every sample is the one the online stream would give
        for its index) and held where the source makes its training batches; False where it would take more
        than POOL_MOST_BYTES (the subset is then made step by step, each micro-batch as one call)."""
        first = self.source.train_batch(self._subset[:1])
        fields = [k for k in first if k != "ids"]
        sample_bytes = sum(first[k][0].numel() * first[k].element_size() for k in fields)
        if not fields or sample_bytes * len(self._subset) > POOL_MOST_BYTES:
            return False
        pool = {k: first[k].new_empty((len(self._subset), *first[k].shape[1:])) for k in fields}
        for lo in range(0, len(self._subset), POOL_CHUNK):
            part = self.source.train_batch(self._subset[lo : lo + POOL_CHUNK])
            for k in fields:
                pool[k][lo : lo + len(part[k])] = part[k]
        return pool

    def _pooled(self, start: int, stop: int) -> Batch:
        """The samples at global positions [start, stop), gathered from the held subset: the epoch's order,
        copied once per epoch to where the pool is, sliced (no copy) and used as one gather per field."""
        n, ids, rows = len(self._subset), [], []
        for epoch in range(start // n, (stop - 1) // n + 1):
            lo, hi = max(start, epoch * n) - epoch * n, min(stop, (epoch + 1) * n) - epoch * n
            order, there = self._epoch_order(epoch), self._rows  # read once: another thread may replace it
            if there is None or there[0] != epoch:
                there = self._rows = (epoch, order.to(next(iter(self._pool.values())).device))
            ids.append(self._subset[order[lo:hi]])
            rows.append(there[1][lo:hi])
        rows = rows[0] if len(rows) == 1 else torch.cat(rows)
        return {"ids": torch.cat(ids), **{k: v[rows] for k, v in self._pool.items()}}

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = int(state["position"])

    def close(self) -> None:
        """Nothing to release (a :class:`~goldenpath.data.prefetch.Prefetched` stream stops its thread)."""


class SequentialStream:
    """Like :class:`Stream` for a sequential source: each process reads its own shard in order."""

    def __init__(self, source: SequentialSource, *, seed: int, batch_size: int, micro_batch_size: int,
                 rank: int = 0, world: int = 1):
        accumulation = accumulation_steps(batch_size, micro_batch_size, world)
        self.source, self.batch_size, self.micro_batch_size = source, batch_size, micro_batch_size
        self.accumulation = accumulation
        self.limit = None
        self.position = 0
        self._it = source.iterate(seed=seed, rank=rank, world=world)

    def next_step(self) -> list[Batch]:
        batches = []
        for _ in range(self.accumulation):
            examples = [next(self._it, None) for _ in range(self.micro_batch_size)]
            if examples[-1] is None:
                raise StreamExhausted
            batches.append(self.source.collate(examples))
        self.position += self.batch_size
        return batches

    # loading a state reads the source again from its oldest buffered example (exact, but slow for a large
    # shuffle buffer), so a loss target's replay reads the micro-batches its snapshot kept instead
    rewinds = False
    # each process reads its own share, which may run out a step before another's: the processes agree each
    # step whether every one has its share (the training loop's ``share_group``)
    ends_apart = True

    def state_dict(self) -> dict:
        return {"position": self.position, "iterator": self._it.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.position = int(state["position"])
        self._it.load_state_dict(state["iterator"])

    def close(self) -> None:
        """Nothing to release (a :class:`~goldenpath.data.prefetch.Prefetched` stream stops its thread)."""


class MemorySource:
    """A random-access pool held in memory: the offline subset of a sequential source."""

    def __init__(self, source: SequentialSource, size: int, *, skip: int = 0):
        it = source.iterate(seed=0, rank=0, world=1)
        examples = []
        for k, example in enumerate(it):
            if k >= skip:
                examples.append(example)
            if len(examples) == size:
                break
        if len(examples) < size:
            raise ValueError(f"the stream holds only {skip + len(examples)} samples, fewer than {skip + size} "
                             f"(data.subset x train_size + train_size)")
        self._pool = source.collate(examples)
        self.info, self.size, self._source = source.info, size, source

    def train_batch(self, index: torch.Tensor) -> Batch:
        batch = {k: v[index] for k, v in self._pool.items()}
        batch["ids"] = index.clone()
        return batch

    def heldout(self, split):
        return self._source.heldout(split)

    def loss_floor(self):
        return self._source.loss_floor()


def build_stream(source, data, *, seed: int, batch_size: int, micro_batch_size: int, rank: int = 0,
                 world: int = 1, device: torch.device | str | None = None) -> Stream | SequentialStream | Prefetched:
    """The training stream for a data config (``data``: goldenpath.config.DataConfig) and run seed.

    With ``data.prefetch`` > 0 it is :class:`~goldenpath.data.prefetch.Prefetched`: that many steps made ahead
    in a background thread, in pinned memory when ``device`` (default: the current CUDA device, if any) is a
    CUDA device.
    """
    if hasattr(source, "train_batch"):
        stream = Stream(source, seed=seed, data_seed=data.seed, epochs=data.epochs, train_size=data.train_size,
                        batch_size=batch_size, micro_batch_size=micro_batch_size, rank=rank, world=world,
                        subset=data.subset)
    elif data.train_size is not None:
        pool = MemorySource(source, data.train_size, skip=data.subset * data.train_size)  # the stream's block
        stream = Stream(pool, seed=seed, data_seed=data.seed, epochs=data.epochs, train_size=data.train_size,
                        batch_size=batch_size, micro_batch_size=micro_batch_size, rank=rank, world=world)
    else:
        stream = SequentialStream(source, seed=seed, batch_size=batch_size, micro_batch_size=micro_batch_size,
                                  rank=rank, world=world)
    if data.prefetch == 0:
        return stream
    return Prefetched(stream, steps=data.prefetch, pin_device=pin_device(device))


def pin_device(device: torch.device | str | None) -> torch.device | None:
    """The CUDA device batches are pinned for, or None (a CPU run, or no GPU)."""
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    return device if device.type == "cuda" else None
