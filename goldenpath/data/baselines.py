"""Trivial baseline losses: the eval loss a predictor reaches that has learned (almost) nothing, per data source.

A loss target above this baseline is trivial: every model that reaches it is still close to a trivial
predictor, so a ratio near 1 there says nothing about the settings compared.

* **language models** (``SourceInfo.task == "lm"``): the **unigram** loss, the entropy (nats) of the eval
  set's own token frequencies (labels != -100): the lowest mean loss any context-free predictor reaches on
  the eval set (the same number as ``goldenpath.training.run.chance_loss`` of the eval batch).
* **classification**: the lower of two eval losses, both fitted on the first ``samples`` (8192, or the whole
  pool if smaller) training samples:

  - a **linear model**: multinomial logistic regression with a bias on the flattened pixels, each pixel
    standardised with the mean and std of those samples, fitted in float64 by L-BFGS (strong Wolfe line
    search) until no gradient coordinate exceeds 1e-9 or the objective stops changing. Objective: the mean
    cross-entropy plus ``c |W|^2 / (2 n)`` over weights and bias; ``c = 1`` is scikit-learn's default
    penalty (``C = 1``: summed loss + ``|W|^2 / 2``, a unit-variance Gaussian prior per weight of a
    standardised pixel), with the bias penalised too, so a class absent from the ``n`` samples keeps a
    finite logit and the minimiser is unique. ``c`` is chosen from :data:`PENALTIES` by the loss on the last
    fifth of the samples of a fit on the first four fifths, then the fit is made on all of them: a linear
    model on 784 pixels of 8,192 images overfits at ``c = 1`` (eval loss 0.98 on Fashion-MNIST, against
    about 0.5 well regularised), and a baseline must be the best such model, not a poor one. Where the
    images span few directions (the teacher's span 75), the fit runs in that span, which has the same
    minimum and takes a fraction of the time;
  - the **label marginal**: the cross-entropy of the eval labels under the training labels' frequencies
    with add-one smoothing. It wins where the pixels say (next to) nothing about the labels, or where they
    are too many for the samples and the linear model overfits.

Results are cached in process and on disk (``cache_dir()/baselines/<key>.json``, a few hundred bytes). The
key hashes the data section without the fields that change neither the eval set nor the start of the
pool (``epochs``, ``train_size``, ``subset``, and ``probe_size`` where it moves neither), the sample count,
the code of ``goldenpath.data`` and the torch version. It does not hash the bytes of a dataset on disk.

Usage::

    from goldenpath.data.baselines import trivial_loss
    loss, what = trivial_loss(config.data)   # e.g. (1.87, "linear model (8192 samples)")
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from goldenpath.store.files import atomic_write, cache_dir
from goldenpath.config import ConfigError, DataConfig, require, to_dict
from goldenpath.data.streams import Batch
from goldenpath.seeding import Purpose, seeded_generator

SAMPLES = 8192          # training samples the linear model and the label marginal are fitted on
PENALTIES = (1.0, 10.0, 100.0, 1000.0)  # L2 strengths c tried (times 1 / (2 n)), chosen on held-out samples
GRAD_TOLERANCE = 1e-9   # L-BFGS stops when no coordinate of the objective's gradient exceeds this
MAX_ITERATIONS = 500    # L-BFGS iterations; strongly convex and preconditioned, fits stop after 50-250
RANGE_PROBES = 256      # random directions that look for a low-rank span of the images (the teacher's: 75)
RANK_TOLERANCE = 1e-12  # fraction of the pixels' squared norm a low-rank basis may leave out: float rounding

_KEY_DROPPED = ("epochs", "train_size", "subset")   # offline regime: change neither eval set nor pool order
_PROBE_FREE = {"teacher", "markov", "fashion_mnist", "shakespeare"}  # probe set apart from eval set and pool


def trivial_loss(data_config: DataConfig, *, samples: int = SAMPLES) -> tuple[float, str]:
    """(loss, what) for the data section of a run config (``config.data``, a DataConfig subclass): the
    eval-set cross-entropy a trivial predictor reaches (see the module docstring).

    Args:
        data_config: the data section; its source is built only when no cache holds the answer.
        samples: training samples the classification baselines are fitted on (the pool's size if smaller).

    Returns:
        (loss in nats, what reached it: "unigram", "linear model (n samples)" or "label marginal (n samples)").
    """
    if samples < 1:
        raise ValueError(f"samples: got {samples}; fit on at least one training sample")
    return _cached(_Request(_cache_key(data_config, samples=samples), data_config, samples))


# ----------------------------------------------------------------------------- the baselines

def _unigram_loss(labels: torch.Tensor) -> float:
    """Entropy (nats) of the empirical distribution of the predicted tokens (labels != -100)."""
    counts = torch.bincount(labels[labels != -100].flatten()).double()
    p = counts[counts > 0] / counts.sum()
    return float(-(p * p.log()).sum())


def _marginal_loss(train_y: torch.Tensor, eval_y: torch.Tensor, *, num_classes: int) -> float:
    """Mean cross-entropy of ``eval_y`` under the add-one-smoothed class frequencies of ``train_y``."""
    counts = torch.bincount(train_y, minlength=num_classes).double() + 1.0
    return float(-(counts / counts.sum()).log()[eval_y].mean())


def _linear_loss(train_x: torch.Tensor, train_y: torch.Tensor, eval_x: torch.Tensor, eval_y: torch.Tensor, *,
                 num_classes: int, penalties: tuple[float, ...] = PENALTIES) -> float:
    """Eval cross-entropy of multinomial logistic regression fitted on (train_x, train_y), its penalty chosen
    from ``penalties`` on the last fifth of the samples (module docstring).

    ``train_x``, ``eval_x``: [N, ...] inputs, flattened here; labels int64 in ``0..num_classes-1``.
    """
    if len(penalties) > 1:
        cut = len(train_x) - len(train_x) // 5
        held = [_linear_loss(train_x[:cut], train_y[:cut], train_x[cut:], train_y[cut:], num_classes=num_classes,
                             penalties=(c,)) for c in penalties]
        penalties = (penalties[min(range(len(held)), key=held.__getitem__)],)
    # Outside any caller's inference mode or no_grad: the fit needs autograd on fresh float64 copies.
    with torch.inference_mode(False), torch.enable_grad():
        x = train_x.reshape(len(train_x), -1).to(torch.float64, copy=True)
        mean, std = x.mean(0), x.std(0, correction=0)
        std = torch.where(std > 1e-12, std, torch.ones_like(std))  # a constant pixel: 0 after centring
        y = train_y.to(torch.int64, copy=True)
        w, b = _fit_logistic((x - mean) / std, y, num_classes=num_classes, strength=penalties[0])
    ex = (eval_x.reshape(len(eval_x), -1).to(torch.float64) - mean) / std
    return float(F.cross_entropy(ex @ w + b, eval_y.to(torch.int64)))


def _fit_logistic(x: torch.Tensor, y: torch.Tensor, *, num_classes: int,
                  strength: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(W, b) minimising mean cross-entropy(x W + b, y) + strength (|W|^2 + |b|^2) / (2 n), in float64 by L-BFGS.

    Where the rows of ``x`` span few directions (``_row_basis``), W is fitted in their basis ``q``: the
    gradient of the loss lies in the rows' span and the penalty shrinks every other component to 0, and
    |q w| = |w|, so the minimum is the same.
    """
    basis = _row_basis(x)
    features = x if basis is None else basis[1]
    w, b = _fit_preconditioned(features, y, num_classes=num_classes, strength=strength)
    return (w if basis is None else basis[0] @ w), b


def _row_basis(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(q, x q): an orthonormal basis q [d, r] of the directions that hold the rows' squared norm, all but a
    fraction 2 x RANK_TOLERANCE of it, when RANGE_PROBES random combinations of the rows find them
    (randomised range finding); None when the rows need more directions or have no more pixels than that.

    The teacher's images are sums of a few Fourier modes (75 directions at 3 x 16 x 16 and 3 x 32 x 32 alike,
    with the default max_frequency 2), so its fit runs on 75 features, not 768 or 3072; what is left out is
    float rounding. Real images need every pixel: then the probes cost about as much as 25 of the fit's
    50-250 loss evaluations.
    """
    n, d = x.shape
    k = RANGE_PROBES
    if d <= k:
        return None
    probes = torch.randn(n, k, generator=seeded_generator(Purpose.PROBES), dtype=torch.float64)
    q = torch.linalg.qr(x.T @ probes).Q
    xq = x @ q
    total = x.square().sum()
    if total - xq.square().sum() > RANK_TOLERANCE * total:
        return None
    # principal axes inside the span; those below RANK_TOLERANCE / k each hold float rounding only
    variances, axes = torch.linalg.eigh(xq.T @ xq)
    keep = variances > RANK_TOLERANCE * total / k
    return q @ axes[:, keep], xq @ axes[:, keep]


def _fit_preconditioned(x: torch.Tensor, y: torch.Tensor, *, num_classes: int,
                        strength: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The minimiser of ``_fit_logistic``'s objective by L-BFGS on Z with W = M Z.

    M: the eigenvectors of the pixel covariance scaled by (eigenvalue / 4 + 1 / n)^(-1/2). Pixels are
    strongly correlated, so in W the curvature spans orders of magnitude and plain L-BFGS takes thousands of
    steps; in Z it is near 1 in every direction. M only changes the path, not the minimum: the objective is
    evaluated in W.
    """
    n, d = x.shape
    penalty = strength / (2 * n)  # strength 1: scikit-learn's C = 1 (summed loss + |W|^2 / 2), divided by n
    eigenvalues, eigenvectors = torch.linalg.eigh(x.T @ x / n)
    # 1/4: the softmax's curvature p (1 - p) at most; 2 * penalty = 1/n: the penalty's curvature
    m = eigenvectors * (eigenvalues.clamp_min(0) / 4 + 2 * penalty).rsqrt()
    z = torch.zeros(d, num_classes, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([z, b], lr=1.0, max_iter=MAX_ITERATIONS, max_eval=2 * MAX_ITERATIONS,
                            tolerance_grad=GRAD_TOLERANCE, tolerance_change=1e-15, history_size=20,
                            line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        w = m @ z
        loss = F.cross_entropy(x @ w + b, y) + penalty * (w.square().sum() + b.square().sum())
        loss.backward()
        return loss

    opt.step(closure)
    return (m @ z).detach(), b.detach()


def _classification(source, samples: int) -> tuple[float, str]:
    """The lower of the linear model's and the label marginal's eval loss, fitted on the pool's first samples."""
    train, ev = _pool_start(source, samples), source.heldout("eval")
    n, k = len(train["y"]), source.info.num_classes
    linear = _linear_loss(train["x"], train["y"], ev["x"], ev["y"], num_classes=k)
    marginal = _marginal_loss(train["y"], ev["y"], num_classes=k)
    if linear <= marginal:
        return linear, f"linear model ({n} samples)"
    return marginal, f"label marginal ({n} samples)"


def _pool_start(source, samples: int) -> Batch:
    """The first ``samples`` of the training pool (all of it if smaller): random access, or the seed-0 stream."""
    if hasattr(source, "train_batch"):
        n = samples if source.size is None else min(samples, source.size)
        return source.train_batch(torch.arange(n))
    it = source.iterate(seed=0, rank=0, world=1)
    examples = [e for _, e in zip(range(samples), it)]
    require(bool(examples), "data.split", "the training stream is empty", "point the source at training data")
    return source.collate(examples)


def _compute(data_config: DataConfig, samples: int) -> tuple[float, str]:
    source = data_config.build()
    task = source.info.task
    if task == "lm":
        labels = source.heldout("eval")["labels"]
        require(bool((labels != -100).any()), "data.eval_size", "the eval set predicts no token",
                "use a larger eval set")
        return _unigram_loss(labels), "unigram"
    if task == "classification":
        return _classification(source, samples)
    raise ConfigError("data.source", f"no trivial baseline for task {task!r}", "use an lm or classification source")


# ----------------------------------------------------------------------------- caching

@dataclass(frozen=True)
class _Request:
    """One baseline to compute; compared and hashed by its cache key alone (the config may hold dicts)."""

    key: str
    data: DataConfig = field(compare=False)
    samples: int = field(compare=False)


@functools.lru_cache(maxsize=128)
def _cached(request: _Request) -> tuple[float, str]:
    path = _cache_dir() / f"{request.key}.json"
    try:
        stored = json.loads(path.read_text())
        return float(stored["loss"]), str(stored["what"])
    except Exception:  # noqa: BLE001 - missing, torn or foreign: compute and store
        pass
    loss, what = _compute(request.data, request.samples)
    _store(path, {"loss": loss, "what": what, "samples": request.samples, "data": _key_fields(request.data)})
    return loss, what


def _store(path: Path, record: dict) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps(record, sort_keys=True) + "\n"
        atomic_write(path, lambda tmp: tmp.write_text(text), durable=False)  # recomputable: no fsync
    except OSError:  # a read-only cache: compute again next time
        pass


def _cache_dir() -> Path:
    return cache_dir() / "baselines"


def _key_fields(data_config: DataConfig) -> dict:
    """The data section's fields that can change the eval set or the start of the training pool."""
    d = to_dict(data_config)
    # probe_size moves cifar5m's eval rows (counted back from the end, just before the probe rows) and the
    # start of an hf_* pool read from the same split as the held-out sets: it stays in the key there.
    probe_free = d["source"] in _PROBE_FREE or d.get("eval_split") is not None
    return {k: v for k, v in d.items() if k not in _KEY_DROPPED and not (k == "probe_size" and probe_free)}


def _cache_key(data_config: DataConfig, *, samples: int) -> str:
    text = json.dumps({"data": _key_fields(data_config), "samples": samples, "code": _code_version()},
                      sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:20]


@functools.cache
def _code_version() -> str:
    """A hash of goldenpath.data's code, the seeding its streams draw from and the torch version: an edit to a
    source, to the seeding or to this file refits."""
    h = hashlib.sha1(torch.__version__.encode())
    for path in [*sorted(Path(__file__).parent.glob("*.py")), Path(__file__).parent.parent / "seeding.py"]:
        h.update(path.name.encode() + path.read_bytes())
    return h.hexdigest()[:12]
