"""Real data through the same Stream interface: idx files, CIFAR-5m ``.npz`` parts, Hugging Face datasets.

* ``fashion_mnist``: idx files (``train-images-idx3-ubyte[.gz]`` ...), as the Debian package
  ``dataset-fashion-mnist`` installs them; also reads MNIST's files. Pool: the train split; eval and probe:
  disjoint slices of the test split, permuted by the data seed.
* ``cifar5m``: the released parts ``cifar5m_part*.npz`` (X uint8 [N, 32, 32, 3], Y int64), memory-mapped
  when stored uncompressed, so random access over 5M images costs no load time. Eval and probe: the last
  rows of the last part; the pool: everything before them.
* ``hf_text`` / ``hf_image``: ``datasets.load_dataset(..., streaming=True)`` (the hub, or local json/parquet
  files via ``path: json`` + ``data_files``), shuffled with a buffer, sharded by process, resumable through
  the iterator's ``state_dict``. Text is tokenised (``AutoTokenizer`` or a byte-level fallback) and packed
  into sequences of ``seq_len + 1`` tokens (or truncated and padded with ``pack: false``).

Images are standardised per channel with the mean and std of the eval set.
"""

from __future__ import annotations

import gzip
import struct
import zipfile
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from goldenpath.config import ConfigError, DataConfig, data_source, require
from goldenpath.data.streams import Batch, SourceInfo, seeded_generator

# ----------------------------------------------------------------------------- shared image handling


class _ImagePool:
    """Random access over uint8 images [N, H, W, C] (array-like) with int labels; eval-set standardisation."""

    def _standardise(self, images: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div_(255.0)
        return (x - self._mean) / self._std

    def _set_stats(self, eval_images: np.ndarray) -> None:
        x = torch.from_numpy(np.asarray(eval_images)).float().div_(255.0)
        self._mean = x.mean(dim=(0, 1, 2)).view(1, -1, 1, 1)
        self._std = x.std(dim=(0, 1, 2)).clamp_min(1e-6).view(1, -1, 1, 1)

    def loss_floor(self) -> None:
        return None


def _missing(field: str, path: Path, what: str) -> ConfigError:
    return ConfigError(field, f"no {what} under {path}", "point it at the directory holding the files")


# ----------------------------------------------------------------------------- idx (Fashion-MNIST)

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | Path) -> np.ndarray:
    """Read an idx file (optionally gzipped): magic 0 0 <dtype> <ndim>, big-endian int32 dims, data."""
    path = Path(path)
    data = (gzip.open if path.suffix == ".gz" else open)(path, "rb").read()
    zero, dtype, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype not in _IDX_DTYPES:
        raise ValueError(f"{path}: not an idx file (magic {data[:4].hex()})")
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    return np.frombuffer(data, dtype=_IDX_DTYPES[dtype], offset=4 + 4 * ndim).reshape(shape)


def _idx_file(root: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz"):
        if (root / name).exists():
            return root / name
    raise _missing("data.path", root, f"{stem}[.gz]")


@data_source("fashion_mnist")
@dataclass(frozen=True)
class FashionMNISTData(DataConfig):
    """Fashion-MNIST (or MNIST) idx files: 60k training images, eval/probe from the 10k test images."""

    source: str = "fashion_mnist"
    path: str = "/usr/share/datasets/fashion-mnist"

    def check(self) -> None:
        super().check()
        require(self.eval_size + self.probe_size <= 10_000, "data.eval_size",
                f"eval_size + probe_size = {self.eval_size + self.probe_size} exceeds the 10000 test images",
                "lower data.eval_size or data.probe_size")

    def build(self) -> IdxSource:
        return IdxSource(self)


class IdxSource(_ImagePool):
    def __init__(self, cfg: FashionMNISTData):
        root = Path(cfg.path)
        self._x = read_idx(_idx_file(root, "train-images-idx3-ubyte"))[..., None]
        self._y = read_idx(_idx_file(root, "train-labels-idx1-ubyte")).astype(np.int64)
        test_x = read_idx(_idx_file(root, "t10k-images-idx3-ubyte"))[..., None]
        test_y = read_idx(_idx_file(root, "t10k-labels-idx1-ubyte")).astype(np.int64)
        perm = torch.randperm(len(test_x), generator=seeded_generator(cfg.seed, 4)).numpy()
        cut = {"eval": perm[: cfg.eval_size], "probe": perm[cfg.eval_size : cfg.eval_size + cfg.probe_size]}
        self.size = len(self._x)
        self.info = SourceInfo("classification", (1, *self._x.shape[1:3]), int(self._y.max()) + 1)
        self._set_stats(test_x[cut["eval"]])
        self._heldout = {s: {"ids": torch.from_numpy(rows), "x": self._standardise(test_x[rows]),
                             "y": torch.from_numpy(test_y[rows])} for s, rows in cut.items()}

    def train_batch(self, index: torch.Tensor) -> Batch:
        rows = index.numpy()
        return {"ids": index.clone(), "x": self._standardise(self._x[rows]), "y": torch.from_numpy(self._y[rows])}

    def heldout(self, split: str) -> Batch:
        return self._heldout[split]


# ----------------------------------------------------------------------------- CIFAR-5m npz parts

def load_npz_member(path: str | Path, name: str) -> np.ndarray:
    """Array ``name`` of an .npz file, memory-mapped when the member is stored uncompressed."""
    path = Path(path)
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo(f"{name}.npy")
        if info.compress_type == zipfile.ZIP_STORED:
            with open(path, "rb") as f:
                f.seek(info.header_offset)
                header = f.read(30)
                name_len, extra_len = struct.unpack("<HH", header[26:30])
                f.seek(info.header_offset + 30 + name_len + extra_len)
                version = np.lib.format.read_magic(f)
                read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                               else np.lib.format.read_array_header_2_0)
                shape, fortran, dtype = read_header(f)
                offset = f.tell()
            return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape,
                             order="F" if fortran else "C")
    with np.load(path) as npz:
        return npz[name]


@data_source("cifar5m")
@dataclass(frozen=True)
class CIFAR5mData(DataConfig):
    """CIFAR-5m (Nakkiran et al.): ~6M generated CIFAR-like images in ``cifar5m_part*.npz``."""

    source: str = "cifar5m"
    path: str = "data/cifar5m"
    eval_size: int = 10_000
    probe_size: int = 10_000

    def build(self) -> NpzSource:
        return NpzSource(self)


class NpzSource(_ImagePool):
    def __init__(self, cfg: CIFAR5mData):
        root = Path(cfg.path)
        parts = sorted(root.glob("cifar5m_part*.npz"))
        if not parts:
            raise _missing("data.path", root, "cifar5m_part*.npz files")
        self._xs = [load_npz_member(p, "X") for p in parts]
        self._ys = [np.asarray(load_npz_member(p, "Y"), dtype=np.int64) for p in parts]
        self._starts = np.cumsum([0] + [len(x) for x in self._xs])
        total, held = int(self._starts[-1]), cfg.eval_size + cfg.probe_size
        require(held < total, "data.eval_size", f"eval_size + probe_size = {held} leaves no training images "
                f"of {total}", "lower data.eval_size or data.probe_size")
        self.size = total - held
        h, w, c = self._xs[0].shape[1:]
        self.info = SourceInfo("classification", (c, h, w), 10)
        rows = {"eval": np.arange(self.size, self.size + cfg.eval_size),
                "probe": np.arange(self.size + cfg.eval_size, total)}
        self._set_stats(self._rows(rows["eval"])[0])
        self._heldout = {s: self._batch(r) for s, r in rows.items()}

    def _rows(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        part = np.searchsorted(self._starts, rows, side="right") - 1
        x = np.empty((len(rows), *self._xs[0].shape[1:]), dtype=np.uint8)
        y = np.empty(len(rows), dtype=np.int64)
        for p in np.unique(part):
            sel = part == p
            local = rows[sel] - self._starts[p]
            order = np.argsort(local)  # sorted reads are kind to the page cache
            x[np.flatnonzero(sel)[order]] = self._xs[p][local[order]]
            y[sel] = self._ys[p][local]
        return x, y

    def _batch(self, rows: np.ndarray) -> Batch:
        x, y = self._rows(rows)
        return {"ids": torch.from_numpy(rows.astype(np.int64)), "x": self._standardise(x), "y": torch.from_numpy(y)}

    def train_batch(self, index: torch.Tensor) -> Batch:
        return self._batch(index.numpy())

    def heldout(self, split: str) -> Batch:
        return self._heldout[split]


# ----------------------------------------------------------------------------- Hugging Face datasets (streaming)

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

    def open(self, split: str):
        """The split as a streaming datasets.IterableDataset."""
        import datasets

        return datasets.load_dataset(self.path, self.name, data_files=self.data_files, split=split, streaming=True)


class _HFIterator:
    """This process's shard of a streaming dataset, turned into samples; resumable via state_dict."""

    def __init__(self, source, dataset, rank: int, world: int):
        self._source, self._dataset, self._rank, self._world = source, dataset, rank, world
        self._it = None
        self._pending: list[int] = []   # packing: tokens read but not yet emitted
        self._count = 0

    def __iter__(self):
        return self

    def __next__(self) -> Batch:
        if self._it is None:
            self._it = iter(self._dataset)
        sample = self._source.make_sample(self._it, self._pending)
        sample["ids"] = torch.tensor(self._count * self._world + self._rank)
        self._count += 1
        return sample

    def state_dict(self) -> dict:
        return {"dataset": self._dataset.state_dict(), "pending": list(self._pending), "count": self._count}

    def load_state_dict(self, state: dict) -> None:
        self._dataset.load_state_dict(state["dataset"])
        self._pending[:] = state["pending"]
        self._count = state["count"]
        self._it = None


class _HFSource:
    """Common parts of streaming text and image sources."""

    def __init__(self, cfg: _HFData):
        self.cfg = cfg

    def _train_dataset(self):
        ds = self.cfg.open(self.cfg.split)
        if self.cfg.eval_split is None:
            ds = ds.skip(self._heldout_examples)
        return ds

    def iterate(self, *, seed: int, rank: int, world: int) -> _HFIterator:
        from datasets.distributed import split_dataset_by_node

        ds = self._train_dataset().shuffle(seed=seed, buffer_size=self.cfg.shuffle_buffer)
        return _HFIterator(self, split_dataset_by_node(ds, rank=rank, world_size=world), rank, world)

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
        self.info = SourceInfo("lm", (cfg.seq_len,), vocab)

    def _tokens(self, example: dict) -> list[int]:
        require(self.cfg.text_field in example, "data.text_field",
                f"no column {self.cfg.text_field!r} in {sorted(example)}", "name an existing column")
        return self.tokenizer.encode(example[self.cfg.text_field], add_special_tokens=False)

    def make_sample(self, examples, pending: list[int]) -> Batch:
        """Next sample: seq_len + 1 tokens (packed), or one document truncated/padded (labels -100)."""
        length = self.cfg.seq_len + 1
        if self.cfg.pack:
            while len(pending) < length:
                pending.extend(self._tokens(next(examples)) + [self.eos])
            seq = pending[:length]
            del pending[:length]
            valid = length
        else:
            seq = []
            while len(seq) < 2:
                seq = (self._tokens(next(examples)) + [self.eos])[:length]
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
