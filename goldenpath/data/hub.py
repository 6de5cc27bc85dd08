"""Hugging Face datasets through the same Stream interface, streaming.

* ``hf_text`` / ``hf_image``: ``datasets.load_dataset(..., streaming=True)`` (the hub, or local json/parquet
  files via ``path: json`` + ``data_files``), its files in an order of the seed, shuffled by a buffer of
  ``shuffle_buffer`` examples (:class:`_Buffered`), shared among processes as ``datasets`` shares it
  (:meth:`_HFSource.iterate`), resumable exactly through the iterator's ``state_dict``. Text is tokenised
  (``AutoTokenizer`` or a byte-level fallback) and packed into sequences of ``seq_len + 1`` tokens (or
  truncated and padded with ``pack: false``).

Images are standardised per channel with the mean and std of the eval set.
"""

from __future__ import annotations

import collections
import copy
import itertools
import logging
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch

from goldenpath.config import ConfigError, DataConfig, data_source, require
from goldenpath.data.sources import _ImagePool
from goldenpath.data.streams import Batch, SourceInfo
from goldenpath.seeding import Purpose, stream_key

@dataclass(frozen=True)
class _HFData(DataConfig):
    path: str = "json"                 # hub dataset name, or a builder (json, parquet, text) with data_files
    name: str | None = None            # dataset configuration, e.g. "en" for allenai/c4
    data_files: str | dict[str, str] | None = None  # local files for json/parquet (glob, or {split: files})
    split: str = "train"
    eval_split: str | None = None      # held-out split; None: eval and probe come first from `split`
    shuffle_buffer: int = 10_000       # examples in the streaming shuffle buffer

    def check(self) -> None:
        super().check()
        require(self.shuffle_buffer >= 1, "data.shuffle_buffer", f"got {self.shuffle_buffer}", "use >= 1")
        require(self.eval_split != self.split, "data.eval_split", f"is the training split {self.split!r}: the "
                "held-out examples would be trained on", "name another split, or null (the held-out examples "
                "then come first from the split and training skips them)")

    def open(self, split: str):
        """The split as a streaming datasets.IterableDataset."""
        import datasets

        return datasets.load_dataset(self.path, self.name, data_files=self.data_files, split=split, streaming=True)


class _Examples:
    """A dataset's examples in order, with ``state`` (the dataset's state after the last one read) and ``load``."""

    def __init__(self, dataset):
        self._dataset, self._it = dataset, None
        self._loaded: dict | None = None  # the state loaded and not read from yet

    def __iter__(self):
        return self

    def __next__(self):
        if self._it is None:
            self._it = iter(self._dataset)
        self._loaded = None
        return next(self._it)

    @property
    def state(self) -> dict:
        """A copy (what ``datasets`` returns may share parts that go on changing as it reads, as a plain read of
        parquet does); after ``load``, the state loaded until an example is read (``datasets`` applies a loaded
        state when iteration starts, and until then returns its old one)."""
        return copy.deepcopy(self._loaded if self._loaded is not None else self._dataset.state_dict())

    def load(self, state: dict) -> None:
        if self._it is not None:
            self._it.close()
        self._dataset.load_state_dict(state)
        self._it, self._loaded = None, copy.deepcopy(state)


_M64 = 2**64 - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


class _Buffered:
    """The examples of ``source`` (:class:`_Examples`) through a shuffle buffer whose state is exact.

    The buffer holds up to ``size`` examples; each one handed out is drawn uniformly from it (draw ``d`` takes
    slot ``splitmix64(key + d) mod n``: a function of the key and the draw alone) and its slot is refilled
    from the source. ``datasets``' own buffer loses its contents on resume (it refills from where its source
    stopped, so the examples after it differ); here ``state`` names the buffered examples by their place in
    the source's order, with the source's state at a *mark* at or before the oldest of them (one every MARK
    examples read: a copy of the source's state per example halved what a CPU thread hands out), and ``load``
    reads the source again from that mark up to where it stopped, keeping those (about ``size`` x ln ``size``
    examples read again), so a resumed stream hands out exactly what the uninterrupted one does.
    """

    MARK = 64  # examples read between two copies of the source's state

    def __init__(self, source: _Examples, size: int, key: int):
        self._source, self._size, self._key = source, size, key
        self._places: list[int] = []  # each buffered example's place in the source's order, by slot
        self._examples: list[dict] = []  # the buffered examples, by slot
        self._marks: dict[int, dict] = {}  # place (a multiple of MARK) -> the source's state before it
        self._read = 0  # examples read from the source
        self._present: set[int] = set()  # the buffered places
        self._oldest = 0  # no buffered example has a smaller place
        self._low = 0  # the earliest mark kept

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        while len(self._places) < self._size:
            if self._read % self.MARK == 0 and self._read not in self._marks:
                self._marks[self._read] = self._source.state
            try:
                example = next(self._source)
            except StopIteration:
                break
            self._places.append(self._read)
            self._examples.append(example)
            self._present.add(self._read)
            self._read += 1
        if not self._places:
            raise StopIteration
        draw = self._read - len(self._places)  # examples handed out so far
        i = _splitmix64((self._key + draw) & _M64) % len(self._places)
        place, example = self._places[i], self._examples[i]
        self._places[i], self._examples[i] = self._places[-1], self._examples[-1]
        self._places.pop()
        self._examples.pop()
        self._present.discard(place)
        while self._oldest < self._read and self._oldest not in self._present:
            self._oldest += 1
        while self._low + self.MARK <= self._oldest:  # marks a load no longer starts from
            self._marks.pop(self._low, None)
            self._low += self.MARK
        return example

    def _mark(self) -> int:
        """The mark a load starts from: at or before the oldest buffered example (where reading stopped, when
        the buffer is empty: ``_oldest`` never passes ``_read``)."""
        return (self._oldest // self.MARK) * self.MARK

    @property
    def state(self) -> dict:
        """The buffered examples' places and where to read them again from (a copy of a list: cheap enough to
        take after every example, as :class:`_ReadAhead` does)."""
        mark = self._mark()
        if mark not in self._marks:  # nothing read since the start or a load
            self._marks[mark] = self._source.state
        return {"count": self._read, "buffer": list(self._places), "mark": mark, "from": self._marks[mark]}

    def load(self, state: dict) -> None:
        places, self._read = state["buffer"], state["count"]
        wanted, kept = set(places), {}
        self._source.load(state["from"])
        self._marks = {}
        for place in range(state["mark"], self._read):
            if place % self.MARK == 0:
                self._marks[place] = self._source.state
            example = next(self._source)
            if place in wanted:
                kept[place] = example
        self._places, self._examples = list(places), [kept[p] for p in places]
        self._present = set(places)
        self._oldest = min(places) if places else self._read
        self._low = state["mark"]


class _Strided:
    """Every ``world``-th example of ``source``, from the ``rank``-th: this process's share of a stream that every
    process reads whole (a dataset with fewer files than processes, or a number they do not divide)."""

    def __init__(self, source: _Buffered, rank: int, world: int):
        self._source, self._rank, self._world = source, rank, world
        self._taken = 0  # examples of the source read so far

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        while self._taken % self._world != self._rank:
            next(self._source)
            self._taken += 1
        self._taken += 1
        return next(self._source)

    @property
    def state(self) -> dict:
        return {"source": self._source.state, "taken": self._taken}

    def load(self, state: dict) -> None:
        if "source" not in state:
            raise ConfigError("data.eval_split", "this run's stream state was saved while its processes split the "
                              "files after skipping the held-out examples, which let some of them into training; "
                              "it cannot be resumed", "train the run again (or give it a data.eval_split)")
        self._source.load(state["source"])
        self._taken = state["taken"]


class _ReadAhead:
    """Examples read ``n`` at a time and prepared in one call (text: tokenised), handed out one by one; ``state``
    is the examples' state after the last one handed out, as if they were read one by one."""

    def __init__(self, examples, prepare, n: int):
        self._examples, self._prepare, self._n = examples, prepare, n
        self._ready: collections.deque = collections.deque()  # (prepared example, state after reading it)
        self.state = examples.state

    def __iter__(self):
        return self

    def __next__(self):
        if not self._ready:
            read, states = [], []
            for example in itertools.islice(self._examples, self._n):
                read.append(example)
                states.append(self._examples.state)  # what a resume state saved after this example holds
            if not read:
                raise StopIteration
            self._ready.extend(zip(self._prepare(read), states))
        item, self.state = self._ready.popleft()
        return item


class _HFIterator:
    """This process's share of a streaming dataset, shuffled, turned into samples; resumable via state_dict."""

    def __init__(self, source, examples, rank: int, world: int):
        self._source, self._examples, self._rank, self._world = source, examples, rank, world
        self._it: _ReadAhead | None = None
        self._pending: list[int] = []   # packing: tokens read but not yet emitted
        self._count = 0

    def __iter__(self):
        return self

    def __next__(self) -> Batch:
        if self._it is None:
            self._it = _ReadAhead(self._examples, self._source.prepare, self._source.read_ahead)
        sample = self._source.make_sample(self._it, self._pending)
        sample["ids"] = torch.tensor(self._count * self._world + self._rank)
        self._count += 1
        return sample

    def state_dict(self) -> dict:
        examples = self._it.state if self._it is not None else self._examples.state
        return {"examples": examples, "pending": list(self._pending), "count": self._count}

    def load_state_dict(self, state: dict) -> None:
        if "examples" not in state:  # saved when datasets' own buffer shuffled: it cannot be put back
            raise ConfigError("data.shuffle_buffer", "this run's stream state was saved by an earlier goldenpath, "
                              "whose shuffle buffer a resume could not put back", "train the run again from the start")
        self._examples.load(state["examples"])
        self._pending[:] = state["pending"]
        self._count = state["count"]
        self._it = None


class _NoBufferWarning(logging.Filter):
    """Drops ``datasets``' warning that a loaded state holds no shuffle buffer contents: the buffer of the
    datasets this module reads holds one example, handed out at once (the files' order is all it shuffles),
    so it has nothing to lose."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "state dict of a shuffle buffer" not in record.getMessage()


def _quiet_buffer_warning() -> None:
    log = logging.getLogger("datasets.iterable_dataset")
    if not any(isinstance(f, _NoBufferWarning) for f in log.filters):
        log.addFilter(_NoBufferWarning())


class _HFSource:
    """Common parts of streaming text and image sources."""

    read_ahead = 1  # training examples read and prepared at once

    def __init__(self, cfg: _HFData):
        self.cfg = cfg

    def prepare(self, examples: list[dict]) -> list:
        """What ``make_sample`` reads for each example."""
        return examples

    def _train_dataset(self):
        ds = self.cfg.open(self.cfg.split)
        if self.cfg.eval_split is None:
            ds = ds.skip(self._heldout_examples)
        return ds

    def iterate(self, *, seed: int, rank: int, world: int) -> _HFIterator:
        """This process's examples: a dataset of several files read in an order of the seed (``datasets``'
        shuffle with a buffer of one: its buffer keeps no contents in its state; it costs some 130 us per example,
        20x a plain read, so a dataset of one file is read as it is), then shuffled by a :class:`_Buffered`
        buffer. Without ``data.eval_split`` the files are read in their order, after the held-out examples (the
        first of the split), and the buffer alone shuffles. As ``datasets.distributed.split_dataset_by_node``
        splits: where the processes divide the files (and no held-out examples are skipped), each process
        buffers its own files; otherwise every process buffers the whole stream alike and takes every
        ``world``-th example, so a logical batch holds the same examples whatever the number of processes (the
        same documents: packed text, ``data.pack``, cuts each process's documents into sequences of its own, so
        the sequences of a batch depend on the number of processes; unpacked, they do not)."""
        from datasets.distributed import split_dataset_by_node

        _quiet_buffer_warning()
        ds = self._train_dataset()
        # without an eval split the held-out examples are the first of the split, skipped here: datasets then
        # keeps the files in their order (a shuffle would only cost its per-example time), and a split by node
        # would divide the skip among the processes' files (held-out examples trained on, others never read)
        skipped = self.cfg.eval_split is None
        if ds.num_shards > 1 and not skipped:
            ds = ds.shuffle(seed=seed, buffer_size=1)
        if ds.num_shards % world == 0 and (world == 1 or not skipped):
            buffered = _Buffered(_Examples(split_dataset_by_node(ds, rank=rank, world_size=world)),
                                 self.cfg.shuffle_buffer, stream_key(seed, Purpose.BUFFER, rank) & _M64)
            return _HFIterator(self, buffered, rank, world)
        # process 0's key, as one process reading the whole stream has: its order whatever the number of processes
        buffered = _Buffered(_Examples(ds), self.cfg.shuffle_buffer, stream_key(seed, Purpose.BUFFER, 0) & _M64)
        return _HFIterator(self, _Strided(buffered, rank, world), rank, world)

    @cached_property
    def _heldout_data(self) -> tuple[dict[str, Batch], int]:
        """Eval then probe samples read in order from the held-out split, and the raw examples consumed."""
        ds = self.cfg.open(self.cfg.eval_split or self.cfg.split)
        counting = _Counting(iter(ds))
        pending: list[int] = []
        out = {split: self._take(counting, pending, split, n, "the held-out data has", f"lower data.{split}_size")
               for split, n in (("eval", self.cfg.eval_size), ("probe", self.cfg.probe_size))}
        return out, counting.n

    def _take(self, examples, pending: list[int], split: str, n: int, where: str, fix: str) -> Batch:
        """The next ``n`` samples of ``examples`` (ids 0..n-1) for the held-out ``split``, or a one-line error."""
        samples = []
        examples = (item for example in examples for item in self.prepare([example]))  # one at a time: counted
        for i in range(n):
            try:
                samples.append(self.make_sample(examples, pending))
            except StopIteration:
                raise ConfigError(f"data.{split}_size", f"{where} only {i} samples for {n}", fix) from None
            samples[-1]["ids"] = torch.tensor(i)
        return self.collate(samples)

    @property
    def _heldout_examples(self) -> int:
        return self._heldout_data[1]

    def heldout(self, split: str) -> Batch:
        return self._heldout_data[0][split]

    def loss_floor(self) -> None:
        return None


class _Counting:
    def __init__(self, it):
        self.it, self.n = it, 0

    def __iter__(self):
        return self

    def __next__(self):
        item = next(self.it)
        self.n += 1
        return item


class ByteTokenizer:
    """UTF-8 bytes as tokens 0..255 plus an end-of-text token 256: needs no download."""

    vocab_size = 257
    eos_token_id = 256

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return list(text.encode("utf-8"))


@data_source("hf_text")
@dataclass(frozen=True)
class HFTextData(_HFData):
    """Text from a (streaming) Hugging Face dataset, tokenised and packed into fixed-length sequences."""

    source: str = "hf_text"
    eval_size: int = 256               # sequences
    probe_size: int = 128              # sequences
    text_field: str = "text"
    tokenizer: str = "bytes"           # "bytes", or a name/path for transformers.AutoTokenizer
    seq_len: int = 128                 # predicted tokens per sequence
    pack: bool = True                  # True: concatenate documents (eos between); False: one padded document each

    def check(self) -> None:
        super().check()
        require(self.seq_len >= 1, "data.seq_len", f"got {self.seq_len}", "use >= 1 token")

    def build(self) -> HFTextSource:
        return HFTextSource(self)


class HFTextSource(_HFSource):
    def __init__(self, cfg: HFTextData):
        super().__init__(cfg)
        if cfg.tokenizer == "bytes":
            self.tokenizer = ByteTokenizer()
            vocab, self.eos = ByteTokenizer.vocab_size, ByteTokenizer.eos_token_id
        else:
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer)
            vocab = len(self.tokenizer)
            self.eos = self.tokenizer.eos_token_id if self.tokenizer.eos_token_id is not None else vocab - 1
        self.backend = self._plain_backend(self.tokenizer)
        self.info = SourceInfo("lm", (cfg.seq_len,), vocab)

    @staticmethod
    def _plain_backend(tokenizer):
        """A fast tokenizer's Rust core without the truncation and padding its tokenizer.json may set (many hub
        tokenizers do; transformers' own encode turns them off): else a batch of documents would come back
        padded to its longest (pad ids packed into the training stream, where a held-out document, tokenised
        alone, gets none) and a long one cut. None for a tokenizer without one."""
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None:
            return None
        from tokenizers import Tokenizer

        plain = Tokenizer.from_str(backend.to_str())  # a copy: the tokenizer itself is left as it was
        plain.no_truncation()
        plain.no_padding()
        return plain

    read_ahead = 64  # documents tokenised in one call of a fast tokenizer

    def prepare(self, examples: list[dict]) -> list[list[int]]:
        """Each document's tokens: one batched call for a fast tokenizer (its Rust core, without the GIL)."""
        field = self.cfg.text_field
        for example in examples:
            require(field in example, "data.text_field", f"no column {field!r} in {sorted(example)}",
                    "name an existing column")
        texts = [example[field] for example in examples]
        if self.backend is not None:
            return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=False)]
        return [self.tokenizer.encode(text, add_special_tokens=False) for text in texts]

    def make_sample(self, documents, pending: list[int]) -> Batch:
        """Next sample from the documents' tokens: seq_len + 1 tokens (packed), or one document truncated and
        padded (labels -100)."""
        length = self.cfg.seq_len + 1
        if self.cfg.pack:
            while len(pending) < length:
                pending.extend(next(documents) + [self.eos])
            seq = pending[:length]
            del pending[:length]
            valid = length
        else:
            seq = []
            while len(seq) < 2:
                seq = (next(documents) + [self.eos])[:length]
            valid = len(seq)
            seq = seq + [self.eos] * (length - valid)
        tokens = torch.tensor(seq, dtype=torch.int64)
        labels = tokens[1:].clone()
        labels[valid - 1 :] = -100
        return {"input_ids": tokens[:-1], "labels": labels}

    def collate(self, examples: list[Batch]) -> Batch:
        return {k: torch.stack([e[k] for e in examples]) for k in examples[0]}


@data_source("hf_image")
@dataclass(frozen=True)
class HFImageData(_HFData):
    """Labelled images from a (streaming) Hugging Face dataset, e.g. path: uoft-cs/cifar10."""

    source: str = "hf_image"
    image_field: str = "img"
    label_field: str = "label"
    classes: int | None = None         # None: read from the dataset's ClassLabel feature

    def build(self) -> HFImageSource:
        return HFImageSource(self)


class HFImageSource(_HFSource, _ImagePool):
    def __init__(self, cfg: HFImageData):
        super().__init__(cfg)
        heldout = self._heldout_data[0]  # collated before the statistics exist: still raw uint8 [N, H, W, C]
        classes = cfg.classes
        if classes is None:
            features = self.cfg.open(cfg.split).features or {}
            classes = getattr(features.get(cfg.label_field), "num_classes", None)
            require(classes is not None, "data.classes", "the dataset does not say how many classes it has",
                    "set data.classes")
        h, w, c = heldout["eval"]["raw"].shape[1:]
        self.info = SourceInfo("classification", (c, h, w), classes)
        self._set_stats(heldout["eval"]["raw"].numpy())
        for batch in heldout.values():
            batch["x"] = self._standardise(batch.pop("raw").numpy())

    def make_sample(self, examples, pending) -> Batch:
        example = next(examples)
        for key in ("image_field", "label_field"):
            column = getattr(self.cfg, key)
            require(column in example, f"data.{key}", f"no column {column!r} in {sorted(example)}",
                    "name an existing column")
        image = np.asarray(example[self.cfg.image_field])
        image = image[..., None] if image.ndim == 2 else image
        return {"raw": torch.from_numpy(np.array(image, dtype=np.uint8)),
                "y": torch.tensor(example[self.cfg.label_field], dtype=torch.int64)}

    def collate(self, examples: list[Batch]) -> Batch:
        batch = {k: torch.stack([e[k] for e in examples]) for k in examples[0]}
        if hasattr(self, "_mean"):
            batch["x"] = self._standardise(batch.pop("raw").numpy())
        return batch
