"""Pointwise functional distances between two models' outputs (docs/science.md, "Pointwise functional distance").

Every function takes logits (last dim = classes or vocabulary) of the same shape and returns one value
per point (the leading dims), computed from log-softmax in float32 or better, never from rounded
probabilities. A distance between two models is the mean over probe points (every predicted token
position for a language model), with a percentile bootstrap interval over probe units (sequences).
They measure, and take no gradients: js builds its sum in place.

:func:`linear_cka` compares two models' representations instead: feature matrices of the same points,
one row per point (an image, or a predicted token); :func:`cka_from_moments` gives the same value from sums
accumulated over chunks of points.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

METRICS = ("tv", "kl", "js", "top1")
_LOG_SMALL = math.log(4 * torch.finfo(torch.float32).tiny)  # below it, m may underflow (float32)


def log_probs(logits: torch.Tensor) -> torch.Tensor:
    """log-softmax in float32 or better."""
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    return F.log_softmax(logits, dim=-1)


class Dist:
    """One model's predictive distribution on some points: log-probabilities and probabilities, computed once
    and shared by every metric and every pair it enters. ``masked``: some token has probability exactly 0
    (a -inf logit), so the metrics take the slower forms in which such a token contributes exactly 0;
    ``small``: some log-probability is below _LOG_SMALL. Both are kept on the device and read by the host once,
    when a metric first asks (N models stacked for a probe chunk: one read, not two a model)."""

    def __init__(self, logits: torch.Tensor | None = None):
        if logits is None:  # filled by take()
            return
        self.log_p = log_probs(logits)
        self.p = self.log_p.exp()
        self.top = self.log_p.argmax(-1)
        # [the two flags on the device, their host values once read], shared with every Dist taken from this one
        self._flags = [torch.stack([torch.isneginf(self.log_p).any(), (self.log_p < _LOG_SMALL).any()]), None]

    @property
    def masked(self) -> bool:
        return self._host()[0]

    @property
    def small(self) -> bool:  # a -inf (masked) is below _LOG_SMALL too
        return self._host()[1]

    def _host(self) -> tuple[bool, bool]:
        if self._flags[1] is None:
            self._flags[1] = tuple(self._flags[0].tolist())
        return self._flags[1]

    @staticmethod
    def stack_into(stacked: Dist | None, k: int, n: int, one: Dist) -> Dist:
        """``one`` written as row ``k`` of the distributions of ``n`` models stacked on dim 0 (made at k = 0)."""
        if stacked is None:
            stacked = Dist()
            stacked.log_p, stacked.p = (t.new_empty((n, *t.shape)) for t in (one.log_p, one.p))
            stacked.top = one.top.new_empty((n, *one.top.shape))
            stacked._flags = [torch.zeros_like(one._flags[0]), None]
        stacked.log_p[k], stacked.p[k], stacked.top[k] = one.log_p, one.p, one.top
        stacked._flags[0] |= one._flags[0]
        stacked._flags[1] = None  # a value read before this row came in would be stale
        return stacked

    def take(self, index: slice | torch.Tensor) -> Dist:
        """The distributions of several models stacked on dim 0 (``Dist(torch.stack(logits))``), rows
        ``index`` of that dim (a slice: views, no copy); the flags of all of them (read once for both)."""
        out = Dist()
        out.log_p, out.p, out.top = self.log_p[index], self.p[index], self.top[index]
        out._flags = self._flags
        return out


def _tv(a: Dist, b: Dist) -> torch.Tensor:
    return (a.p - b.p).abs_().sum(-1).mul_(0.5)


def _weighted(p: torch.Tensor, log_ratio: torch.Tensor, masked: bool) -> torch.Tensor:
    """sum_k p_k log_ratio_k, with 0 log(0 / x) = 0 (x >= 0): a token p rules out adds nothing, where the plain
    product would give 0 * (-inf) = nan."""
    if masked:
        log_ratio = log_ratio.masked_fill_(p == 0, 0.0)
    return torch.linalg.vecdot(p, log_ratio)


def _kl(a: Dist, b: Dist) -> torch.Tensor:
    # +inf where q rules out a token p gives mass (as scipy's rel_entr), decided from the log-probabilities: a
    # float32 p that underflows to 0 (log p below about -103) still has mass, and its term p (log p - log q) is
    # then 0 * inf, which _weighted sets to 0
    masked = a.masked or b.masked
    value = _weighted(a.p, a.log_p - b.log_p, masked).clamp_min_(0.0)
    if masked:
        value.masked_fill_((torch.isneginf(b.log_p) & ~torch.isneginf(a.log_p)).any(-1), math.inf)
    return value


def _symmetric_kl(a: Dist, b: Dist) -> torch.Tensor:
    return _kl(a, b).add_(_kl(b, a)).mul_(0.5)


def _js(a: Dist, b: Dist) -> torch.Tensor:
    # each log-ratio is taken pointwise before it is weighted (the entropy form H(m) - (H(p) + H(q)) / 2 would
    # subtract sums at the scale of the entropies, as large as the distance itself for near-equal models).
    # log m from m = p + (q - p) / 2 (lerp: one pass, exact where p = q) and one log, where logaddexp takes an
    # exp and a log1p; p, q carry one rounding each, an absolute error ~1e-7 in log m as logaddexp's at
    # |log p| ~ 1 (tested against float64). The sum p (log p - log m) + q (log q - log m) is built in place
    # in one buffer besides log m (seven passes over a pair's distributions).
    log_m = torch.lerp(a.p, b.p, 0.5)
    if a.small or b.small:  # where m underflows below the smallest normal float, log m is that float's log:
        log_m.clamp_min_(torch.finfo(log_m.dtype).tiny)  # such tokens weigh < 1e-37 (0 where p = 0, never 0 * inf)
    log_m.log_()
    masked = a.masked or b.masked
    ratio_a, ratio_b = torch.sub(a.log_p, log_m), torch.sub(b.log_p, log_m, out=log_m)
    if masked:  # 0 log(0 / m) = 0 where the plain product would give 0 * (-inf) = nan
        ratio_a.masked_fill_(a.p == 0, 0.0), ratio_b.masked_fill_(b.p == 0, 0.0)
    value = ratio_a.mul_(a.p).addcmul_(ratio_b, b.p).sum(-1)
    return value.mul_(0.5).clamp_(0.0, math.log(2.0))


def _top1(a: Dist, b: Dist) -> torch.Tensor:
    return (a.top != b.top).to(torch.float32)


def _sq(a: Dist, b: Dist) -> torch.Tensor:
    return (a.p - b.p).square_().sum(-1).mul_(0.5)


ON_DISTS = {"tv": _tv, "kl": _symmetric_kl, "js": _js, "top1": _top1, "sq": _sq}  # compare's metrics


def tv(logits_p: torch.Tensor, logits_q: torch.Tensor) -> torch.Tensor:
    """Total variation 1/2 sum_k |p_k - q_k|, in [0, 1]."""
    return _tv(Dist(logits_p), Dist(logits_q))


def kl(logits_p: torch.Tensor, logits_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) = sum_k p_k (log p_k - log q_k), natural log, >= 0."""
    return _kl(Dist(logits_p), Dist(logits_q))


def symmetric_kl(logits_p: torch.Tensor, logits_q: torch.Tensor) -> torch.Tensor:
    """1/2 [KL(p || q) + KL(q || p)], natural log, >= 0: compare's ``kl``, the same whichever model comes first
    (its permutation tests relabel runs; a one-way KL would give a pair another value when relabelled)."""
    return _symmetric_kl(Dist(logits_p), Dist(logits_q))


def js(logits_p: torch.Tensor, logits_q: torch.Tensor) -> torch.Tensor:
    """Jensen-Shannon 1/2 KL(p || m) + 1/2 KL(q || m), m = (p + q) / 2, natural log, in [0, ln 2]."""
    return _js(Dist(logits_p), Dist(logits_q))


def top1(logits_p: torch.Tensor, logits_q: torch.Tensor) -> torch.Tensor:
    """Top-1 disagreement 1[argmax p != argmax q] (as floats)."""
    return (logits_p.argmax(-1) != logits_q.argmax(-1)).to(torch.float32)


def sq(logits_p: torch.Tensor, logits_q: torch.Tensor) -> torch.Tensor:
    """Half the squared Euclidean distance 1/2 sum_k (p_k - q_k)^2, in [0, 1]. A squared Euclidean distance,
    so between two settings it splits into the distance between their mean predicted distributions and
    their seeds' spreads (the location test of :mod:`goldenpath.comparison.stats`)."""
    return _sq(Dist(logits_p), Dist(logits_q))


FUNCTIONS = {"tv": tv, "kl": symmetric_kl, "js": js, "top1": top1, "sq": sq}  # compare's metrics, on logits


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA (Kornblith et al. 2019) of features ``x`` [n, d1] and ``y`` [n, d2] of the same n points.

    ||X'Y||_F^2 / (||X'X||_F ||Y'Y||_F) with column-centred X, Y, in float64: the normalised HSIC of the
    linear kernels. In [0, 1]; 1 when one is an orthogonal transform and isotropic scaling of the other;
    nan when either matrix has no variance.
    """
    if x.dim() != 2 or y.dim() != 2 or len(x) != len(y):
        raise ValueError(f"linear_cka needs [n, d1] and [n, d2] features of the same points, got "
                         f"{tuple(x.shape)} and {tuple(y.shape)}")
    x, y = x.double(), y.double()
    x, y = x - x.mean(0), y - y.mean(0)
    return _cka(x.T @ y, x.T @ x, y.T @ y)


def cka_from_moments(n: float, sum_x: torch.Tensor, sum_y: torch.Tensor, xx: torch.Tensor, yy: torch.Tensor,
                     xy: torch.Tensor) -> float:
    """:func:`linear_cka` from sums over n points: ``sum_x`` = sum_i x_i [d1], ``xx`` = sum_i x_i x_i' [d1, d1],
    ``xy`` = sum_i x_i y_i' [d1, d2] (likewise for y). The features may be shifted by any constant vector
    first (centring removes it); shifting by about their mean keeps the float64 sums free of cancellation."""
    sum_x, sum_y = sum_x.double(), sum_y.double()
    return _cka(xy.double() - torch.outer(sum_x, sum_y) / n, xx.double() - torch.outer(sum_x, sum_x) / n,
                yy.double() - torch.outer(sum_y, sum_y) / n)


def _cka(cross: torch.Tensor, gram_x: torch.Tensor, gram_y: torch.Tensor) -> float:
    """||C_xy||_F^2 / (||C_xx||_F ||C_yy||_F) from centred cross-products (nan when a denominator is 0)."""
    den = float(torch.linalg.matrix_norm(gram_x) * torch.linalg.matrix_norm(gram_y))
    return float(torch.linalg.matrix_norm(cross) ** 2) / den if den > 0 else math.nan


def unit_sums(values: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per probe unit: the sum of its points' values (in float64) and how many points it has.

    Without ``mask`` every value is a unit of one point (images): ``values`` [..., units]. With ``mask``
    [units, positions] (True = a predicted token), ``values`` [..., units, positions] sums each sequence's
    points. Leading dims (e.g. several metrics) are kept: sums [..., units], counts [units].
    """
    if mask is None:
        return values.double(), torch.ones(values.shape[-1], dtype=torch.float64, device=values.device)
    values = torch.where(mask, values, torch.zeros((), dtype=values.dtype, device=values.device))
    return values.sum(-1, dtype=torch.float64), mask.sum(-1, dtype=torch.float64)


def bootstrap_weights(n_units: int, *, n_boot: int = 1000, seed: int = 0) -> torch.Tensor:
    """[n_boot, n_units] float64: how often each unit is drawn in each bootstrap resample (rows sum to n)."""
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, n_units, (n_boot, n_units), generator=gen)
    ones = torch.ones_like(idx, dtype=torch.float64)
    return torch.zeros(n_boot, n_units, dtype=torch.float64).scatter_add_(1, idx, ones)


def bootstrap(sums: torch.Tensor, counts: torch.Tensor, *, denominator: tuple | None = None, n_boot: int = 1000,
              level: float = 0.95, seed: int = 0, weights: torch.Tensor | None = None) -> tuple[float, float, float]:
    """(estimate, low, high): the mean over points, with a percentile bootstrap over units.

    ``sums``/``counts`` are per unit; ``denominator`` = (sums, counts) of a second mean over the same
    units turns the statistic into a ratio of means, resampled jointly (the golden-path ratio).
    ``weights``: resample counts from :func:`bootstrap_weights`, shared across statistics of the same units.
    """
    w = bootstrap_weights(len(sums), n_boot=n_boot, seed=seed) if weights is None else weights
    den = None if denominator is None else (denominator[0][None], denominator[1][None])
    est, low, high = bootstrap_rows(sums[None], counts[None], denominator=den, weights=w, level=level)
    return float(est[0]), float(low[0]), float(high[0])


def bootstrap_rows(sums: torch.Tensor, counts: torch.Tensor, *, weights: torch.Tensor,
                   denominator: tuple | None = None, level: float = 0.95):
    """:func:`bootstrap` for k statistics at once: ``sums``/``counts`` [k, units] -> (estimate, low, high), each [k].

    One matrix product resamples every statistic (the same resamples for all); a row whose draws are
    all undefined (0/0) gets nan bounds. Counts that every row shares (compare's pairs: the probe's points per
    unit) are resampled once.
    """
    sums, counts, w = sums.double(), counts.double(), weights.double().T  # w: [units, n_boot]
    estimate = sums.sum(1) / counts.sum(1)
    draws = _mean(_drawn(sums, w), _resampled(counts, w))
    if denominator is not None:
        den_s, den_c = denominator[0].double(), denominator[1].double()
        estimate = estimate / (den_s.sum(1) / den_c.sum(1))
        draws = draws / _mean(_drawn(den_s, w), _resampled(den_c, w))
    alpha = (1 - level) / 2
    low, high = (torch.from_numpy(x) for x in _percentiles(draws.cpu().numpy(), (alpha, 1 - alpha)))
    return estimate, low, high


def _mean(sums: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """sums / counts, undefined (nan) where a resample drew no points: not an infinite KL's inf."""
    return torch.where(counts > 0, sums / counts, math.nan)


def _drawn(sums: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``sums @ w``, where a unit's infinite sum (a KL that one of its tokens makes infinite) enters only the
    resamples that draw it (the product would give 0 x inf = nan in the others, which then were dropped)."""
    infinite = torch.isposinf(sums)
    if not infinite.any():
        return sums @ w
    drawn = sums.masked_fill(infinite, 0.0) @ w
    return drawn.masked_fill((infinite.to(w.dtype) @ w) > 0, math.inf)


def _resampled(counts: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``counts @ w``, computed for one row where every row of ``counts`` is the same."""
    if len(counts) > 1 and bool((counts == counts[:1]).all()):
        return counts[:1] @ w
    return counts @ w


def _percentiles(draws: np.ndarray, qs: tuple[float, ...]) -> list[np.ndarray]:
    """Each row's q-quantile over its defined draws, for each q (linear interpolation, as numpy's and torch's
    default); nan for a row with none. Undefined draws (nan: a resample of units without points) are dropped;
    infinite ones (a KL that a unit makes infinite, in every resample that draws it) are kept, above every
    finite draw, so such a row's upper bound is infinite, as its estimate is.

    One vectorised sort for all rows and every q (numpy's SIMD sort: faster than its partition here, and
    torch.quantile sorts about 10x slower on CPU).
    """
    k = (~np.isnan(draws)).sum(1)
    hs = [q * np.maximum(k - 1, 0) for q in qs]
    los = [np.floor(h).astype(np.int64) for h in hs]
    his = [np.minimum(lo + 1, np.maximum(k - 1, 0)) for lo in los]
    ordered = np.sort(draws, axis=1)  # +inf after every finite draw, nan last
    out = []
    for h, lo, hi in zip(hs, los, his):
        below = np.take_along_axis(ordered, lo[:, None], 1)[:, 0]
        above = np.take_along_axis(ordered, hi[:, None], 1)[:, 0]
        t = h - lo
        with np.errstate(invalid="ignore"):  # inf - inf where both order statistics are infinite: replaced below
            value = np.where(t < 0.5, below + t * (above - below), above - (above - below) * (1 - t))
        value = np.where(np.isposinf(above), np.where(t > 0, np.inf, below), value)
        out.append(np.where(k > 0, value, np.nan))
    return out
