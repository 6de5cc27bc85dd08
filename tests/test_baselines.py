"""Trivial baselines against independent answers: a hand count of the eval tokens, scipy's L-BFGS-B on the same
penalised logistic objective written in numpy, smoothed label counts, and the disk cache read back."""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.optimize import minimize

from goldenpath.config import DataConfig, load_config
from goldenpath.data import SourceInfo, baselines
from goldenpath.data.baselines import trivial_loss

from .conftest import TINY_MARKOV, TINY_TEACHER

CACHE_DIR = baselines._cache_dir  # before the fixture points it at tmp_path

SMALL_TEACHER = [*TINY_TEACHER, "data.image_size=8"]  # 3 x 8 x 8: 192 pixels, a linear fit in well under a second


def data(*overrides) -> DataConfig:
    return load_config(None, [*overrides, "budget.steps=1"]).data


@pytest.fixture(autouse=True)
def fresh_cache(tmp_path, monkeypatch):
    """Each test starts with empty baseline caches, on disk (under tmp_path) and in process; the teacher's own
    cache stays shared (conftest's temporary GOLDENPATH_CACHE)."""
    monkeypatch.setattr(baselines, "_cache_dir", lambda: tmp_path / "baselines")
    baselines._cached.cache_clear()
    yield
    baselines._cached.cache_clear()


def reference_linear_loss(train_x, train_y, eval_x, eval_y, k: int, penalties=baselines.PENALTIES) -> float:
    """Eval loss of mean CE + c |theta|^2 / (2n) (weights and bias), minimised by scipy with a numpy gradient,
    c the one of ``penalties`` whose fit on the first four fifths of the samples does best on the last."""
    if len(penalties) > 1:
        cut = len(train_x) - len(train_x) // 5
        held = [reference_linear_loss(train_x[:cut], train_y[:cut], train_x[cut:], train_y[cut:], k, (c,))
                for c in penalties]
        penalties = (penalties[int(np.argmin(held))],)
    c = penalties[0]
    x = np.asarray(train_x, dtype=np.float64).reshape(len(train_x), -1)
    mean, std = x.mean(0), x.std(0)
    std[std <= 1e-12] = 1.0
    x = (x - mean) / std
    y = np.asarray(train_y)
    n, d = x.shape
    onehot = np.eye(k)[y]

    def log_softmax(z):
        z = z - z.max(1, keepdims=True)
        return z - np.log(np.exp(z).sum(1, keepdims=True))

    def objective(theta):
        w, b = theta[: d * k].reshape(d, k), theta[d * k :]
        logp = log_softmax(x @ w + b)
        g = (np.exp(logp) - onehot) / n
        loss = -logp[np.arange(n), y].mean() + c * theta @ theta / (2 * n)
        return loss, np.concatenate([(x.T @ g).ravel(), g.sum(0)]) + c * theta / n

    rng = np.random.default_rng(0)
    at = rng.normal(size=d * k + k) * 0.1
    for v in rng.normal(size=(3, d * k + k)):  # the gradient is right: central differences along 3 directions
        slope = (objective(at + 1e-6 * v)[0] - objective(at - 1e-6 * v)[0]) / 2e-6
        assert slope == pytest.approx(objective(at)[1] @ v, rel=1e-6)
    res = minimize(objective, np.zeros(d * k + k), jac=True, method="L-BFGS-B",
                   options={"maxiter": 20_000, "maxfun": 40_000, "ftol": 1e-16, "gtol": 1e-11, "maxcor": 30})
    w, b = res.x[: d * k].reshape(d, k), res.x[d * k :]
    ex = (np.asarray(eval_x, dtype=np.float64).reshape(len(eval_x), -1) - mean) / std
    ey = np.asarray(eval_y)
    return float(-log_softmax(ex @ w + b)[np.arange(len(ey)), ey].mean())


def smoothed_marginal(train_y, eval_y, k: int) -> float:
    counts = collections.Counter(int(c) for c in train_y)
    total = len(train_y) + k
    return -sum(math.log((counts[int(c)] + 1) / total) for c in eval_y) / len(eval_y)


# ----------------------------------------------------------------------------- language models: unigram

def test_unigram_is_the_entropy_of_the_eval_token_counts():
    cfg = data(*TINY_MARKOV)
    labels = cfg.build().heldout("eval")["labels"]
    counts = collections.Counter(labels.flatten().tolist())
    total = sum(counts.values())
    expected = -sum(c / total * math.log(c / total) for c in counts.values())
    loss, what = trivial_loss(cfg)
    assert what == "unigram"
    assert loss == pytest.approx(expected, abs=1e-12)
    assert len(counts) > 2 and loss < math.log(16)


def test_unigram_skips_unpredicted_positions():
    labels = torch.tensor([[1, 1, 2, -100], [-100, -100, 2, 1]])  # 1 three times, 2 twice
    expected = -(0.6 * math.log(0.6) + 0.4 * math.log(0.4))
    assert baselines._unigram_loss(labels) == pytest.approx(expected, abs=1e-15)


# ----------------------------------------------------------------------------- images: linear model

@pytest.mark.parametrize("probes", [None, 100])  # None: 192 pixels, fitted as they are; 100: in their 75-d span
def test_linear_model_matches_scipy_and_lies_between_floor_and_marginal(probes, monkeypatch):
    n = 1024
    spans = []
    row_basis = baselines._row_basis
    monkeypatch.setattr(baselines, "_row_basis", lambda x: spans.append(row_basis(x)) or spans[-1])
    if probes is not None:
        monkeypatch.setattr(baselines, "RANGE_PROBES", probes)
    cfg = data(*SMALL_TEACHER)
    loss, what = trivial_loss(cfg, samples=n)
    assert (spans[0] is None) == (probes is None) and (probes is None or spans[0][0].shape == (192, 75))

    source = cfg.build()
    train, ev = source.train_batch(torch.arange(n)), source.heldout("eval")
    expected = reference_linear_loss(train["x"], train["y"], ev["x"], ev["y"], 10)
    assert what == f"linear model ({n} samples)"
    assert loss == pytest.approx(expected, abs=1e-6)
    assert source.loss_floor() < loss < smoothed_marginal(train["y"], ev["y"], 10)


def test_row_basis_finds_a_low_rank_span_and_declines_a_full_one(monkeypatch):
    monkeypatch.setattr(baselines, "RANGE_PROBES", 20)
    g = torch.Generator().manual_seed(0)
    low = (torch.randn(500, 10, generator=g) @ torch.randn(10, 60, generator=g)).float().double()  # rank 10
    q, xq = baselines._row_basis(low)
    _, s, vt = np.linalg.svd(low.numpy(), full_matrices=False)
    assert s[10] < 1e-6 * s[0]  # the float32 rounding: 10 directions hold everything else
    q_np, top = q.numpy(), vt[:10].T
    assert q.shape == (60, 10) and np.allclose(q_np.T @ q_np, np.eye(10), atol=1e-12)
    assert np.allclose(q_np @ (q_np.T @ top), top, atol=1e-6)  # q spans numpy's top 10 singular vectors
    assert torch.allclose(low @ q, xq) and torch.allclose(xq @ q.T, low, atol=1e-5)
    assert baselines._row_basis(torch.randn(500, 60, generator=g, dtype=torch.float64)) is None
    # a rank-10 span whose variances fall by 1e-8: small directions are signal, kept
    u, v = torch.linalg.qr(torch.randn(500, 10, generator=g, dtype=torch.float64)).Q, torch.linalg.qr(
        torch.randn(60, 10, generator=g, dtype=torch.float64)).Q
    spread = (u * torch.logspace(2, -2, 10, dtype=torch.float64)) @ v.T
    assert baselines._row_basis(spread)[0].shape == (60, 10)


# ----------------------------------------------------------------------------- images: the label marginal

@dataclasses.dataclass(frozen=True)
class NoiseData(DataConfig):
    """Pixels of pure Gaussian noise with labels drawn independently of them: only the marginal is learnable."""

    source: str = "noise"
    features: int = 40

    def build(self) -> NoiseSource:
        return NoiseSource(self)


class NoiseSource:
    size = 600
    probs = torch.tensor([0.4, 0.3, 0.2, 0.1])

    def __init__(self, cfg: NoiseData):
        g = torch.Generator().manual_seed(cfg.seed)
        self.info = SourceInfo("classification", (cfg.features,), len(self.probs))
        self._x = torch.randn(self.size, cfg.features, generator=g)
        self._y = torch.multinomial(self.probs, self.size, replacement=True, generator=g)
        ey = torch.multinomial(self.probs, cfg.eval_size, replacement=True, generator=g)
        self._eval = {"ids": torch.arange(cfg.eval_size), "x": torch.randn(cfg.eval_size, cfg.features, generator=g),
                      "y": ey}

    def train_batch(self, index):
        return {"ids": index.clone(), "x": self._x[index], "y": self._y[index]}

    def heldout(self, split):
        return self._eval

    def loss_floor(self):
        return None


@dataclasses.dataclass(frozen=True)
class NoiseStreamData(NoiseData):
    source: str = "noise_stream"

    def build(self) -> NoiseStream:
        return NoiseStream(self)


class NoiseStream:
    """NoiseSource's samples read in order without random access, like a datasets stream."""

    def __init__(self, cfg: NoiseData):
        self._pool = NoiseSource(cfg)
        self.info = self._pool.info

    def iterate(self, *, seed: int, rank: int, world: int):
        assert (seed, rank, world) == (0, 0, 1)
        return iter([{"x": x, "y": y} for x, y in zip(self._pool._x, self._pool._y)])

    def collate(self, examples):
        return {k: torch.stack([e[k] for e in examples]) for k in examples[0]}

    def heldout(self, split):
        return self._pool.heldout(split)


def test_label_marginal_wins_when_pixels_carry_no_information():
    cfg = NoiseData(eval_size=2000)
    loss, what = trivial_loss(cfg)  # samples=8192 > the pool of 600: fitted on all of it
    source = cfg.build()
    ev = source.heldout("eval")
    assert what == "label marginal (600 samples)"
    assert loss == pytest.approx(smoothed_marginal(source._y, ev["y"], 4), abs=1e-12)
    linear = baselines._linear_loss(source._x, source._y, ev["x"], ev["y"], num_classes=4)
    assert linear > loss  # 40 noise pixels x 3 free logits overfit 600 samples


@pytest.mark.parametrize("samples", [300, 8192])
@pytest.mark.parametrize("config", [NoiseData, NoiseStreamData])  # random access; read in order
def test_the_fit_takes_the_first_samples_of_the_pool(config, samples):
    n = min(samples, NoiseSource.size)
    loss, what = trivial_loss(config(eval_size=500), samples=samples)
    source = NoiseSource(NoiseData(eval_size=500))
    assert what == f"label marginal ({n} samples)"
    assert loss == pytest.approx(smoothed_marginal(source._y[:n], source.heldout("eval")["y"], 4), abs=1e-12)


def test_fit_runs_inside_a_callers_inference_mode():
    with torch.inference_mode():  # the source's tensors are inference tensors: the fit must copy them
        source = NoiseSource(NoiseData(eval_size=100))
        inside = baselines._linear_loss(source._x, source._y, source._eval["x"], source._eval["y"], num_classes=4)
    assert inside == baselines._linear_loss(source._x.clone(), source._y.clone(), source._eval["x"].clone(),
                                            source._eval["y"].clone(), num_classes=4)


# ----------------------------------------------------------------------------- caching

def test_disk_cache_lives_under_goldenpaths_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("GOLDENPATH_CACHE", str(tmp_path / "elsewhere"))
    assert CACHE_DIR() == tmp_path / "elsewhere" / "baselines"


def test_second_call_reads_the_cache_in_process_and_from_disk(monkeypatch, tmp_path):
    calls = []
    compute = baselines._compute
    monkeypatch.setattr(baselines, "_compute", lambda *a: calls.append(a) or compute(*a))
    cfg = data(*TINY_MARKOV)
    first = trivial_loss(cfg, samples=256)
    assert trivial_loss(cfg, samples=256) == first and len(calls) == 1
    offline = dataclasses.replace(cfg, epochs=3, train_size=100, subset=1, probe_size=8)  # same eval set and pool
    assert trivial_loss(offline, samples=256) == first and len(calls) == 1

    files = list((tmp_path / "baselines").glob("*.json"))
    assert len(files) == 1 and files[0].stat().st_size < 2000
    stored = json.loads(files[0].read_text())
    assert (stored["loss"], stored["what"]) == first  # floats round-trip through JSON exactly
    baselines._cached.cache_clear()
    assert trivial_loss(cfg, samples=256) == first and len(calls) == 1  # read back from disk

    trivial_loss(dataclasses.replace(cfg, eval_size=16), samples=256)  # another eval set: computed anew
    trivial_loss(cfg, samples=128)                                     # another pool size: computed anew
    assert len(calls) == 3
    files[0].write_text("{")  # a torn file is recomputed and rewritten
    baselines._cached.cache_clear()
    assert trivial_loss(cfg, samples=256) == first and len(calls) == 4
    assert json.loads(files[0].read_text())["loss"] == first[0]


def test_probe_size_stays_in_the_key_where_it_moves_the_eval_set():
    teacher = baselines._key_fields(data(*SMALL_TEACHER))
    cifar = baselines._key_fields(data("data.source=cifar5m"))  # eval rows sit just before the probe rows
    same_split = baselines._key_fields(data("data.source=hf_text"))  # the pool starts after eval + probe
    assert "probe_size" not in teacher and "epochs" not in teacher and "eval_size" in teacher
    assert "probe_size" in cifar and "probe_size" in same_split


# ----------------------------------------------------------------------------- a real format: idx files

def write_idx(path: Path, array: np.ndarray) -> None:
    """idx: two zero bytes, type 0x08 (uint8), ndim, big-endian uint32 dims, then the bytes."""
    head = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(head + array.astype(np.uint8).tobytes())


def test_fashion_mnist_idx_files_go_through_the_same_fit(tmp_path):
    rng = np.random.default_rng(0)

    def images(labels):  # 10 x 10 noise with a faint bar in row `label`: learnable, not separable
        x = rng.integers(0, 200, (len(labels), 10, 10))
        x[np.arange(len(labels)), labels] += 40
        return x

    train_y, test_y = rng.integers(0, 10, 400), rng.integers(0, 10, 200)
    train_x, test_x = images(train_y), images(test_y)
    for name, a in {"train-images-idx3-ubyte": train_x, "train-labels-idx1-ubyte": train_y,
                    "t10k-images-idx3-ubyte": test_x, "t10k-labels-idx1-ubyte": test_y}.items():
        write_idx(tmp_path / name, a)
    cfg = data("data.source=fashion_mnist", f"data.path={tmp_path}", "data.eval_size=150", "data.probe_size=50")
    loss, what = trivial_loss(cfg)
    rows = cfg.build().heldout("eval")["ids"].numpy()
    # per-pixel standardisation undoes the source's per-channel one: the raw bytes are the same features
    expected = reference_linear_loss(train_x, train_y, test_x[rows], test_y[rows], 10)
    assert what == "linear model (400 samples)"
    assert loss == pytest.approx(expected, abs=1e-6)
    assert loss < smoothed_marginal(train_y, test_y[rows], 10)
