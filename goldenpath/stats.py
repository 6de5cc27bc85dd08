"""Setting-level statistics of loss-matched distances: pure functions on pairwise distances.

A *setting* is one point of the knob grid with all its seeds. For settings K and R at one loss target:

- D(K, R): the mean distance over all cross pairs (a seed of K, a seed of R);
- F(K, R): the pooled seed floor, the mean over all within-K and within-R seed pairs;
- ratio = D / F, about 1 when K and R give the same distribution of functions.

Its interval comes from a hierarchical bootstrap: each draw resamples the probe units (one set of unit
weights for every pair) and, within every setting, its seeds; a within-setting pair of two copies of one
seed carries no weight. Its p-value for "K and R are the same" comes from reassigning the pooled seeds
between K and R (every split when they are few, else random ones) and recomputing the ratio: the
energy-distance / PERMANOVA construction on the distance matrix. With equal seed counts the ratio orders
the splits exactly as PERMANOVA's pseudo-F on the matrix of square-rooted distances does, so the two tests
give the same p-value.

Distances between runs arrive as per-unit sums: ``sums`` [pairs, units] and ``counts`` [units] (points per
probe unit: 1 for an image, the predicted tokens of a sequence), pairs in ``itertools.combinations(range(n), 2)``
order, so that the distance of a pair under unit weights w is (sums @ w) / (counts @ w).
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Comparison:
    """Settings K (``a``) and R (``b``) at one target and metric."""

    d_cross: float
    d_floor: float
    ratio: float
    ci_low: float
    ci_high: float
    p_value: float
    n_a: int
    n_b: int
    permutations: int  # splits the p-value was computed from (all of them when exact)


def pair_matrix(values: np.ndarray, n: int) -> np.ndarray:
    """[..., pairs] values in combinations order -> [..., n, n] symmetric matrices with a zero diagonal."""
    rows, cols = np.triu_indices(n, 1)
    out = np.zeros((*values.shape[:-1], n, n))
    out[..., rows, cols] = values
    out[..., cols, rows] = values
    return out


def draws(sums: np.ndarray, counts: np.ndarray, groups: list[list[int]], *, n_boot: int = 1000,
          seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Hierarchical bootstrap draws: ([n_boot, n, n] distance matrices under resampled probe units,
    [n_boot, n] seed weights: how often each run is drawn within its setting). Draw 0 is the data itself.

    The draws depend only on (seed, n_boot, the number of units, groups), so every metric and target of
    one sweep shares them: they are drawn once and reused (read-only)."""
    n = pair_count_to_n(len(sums))
    w, a = _resamples(seed, n_boot, len(counts), n, tuple(tuple(g) for g in groups))
    with np.errstate(invalid="ignore", divide="ignore"):
        per_pair = (sums @ w.T) / (counts @ w.T)  # [pairs, n_boot]
    matrices = pair_matrix(per_pair.T, n)
    return matrices, a.copy()


@functools.lru_cache(maxsize=4)
def _resamples(seed: int, n_boot: int, units: int, n: int, groups: tuple) -> tuple[np.ndarray, np.ndarray]:
    """(unit weights [n_boot, units], seed weights [n_boot, n]) of :func:`draws`, in its order of draws."""
    rng = np.random.default_rng(seed)
    w = rng.multinomial(units, np.full(units, 1 / units), size=n_boot).astype(np.float64)
    w[0] = 1.0
    a = np.zeros((n_boot, n))
    for members in groups:
        k = len(members)
        a[:, list(members)] = rng.multinomial(k, np.full(k, 1 / k), size=n_boot)
        a[0, list(members)] = 1.0
    w.setflags(write=False)
    a.setflags(write=False)
    return w, a


def pair_count_to_n(pairs: int) -> int:
    n = int(round((1 + math.sqrt(1 + 8 * pairs)) / 2))
    if n * (n - 1) // 2 != pairs:
        raise ValueError(f"{pairs} is not a number of pairs n (n - 1) / 2")
    return n


def ratios(matrices: np.ndarray, weights: np.ndarray, groups: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """For every pair of settings and every draw: (D [draws, S, S], F [draws, S, S]) (nan where undefined).

    D[k, r] = sum_{i in k, j in r} a_i a_j d_ij / (sum a_i sum a_j); F[k, r] = (W_k + W_r) / (P_k + P_r) with
    W_k = sum_{i < i' in k} a_i a_i' d_ii' and P_k = sum_{i < i' in k} a_i a_i'.
    """
    s = len(groups)
    member = np.zeros((matrices.shape[-1], s))
    for k, members in enumerate(groups):
        member[members, k] = 1.0
    e = weights[:, :, None] * member[None]                 # [draws, n, S]
    g = _between(weights, matrices, groups, e)             # weighted sums of distances between settings
    size = e.sum(1)                                         # [draws, S]
    within = np.diagonal(g, axis1=1, axis2=2) / 2           # W_k
    pairs = (size**2 - (e**2).sum(1)) / 2                   # P_k
    with np.errstate(invalid="ignore", divide="ignore"):
        d = g / (size[:, :, None] * size[:, None, :])
        f = (within[:, :, None] + within[:, None, :]) / (pairs[:, :, None] + pairs[:, None, :])
    return d, f


def _between(weights: np.ndarray, matrices: np.ndarray, groups: list[list[int]], e: np.ndarray) -> np.ndarray:
    """g[b, s, r] = sum_{i in s, j in r} a_bi d_bij a_bj, i.e. ``einsum("bis,bij,bjr->bsr", e, d, e)``, to the bit.

    That einsum adds its terms (e_is d_ij) e_jr one by one into a zero, i outer and j inner over every run;
    the terms of runs outside s or r are exact zeros, which leave a finite sum unchanged. Here only the
    members' terms are added, in the same order, for all pairs of settings at once (the einsum visits
    n^2 terms for each of the S^2 pairs). Non-finite distances (0 x inf is nan) go through the einsum."""
    if not np.isfinite(matrices).all():
        return np.einsum("bis,bij,bjr->bsr", e, matrices, e)
    n, s = matrices.shape[-1], len(groups)
    members = [sorted(set(int(i) for i in g)) for g in groups]
    width = max((len(m) for m in members), default=0)
    idx = np.full((s, width), n)  # padded with run n: a zero row and column
    for k, m in enumerate(members):
        idx[k, : len(m)] = m
    terms = np.zeros((len(matrices), n + 1, n + 1))
    terms[:, :n, :n] = (weights[:, :, None] * matrices) * weights[:, None, :]
    g = np.zeros((len(matrices), s, s))
    for p in range(width):
        rows = terms[:, idx[:, p]]                            # [draws, S, n + 1]
        for q in range(width):
            g += rows[:, :, idx[:, q]]
    return g


def percentile_interval(values: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    finite = values[np.isfinite(values)]
    if not len(finite):
        return math.nan, math.nan
    alpha = (1 - level) / 2
    return float(np.percentile(finite, 100 * alpha)), float(np.percentile(finite, 100 * (1 - alpha)))


def permutation_p(matrix: np.ndarray, a: list[int], b: list[int], *, max_exact: int = 5000,
                  n_random: int = 2000, seed: int = 0) -> tuple[float, int]:
    """P(ratio of a random split >= the observed ratio) over reassignments of the pooled seeds of ``a``
    and ``b`` (run indices into ``matrix``) keeping both sizes: exact when at most ``max_exact`` splits,
    else ``n_random`` random splits plus the observed one. Returns (p, splits used)."""
    pooled = np.asarray(a + b)
    m, total = len(a), len(a) + len(b)
    sub = matrix[np.ix_(pooled, pooled)]
    n_splits = math.comb(total, m)
    if n_splits <= max_exact:
        splits = np.zeros((n_splits, total))
        for row, chosen in enumerate(itertools.combinations(range(total), m)):
            splits[row, list(chosen)] = 1.0
        observed = _split_ratio(sub, np.r_[np.ones(m), np.zeros(total - m)][None])[0]
        stats = _split_ratio(sub, splits)
        return float(np.mean(stats >= observed - 1e-12 * abs(observed))), n_splits
    rng = np.random.default_rng(seed)
    splits = np.zeros((n_random + 1, total))
    splits[0, :m] = 1.0
    for row in range(1, n_random + 1):
        splits[row, rng.choice(total, m, replace=False)] = 1.0
    stats = _split_ratio(sub, splits)
    return float(np.mean(stats >= stats[0] - 1e-12 * abs(stats[0]))), n_random + 1


def _split_ratio(matrix: np.ndarray, z: np.ndarray) -> np.ndarray:
    """D / F of every split (rows of z: 1 = in the first group) of one distance matrix."""
    m, n = z.sum(1), (1 - z).sum(1)
    cross = np.einsum("pi,ij,pj->p", z, matrix, 1 - z)
    within = (np.einsum("pi,ij,pj->p", z, matrix, z) + np.einsum("pi,ij,pj->p", 1 - z, matrix, 1 - z)) / 2
    with np.errstate(invalid="ignore", divide="ignore"):
        return (cross / (m * n)) / (within / (m * (m - 1) / 2 + n * (n - 1) / 2))


def compare_settings(sums: np.ndarray, counts: np.ndarray, groups: list[list[int]], *, n_boot: int = 1000,
                     seed: int = 0, level: float = 0.95, max_exact: int = 5000,
                     n_random: int = 2000) -> tuple[dict[tuple[int, int], Comparison], np.ndarray]:
    """Every pair of settings (``groups``: run indices of each setting's seeds) at one target and metric.

    Returns ({(k, r): Comparison} for k < r, ratio draws [n_boot, S, S] for derived statistics such as the
    trend; draw 0 is the point estimate)."""
    matrices, weights = draws(sums, counts, groups, n_boot=n_boot, seed=seed)
    d, f = ratios(matrices, weights, groups)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = d / f
    out = {}
    for k, rr in itertools.combinations(range(len(groups)), 2):
        low, high = percentile_interval(r[1:, k, rr], level)
        p, used = permutation_p(matrices[0], groups[k], groups[rr], max_exact=max_exact, n_random=n_random,
                                seed=seed) if np.isfinite(r[0, k, rr]) else (math.nan, 0)
        out[(k, rr)] = Comparison(float(d[0, k, rr]), float(f[0, k, rr]), float(r[0, k, rr]), low, high, p,
                                  len(groups[k]), len(groups[rr]), used)
    return out, r


def holm(p_values: list[float]) -> list[float]:
    """Holm's step-down adjustment (family-wise error), nan left as nan."""
    p = np.asarray(p_values, dtype=float)
    out = np.full_like(p, np.nan)
    finite = np.flatnonzero(np.isfinite(p))
    order = finite[np.argsort(p[finite])]
    running = 0.0
    for rank, idx in enumerate(order):
        running = max(running, min(1.0, (len(order) - rank) * p[idx]))
        out[idx] = running
    return out.tolist()


def slope(x: np.ndarray, y: np.ndarray) -> float:
    """Least-squares slope of y on x over finite pairs (nan with fewer than two distinct x)."""
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    if len(np.unique(x)) < 2:
        return math.nan
    xc = x - x.mean()
    return float((xc * (y - y.mean())).sum() / (xc**2).sum())
