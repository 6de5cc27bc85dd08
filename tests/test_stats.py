"""Setting-level statistics against an independent PERMANOVA (scikit-bio), hand computations, and simulations
with a known truth: a planted effect gives the predicted ratio and a small p; a null gives p-values spread
uniformly, ratios centred at 1, and intervals that cover 1 (seed-to-seed spread included)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from scipy import stats as sps

from goldenpath import stats


def pair_sums(outputs: np.ndarray) -> np.ndarray:
    """outputs [runs, units] (a scalar 'function' per probe unit) -> per-unit distances |f_a - f_b| per pair."""
    return np.stack([np.abs(outputs[i] - outputs[j]) for i, j in itertools.combinations(range(len(outputs)), 2)])


def simulate(rng, shift: float, *, seeds=(5, 5), units=400, seed_spread=0.0):
    """Two settings of ``seeds`` runs: f(u) = shift * [setting 1] * h(u) + s_run * noise(u), s_run the run's own
    noise scale (lognormal with ``seed_spread``): seeds differ as a whole, not only pointwise."""
    h = rng.normal(size=units)
    rows = []
    for k, n in enumerate(seeds):
        for _ in range(n):
            scale = math.exp(seed_spread * rng.normal())
            rows.append(shift * k * h + scale * rng.normal(size=units))
    groups = [list(range(seeds[0])), list(range(seeds[0], sum(seeds)))]
    return pair_sums(np.stack(rows)), np.ones(units), groups


def test_the_ratio_is_cross_over_pooled_within_means_by_hand():
    d = np.array([[0, 1, 4, 5, 6], [1, 0, 4, 6, 5], [4, 4, 0, 2, 3], [5, 6, 2, 0, 1], [6, 5, 3, 1, 0]], float)
    sums = np.array([[d[i, j]] for i, j in itertools.combinations(range(5), 2)])
    out, _ = stats.compare_settings(sums, np.ones(1), [[0, 1], [2, 3, 4]], n_boot=50)
    c = out[(0, 1)]
    cross = np.mean([d[i, j] for i in (0, 1) for j in (2, 3, 4)])
    within = np.mean([d[0, 1], d[2, 3], d[2, 4], d[3, 4]])
    assert (c.d_cross, c.d_floor, c.ratio) == pytest.approx((cross, within, cross / within))
    assert c.permutations == math.comb(5, 2) and (c.n_a, c.n_b) == (2, 3)


def test_the_permutation_p_value_equals_permanova_on_the_square_rooted_distances():
    from skbio import DistanceMatrix
    from skbio.stats.distance import permanova

    rng = np.random.default_rng(1)
    sums, counts, groups = simulate(rng, 0.3, seeds=(4, 4), units=50)
    out, _ = stats.compare_settings(sums, counts, groups, n_boot=10)
    matrix = stats.pair_matrix(sums.mean(1), 8)
    dm = DistanceMatrix(np.sqrt(matrix))

    def pseudo_f(first):
        labels = [int(i not in first) for i in range(8)]
        return permanova(dm, labels, permutations=0)["test statistic"]

    observed = pseudo_f(set(groups[0]))
    splits = [pseudo_f(set(c)) for c in itertools.combinations(range(8), 4)]
    exact = np.mean(np.asarray(splits) >= observed - 1e-12)  # PERMANOVA's own statistic over every split
    assert out[(0, 1)].p_value == pytest.approx(exact, abs=1e-12)
    sampled = permanova(dm, [0] * 4 + [1] * 4, permutations=4999, seed=0)["p-value"]
    assert abs(sampled - out[(0, 1)].p_value) < 0.03  # scikit-bio's random permutations agree


def test_a_planted_effect_gives_the_predicted_ratio_and_a_small_p():
    rng = np.random.default_rng(2)
    shift = 1.0  # f differs by shift * h(u), h ~ N(0, 1): cross distance |N(0, shift^2 + 2)|, within |N(0, 2)|
    sums, counts, groups = simulate(rng, shift, units=2000)
    c = stats.compare_settings(sums, counts, groups, n_boot=300)[0][(0, 1)]
    predicted = math.sqrt(shift**2 + 2) / math.sqrt(2)  # the ratio of the folded normals' means
    assert c.ratio == pytest.approx(predicted, rel=0.03)
    assert c.ci_low < predicted < c.ci_high and c.ci_low > 1
    assert c.p_value <= 2 / math.comb(10, 5) + 1e-12  # the observed split and its mirror image: the smallest p


def test_a_null_gives_uniform_p_values_ratios_centred_at_one_and_intervals_that_cover_one():
    rng = np.random.default_rng(3)
    ps, rs, covered, covered_units_only = [], [], 0, 0
    reps = 120
    for _ in range(reps):
        sums, counts, groups = simulate(rng, 0.0, units=200, seed_spread=0.7)  # one setting's seeds split in two
        out, draws = stats.compare_settings(sums, counts, groups, n_boot=200, seed=int(rng.integers(1 << 30)))
        c = out[(0, 1)]
        ps.append(c.p_value)
        rs.append(c.ratio)
        covered += c.ci_low <= 1 <= c.ci_high
        # the interval a bootstrap over probe units alone would give: it ignores the seeds' own spread
        matrices, _ = stats.draws(sums, counts, groups, n_boot=200)
        d, f = stats.ratios(matrices, np.ones((200, 10)), groups)
        low, high = stats.percentile_interval((d / f)[1:, 0, 1])
        covered_units_only += low <= 1 <= high
    assert sps.kstest(ps, "uniform").pvalue > 0.01
    assert abs(np.mean(rs) - 1) < 0.02
    assert covered / reps >= 0.88
    assert covered_units_only / reps < covered / reps - 0.1  # seed spread is what the probe-only interval misses


def test_holm_and_slope_against_hand_values():
    assert stats.holm([0.01, 0.04, math.nan, 0.03]) == pytest.approx([0.03, 0.06, math.nan, 0.06], nan_ok=True)
    x = np.log([0.1, 0.2, 0.4, 0.8])
    assert stats.slope(x, 0.5 * x + 3) == pytest.approx(0.5)
    assert math.isnan(stats.slope(np.ones(3), np.arange(3.0)))


@pytest.mark.parametrize("n,n_settings", [(8, 8), (8, 2), (16, 16), (16, 3), (5, 1)])
def test_between_settings_is_the_einsum_to_the_bit(n, n_settings):
    """The weighted between-setting sums equal np.einsum's bit for bit (the committed tables came from it),
    unsorted members and non-finite distances included."""
    rng = np.random.default_rng(n * 10 + n_settings)
    groups = [sorted(map(int, g)) for g in np.array_split(rng.permutation(n), n_settings)]
    groups[0] = groups[0][::-1]
    d = rng.gamma(2.0, 1.0, (300, n, n))
    d = d + d.transpose(0, 2, 1)
    a = np.zeros((300, n))
    for g in groups:
        a[:, g] = rng.multinomial(len(g), np.full(len(g), 1 / len(g)), size=300)
    member = np.zeros((n, n_settings))
    for k, g in enumerate(groups):
        member[g, k] = 1.0
    e = a[:, :, None] * member[None]
    for matrices in (d, np.where(rng.random(d.shape) < 0.001, np.nan, d)):
        want = np.einsum("bis,bij,bjr->bsr", e, matrices, e)
        got = stats._between(a, matrices, groups, e)
        assert np.array_equal(got, want, equal_nan=True)


def test_draws_are_one_generator_sequence_shared_across_calls():
    """Unit weights first, then each setting's seed weights, from one default_rng(seed); a second call (the
    next metric) gets the same draws, and changing the returned weights does not change later calls."""
    rng = np.random.default_rng(5)
    sums, counts, groups = rng.random((15, 40)), rng.integers(1, 9, 40).astype(float), [[0, 2, 4], [1, 3, 5]]
    ref = np.random.default_rng(3)
    w = ref.multinomial(40, np.full(40, 1 / 40), size=50).astype(float)
    w[0] = 1.0
    a = np.zeros((50, 6))
    for g in groups:
        a[:, g] = ref.multinomial(3, np.full(3, 1 / 3), size=50)
        a[0, g] = 1.0
    for _ in range(2):
        matrices, weights = stats.draws(sums, counts, groups, n_boot=50, seed=3)
        assert np.array_equal(weights, a)
        assert np.array_equal(matrices, stats.pair_matrix(((sums @ w.T) / (counts @ w.T)).T, 6))
        weights[:] = -1.0
