"""Real images through the same Stream interface: idx files and CIFAR-5m ``.npz`` parts (Hugging Face
datasets: :mod:`goldenpath.data.hub`).

* ``fashion_mnist``: idx files (``train-images-idx3-ubyte[.gz]`` ...), as the Debian package
  ``dataset-fashion-mnist`` installs them; also reads MNIST's files. Pool: the train split; eval and probe:
  disjoint slices of the test split, permuted by the data seed.
* ``cifar5m``: the released parts ``cifar5m_part*.npz`` (X uint8 [N, 32, 32, 3], Y int64), memory-mapped
  when stored uncompressed, so random access over 5M images costs no load time. Eval and probe: the last
  rows of the last part; the pool: everything before them.
Images are standardised per channel with the mean and std of the eval set.
"""

from __future__ import annotations

import gzip
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from goldenpath.config import ConfigError, DataConfig, data_source, require
from goldenpath.data.streams import Batch, SourceInfo
from goldenpath.seeding import Purpose, seeded_generator

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
        perm = torch.randperm(len(test_x), generator=seeded_generator(cfg.seed, Purpose.HELDOUT)).numpy()
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
