"""Gradient-noise analysis at fixed parameters (docs/science.md, "Gradient noise at fixed parameters"): pure functions.

- ``tail_index``: the Mohammadi et al. (2015, Corollary 2.4) estimator of the alpha of a symmetric
  alpha-stable variable, as used by Simsekli et al. (2019); ``tail_index_ci`` adds a t interval over its blocks.
- ``aggregate``, ``aggregation_series``: the tail index of sums of k draws (alpha-stable keeps its alpha,
  finite variance drifts to 2); ``atom_fraction``: the share of exact zeros (ReLU sparsity) per coordinate.
- ``gaussianity``: Anderson-Darling and Shapiro-Wilk on standardised noise and on random projections, with
  p-values from Gaussian simulations of the noise's own covariance; ``qq_data`` for plots.
- ``noise_scale``: the simple gradient noise scale B_simple = tr(Sigma) / |G|^2 (McCandlish et al. 2018)
  from squared gradient norms at two batch sizes; ``noise_scale_per_sample`` from per-sample norms.
"""

from __future__ import annotations

import math

import numpy as np

EPS = np.spacing(1)  # guards log 0, as the reference implementation does


def _as_array(samples) -> np.ndarray:
    if hasattr(samples, "detach"):
        samples = samples.detach().cpu().double().numpy()
    return np.asarray(samples, dtype=np.float64).ravel()


def default_k1(k: int) -> int:
    """The largest divisor of K not above sqrt(K) (the reference's choice of the group size K1)."""
    best = 1
    for i in range(1, math.isqrt(k) + 1):
        if k % i == 0:
            best = i
    return best


def group_size(k: int) -> int:
    """K1 for K samples: :func:`default_k1`, or floor(sqrt(K)) (the remainder dropped) where K has no divisor
    near sqrt(K) (e.g. K prime, or twice a prime: 2 would make the estimate needlessly noisy)."""
    k1 = default_k1(k)
    return math.isqrt(k) if k1 < math.isqrt(k) // 4 or k1 < 2 else k1


def _block_terms(samples, k1: int | None) -> tuple[np.ndarray, int]:
    """(Z [K2], K1): Z_i = log|Y_i| - (1/K1) sum_j log|X_j| over the i-th block of K1 consecutive samples, Y_i
    their sum; 1/alpha is the mean of Z over log K1. When K has no divisor near sqrt(K), the last samples are
    dropped so that K1 = floor(sqrt(K)) divides the rest."""
    x = _as_array(samples)
    k = len(x)
    if k < 4:
        raise ValueError(f"tail_index needs at least 4 samples, got {k}")
    k1 = group_size(k) if k1 is None else k1
    if not 2 <= k1 <= k // 2:
        raise ValueError(f"k1 must lie in [2, K/2] = [2, {k // 2}], got {k1}")
    blocks = x[: k1 * (k // k1)].reshape(-1, k1)
    return np.log(np.abs(blocks.sum(1)) + EPS) - np.log(np.abs(blocks) + EPS).mean(1), k1


def tail_index(samples, k1: int | None = None) -> float:
    """alpha of symmetric alpha-stable samples: 1/alpha = (mean log|Y_i| - mean log|X_i|) / log K1,
    Y_i the sums of K1 consecutive samples (:func:`_block_terms`)."""
    z, k1 = _block_terms(samples, k1)
    return float(math.log(k1) / z.mean())


def tail_index_ci(samples, k1: int | None = None, *, level: float = 0.95) -> tuple[float, float, float]:
    """(alpha, low, high): the estimate and a t interval over the K2 blocks, inverted.

    A block's sum of K1 i.i.d. alpha-stable draws is K1^(1/alpha) times one draw in law, so each block's Z_i
    (:func:`_block_terms`) has mean log(K1) / alpha exactly: 1/alpha-hat is a mean of K2 i.i.d. terms, with
    a t interval (K2 - 1 degrees of freedom) that holds the estimate; alpha's interval is its inverse (high
    infinite when 1/alpha's low bound is not positive). Simulated (200 draws each; alpha 1.2, 1.5, 1.8, 2 at
    K = 2,000 and 20,000) it covered 94-97.5%; the bootstrap of single draws it replaces covered 100% and
    left out its own estimate in up to 13% of draws (a resample repeats draws inside a block)."""
    from scipy import stats

    z, k1 = _block_terms(samples, k1)
    inv, se = z.mean() / math.log(k1), z.std(ddof=1) / math.sqrt(len(z)) / math.log(k1)
    half = float(stats.t.ppf(0.5 + level / 2, len(z) - 1)) * se
    return float(math.log(k1) / z.mean()), float(1.0 / (inv + half)), float(1.0 / (inv - half)) if inv > half \
        else math.inf


def _standardise(x: np.ndarray) -> np.ndarray:
    sd = x.std()
    return (x - x.mean()) / (sd if sd > 0 else 1.0)


def _normal_scores(a: np.ndarray) -> np.ndarray:
    """Each column of ``[M, n]`` (M >= 3 draws) standardised so that, for Gaussian draws, every value is exactly
    N(0, 1): the residual over the column's sample sd with its leverage, r = e / (s sqrt(1 - 1/M)) (the
    internally studentised residual), is turned into the externally studentised residual
    t = r sqrt((M - 2) / (M - 1 - r^2)) ~ Student t with M - 2 degrees of freedom, then into the normal
    quantile of its probability. A plain (x - mean) / sd from M draws is bounded by (M - 1) / sqrt(M) and has
    lighter tails than a normal, which a large pooled sample detects. The values of one column are not
    independent (they sum to 0), so a test that pools them is calibrated by :func:`gaussianity`'s simulation,
    not by its own p-value."""
    from scipy import stats

    m = a.shape[0]
    r = (a - a.mean(0)) / (a.std(0, ddof=1) * math.sqrt(1 - 1 / m))
    t = r * np.sqrt((m - 2) / np.maximum(m - 1 - r * r, np.finfo(np.float64).tiny))
    # a point far out (t -> inf as r^2 -> M - 1) keeps a finite score: its probability floored at the smallest
    # positive float (a score of about 37.5)
    return np.sign(t) * stats.norm.isf(np.maximum(stats.t.sf(np.abs(t), m - 2), np.finfo(np.float64).tiny))


def _normality_statistics(values: np.ndarray, shapiro: np.ndarray | None) -> tuple[float, float]:
    """(Anderson-Darling statistic against N(0, 1) with estimated mean and sd, Shapiro-Wilk W on the values at
    ``shapiro``; nan without them)."""
    from scipy import stats

    ad = float(stats.anderson(values, dist="norm", method="interpolate").statistic)
    return ad, float(stats.shapiro(values[shapiro]).statistic) if shapiro is not None else math.nan


def gaussianity(noise, *, projections: int = 20, simulations: int = 100, max_values: int | None = 20_000,
                max_shapiro: int = 5000, seed: int = 0) -> dict:
    """Normality tests of gradient noise ``[M, d]`` (M batches x d coordinates; or a 1-d sample of M draws).

    Two views, each a pool of values: every coordinate standardised across the batches (:func:`_normal_scores`:
    N(0, 1) per value for Gaussian noise), on at most ``max_values`` values (a random subset of the
    coordinates, None: all); and the noise vectors projected on ``projections`` random unit directions,
    standardised alike. Each view gets the Anderson-Darling statistic (``<view>_anderson``) and Shapiro-Wilk's
    W on at most ``max_shapiro`` of its values (``<view>_shapiro``).

    The pooled values are not independent: coordinates of one noise vector move together (a few directions
    hold most of a network's gradient noise), projections of the same vectors too. So the tests' own p-values
    do not hold for them (exactly Gaussian noise with a CNN's covariance was rejected 85% of the time at 5%
    per coordinate). The p-values (``<view>_anderson_p``, ``<view>_shapiro_p``) are instead the statistic's
    rank among the same statistics of ``simulations`` Gaussian samples with the noise's own sample covariance
    (M rows of Z C, Z an [M, M] standard normal matrix, C the centred noise over sqrt(M - 1)): (1 + the
    simulations at least as extreme) / (1 + simulations), a parametric bootstrap of "the noise is Gaussian";
    its level is checked by simulation in the tests. ``simulations=0``: the statistics alone, no p-values.
    """
    a = noise.detach().cpu().double().numpy() if hasattr(noise, "detach") else np.asarray(noise, np.float64)
    if a.ndim == 1:
        a = a[:, None]
    if len(a) < 3:
        raise ValueError(f"gaussianity needs at least 3 draws of the noise, got {len(a)}")
    rng = np.random.default_rng(seed)
    m = len(a)
    live = a[:, a.std(0) > 0]
    u = rng.standard_normal((live.shape[1], projections))
    u /= np.linalg.norm(u, axis=0)
    projected = (live @ u - live.mean(0) @ u) / math.sqrt(m - 1)  # every coordinate, as C u
    if max_values is not None and live.shape[1] * m > max_values:
        live = live[:, np.sort(rng.choice(live.shape[1], max(1, max_values // m), replace=False))]
    # C: the centred noise over sqrt(M - 1), so that C^T C is its sample covariance (the scores do not depend on
    # a column's mean or scale, so the views are C's columns and C u)
    views = {"coordinates": (live - live.mean(0)) / math.sqrt(m - 1), "projections": projected}
    out = {}
    for name, base in views.items():
        base = base[:, base.std(0) > 0]
        n = base.size
        shapiro = np.sort(rng.choice(n, max_shapiro, replace=False)) if n > max_shapiro else np.arange(n)
        shapiro = shapiro if n >= 3 else None
        ad, w = _normality_statistics(_normal_scores(base).ravel(), shapiro)
        out.update({f"{name}_anderson": ad, f"{name}_shapiro": w, f"{name}_n": int(n)})
        if simulations:
            sims = np.array([_normality_statistics(_normal_scores(rng.standard_normal((m, m)) @ base).ravel(),
                                                   shapiro) for _ in range(simulations)])
            out[f"{name}_anderson_p"] = float((1 + (sims[:, 0] >= ad).sum()) / (1 + simulations))
            out[f"{name}_shapiro_p"] = float((1 + (sims[:, 1] <= w).sum()) / (1 + simulations)) \
                if shapiro is not None else math.nan
    return out


def qq_data(samples, *, max_points: int = 2000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(normal quantiles, ordered standardised samples), subsampled to ``max_points`` for plotting."""
    from scipy import stats

    x = _standardise(_as_array(samples))
    if len(x) > max_points:
        x = np.random.default_rng(seed).choice(x, max_points, replace=False)
    (theoretical, ordered), _ = stats.probplot(x, dist="norm")
    return theoretical, ordered


def noise_scale(sq_norm_small: float, sq_norm_big: float, b_small: float, b_big: float) -> tuple[float, float, float]:
    """(tr Sigma, |G|^2, B_simple) from E|G_b|^2 = |G|^2 + tr(Sigma) / b at two batch sizes b_small < b_big."""
    if not 0 < b_small < b_big:
        raise ValueError(f"need 0 < b_small < b_big, got {b_small}, {b_big}")
    grad_sq = (b_big * sq_norm_big - b_small * sq_norm_small) / (b_big - b_small)
    trace = (sq_norm_small - sq_norm_big) / (1 / b_small - 1 / b_big)
    return float(trace), float(grad_sq), float(trace / grad_sq) if grad_sq != 0 else math.inf


def noise_scale_per_sample(per_sample_sq_norms, batch_grad_sq_norm: float, batch_size: int):
    """The same from per-sample gradients (b_small = 1): their mean squared norm and the batch mean's."""
    return noise_scale(float(np.mean(_as_array(per_sample_sq_norms))), batch_grad_sq_norm, 1, batch_size)


# ----------------------------------------------------------------------------- a run's checkpoint


def per_coordinate_tail_index(samples: np.ndarray) -> np.ndarray:
    """The tail index of every column of ``[M, d]`` samples (M draws of each coordinate), vectorised."""
    m = samples.shape[0]
    k1 = group_size(m)  # as tail_index chooses it
    k2 = m // k1
    x = samples[: k1 * k2]
    y = x.reshape(k2, k1, -1).sum(1)
    inv = (np.log(np.abs(y) + EPS).mean(0) - np.log(np.abs(x) + EPS).mean(0)) / math.log(k1)
    return 1.0 / inv


def atom_fraction(noise: np.ndarray) -> np.ndarray:
    """Per column of ``[M, d]`` noise, the share of entries equal to its most repeated value (0 where no value
    repeats): the exact zeros of the raw gradients (ReLU units silent on a batch), since centring moves them
    all to one value -mean, while continuous values do not repeat."""
    a = np.sort(np.asarray(noise, dtype=np.float64), axis=0)
    m, d = a.shape
    best = np.ones(d)
    run = np.ones(d)
    for i in range(1, m):
        run = np.where(a[i] == a[i - 1], run + 1, 1)
        best = np.maximum(best, run)
    return np.where(best > 1, best / m, 0.0)


def aggregate(samples: np.ndarray, k: int) -> np.ndarray:
    """Sums of ``k`` consecutive draws along axis 0: ``[M, ...] -> [M // k, ...]`` (the remainder dropped).

    The noise of a batch of k samples is (1/k) times such a sum, and the tail index ignores the scale: an
    alpha-stable law keeps its alpha under this map, one of finite variance tends to alpha = 2 (the CLT).
    """
    x = np.asarray(samples, dtype=np.float64)
    if not 1 <= k <= len(x):
        raise ValueError(f"k must lie in [1, {len(x)}], got {k}")
    m = len(x) // k
    return x[: m * k].reshape(m, k, *x.shape[1:]).sum(1)


def aggregation_series(samples: np.ndarray, ks, *, draws: int | None = None) -> dict[int, float]:
    """{k: median per-coordinate tail index of ``aggregate(samples, k)``}; ``samples`` is ``[N, d]`` with N
    at least 16 times the largest k (each column keeps at least 16 draws). ``draws``: keep only the first
    ``draws`` sums at every k, so that the estimator's small-sample bias is the same at every k."""
    out = {}
    for k in ks:
        agg = aggregate(samples, k)[:draws]
        if len(agg) < 16:
            raise ValueError(f"k={k} leaves {len(agg)} draws per coordinate; need 16")
        out[int(k)] = float(np.median(per_coordinate_tail_index(agg - agg.mean(0))))
    return out


def pooled_sample(noise: np.ndarray, max_pooled: int, rng: np.random.Generator) -> np.ndarray:
    """At most ``max_pooled`` of the noise matrix's values, in random order, for the pooled tail index; the
    columns that never move (an embedding row no batch used, a dead unit's weights) left out.

    The estimator sums K1 consecutive samples and assumes them i.i.d.; values in coordinate order put
    correlated neighbours (the weights of one unit) in the same block and bias alpha down. A constant
    column's exact zeros each add log(EPS) = -36 to the mean of log|X|, pulling alpha down by an amount that
    depends on the gradients' units (10% zero columns took Gaussian noise from alpha 2 to 1.0 at unit scale,
    1.24 at 1e-6).
    """
    values = noise[:, noise.std(0) > 0].ravel() if noise.ndim == 2 else noise.ravel()
    return rng.choice(values, min(max_pooled, len(values)), replace=False)
