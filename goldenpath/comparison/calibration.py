"""Simulated sweeps with a known truth, to check goldenpath's statistics: rejection rates and coverage.

A simulated *function* is a classifier's predicted distribution on a fixed probe set. Setting k has a mean
function ``m_k(x) = softmax(mu(x) + shift_k * delta(x))`` (``mu`` the common function, ``delta`` a fixed
direction: a *location* shift of size ``shift_k``); seed s of setting k predicts

    p_ks(x) = m_k(x) + w_ks * (q_ks(x) - m_k(x)),   q_ks(x) ~ Dirichlet(concentration * m_k(x)),

a point between the mean function and a random distribution whose mean is the mean function, so
``E p_ks = m_k`` exactly: ``w_ks = min(1, scale_k * a_s)`` sets the setting's seed *spread* without moving
its mean, and ``a_s`` (lognormal with ``hetero``) lets some seeds land further than others. In a paired
design seed s is shared across settings: ``q_ks = (1 - rho) u_ks + rho c_s`` with ``c_s`` common to every
setting (so the settings must share their mean function) and ``a_s`` common; unpaired seeds draw the same
mixture with a ``c`` of their own, so every run's distribution is the same in both designs. ``shared=True`` draws the
same but analyses the runs as if every one had its own seed: the bias of seeds shared unknowingly.

The truth (the ratio, spread and location ratio of two settings) is the same statistic over ``truth_seeds``
independent seeds on the same probe set: the estimand of goldenpath's intervals, which hold the probe set
fixed. :func:`calibrate` repeats a sweep ``reps`` times and reports rejection rates and coverage.
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass

import numpy as np

from goldenpath.comparison import stats

from goldenpath.comparison.design import Design


@dataclass(frozen=True)
class World:
    """The population a simulated sweep samples from."""

    shifts: tuple[float, ...]        # location shift of each setting (0: the reference)
    scales: tuple[float, ...]        # seed spread of each setting (weight of the random part, at most 1)
    points: int = 200                # probe points
    classes: int = 10
    base: float = 2.0                # the common function's logit scale
    concentration: float = 10.0      # of the Dirichlet around the mean function
    hetero: float = 0.0              # per-seed log-scale spread
    rho: float = 0.0                 # share of seed noise common to a seed's runs in every setting
    paired: bool = False             # the same seeds in every setting, analysed as paired
    shared: bool = False             # the same seeds in every setting, analysed as if independent
    seed: int = 0                    # draws mu and delta (the probe set)

    def means(self) -> np.ndarray:
        """[settings, points, classes] mean functions."""
        rng = np.random.default_rng(self.seed)
        mu = self.base * rng.normal(size=(self.points, self.classes))
        delta = rng.normal(size=(self.points, self.classes))
        return np.stack([_softmax(mu + s * delta) for s in self.shifts])


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _dirichlet(rng: np.random.Generator, alpha: np.ndarray) -> np.ndarray:
    g = rng.standard_gamma(alpha)
    return g / g.sum(-1, keepdims=True)


def functions(world: World, n: int, rng: np.random.Generator) -> tuple[np.ndarray, Design]:
    """Predicted distributions [runs, points, classes] of n seeds in every setting, and their design."""
    m = world.means()
    same = world.paired or world.shared
    if same and world.rho > 0 and any(s != world.shifts[0] for s in world.shifts):
        raise ValueError("seed noise common to settings needs one mean function (equal shifts)")
    common = _dirichlet(rng, np.broadcast_to(world.concentration * m[0], (n, *m.shape[1:])))
    seed_scale = np.exp(world.hetero * rng.normal(size=n))
    out, groups, seeds = [], [], []
    for k in range(len(world.shifts)):
        q = _dirichlet(rng, np.broadcast_to(world.concentration * m[k], (n, *m.shape[1:])))
        if world.rho > 0:  # the same mixture for independent seeds, each with its own "common" part
            c = common if same else _dirichlet(rng, np.broadcast_to(world.concentration * m[k], q.shape))
            q = (1 - world.rho) * q + world.rho * c
        a = seed_scale if same else np.exp(world.hetero * rng.normal(size=n))
        w = np.minimum(1.0, world.scales[k] * a)[:, None, None]
        out.append(m[k] + w * (q - m[k]))
        groups.append(tuple(range(k * n, (k + 1) * n)))
        seeds += [(0 if same else k, s) for s in range(n)]
    return np.concatenate(out), Design(tuple(groups), tuple(seeds))


def pair_sums(p: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(tv [pairs, points], sq [pairs, points], counts [points]) of every pair of runs, combinations order."""
    i, j = np.array(list(itertools.combinations(range(len(p)), 2))).T
    diff = p[i] - p[j]
    return 0.5 * np.abs(diff).sum(-1), 0.5 * (diff**2).sum(-1), np.ones(p.shape[1])


@dataclass(frozen=True)
class Truth:
    ratio: float
    spread: float
    location: float


@functools.lru_cache(maxsize=32)
def truth(world: World, *, k: int = 1, r: int = 0, truth_seeds: int = 4000, pairs: int = 400_000,
          rng_seed: int = 12345) -> Truth:
    """The population ratio, spread (F_k / F_r) and location ratio of settings k and r on the world's probe
    set, from ``truth_seeds`` independent seeds per setting and ``pairs`` random pairs of distinct seeds.
    The settings are drawn from common random numbers (seed i of k and of r from the same uniforms, by
    inverse CDFs) and the same pairs (i, j) enter every mean: each mean is unbiased (two distinct seeds are
    independent) and their ratios are precise."""
    from scipy.special import gammaincinv

    rng = np.random.default_rng(rng_seed)
    m = world.means()
    n, shape = truth_seeds, m.shape[1:]
    a = np.exp(world.hetero * rng.normal(size=n))
    u, v = rng.random((n, *shape)), rng.random((n, *shape))

    def draw(j: int) -> np.ndarray:
        alpha = world.concentration * m[j]
        g = gammaincinv(alpha, u)
        q = g / g.sum(-1, keepdims=True)
        if world.rho > 0:
            h = gammaincinv(alpha, v)
            q = (1 - world.rho) * q + world.rho * h / h.sum(-1, keepdims=True)
        w = np.minimum(1.0, world.scales[j] * a)[:, None, None]
        return (m[j] + w * (q - m[j])).astype(np.float32)

    x, y = draw(k), draw(r)
    i = rng.integers(0, n, pairs)
    j = (i + rng.integers(1, n, pairs)) % n                     # another seed
    sums = np.zeros((2, 3))                                      # (tv, sq) x (within k, within r, cross)
    per_pair = np.empty((2, 20_000))
    for lo in range(0, pairs, 20_000):  # summed per 20,000 pairs as since the first version: the same bits
        a_, b_ = i[lo:lo + 20_000], j[lo:lo + 20_000]
        for col, (p, q) in enumerate(((x, x), (y, y), (x, y))):
            for at in range(0, len(a_), 500):  # in blocks whose temporaries the allocator reuses
                d = (p[a_[at:at + 500]] - q[b_[at:at + 500]]).astype(np.float64)
                per_pair[0, at:at + len(d)] = np.abs(d).sum(-1).mean(-1)
                per_pair[1, at:at + len(d)] = (d**2).sum(-1).mean(-1)
            sums[:, col] += 0.5 * per_pair[:, :len(a_)].sum(-1)
    (fk, fr, d), (qk, qr, qd) = sums / pairs
    return Truth(d / ((fk + fr) / 2), fk / fr, qd / ((qk + qr) / 2))


def calibrate(world: World, n: int, *, reps: int = 200, seed: int = 0, n_perm: int = 499,
              alpha: float = 0.05, truth_seeds: int = 4000, truth_pairs: int = 400_000) -> dict[str, float]:
    """Rejection rates and interval coverage of settings 1 against 0 (and the family test of every setting
    against setting 0) over ``reps`` simulated sweeps of n seeds per setting."""
    rng = np.random.default_rng(seed)
    t = truth(world, truth_seeds=truth_seeds, pairs=truth_pairs)
    hits = {"ratio_p": 0, "location_p": 0, "spread_p": 0, "family_p": 0, "ratio_covers": 0, "spread_covers": 0,
            "location_covers": 0}
    widths = []
    family = list(range(1, len(world.shifts)))
    for _ in range(reps):
        p, design = functions(world, n, rng)
        if world.shared:  # the same seeds, analysed as if every run had its own
            design = Design(design.groups, tuple(range(len(design.seeds))))
        tv, sq, counts = pair_sums(p)
        kw = {"n_perm": n_perm, "seed": int(rng.integers(1 << 30))}
        c = stats.compare_settings(tv, counts, design, sq_sums=sq, **kw)[0][(0, 1)]
        hits["ratio_p"] += c.p_value < alpha
        hits["location_p"] += c.location_p < alpha
        hits["spread_p"] += c.spread_p < alpha
        hits["ratio_covers"] += c.ci_low <= t.ratio <= c.ci_high
        hits["spread_covers"] += c.spread_high >= 1 / t.spread >= c.spread_low  # a = setting 0, b = setting 1
        hits["location_covers"] += c.location_low <= t.location <= c.location_high
        widths.append(math.log(c.ci_high / c.ci_low))
        if len(family) > 1:
            f = stats.family_test(tv, counts, design, family, 0, sq_sums=sq, **kw)
            hits["family_p"] += f.p_global < alpha
    out = {k: v / reps for k, v in hits.items()}
    if len(family) == 1:
        out["family_p"] = math.nan
    return {**out, "true_ratio": t.ratio, "true_spread": t.spread, "true_location": t.location,
            "mean_log_width": float(np.mean(widths))}
