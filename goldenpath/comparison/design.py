"""The seed design of a comparison and what every statistic of :mod:`goldenpath.comparison.stats` is built from:
distance matrices from per-unit pair sums, the design (which settings share seeds), the cell means of one
labelling of the runs and their covariance over independent seeds (Hoeffding's construction), and the
relabellings a permutation test draws (every one that keeps each setting's size when they are few, else
random ones; within seeds in a paired design).

Distances between runs arrive as per-unit sums (``sums`` [pairs, units], ``counts`` [units], pairs in
``itertools.combinations(range(n), 2)`` order); a pair's distance is ``sums.sum(1) / counts.sum()``.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections import Counter
from dataclasses import dataclass

import numpy as np
from scipy import stats as sps


# ----------------------------------------------------------------------------- matrices and designs


def pair_count_to_n(pairs: int) -> int:
    n = int(round((1 + math.sqrt(1 + 8 * pairs)) / 2))
    if n * (n - 1) // 2 != pairs:
        raise ValueError(f"{pairs} is not a number of pairs n (n - 1) / 2")
    return n


def pair_matrix(values: np.ndarray, n: int) -> np.ndarray:
    """[..., pairs] values in combinations order -> [..., n, n] symmetric matrices with a zero diagonal."""
    rows, cols = np.triu_indices(n, 1)
    out = np.zeros((*values.shape[:-1], n, n))
    out[..., rows, cols] = values
    out[..., cols, rows] = values
    return out


def distance_matrix(sums: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """[runs, runs] mean distance of every pair over the probe set, from per-unit sums."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return pair_matrix(np.asarray(sums, float).sum(1) / float(np.sum(counts)), pair_count_to_n(len(sums)))


@dataclass(frozen=True)
class Design:
    """Which runs form each setting and which seed each run has.

    ``groups``: run indices of each setting; ``seeds``: per run, its seed's identity (any hashable; runs of
    two settings with the same seed share initialisation and stream order)."""

    groups: tuple[tuple[int, ...], ...]
    seeds: tuple

    def __post_init__(self):
        for k, g in enumerate(self.groups):
            mine = [self.seeds[i] for i in g]
            if len(set(mine)) != len(mine):
                raise ValueError(f"setting {k} has two runs with one seed")

    def relation(self, members: list[int]) -> str:
        """How the settings ``members`` share seeds: ``independent`` (no seed in two of them), ``paired``
        (every seed in all of them) or ``partial`` (neither: no exact permutation test exists)."""
        sets = [{self.seeds[i] for i in self.groups[k]} for k in members]
        count = Counter(s for ss in sets for s in ss)
        if all(c == 1 for c in count.values()):
            return "independent"
        if all(c == len(members) for c in count.values()):
            return "paired"
        return "partial"


def different_seed(design: Design) -> np.ndarray:
    """[n, n] 1 where two runs have different seeds (0 on the diagonal and between same-seed runs)."""
    code = {s: i for i, s in enumerate(dict.fromkeys(design.seeds))}
    seeds = np.array([code[s] for s in design.seeds])
    return (seeds[:, None] != seeds[None, :]).astype(float)


def label_matrix(design: Design) -> np.ndarray:
    n = len(design.seeds)
    z = np.zeros((n, len(design.groups)))
    for k, g in enumerate(design.groups):
        z[list(g), k] = 1.0
    return z


# ----------------------------------------------------------------------------- the statistics of one labelling


def _cells(m: np.ndarray, a: np.ndarray, z: np.ndarray,
           counts: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """For labellings z [B, n, S] (weights: 1 member, 0 not): (sums [B, S, S], counts [B, S, S]) of the
    distances ``m`` over the pairs of runs with different seeds (``a``) between (or within) settings. ``counts``:
    those of ``a`` and ``z`` when known (they do not depend on ``m``)."""
    return _between(_masked(m, a), z), (cell_counts(a, z) if counts is None else counts)


def _masked(m: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``m * mask`` with the pairs the mask leaves out at exactly 0, even where ``m`` is infinite (not 0 x inf)."""
    return np.where(mask != 0, m, 0.0) * mask


def _between(w: np.ndarray, z: np.ndarray) -> np.ndarray:
    """[B, S, S]: z_b' w z_b for every labelling b (z's weights 0 or 1). A cell is infinite (nan) where one of
    its own pairs is, and only there: in the plain product a run outside a cell still meets an infinite
    distance with weight 0, and 0 x inf = nan spread to every cell (one kl of inf between two settings made
    every ratio, and the whole answer, nan)."""
    zt = np.swapaxes(z, 1, 2)
    if np.isfinite(w).all():
        return zt @ w @ z
    out = zt @ np.where(np.isfinite(w), w, 0.0) @ z
    for bad, value in ((np.isinf(w), np.inf), (np.isnan(w), np.nan)):  # distances: >= 0, inf or nan
        if bad.any():
            out[(zt @ bad.astype(w.dtype) @ z) > 0] = value  # nan last: a cell with inf and nan is nan
    return out


def _diag(x: np.ndarray) -> np.ndarray:
    return np.diagonal(x, axis1=-2, axis2=-1)


def cell_counts(a: np.ndarray, z: np.ndarray) -> np.ndarray:
    """[B, S, S]: the pairs of runs with different seeds (``a``) between (or within) the settings of labellings z,
    shared by every statistic of those labellings (:func:`parts`, :func:`location_ratio`)."""
    return _between(a, z)


def parts(m: np.ndarray, a: np.ndarray, z: np.ndarray, counts: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """D [B, S, S], own floors [B, S], pooled floors [B, S, S] and ratios [B, S, S] of labellings z."""
    s, c = _cells(m, a, z, counts)
    with np.errstate(invalid="ignore", divide="ignore"):
        cross = s / c
        own = _diag(s) / _diag(c)
        ss, cc = _diag(s), _diag(c)
        pooled = (ss[:, :, None] + ss[:, None, :]) / (cc[:, :, None] + cc[:, None, :])
        return {"cross": cross, "own": own, "pooled": pooled, "ratio": cross / pooled}


def location_ratio(q: np.ndarray, a: np.ndarray, z: np.ndarray, counts: np.ndarray | None = None) -> np.ndarray:
    """[B, S, S]: D_2 / ((F_2K + F_2R) / 2) in the squared distance ``q`` (1 = the same mean function)."""
    s, c = _cells(q, a, z, counts)
    with np.errstate(invalid="ignore", divide="ignore"):
        own = _diag(s) / _diag(c)
        return (s / c) / ((own[:, :, None] + own[:, None, :]) / 2)


# ----------------------------------------------------------------------------- variances of cell means


@dataclass(frozen=True)
class Cells:
    """The mean distance of every *cell* (the pairs of runs between settings k and r, or within k when
    k == r; pairs with a shared seed left out) and an unbiased estimate of their covariance."""

    types: list[tuple[int, int]]    # (k, r), k <= r
    means: np.ndarray               # [T]
    cov: np.ndarray                 # [T, T]
    pairs: np.ndarray               # [T] pairs of runs in each cell

    def index(self, k: int, r: int) -> int:
        return self.types.index((min(k, r), max(k, r)))


def cells(m: np.ndarray, design: Design, members: list[int] | None = None) -> Cells:
    """Cell means of the distance matrix ``m`` and their covariance, by Hoeffding's construction: each cell
    mean is a U-statistic over independent seeds, so cov(U_t, U_u) = E[U_t U_u] - mu_t mu_u, and mu_t mu_u
    is estimated without bias by the mean of d_a d_b over pairs a (of cell t) and b (of cell u) that share
    no seed. The estimate is unbiased (it can be negative where a variance is near 0)."""
    members = list(range(len(design.groups))) if members is None else members
    code = {s: i for i, s in enumerate(dict.fromkeys(design.seeds))}
    seed_of = np.zeros((len(design.seeds), len(code)))
    seed_of[np.arange(len(design.seeds)), [code[s] for s in design.seeds]] = 1.0
    a, z = different_seed(design), label_matrix(design)
    types = [(k, r) for i, k in enumerate(members) for r in members[i:]]
    q, c = [], []   # per cell, [seeds, seeds]: the sum of distances (and count of pairs) between two seeds
    for k, r in types:
        mask = np.outer(z[:, k], z[:, r])
        mask = (mask + mask.T if k != r else mask) * a
        q.append(seed_of.T @ _masked(m, mask) @ seed_of)  # another cell's inf stays out
        c.append(seed_of.T @ mask @ seed_of)
    q, c = np.asarray(q), np.asarray(c)
    total, pairs = q.sum((1, 2)) / 2, c.sum((1, 2)) / 2

    def disjoint(x: np.ndarray, tot: np.ndarray) -> np.ndarray:
        """sum over pairs a in t, b in u sharing no seed of x_a x_b: all minus those touching a common seed
        (a pair touching two common seeds is counted twice by the first term)."""
        touching = x.sum(2)                                           # [T, seeds]
        return np.outer(tot, tot) - touching @ touching.T + np.einsum("tab,uab->tu", x, x) / 2

    with np.errstate(invalid="ignore", divide="ignore"):
        means = total / pairs
        product = disjoint(q, total) / disjoint(c, pairs)
    return Cells(types, means, np.outer(means, means) - product, pairs)


def delta_var(cells_: Cells, gradient: dict[tuple[int, int], float]) -> float:
    """Delta-method variance of a smooth function of cell means from its gradient {cell: d f / d mean}
    (unbiased for the linearised function; it can be negative near 0)."""
    g = np.zeros(len(cells_.types))
    for (k, r), v in gradient.items():
        g[cells_.index(k, r)] += v
    used = np.flatnonzero(g)  # cells of other settings (a one-seed setting's are nan) must not enter as 0 x nan
    with np.errstate(invalid="ignore"):  # a used cell's covariance undefined (3 seeds: no disjoint pairs): nan
        return float(g[used] @ cells_.cov[np.ix_(used, used)] @ g[used])


def delta_se(cells_: Cells, gradient: dict[tuple[int, int], float]) -> float:
    """Standard error of a smooth function of cell means (delta method); nan where the estimated variance
    is not positive."""
    var = delta_var(cells_, gradient)
    return math.sqrt(var) if var > 0 else math.nan


@functools.lru_cache(maxsize=4096)
def t_quantile(q: float, dof: float) -> float:
    """Student's t quantile, kept: compare asks for the same few seed counts at every pair of settings, metric and
    target, and scipy's ppf takes some 0.2 ms a call."""
    return float(sps.t.ppf(q, dof))


@functools.lru_cache(maxsize=16)
def normal_quantile(q: float) -> float:
    return float(sps.norm.ppf(q))


def t_interval(estimate: float, se: float, dof: float, *, level: float = 0.95) -> tuple[float, float]:
    """exp(log estimate -/+ t se): an interval for a positive ratio from the standard error of its log."""
    if not (np.isfinite(estimate) and estimate > 0 and np.isfinite(se) and dof >= 1):
        return math.nan, math.nan
    half = t_quantile(0.5 + level / 2, dof) * se
    return math.exp(math.log(estimate) - half), math.exp(math.log(estimate) + half)


def t_p_value(estimate: float, se: float, dof: float) -> float:
    """Two-sided p of "the ratio is 1" from the standard error of its log."""
    if not (np.isfinite(estimate) and estimate > 0 and np.isfinite(se) and dof >= 1):
        return math.nan
    return float(2 * sps.t.sf(abs(math.log(estimate)) / se, dof))


# ----------------------------------------------------------------------------- permutations


def relabellings(design: Design, members: list[int], *, max_exact: int = 5000, n_perm: int = 2000,
                 seed: int = 0) -> tuple[np.ndarray, bool]:
    """Labellings z [B, n, S] of the runs of ``members`` (row 0: the observed one) that keep every setting's
    size: every distinct one when at most ``max_exact``, else ``n_perm`` random ones. Independent seeds: runs
    move freely between the settings; paired seeds: labels move only within a seed. Returns (z, exact)."""
    order, labels, exact = _labellings(design, members, max_exact, n_perm, seed)
    z = np.repeat(label_matrix(design)[None], len(labels), 0)
    z[:, order] = 0.0
    z[np.arange(len(labels))[:, None], np.asarray(order)[None, :], labels] = 1.0
    return z, exact


def member_relabellings(design: Design, members: list[int], *, max_exact: int = 5000, n_perm: int = 2000,
                        seed: int = 0) -> tuple[np.ndarray, np.ndarray, bool]:
    """:func:`relabellings` restricted to the runs and settings of ``members``: (runs, z [B, runs, members], exact),
    ``runs`` those of ``members[0]``, then of ``members[1]``, ...; column j of z is ``members[j]``. A statistic of
    these settings alone takes the same values from the distances among ``runs`` (the other runs would add exact
    zeros) at a fraction of the cost."""
    order, labels, exact = _labellings(design, members, max_exact, n_perm, seed)
    runs = np.array([i for k in members for i in design.groups[k]])
    where = np.empty(max(runs) + 1, dtype=np.int64)
    where[runs] = np.arange(len(runs))
    column = np.empty(max(members) + 1, dtype=np.int64)
    column[members] = np.arange(len(members))
    z = np.zeros((len(labels), len(runs), len(members)))
    z[np.arange(len(labels))[:, None], where[np.asarray(order)][None, :], column[labels]] = 1.0
    return runs, z, exact


def _labellings(design: Design, members: list[int], max_exact: int, n_perm: int,
                seed: int) -> tuple[list[int], np.ndarray, bool]:
    """(order, labels [B, len(order)], exact): the setting of each run of ``order`` (the runs of ``members``, by
    block) in every labelling :func:`relabellings` gives, row 0 the observed one."""
    relation = design.relation(members)
    if relation == "partial":
        raise ValueError("the settings share some seeds but not all: no exact permutation test")
    runs = [i for k in members for i in design.groups[k]]
    label = {i: k for k in members for i in design.groups[k]}
    if relation == "independent":
        blocks = [runs]
    else:
        by_seed: dict = {}
        for i in runs:
            by_seed.setdefault(design.seeds[i], []).append(i)
        blocks = list(by_seed.values())
    # the labellings depend on the blocks' labels alone: as ranks among the members (the same order, so the same
    # enumeration), every pair of settings of one size and every metric and target share one computation
    ranks = sorted(members)
    rank = {k: ranks.index(k) for k in members}
    ranked, exact = _ranked_labellings(tuple(tuple(rank[label[i]] for i in b) for b in blocks), relation == "paired",
                                       max_exact, n_perm, seed)
    return [i for b in blocks for i in b], np.asarray(ranks)[ranked], exact


@functools.lru_cache(maxsize=256)
def _ranked_labellings(blocks: tuple[tuple[int, ...], ...], paired: bool, max_exact: int, n_perm: int,
                       seed: int) -> tuple[np.ndarray, bool]:
    """(labels [B, runs] of the runs in block order, exact) for blocks of labels (ranks): every distinct
    arrangement within the blocks when at most ``max_exact`` (the observed first), else ``n_perm`` random ones
    after it. Kept (read-only): compare asks for the same few for every pair of settings, metric and target."""
    count = 1
    for b in blocks:
        count *= math.factorial(len(b)) // math.prod(math.factorial(v) for v in Counter(b).values())
    observed = [x for b in blocks for x in b]
    if count <= max_exact:
        options = [list(dict.fromkeys(itertools.permutations(b))) for b in blocks] if paired \
            else [list(_arrangements(tuple(sorted(blocks[0]))))]
        assignments = [sum((list(x) for x in combo), []) for combo in itertools.product(*options)]
        assignments.remove(observed)
        assignments.insert(0, observed)
    else:
        rng = np.random.default_rng(seed)
        labels = [np.asarray(b) for b in blocks]
        assignments = [np.concatenate(labels)]
        if len(labels) == 1:  # all rows at once: the same draws as one rng.permutation per row
            rows = rng.permuted(np.tile(np.arange(len(labels[0])), (n_perm, 1)), axis=1)
            assignments += list(labels[0][rows])
        else:
            for _ in range(n_perm):
                assignments.append(np.concatenate([lab[rng.permutation(len(lab))] for lab in labels]))
    out = np.asarray(assignments, dtype=np.int64)
    out.flags.writeable = False
    return out, count <= max_exact


@functools.lru_cache(maxsize=1024)
def _arrangements(labels: tuple) -> tuple[tuple, ...]:
    """Every distinct arrangement of a multiset of labels (given sorted), in lexicographic order; kept, since
    compare asks for the same few multisets for every metric and target."""
    if not labels:
        return ((),)
    out = []
    for k in dict.fromkeys(labels):  # each distinct label first, in order
        rest = list(labels)
        rest.remove(k)
        out += [(k, *tail) for tail in _arrangements(tuple(rest))]
    return tuple(out)


def smallest_p(design: Design, members: list[int], *, max_exact: int = 5000, n_perm: int = 2000) -> float:
    """The smallest p-value the seeds of ``members`` (the first: the reference) allow a setting against the
    reference, its permutation p (two members) or its min-P adjusted p (a family), where one setting's split of
    runs against the reference is the most extreme (as when it is planted far from the rest) and distances tie
    only where the design makes them (exactly equal distances between runs can tie more, or fewer).

    Setting j's statistic depends on its runs and the reference's alone, so its observed value ties with every
    relabelling that keeps those two sets of runs (the other settings' runs arranged any way among them) and,
    where the sizes allow, with their mirror: t_j of them, and p_j >= t_j / B. Its min-P adjusted p also counts
    the relabellings where another setting k's p is as small: t_k floor(t_j / t_k) of them. So three settings of
    3 seeds allow 4 / 1680 and four of 2 seeds 36 / 2520, where counting the observed labelling alone said
    1 / 1680 and 1 / 2520."""
    relation = design.relation(members)
    sizes = [len(design.groups[k]) for k in members]
    ref, family = sizes[0], sizes[1:]

    def arrangements(parts: list[int]) -> int:
        return math.factorial(sum(parts)) // math.prod(math.factorial(x) for x in parts)

    if relation == "independent":
        count = arrangements(sizes)
        ties = [(2 if n == ref else 1) * arrangements(family[:j] + family[j + 1:]) for j, n in enumerate(family)]
    elif relation == "paired":  # labels move within each seed: the same two runs of every seed, either way round
        count = math.factorial(len(members)) ** ref
        ties = [2 * math.factorial(len(members) - 2) ** ref] * len(family)
    else:
        return math.nan
    reach = min(sum(tk * (tj // tk) for tk in ties) for tj in ties)
    return reach / count if count <= max_exact else max(reach / count, 1 / (n_perm + 1))


def upper_p(stats: np.ndarray) -> np.ndarray:
    """[B, F] statistics of B labellings (row 0 observed) -> [B, F]: for every labelling, the fraction of
    labellings whose statistic is at least its own (ties within a relative 1e-12 count: the swapped
    labelling of two equal settings gives the same value in another rounding). A relabelling's undefined
    statistic (nan: an infinite KL on both sides of a ratio) counts as at least as extreme as any, +inf as
    the most extreme it is, so neither makes a p-value smaller than it can be."""
    b = len(stats)
    x = np.where(np.isnan(stats), np.inf, stats)
    with np.errstate(invalid="ignore"):  # inf - inf, not taken
        at_least = np.where(np.isinf(x), x, x - 1e-12 * np.abs(x))
    out = np.empty_like(x)
    for j in range(x.shape[1]):
        column = np.sort(x[:, j])
        out[:, j] = (b - np.searchsorted(column, at_least[:, j], side="left")) / b
    return out
