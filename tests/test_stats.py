"""Setting-level statistics against an independent PERMANOVA (scikit-bio), hand computations, brute-force
enumerations, and simulations with a known truth (goldenpath.comparison.calibration): the tests reject at their level
under the null, the location and spread tests each reject only their own effect, the intervals cover the
truth, and seeds shared unknowingly break all of it (the reason for the independent design)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from goldenpath.comparison import calibration as cal, stats

from goldenpath.comparison.design import (Design, cells, distance_matrix, member_relabellings, pair_matrix,
                                          relabellings, smallest_p)


def pair_sums(outputs: np.ndarray) -> np.ndarray:
    """outputs [runs, units] (a scalar 'function' per probe unit) -> per-unit distances |f_a - f_b| per pair."""
    return np.stack([np.abs(outputs[i] - outputs[j]) for i, j in itertools.combinations(range(len(outputs)), 2)])


def independent(*sizes: int) -> Design:
    starts = np.cumsum([0, *sizes])
    groups = tuple(tuple(range(a, b)) for a, b in zip(starts[:-1], starts[1:]))
    return Design(groups, tuple(range(starts[-1])))


def paired(settings: int, seeds: int) -> Design:
    groups = tuple(tuple(range(k * seeds, (k + 1) * seeds)) for k in range(settings))
    return Design(groups, tuple(i % seeds for i in range(settings * seeds)))


def test_the_ratio_floors_spread_and_location_by_hand():
    d = np.array([[0, 1, 4, 5, 6], [1, 0, 4, 6, 5], [4, 4, 0, 2, 3], [5, 6, 2, 0, 1], [6, 5, 3, 1, 0]], float)
    q = d**2 / 10
    sums = np.array([[d[i, j]] for i, j in itertools.combinations(range(5), 2)])
    sq = np.array([[q[i, j]] for i, j in itertools.combinations(range(5), 2)])
    c = stats.compare_settings(sums, np.ones(1), independent(2, 3), sq_sums=sq, n_perm=50)[0][(0, 1)]
    cross = np.mean([d[i, j] for i in (0, 1) for j in (2, 3, 4)])
    within = np.mean([d[0, 1], d[2, 3], d[2, 4], d[3, 4]])
    own_b = np.mean([d[2, 3], d[2, 4], d[3, 4]])
    assert (c.d_cross, c.d_floor, c.ratio) == pytest.approx((cross, within, cross / within))
    assert (c.floor_a, c.floor_b, c.spread) == pytest.approx((d[0, 1], own_b, d[0, 1] / own_b))
    q_cross = np.mean([q[i, j] for i in (0, 1) for j in (2, 3, 4)])
    q_floor = (q[0, 1] + np.mean([q[2, 3], q[2, 4], q[3, 4]])) / 2
    assert c.location == pytest.approx(q_cross / q_floor)
    assert c.permutations == math.comb(5, 2) and (c.n_a, c.n_b, c.design) == (2, 3, "independent")


def test_same_seed_pairs_are_left_out_of_every_mean_in_a_paired_design():
    rng = np.random.default_rng(0)
    n = 6  # runs: settings 0 and 1, seeds 0-2 each
    d = rng.random((n, n))
    d = d + d.T
    np.fill_diagonal(d, 0)
    sums = np.array([[d[i, j]] for i, j in itertools.combinations(range(n), 2)])
    c = stats.compare_settings(sums, np.ones(1), paired(2, 3), n_perm=50)[0][(0, 1)]
    cross = np.mean([d[i, 3 + j] for i in range(3) for j in range(3) if i != j])
    assert c.d_cross == pytest.approx(cross) and c.design == "paired"
    assert c.permutations == 2**3  # every swap of the two labels within each seed


def test_the_permutation_p_value_equals_permanova_on_the_square_rooted_distances():
    from skbio import DistanceMatrix
    from skbio.stats.distance import permanova

    rng = np.random.default_rng(1)
    rows = [0.3 * k + rng.normal(size=50) for k in (0, 0, 0, 0, 1, 1, 1, 1)]
    sums = pair_sums(np.stack(rows))
    out, _ = stats.compare_settings(sums, np.ones(50), independent(4, 4), n_perm=10)
    dm = DistanceMatrix(np.sqrt(pair_matrix(sums.mean(1), 8)))

    def pseudo_f(first):
        labels = [int(i not in first) for i in range(8)]
        return permanova(dm, labels, permutations=0)["test statistic"]

    observed = pseudo_f(set(range(4)))
    splits = [pseudo_f(set(c)) for c in itertools.combinations(range(8), 4)]
    exact = np.mean(np.asarray(splits) >= observed - 1e-12)  # PERMANOVA's own statistic over every split
    assert out[(0, 1)].p_value == pytest.approx(exact, abs=1e-12)


@pytest.mark.parametrize("design", [independent(3, 3, 2), paired(3, 3)])
def test_relabellings_are_every_labelling_that_keeps_the_sizes_once(design):
    z, exact = relabellings(design, [0, 1, 2])
    labels = {tuple(row.argmax(1)) for row in z}
    assert exact and len(labels) == len(z)  # no labelling twice
    truth = tuple(np.repeat(np.arange(3), [len(g) for g in design.groups]))
    assert tuple(z[0].argmax(1)) == truth  # the observed one first
    if design.relation([0, 1, 2]) == "independent":
        assert len(z) == math.factorial(8) // (math.factorial(3) ** 2 * math.factorial(2))
    else:  # within each seed, the three runs take the three labels in any order
        assert len(z) == math.factorial(3) ** 3
        seeds = np.asarray(design.seeds)
        for row in labels:
            for s in range(3):
                assert sorted(np.asarray(row)[seeds == s]) == [0, 1, 2]
    # the observed split ties with its mirror and with the two family settings swapped where sizes allow
    reach = 1 if design.relation([0, 1, 2]) == "independent" else 4  # sizes 3, 3, 2: the 2-seed setting's split
    assert smallest_p(design, [0, 1, 2]) == pytest.approx(reach / len(z))


# digests of the labellings (the argmax of every row, int8) that goldenpath drew before they were kept and shared
# between settings: the same enumeration order and the same random draws since
LABELLINGS = {
    ("independent(3, 3, 2)", (0, 1)): "58665a509ef64a08", ("independent(3, 3, 2)", (2, 0, 1)): "d2812d3ab312478c",
    ("independent(3, 3, 2)", (1, 2)): "20919504b9020f31", ("paired(3, 3)", (0, 1)): "e3dfabcc1abb68db",
    ("paired(3, 3)", (2, 0, 1)): "1837f15d83a9943d", ("paired(3, 3)", (1, 2)): "eddc3c453da21684",
    ("independent(10, 10, 10, 9)", (0, 1)): "4a9d791c80680c4a", ("independent(10, 10, 10, 9)", (2, 0, 1)):
    "8d7b39e5fd24225c", ("independent(10, 10, 10, 9)", (1, 2)): "aae8078e23089489",
    ("paired(6, 4)", (0, 1)): "db29d20947102e1d", ("paired(6, 4)", (2, 0, 1)): "9da869a04965af12",
    ("paired(6, 4)", (1, 2)): "81fbd1cc168899bd"}
DESIGNS = {"independent(3, 3, 2)": independent(3, 3, 2), "paired(3, 3)": paired(3, 3),
           "independent(10, 10, 10, 9)": independent(10, 10, 10, 9), "paired(6, 4)": paired(6, 4)}


@pytest.mark.parametrize("design", list(DESIGNS))
@pytest.mark.parametrize("members", [[0, 1], [2, 0, 1], [1, 2]])
def test_member_relabellings_are_the_full_relabellings_restricted_to_the_members(design, members):
    """The labellings of the members' runs alone (compare's pairs of settings and family tests take these, kept
    from one call to the next): every row equal to the full one's at those runs and columns, in the same order,
    the exact enumeration and the random draws alike, members in any order (a family's reference first); and the
    full ones those goldenpath drew before (digests)."""
    import hashlib

    name, design = design, DESIGNS[design]
    full, exact = relabellings(design, members, max_exact=500, n_perm=300, seed=3)
    digest = hashlib.sha1(full.argmax(2).astype(np.int8).tobytes()).hexdigest()[:16]
    assert digest == LABELLINGS[(name, tuple(members))]
    runs, sub, sub_exact = member_relabellings(design, members, max_exact=500, n_perm=300, seed=3)
    assert list(runs) == [i for k in members for i in design.groups[k]] and sub_exact == exact
    np.testing.assert_array_equal(sub, full[:, runs][:, :, members])
    # both branches are met: 20, 8 or 16 labellings enumerated; 560, 184,756 or 1,296 too many, 300 drawn
    again = member_relabellings(design, members, max_exact=500, n_perm=300, seed=3)[1]  # from the kept labels
    np.testing.assert_array_equal(again, sub)
    sub[:] = 0  # the caller's own array: the kept labels are not changed through it
    np.testing.assert_array_equal(member_relabellings(design, members, max_exact=500, n_perm=300, seed=3)[1], again)


def test_an_undefined_cell_covariance_gives_a_nan_variance_without_a_numpy_warning():
    """With 3 seeds a setting's within-cell pairs all share a seed, so their covariance is x / 0: inf of either sign
    where the float sums do not cancel to exactly 0. The delta-method variance is then undefined (nan), and the
    jackknife or the relabellings' spread stand in, without numpy's 'invalid value' warning reaching the user."""
    import warnings

    from goldenpath.comparison.design import Cells, delta_var

    cov = np.array([[np.inf, -np.inf, 0.1], [-np.inf, np.inf, 0.2], [0.1, 0.2, 0.3]])
    c = Cells([(0, 0), (0, 1), (1, 1)], np.array([1.0, 2.0, 1.5]), cov, np.array([3, 9, 3]))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        assert math.isnan(delta_var(c, {(0, 0): 1.0, (0, 1): 0.5}))  # inf - inf
        assert delta_var(c, {(1, 1): 2.0}) == pytest.approx(4 * 0.3)  # cells apart from the undefined ones


def test_a_reference_whose_seeds_give_one_function_gives_an_infinite_spread_not_a_crash():
    """A reference setting whose seeds all give the same function (floor 0: e.g. loss barriers all 0 on a small
    sweep) made a setting's spread against it 1 / 0, and compare crashed; it is infinite."""
    from goldenpath.comparison import verdicts

    rng = np.random.default_rng(5)
    outputs = np.stack([np.zeros(20)] * 3 + [rng.normal(size=20) for _ in range(3)])  # the reference: one function
    settings = [verdicts.Setting(f"s{k}", (k,), "online", 0.1 * 2**k, (0, k), {"lr": 0.1 * 2**k}) for k in range(2)]
    got = verdicts.setting_rows(1.0, "tv", settings, independent(3, 3), pair_sums(outputs), np.ones(20), n_perm=50)
    row = [r for r in got["summary"] if r["setting"] == "s1"][0]
    assert row["spread"] == math.inf and row["floor"] > 0 and row["ref_floor"] == 0


def test_min_p_adjusted_p_values_equal_a_brute_force_over_every_relabelling():
    rng = np.random.default_rng(2)
    design = independent(3, 3, 3)
    rows = [0.4 * (k == 2) + rng.normal(size=30) for k in (0, 0, 0, 1, 1, 1, 2, 2, 2)]
    sums = pair_sums(np.stack(rows))
    test = stats.family_test(sums, np.ones(30), design, [1, 2], 0)
    m = pair_matrix(sums.sum(1) / 30, 9)
    ratios = []  # by hand: each labelling's ratio of settings 1 and 2 against 0
    for a in itertools.combinations(range(9), 3):
        rest = [i for i in range(9) if i not in a]
        for b in itertools.combinations(rest, 3):
            c = [i for i in rest if i not in b]
            groups = {0: list(a), 1: list(b), 2: c}
            row = []
            for k in (1, 2):
                cross = m[np.ix_(groups[k], groups[0])].mean()
                within = [m[i, j] for g in (groups[k], groups[0]) for i, j in itertools.combinations(g, 2)]
                row.append(cross / np.mean(within))
            ratios.append(row)
    ratios = np.asarray(ratios)
    observed = ratios[0]  # combinations start with the observed labelling
    marginal = np.stack([(ratios[:, j][None, :] >= ratios[:, j][:, None] - 1e-12).mean(1) for j in range(2)], 1)
    smallest = marginal.min(1)
    want = [np.mean(smallest <= marginal[0, j] + 1e-12) for j in range(2)]
    assert [test.adjusted[1], test.adjusted[2]] == pytest.approx(want)
    assert test.p_global == pytest.approx(min(want)) and test.exact and test.permutations == len(ratios)
    assert np.all(ratios[0] == observed)


def test_cell_covariance_is_unbiased_for_the_covariance_of_cell_means():
    """Across many simulated sweeps, the mean of the estimated covariance of the cell means equals their
    empirical covariance (independent and paired designs, heteroscedastic seeds)."""
    for world in (cal.World(shifts=(0, 0.4), scales=(0.4, 0.6), hetero=0.4, points=60),
                  cal.World(shifts=(0, 0), scales=(0.4, 0.6), hetero=0.4, rho=0.3, paired=True, points=60)):
        rng = np.random.default_rng(3)
        means, covs = [], []
        for _ in range(600):
            p, design = cal.functions(world, 5, rng)
            tv, _, counts = cal.pair_sums(p)
            c = cells(distance_matrix(tv, counts), design)
            means.append(c.means)
            covs.append(c.cov)
        empirical, estimated = np.cov(np.asarray(means).T), np.mean(covs, 0)
        scale = np.sqrt(np.outer(np.diag(empirical), np.diag(empirical)))
        assert np.abs(estimated - empirical).max() / scale.max() < 0.12, world
        # an estimate from the within-setting pairs alone (as a naive bootstrap would) misses the covariance
        assert empirical[0, 1] / math.sqrt(empirical[0, 0] * empirical[1, 1]) > 0.3


def test_row_slopes_are_each_rows_slope_with_its_undefined_values_left_out():
    rng = np.random.default_rng(3)
    x = np.log([0.1, 0.2, 0.4, 0.8, 1.6])
    y = rng.normal(size=(200, 5))
    y[rng.random(y.shape) < 0.2] = np.nan  # a relabelling's ratio can be undefined (0/0)
    y[0] = [np.nan, np.nan, np.nan, 1.0, np.nan]  # one defined value: no slope
    y[1] = [np.inf, 2.0, -np.inf, 1.0, np.nan]
    want = np.array([stats.slope(x, row) for row in y])
    got = stats.row_slopes(x, y)
    assert np.isnan(got[0]) and np.isnan(want[0])
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-14, equal_nan=True)
    same_x = stats.row_slopes(np.array([0.3, 0.3, 0.3, 1.0]), np.array([[1.0, 2.0, 3.0, np.nan]]))
    assert np.isnan(same_x[0])  # the defined values share one x


def test_slope_and_smallest_p_against_hand_values():
    x = np.log([0.1, 0.2, 0.4, 0.8])
    assert stats.slope(x, 0.5 * x + 3) == pytest.approx(0.5)
    assert math.isnan(stats.slope(np.ones(3), np.arange(3.0)))
    assert smallest_p(independent(5, 5), [0, 1]) == pytest.approx(2 / 252)  # the split and its mirror
    assert smallest_p(paired(2, 5), [0, 1]) == pytest.approx(2 / 32)
    assert smallest_p(independent(10, 10, 10), [0, 1, 2], n_perm=1999) == pytest.approx(1 / 2000)


def test_smallest_p_is_what_a_setting_planted_far_away_reaches():
    """Settings at distinct places, the first family setting farthest from the reference: its split against the
    reference is the one most extreme, so its pairwise p and its min-P adjusted p are the smallest the design
    allows, and smallest_p says so (three settings of 3 seeds: 4 / 1680, the observed split, its mirror, and both
    with the two family settings swapped; counting the observed labelling alone said 1 / 1680)."""
    rng = np.random.default_rng(8)
    for sizes in [(3, 3, 3), (3, 3, 2), (2, 2, 2, 2), (3, 2, 2), (4, 3), "paired 3 x 3", "paired 4 x 2"]:
        design = independent(*sizes) if isinstance(sizes, tuple) else paired(*map(int, sizes.split()[1::2]))
        members = list(range(len(design.groups)))
        reached = []
        for far in members[1:]:  # each family setting planted farthest in turn; the design allows the least of them
            where = {k: 0.0 if k == 0 else 50.0 if k == far else 10.0 * k for k in members}
            place = {i: where[k] for k, g in enumerate(design.groups) for i in g}
            sums = pair_sums(np.stack([rng.normal(size=30) + place[i] for i in range(len(design.seeds))]))
            test = stats.family_test(sums, np.ones(30), design, members[1:], 0)
            assert test.exact
            reached.append(test.adjusted[far])
            pair = stats.compare_settings(sums, np.ones(30), design)[0][(0, far)].p_value
            assert pair == pytest.approx(smallest_p(design, [0, far])), (sizes, far)
        assert min(reached) == pytest.approx(smallest_p(design, members)), (sizes, reached)
    assert smallest_p(independent(3, 3, 3), [0, 1, 2]) == pytest.approx(4 / 1680)
    assert smallest_p(independent(2, 2, 2, 2), [0, 1, 2, 3]) == pytest.approx(36 / 2520)
    assert smallest_p(paired(3, 3), [0, 1, 2]) == pytest.approx(4 / 216)  # 2 ways x 2 settings x 1^3, of 6^3


def test_a_one_seed_setting_leaves_the_other_settings_intervals_alone():
    """A setting with one seed has no floor (its cells are nan); the other settings' intervals must not see it."""
    rng = np.random.default_rng(4)
    rows = [0.5 * k + rng.normal(size=40) for k in (0, 0, 0, 0, 1, 1, 1, 1, 2)]
    sums = pair_sums(np.stack(rows))
    sq = sums**2
    with_one = stats.compare_settings(sums, np.ones(40), independent(4, 4, 1), sq_sums=sq, n_perm=50)[0][(0, 1)]
    keep = [p for p, (i, j) in enumerate(itertools.combinations(range(9), 2)) if i < 8 and j < 8]
    without = stats.compare_settings(sums[keep], np.ones(40), independent(4, 4), sq_sums=sq[keep], n_perm=50)[0][(0, 1)]
    for field in ("ci_low", "ci_high", "spread_low", "spread_high", "location_low", "location_high"):
        assert getattr(with_one, field) == pytest.approx(getattr(without, field)), field
        assert np.isfinite(getattr(with_one, field)), field


def test_an_infinite_distance_between_two_settings_leaves_every_other_comparison_alone():
    """One kl of inf between a run of setting 1 and one of setting 2 (a model ruling a token out): the
    comparisons of 0 and 3, whose runs it does not touch, keep their values, intervals and p; before, 0 x inf in
    the label products made every ratio, interval and spread nan, and the answer empty."""
    rng = np.random.default_rng(0)
    out = rng.normal(size=(16, 30))
    out[12:] += 0.8
    sums = pair_sums(out)
    sq = sums**2
    design = independent(4, 4, 4, 4)
    clean = stats.compare_settings(sums, np.ones(30), design, sq_sums=sq, n_perm=200)[0]
    bad = list(itertools.combinations(range(16), 2)).index((4, 8))
    sums[bad, 0], sq[bad, 0] = np.inf, np.inf
    hit = stats.compare_settings(sums, np.ones(30), design, sq_sums=sq, n_perm=200)[0]
    for key in ((0, 3), (0, 1), (2, 3)):
        for field in ("ratio", "ci_low", "ci_high", "p_value", "spread", "spread_low", "spread_high", "location",
                      "location_low", "location_high", "location_p"):
            assert getattr(hit[key], field) == pytest.approx(getattr(clean[key], field), rel=1e-12), (key, field)
    assert math.isinf(hit[(1, 2)].ratio)  # the pair with the infinite distance is infinitely far


def test_a_partial_overlap_of_seeds_has_no_permutation_test():
    design = Design(((0, 1), (2, 3)), (0, 1, 1, 2))  # one seed in both settings, others not
    assert design.relation([0, 1]) == "partial"
    sums = np.ones((6, 1))
    assert math.isnan(stats.compare_settings(sums, np.ones(1), design)[0][(0, 1)].p_value)
    with pytest.raises(ValueError, match="some seeds but not all"):
        relabellings(design, [0, 1])
    with pytest.raises(ValueError, match="two runs with one seed"):
        Design(((0, 1),), (3, 3))


def test_an_undefined_or_infinite_relabelled_statistic_counts_as_extreme():
    """Observed 2; relabellings 1, +inf (an infinite KL in the cross pairs), nan (inf / inf) and 3: p = 4/5. Ranked
    least extreme, as before, the inf and nan made p 2/5, smaller than it can be."""
    from goldenpath.comparison.design import upper_p

    p = upper_p(np.array([[2.0], [1.0], [math.inf], [math.nan], [3.0]]))[:, 0]
    assert p.tolist() == [0.8, 1.0, 0.4, 0.4, 0.6]


# ----------------------------------------------------------------------------- simulations with a known truth

NULL = cal.World(shifts=(0, 0), scales=(0.5, 0.5), hetero=0.3)
LOCATION = cal.World(shifts=(0, 0.3), scales=(0.5, 0.5), hetero=0.3)
SPREAD = cal.World(shifts=(0, 0), scales=(0.4, 0.6), hetero=0.3)
PAIRED = cal.World(shifts=(0, 0), scales=(0.5, 0.5), hetero=0.3, rho=0.3, paired=True)


# about 15 s of simulated sweeps
def test_the_null_is_rejected_at_its_level_in_both_designs():
    for world in (NULL, PAIRED):
        r = cal.calibrate(world, 10, reps=400, seed=11, n_perm=199, truth_seeds=300, truth_pairs=30_000)
        for test in ("ratio_p", "location_p", "spread_p"):  # spread: a t test (jackknife variance when paired)
            assert 0.03 <= r[test] <= 0.07, (world, test, r)


# about 30 s: analysis/calibration.py commits the same check at 400 sweeps per world
def test_location_and_spread_tests_each_reject_only_their_own_effect_and_intervals_cover():
    loc = cal.calibrate(LOCATION, 10, reps=400, seed=12, n_perm=499, truth_seeds=1500, truth_pairs=100_000)
    spread = cal.calibrate(SPREAD, 10, reps=400, seed=13, n_perm=499, truth_seeds=1500, truth_pairs=100_000)
    assert loc["location_p"] > 0.95 and loc["spread_p"] <= 0.07, loc
    assert spread["spread_p"] > 0.6 and spread["location_p"] <= 0.07, spread
    # the band 93-97%, widened by about twice the Monte Carlo error of 400 sweeps (one standard error: 1.1%)
    for r in (loc, spread):
        for interval in ("spread_covers", "ratio_covers", "location_covers"):
            assert 0.915 <= r[interval] <= 0.99, (interval, r)


def test_spread_has_an_interval_with_three_and_four_seeds_that_covers():
    """With independent seeds the spread's unbiased variance is 0 / 0 at 3 seeds (every two within-setting pairs
    share a seed) and often <= 0 at 4: the jackknife over seeds stands in, so the interval exists and covers."""
    t = cal.truth(SPREAD, truth_seeds=600, pairs=40_000)
    for n in (3, 4):
        rng = np.random.default_rng(20 + n)
        covered = missing = 0
        for _ in range(120):
            p, design = cal.functions(SPREAD, n, rng)
            tv, _, counts = cal.pair_sums(p)
            c = stats.compare_settings(tv, counts, design, n_perm=19)[0][(0, 1)]
            missing += not np.isfinite(c.spread_low)
            covered += c.spread_high >= 1 / t.spread >= c.spread_low
        assert missing == 0 and covered / 120 >= 0.9, (n, covered, missing)  # 0 at 3 seeds before (all missing)
    m = distance_matrix(tv, counts)  # the stand-in: a loop over the left-out seed
    logs = [math.log(np.mean([m[a, b] for a, b in itertools.combinations([x for x in design.groups[1] if x != d], 2)]))
            for d in design.groups[1]]
    want = (len(logs) - 1) / len(logs) * ((np.array(logs) - np.mean(logs)) ** 2).sum()
    assert stats.jackknife_floor_var(m, design.groups[1]) == pytest.approx(want, rel=1e-10)


def test_score_interval_endpoints_solve_the_score_equation():
    """Each endpoint L solves (L_hat - L)^2 = q^2 (v0 + kappa max(L, 0)), found here by scipy's root finder, with kappa
    the excess variance over max(L_hat, sqrt(v0)) and q Student's t (Satterthwaite's dof when asked)."""
    from scipy import optimize
    from scipy import stats as sps

    for estimate, var, v0, sat in [(1.05, 4e-4, 1e-4, False), (1.05, 4e-4, 1e-4, True), (0.99, 3e-4, 1e-4, False),
                                   (1.002, 5e-5, 4e-5, True), (1.2, 1e-4, 2e-4, True)]:
        ell, excess = math.log(estimate), max(var - v0, 0.0)
        kappa = excess / max(ell, math.sqrt(v0))
        df = 9 if not sat else (math.inf if excess == 0 else 9 * ((v0 + excess) / excess) ** 2)
        q = sps.norm.ppf(0.975) if math.isinf(df) else sps.t.ppf(0.975, df)
        f = lambda x: (ell - x) ** 2 - q**2 * (v0 + kappa * max(x, 0.0))  # noqa: E731
        low = optimize.brentq(f, ell - 10, ell)
        high = optimize.brentq(f, ell, ell + 10)
        got = stats.score_interval(estimate, var, v0, 9, satterthwaite=sat)
        assert got == pytest.approx((math.exp(low), math.exp(high)), rel=1e-9), (estimate, var, v0, sat)


def test_paired_spread_variance_is_the_jackknife_over_seeds_by_a_loop():
    rng = np.random.default_rng(3)
    n = 6
    p, design = cal.functions(PAIRED, n, rng)
    tv, _, counts = cal.pair_sums(p)
    m = distance_matrix(tv, counts)
    # a loop over the left-out seed, the floors from the per-point distances of the raw predictions
    values = []
    for drop in range(n):
        keep = [s for s in range(n) if s != drop]
        floor = [np.mean([0.5 * np.abs(p[k * n + a] - p[k * n + b]).sum(-1).mean()
                          for a, b in itertools.combinations(keep, 2)]) for k in (0, 1)]
        values.append(math.log(floor[0] / floor[1]))
    values = np.asarray(values)
    expected = (n - 1) / n * ((values - values.mean()) ** 2).sum()
    assert stats.paired_spread_var(m, design, 0, 1) == pytest.approx(expected, rel=1e-10)


def test_seeds_shared_unknowingly_bias_the_ratio_toward_one_and_silence_the_test():
    """The referee's case: the same seeds in two settings, analysed as if every run had its own."""
    shared = cal.calibrate(cal.World(shifts=(0, 0), scales=(0.5, 0.5), rho=0.3, shared=True), 10, reps=100,
                           seed=15, n_perm=199, truth_seeds=300, truth_pairs=30_000)
    assert shared["ratio_p"] < 0.01 and shared["ratio_covers"] < 0.7  # far below its level, off the truth
