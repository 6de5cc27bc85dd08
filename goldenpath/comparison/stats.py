"""Setting-level statistics of loss-matched distances: pure functions on distance matrices.

A *setting* is one point of the knob grid with all its seeds; a run's *seed* fixes its initialisation and
its stream order. Seeds are independent across settings by default (no two settings share one), so runs
are exchangeable between settings under "the same distribution of functions" and a permutation test that
reassigns runs between settings is exact. In a *paired* design every setting runs the same seeds; the runs
are then exchangeable only within a seed, and the permutation test swaps setting labels within each seed.
Cross-setting pairs of runs that share a seed are left out of every mean (they are closer than two seeds
can be), so the two designs estimate the same quantities.

For settings K and R at one loss target, from the [runs, runs] matrix of a distance (``tv``, ...):

- D(K, R): the mean distance over cross pairs (a seed of K, another seed of R);
- F_K: K's own seed floor, the mean over its within-setting pairs; F(K, R), the pooled floor, the mean over
  all within-K and within-R pairs;
- ratio = D / F: about 1 when K and R give the same *distribution* of functions. It is an energy-distance
  statistic, so it grows when the settings differ in where their functions lie (location) *or* in how
  widely their seeds scatter (spread);
- spread = F_K / F_R;
- location = D_2 / ((F_2K + F_2R) / 2) in the squared Euclidean distance between predicted distributions
  (``sq``): D_2 - (F_2K + F_2R) / 2 estimates, without bias, the squared distance between the settings'
  *mean functions* (the mean predicted distribution over seeds, per probe point) whatever the spreads, so
  the location ratio is 1 + that distance over the mean spread, about 1 when the mean functions agree.

Tests are permutation tests (ratio, location) on the seeds: exact over every relabelling when they are few,
else over ``n_perm`` random ones plus the observed one. The *family* test of settings against a reference is
the single-step min-P test of Westfall and Young over the same relabellings of every run in the family: it
rejects when any setting differs, controls the family-wise error, and gives each setting an adjusted p.

Intervals hold the probe set fixed (a fixed probe set of a thousand points or more; the seeds are the unit)
and count each source of noise once. Every statistic is a smooth function of *cell means* (the mean
distance between two settings, or within one), and each cell mean is a U-statistic over independent seeds,
so their covariance has an unbiased estimate (:func:`cells`, Hoeffding's construction); the delta method
carries it to the statistic. A ratio that is 1 where two settings are the same (the golden-path ratio, the
location ratio) gets a score interval (:func:`score_interval`): its variance is the permutation variance at
1 and grows with the effect, so the interval does not shrink with an estimate that falls short. The spread
gets a t interval on the log scale (in a paired design with the jackknife variance over seeds, since its
two floors share their seeds). Degrees of freedom: the smaller setting's seeds minus one (the location
ratio: Satterthwaite's, see :func:`score_interval`).
Simulations with a known truth check all of it (:mod:`goldenpath.comparison.calibration`, ``analysis/calibration.py``).

Distances between runs arrive as per-unit sums (:mod:`goldenpath.comparison.design`).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np

from goldenpath.comparison.design import (Cells, Design, cell_counts, cells, delta_var, different_seed, distance_matrix,
                                          label_matrix, location_ratio, member_relabellings, normal_quantile, parts,
                                          smallest_p, t_interval, t_p_value, t_quantile, upper_p)

# ----------------------------------------------------------------------------- comparisons


@dataclass(frozen=True)
class Comparison:
    """Settings K (``a``) and R (``b``) at one target and metric."""

    d_cross: float
    d_floor: float        # pooled seed floor
    floor_a: float        # K's own seed floor
    floor_b: float        # R's own seed floor
    ratio: float
    ci_low: float
    ci_high: float
    p_value: float        # permutation p of "the same distribution of functions"
    spread: float         # floor_a / floor_b
    spread_low: float
    spread_high: float
    spread_p: float       # t p of "the same spread" (log scale)
    location: float       # 1 + squared distance between mean functions over the mean spread (nan without q)
    location_low: float
    location_high: float
    location_p: float     # permutation p of "the same mean function"
    n_a: int
    n_b: int
    design: str           # independent or paired
    permutations: int     # relabellings the p-values were computed from (every one when exact)


def _log_var(x: np.ndarray) -> float:
    """Variance of log x over relabellings (finite, positive values): the statistic's sampling variance
    where the settings are the same."""
    x = x[np.isfinite(x) & (x > 0)]
    return float(np.var(np.log(x), ddof=1)) if len(x) > 2 else math.nan


def score_interval(estimate: float, var: float, null_var: float, dof_: float, *, level: float = 0.95,
                   satterthwaite: bool = False) -> tuple[float, float]:
    """An interval for a ratio that is 1 where two settings are the same (the golden-path ratio, the location
    ratio), on the log scale L. Its variance is ``null_var`` at L <= 0 (the spread of L over relabellings)
    and grows with the effect: V(L) = null_var + kappa L, kappa fitted through the delta-method variance
    ``var`` at the estimate. The interval is every L with (L_hat - L)^2 <= t^2 V(L) (a score interval, as
    Wilson's for a proportion): a Wald interval would shrink with an estimate that falls short of the truth,
    since the variance shrinks with it, and undercover near 1. An estimate within its null noise of 0 (or
    below) cannot say how fast the variance grows: kappa is then the excess variance over that noise.

    ``satterthwaite``: t's degrees of freedom are Satterthwaite's for the sum of the null variance (from
    thousands of relabellings: exact) and the excess (from the seeds: ``dof_``), so a ratio at 1 gets the
    normal quantile; else ``dof_``. The golden-path ratio keeps ``dof_``: where the seeds' spreads differ, its
    excess follows the spread's estimate, itself a t quantity (simulations: analysis/calibration.py)."""
    if not (np.isfinite(estimate) and estimate > 0 and dof_ >= 1):
        return math.nan, math.nan
    v0 = null_var if np.isfinite(null_var) else (var if np.isfinite(var) else math.nan)
    if not np.isfinite(v0):
        return math.nan, math.nan
    ell = math.log(estimate)
    excess = max(var - v0, 0.0) if np.isfinite(var) else 0.0
    kappa = excess / max(ell, math.sqrt(v0)) if v0 > 0 else 0.0
    df = dof_
    if satterthwaite:
        df = math.inf if excess == 0 else dof_ * ((v0 + excess) / excess) ** 2
    t2 = (normal_quantile(0.5 + level / 2) if math.isinf(df) else t_quantile(0.5 + level / 2, df)) ** 2
    # the truth is never below 1 (D >= the pooled floor for a distance of negative type, as tv's): at L <= 0
    # the variance is the null's, above it grows as v0 + kappa L; the interval is the union of both pieces
    pieces = []
    if ell - math.sqrt(t2 * v0) <= 0:
        pieces.append((ell - math.sqrt(t2 * v0), min(ell + math.sqrt(t2 * v0), 0.0)))
    b, c = 2 * ell + t2 * kappa, ell**2 - t2 * v0
    if b * b - 4 * c >= 0 and (b + math.sqrt(b * b - 4 * c)) / 2 >= 0:
        root = math.sqrt(b * b - 4 * c)
        pieces.append((max((b - root) / 2, 0.0), (b + root) / 2))
    return math.exp(min(p[0] for p in pieces)), math.exp(max(p[1] for p in pieces))


def paired_spread_var(m: np.ndarray, design: Design, k: int, r: int) -> float:
    """Jackknife variance of log(F_k / F_r) over the seeds of a paired design (one seed left out of both
    settings at a time). The two floors share their seeds, so the spread is a small contrast of two correlated
    means, whose unbiased covariance estimate is too often negative with few seeds; the jackknife's is not."""
    where = {design.seeds[i]: i for i in design.groups[r]}
    kk = list(design.groups[k])
    return _jackknife(np.log(_left_out_floors(m, kk) / _left_out_floors(m, [where[design.seeds[i]] for i in kk])))


def jackknife_floor_var(m: np.ndarray, runs: tuple[int, ...]) -> float:
    """Jackknife variance of the log of a setting's seed floor over its seeds (independent seeds; nan below 3):
    the spread's variance where the unbiased estimate is not positive. With 3 seeds every two within-setting
    pairs share a seed, so that estimate is 0 / 0; with 4 it was <= 0 in a tenth of simulated sweeps. Spliced in
    there, the spread's interval covered 95.5-99.5% at 3 to 5 seeds (200 sweeps a world; 86% at 4 seeds, counting
    the missing intervals, without it)."""
    floors = _left_out_floors(m, list(runs))
    if not (np.isfinite(floors).all() and (floors > 0).all()):
        return math.nan
    return _jackknife(np.log(floors))


def _left_out_floors(m: np.ndarray, runs: list[int]) -> np.ndarray:
    """[n]: the seed floor (mean distance over within-setting pairs) of ``runs`` with run i left out (nan below
    3 runs)."""
    n = len(runs)
    if n < 3:
        return np.full(n, math.nan)
    iu = np.triu_indices(n - 1, 1)
    return np.array([m[np.ix_(keep, keep)][iu].mean() for keep in
                     ([x for j, x in enumerate(runs) if j != drop] for drop in range(n))])


def _jackknife(values: np.ndarray) -> float:
    """The jackknife variance from the n leave-one-out values of a statistic (nan below 3)."""
    n = len(values)
    return float((n - 1) / n * ((values - values.mean()) ** 2).sum()) if n >= 3 else math.nan


def dof(design: Design, members: list[int]) -> float:
    """Degrees of freedom of a t interval on settings ``members``: the smallest setting's seeds minus one
    (Welch's lower bound; it keeps the intervals' coverage at 10 seeds where seeds minus settings does not)."""
    return float(min(len(design.groups[k]) for k in members) - 1)


def compare_settings(sums: np.ndarray, counts: np.ndarray, design: Design, *, sq_sums: np.ndarray | None = None,
                     level: float = 0.95, max_exact: int = 5000, n_perm: int = 2000,
                     seed: int = 0) -> tuple[dict[tuple[int, int], Comparison], Cells]:
    """Every pair of settings (k < r) at one target and metric; pairs that share some seeds but not all get
    nan p-values. Returns ({(k, r): Comparison}, the cells of the metric, for derived statistics such as the
    trend)."""
    m = distance_matrix(sums, counts)
    q = distance_matrix(sq_sums, counts) if sq_sums is not None else None
    a = different_seed(design)
    z = label_matrix(design)[None]
    full = parts(m, a, z)
    loc = location_ratio(q, a, z)[0] if q is not None else None
    cm = cells(m, design)
    cq = cells(q, design) if q is not None else None
    own = full["own"][0]
    out = {}
    for k, r in itertools.combinations(range(len(design.groups)), 2):
        relation = design.relation([k, r])
        ratio, pooled, cross = full["ratio"][0, k, r], full["pooled"][0, k, r], full["cross"][0, k, r]
        null_ratio = null_loc = math.nan
        p_ratio = p_loc = math.nan
        used = 0
        if relation != "partial":
            # only the two settings' runs move, and only their two cells are needed: the statistics of every
            # relabelling from those runs and columns alone (the other runs add exact zeros)
            runs, zz, _ = member_relabellings(design, [k, r], max_exact=max_exact, n_perm=n_perm, seed=seed)
            sub = np.ix_(runs, runs)
            both = a[sub]
            counts_zz = cell_counts(both, zz)
            stat = parts(m[sub], both, zz, counts_zz)["ratio"][:, 0, 1]
            p_ratio = float(upper_p(stat[:, None])[0, 0]) if np.isfinite(stat[0]) else math.nan
            null_ratio, used = _log_var(stat), len(zz)
            if q is not None:
                lstat = location_ratio(q[sub], both, zz, counts_zz)[:, 0, 1]
                p_loc = float(upper_p(lstat[:, None])[0, 0]) if np.isfinite(lstat[0]) else math.nan
                null_loc = _log_var(lstat)
        df = dof(design, [k, r])
        wk, wr = cm.pairs[cm.index(k, k)], cm.pairs[cm.index(r, r)]
        with np.errstate(invalid="ignore", divide="ignore"):
            var = delta_var(cm, {(k, r): 1 / cross, (k, k): -wk / (wk + wr) / pooled, (r, r): -wr / (wk + wr) / pooled})
            low, high = score_interval(ratio, var, null_ratio, df, level=level)
            spread = own[k] / own[r]
            s_var = paired_spread_var(m, design, k, r) if relation == "paired" else \
                delta_var(cm, {(k, k): 1 / own[k], (r, r): -1 / own[r]})
            if relation == "independent" and not 0 < s_var < math.inf:  # 3 seeds: x / 0 (no disjoint pairs)
                s_var = jackknife_floor_var(m, design.groups[k]) + jackknife_floor_var(m, design.groups[r])
            s_se = math.sqrt(s_var) if s_var > 0 else math.nan
            s_low, s_high = t_interval(spread, s_se, df, level=level)
            l_low = l_high = location = math.nan
            if loc is not None:
                location = loc[k, r]
                qk, qr = cq.means[cq.index(k, k)], cq.means[cq.index(r, r)]
                den = (qk + qr) / 2
                l_var = delta_var(cq, {(k, r): 1 / cq.means[cq.index(k, r)], (k, k): -0.5 / den, (r, r): -0.5 / den})
                l_low, l_high = score_interval(location, l_var, null_loc, df, level=level, satterthwaite=True)
        out[(k, r)] = Comparison(
            float(cross), float(pooled), float(own[k]), float(own[r]), float(ratio), low, high, p_ratio,
            float(spread), s_low, s_high, t_p_value(spread, s_se, df), float(location), l_low, l_high, p_loc,
            len(design.groups[k]), len(design.groups[r]), relation, used)
    return out, cm


@dataclass(frozen=True)
class FamilyTest:
    """The min-P test of every setting of a family against the reference at one target."""

    p_global: float                 # P(some setting differs); the smallest adjusted p
    adjusted: dict[int, float]      # setting -> its min-P adjusted p (ratio)
    location: dict[int, float]      # setting -> its min-P adjusted p (location)
    smallest: float                 # the smallest p these seeds allow
    permutations: int
    exact: bool
    slope_null_var: float           # variance over the relabellings of the trend's slope (nan without x)


def family_test(sums: np.ndarray, counts: np.ndarray, design: Design, family: list[int], reference: int, *,
                sq_sums: np.ndarray | None = None, max_exact: int = 5000, n_perm: int = 2000, seed: int = 0,
                x: np.ndarray | None = None) -> FamilyTest:
    """Westfall-Young single-step min-P over the settings ``family`` (reference excluded) against
    ``reference``: every run of the family and the reference relabelled at once (within seeds when paired),
    each setting's permutation p computed in every relabelling, and each observed p compared with the
    distribution of the smallest. Exact when the relabellings are few. ``x``: each family setting's log
    noise, for the null variance of the trend's slope."""
    members = [reference, *family]
    # the runs of the family and the reference alone (the other runs add exact zeros): column 0 the reference
    runs, z, exact = member_relabellings(design, members, max_exact=max_exact, n_perm=n_perm, seed=seed)
    sub = np.ix_(runs, runs)
    m = distance_matrix(sums, counts)[sub]
    a = different_seed(design)[sub]
    pairs_zz = cell_counts(a, z)
    stat = parts(m, a, z, pairs_zz)["ratio"][:, 1:, 0]               # [B, F]
    adjusted = _min_p(stat)
    loc = {}
    if sq_sums is not None:
        q = distance_matrix(sq_sums, counts)[sub]
        loc = dict(zip(family, _min_p(location_ratio(q, a, z, pairs_zz)[:, 1:, 0])))
    null = math.nan
    if x is not None and len(family) > 1 and len(np.unique(x)) > 1:
        with np.errstate(invalid="ignore", divide="ignore"):
            slopes = row_slopes(np.asarray(x, float), np.log(stat))
        slopes = slopes[np.isfinite(slopes)]
        null = float(np.var(slopes, ddof=1)) if len(slopes) > 2 else math.nan
    return FamilyTest(float(min(adjusted)) if len(adjusted) else math.nan, dict(zip(family, adjusted)), loc,
                      smallest_p(design, members, max_exact=max_exact, n_perm=n_perm), len(z), exact, null)


def _min_p(stat: np.ndarray) -> list[float]:
    """Single-step min-P adjusted p-values from statistics [B, F] (row 0 observed; larger = more extreme)."""
    p = upper_p(stat)                                                # [B, F] each row's marginal p's
    finite = np.isfinite(stat[0])
    if not finite.any():
        return [math.nan] * stat.shape[1]
    smallest = np.where(finite[None], p, np.inf).min(1)              # [B]
    return [float(np.mean(smallest <= p[0, j] * (1 + 1e-12))) if finite[j] else math.nan
            for j in range(stat.shape[1])]


# ----------------------------------------------------------------------------- trends


def slope(x: np.ndarray, y: np.ndarray) -> float:
    """Least-squares slope of y on x over finite pairs (nan with fewer than two distinct x)."""
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    if len(np.unique(x)) < 2:
        return math.nan
    xc = x - x.mean()
    return float((xc * (y - y.mean())).sum() / (xc**2).sum())


def row_slopes(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """[B]: :func:`slope` of each row of ``y`` [B, F] on ``x`` [F], all rows in a few array operations (the trend's
    null over thousands of relabellings)."""
    ok = np.isfinite(y) & np.isfinite(x)[None]
    n = ok.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        xc = np.where(ok, x[None] - (np.where(ok, x[None], 0.0).sum(1) / n)[:, None], 0.0)
        yc = np.where(ok, y - (np.where(ok, y, 0.0).sum(1) / n)[:, None], 0.0)
        out = (xc * yc).sum(1) / (xc**2).sum(1)
    distinct = np.where(ok, x[None], np.inf).min(1) < np.where(ok, x[None], -np.inf).max(1)
    return np.where(distinct, out, math.nan)


def trend(x: np.ndarray, cells_: Cells, settings: list[int], reference: int, *, null_var: float = math.nan,
          dof_: float, level: float = 0.95) -> tuple[float, float, float]:
    """Slope of log ratio (each of ``settings`` against ``reference``) on ``x``, with a delta-method t
    interval from the cell covariance (floored by ``null_var``, the slope's variance over relabellings)."""
    x = np.asarray(x, float)
    if len(settings) < 2 or len(np.unique(x)) < 2:
        return math.nan, math.nan, math.nan
    means = {t: cells_.means[i] for i, t in enumerate(cells_.types)}
    grad: dict = {}
    y = []
    w = (x - x.mean()) / ((x - x.mean()) ** 2).sum()
    for k, wk in zip(settings, w):
        cross = means[(min(k, reference), max(k, reference))]
        nk, nr = cells_.pairs[cells_.index(k, k)], cells_.pairs[cells_.index(reference, reference)]
        pooled = (means[(k, k)] * nk + means[(reference, reference)] * nr) / (nk + nr)
        y.append(math.log(cross / pooled))
        for cell, g in (((k, reference), 1 / cross), ((k, k), -nk / (nk + nr) / pooled),
                        ((reference, reference), -nr / (nk + nr) / pooled)):
            cell = (min(cell), max(cell))
            grad[cell] = grad.get(cell, 0.0) + wk * g
    point = slope(x, np.asarray(y))
    # where the family is the same, the slope's first-order term vanishes and its delta-method variance
    # is unstable: the relabellings' spread stands in there, as for the ratio
    se = math.sqrt(np.nanmax([delta_var(cells_, grad), null_var, 0.0]))
    se = se if se > 0 else math.nan
    if not np.isfinite(se):
        return point, math.nan, math.nan
    half = t_quantile(0.5 + level / 2, dof_) * se
    return point, point - half, point + half
