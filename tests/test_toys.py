"""Theory toys against closed forms, a linear program and exact Gaussian moments."""

from __future__ import annotations

import re

import numpy as np
import pytest

from goldenpath.toys import dln, lls, make_problem


def test_lls_gradient_descent_ends_at_the_interpolator_nearest_the_start():
    p = make_problem(10, 30, sparsity=None, seed=0)
    beta0 = np.random.default_rng(1).standard_normal(30)
    final, _ = lls.run(p, beta0, steps=6000, lr=0.05)
    np.testing.assert_allclose(final[0], lls.flow_limit(p.X, p.y, beta0), atol=1e-8)
    np.testing.assert_allclose(final[0], beta0 + np.linalg.pinv(p.X) @ (p.y - p.X @ beta0), atol=1e-8)


@pytest.mark.parametrize("batch, dt", [(None, None), (4, None), (None, 0.01)],
                         ids=["noisy-gd", "noisy-sgd-batch-4", "sde-euler-maruyama"])
def test_lls_null_space_mean_and_covariance_match_the_exact_formula(batch, dt):
    p = make_problem(8, 20, seed=2)
    beta0 = np.random.default_rng(3).standard_normal(20)
    lr, sigma, steps, seeds = 0.05, 2.0, 40, 4000
    b = batch or 8
    final, _ = lls.run(p, beta0, steps=steps * (round(lr / dt) if dt else 1), lr=lr, batch=batch, sigma=sigma,
                       seeds=seeds, seed=4, dt=dt)
    proj = lls.null_projector(p.X)
    null = final @ proj
    mean, cov = lls.null_space_moments(p.X, beta0, lr=lr, sigma=sigma, batch=b, steps=steps)
    sd = np.sqrt(np.diag(cov))
    assert np.all(np.abs(null.mean(0) - mean) <= 5 * sd / np.sqrt(seeds) + 1e-12)
    emp = np.cov(null.T)
    assert np.linalg.norm(emp - cov) / np.linalg.norm(cov) < 0.08
    # and the row-space part is untouched by the noise's null-space spread: it converges to the data
    assert np.abs(final @ (np.eye(20) - proj) - (beta0 @ (np.eye(20) - proj))).max() > 0  # it moved


def test_dln_long_small_step_gd_matches_the_flow_limit():
    p = make_problem(5, 12, seed=5)
    alpha = 0.3
    limit = dln.flow_limit(p.X, p.y, alpha)
    np.testing.assert_allclose(p.X @ limit, p.y, atol=1e-10)
    errors = {}
    for lr, steps in ((0.02, 60_000), (0.005, 240_000)):  # the same time horizon, converged
        final, _ = dln.run(p, alpha, steps=steps, lr=lr)
        errors[lr] = np.linalg.norm(final[0] - limit) / np.linalg.norm(limit)
    assert errors[0.005] < 1e-3 and errors[0.005] < errors[0.02] / 2  # GD -> the flow's limit as lr -> 0


def test_dln_small_alpha_tends_to_min_l1_and_large_alpha_to_min_l2():
    p = make_problem(10, 30, sparsity=3, seed=6)
    l1 = dln.min_l1(p.X, p.y)
    gaps = []
    for alpha in (1e-2, 1e-4, 1e-6, 1e-9):  # the approach is slow: ~ 1 / log(1 / alpha)
        small = dln.flow_limit(p.X, p.y, alpha)
        np.testing.assert_allclose(p.X @ small, p.y, atol=1e-9)
        gaps.append(np.linalg.norm(small - l1) / np.linalg.norm(l1))
    assert all(a > b for a, b in zip(gaps, gaps[1:])) and gaps[-1] < 1e-2
    assert np.abs(small).sum() <= np.abs(l1).sum() * (1 + 1e-3)
    l2 = np.linalg.pinv(p.X) @ p.y
    assert np.linalg.norm(dln.flow_limit(p.X, p.y, 30.0) - l2) / np.linalg.norm(l2) < 1e-3
    # q_alpha: ~ |beta| log|beta| scale for small alpha, ~ beta^2 / (4 alpha^2) for large alpha
    assert dln.q_alpha(np.array([1e-3]), 10.0) == pytest.approx(1e-6 / (4 * 100.0), rel=1e-3)


def test_fit_alpha_recovers_the_alpha_of_a_flow_limit():
    p = make_problem(10, 30, seed=7)
    for alpha in (0.05, 0.3, 2.0):
        fitted, residual = dln.fit_alpha(p.X, p.y, dln.flow_limit(p.X, p.y, alpha))
        assert fitted == pytest.approx(alpha, rel=1e-3) and residual < 1e-6



def test_flow_limit_from_a_warm_dual_start_and_a_shared_alpha_grid_give_the_same_answers():
    """The dual is strictly convex: a start from another alpha's dual solution ends at the same flow limit
    (checked by its optimality conditions: X beta = y and beta = 2 alpha^2 sinh(X^T lam)); fits that share
    one AlphaGrid equal fits that build their own; and Newton reaches its tolerance where the dual's change
    is below its rounding (Armijo alone then backtracks to nothing and stalls)."""
    p = make_problem(15, 30, seed=0)
    for alpha, other in ((0.002, 0.003), (0.3, 0.2), (4.0, 6.0)):
        warm_lam = dln.dual_solution(p.X, p.y, alpha, lam=dln.dual_solution(p.X, p.y, other))
        warm = dln.flow_limit(p.X, p.y, alpha, lam=dln.dual_solution(p.X, p.y, other))
        np.testing.assert_allclose(p.X @ warm, p.y, atol=1e-9)
        np.testing.assert_allclose(warm, 2 * alpha**2 * np.sinh(p.X.T @ warm_lam), rtol=1e-12)
        np.testing.assert_allclose(warm, dln.flow_limit(p.X, p.y, alpha), rtol=1e-7, atol=1e-10)
    grid = dln.AlphaGrid(p.X, p.y)
    rng = np.random.default_rng(1)
    for alpha in (0.05, 0.7):
        beta = dln.flow_limit(p.X, p.y, alpha) + 0.05 * rng.standard_normal(30)
        shared, alone = dln.fit_alpha(p.X, p.y, beta, grid=grid), dln.fit_alpha(p.X, p.y, beta)
        assert shared == pytest.approx(alone, rel=1e-6)
    wide = make_problem(10, 30, seed=0)  # at alpha = 10 the old line search stalled at |X beta - y| ~ 2e-9
    for alpha in (2.0, 10.0):
        limit = dln.flow_limit(wide.X, wide.y, alpha)
        assert np.abs(wide.X @ limit - wide.y).max() <= 1e-12 * max(1.0, np.abs(wide.y).max())

def run_then_converge(p, alpha, *, sigma=0.0, label_noise=0.0, seeds=6):
    """Noise for 20k steps of lr 0.01 (n=10: full batch), then 40k steps of plain GD; alpha_eff and fit residual."""
    d = p.X.shape[1]
    theta, _ = dln.optimise(dln.gradient(p, label_noise=label_noise), np.full(2 * d, alpha), n=len(p.y),
                            steps=20_000, lr=0.01, sigma=sigma, seeds=seeds, seed=1)
    theta, _ = dln.optimise(dln.gradient(p), theta, n=len(p.y), steps=40_000, lr=0.01, seeds=seeds)
    return np.array([dln.fit_alpha(p.X, p.y, b) for b in dln.beta_of(theta)])


def test_label_noise_sgd_lowers_the_effective_alpha_consistently():
    """Pesme et al. 2021: SGD with label noise ends nearer the sparse end of the Q_alpha family. Setting:
    n=10, d=30, 3-sparse truth, alpha=0.5; label noise 3 shrinks alpha_eff ~10x in every seed (the ranges
    over seeds do not overlap), with a lower l1 norm. Isotropic Noisy-SGD at the same setting does not give a
    consistent fall: some seeds fit the small-alpha end, others the large-alpha end (see the closing note)."""
    p = make_problem(10, 30, sparsity=3, seed=0)
    clean = run_then_converge(p, 0.5)
    noisy = run_then_converge(p, 0.5, label_noise=3.0)
    assert clean[:, 0] == pytest.approx(0.5, rel=0.02) and clean[:, 1].max() < 1e-3
    assert noisy[:, 0].max() < clean[:, 0].min() / 5


def _trend_frame(slopes, *, noise=0.0, sigmas=(0.0, 0.2, 0.4, 0.6, 0.8, 1.0), seed=0, residual=0.05):
    """Rows whose log alpha_eff is exactly linear in sigma per seed (slope per seed), plus optional noise."""
    import pandas as pd

    rng = np.random.default_rng(seed)
    return pd.DataFrame([{"noise": "param", "batch": 10, "sigma": s, "seed": k, "at_bound": False,
                          "alpha_eff": 0.5 * np.exp(b * s + noise * rng.standard_normal()),
                          "recovery_error": 1.0 + 0.01 * k, "fit_residual": residual}
                         for k, b in enumerate(slopes) for s in sigmas])


def test_seed_trend_is_the_mean_per_seed_change_with_a_t_interval_and_tost_for_flat():
    from scipy import stats

    from goldenpath.toys.experiments import seed_trend

    slopes = [-0.5, -0.4, -0.6, -0.45, -0.55]
    t = seed_trend(_trend_frame(slopes), "alpha_eff", margin=0.1, log=True)
    assert t["change"] == pytest.approx(np.mean(slopes))  # the span of sigma is 1
    half = stats.t.ppf(0.975, 4) * np.std(slopes, ddof=1) / np.sqrt(5)
    assert t["ci95"] == pytest.approx((np.mean(slopes) - half, np.mean(slopes) + half)) and t["verdict"] == "falls"
    flat = seed_trend(_trend_frame([0.01, -0.01, 0.02, 0.0, -0.02]), "alpha_eff", margin=0.1, log=True)
    assert flat["verdict"] == "flat"
    noisy = seed_trend(_trend_frame([0.3, -0.3, 0.2, -0.2, 0.0]), "alpha_eff", margin=0.1, log=True)
    assert noisy["verdict"] == "inconclusive"  # no fall, and too spread to call flat
    rising = seed_trend(_trend_frame([0.5, 0.4, 0.6]), "alpha_eff", margin=0.1, log=True)
    assert rising["verdict"] == "rises"


def _brute_sign_p(x):
    """The exact two-sided sign test by enumerating every sign pattern of the nonzero values: the share
    of patterns whose count of negatives is at least as far from half as the one observed."""
    import itertools

    x = np.asarray(x, dtype=float)
    x = x[x != 0]
    k, neg = len(x), int((x < 0).sum())
    far = [abs(sum(signs) - k / 2) >= abs(neg - k / 2) - 1e-9 for signs in itertools.product((0, 1), repeat=k)]
    return float(np.mean(far))


def test_sign_median_is_the_exact_sign_test_and_its_intervals_are_that_test_inverted():
    """The p-value against an enumeration of all sign patterns and scipy's binomtest; the 95% and 90%
    intervals hold exactly the medians m that the sign test of x - m (scipy) does not reject, censored
    values (+-inf) included; a median and a verdict with censored values on the far side."""
    from scipy import stats

    from goldenpath.toys.experiments import sign_median

    rng = np.random.default_rng(0)
    for k, censored in ((7, 0), (12, 3), (16, 7)):
        x = rng.normal(-0.3, 1.0, k)
        x[:censored] = np.inf  # seeds whose fit ran to the upper bound: the largest changes, value unknown
        t = sign_median(x, margin=0.1)
        assert t["p"] == pytest.approx(_brute_sign_p(x), rel=1e-9)
        assert t["p"] == pytest.approx(stats.binomtest(int((x < 0).sum()), k).pvalue, rel=1e-12)
        assert (t["falls"], t["rises"], t["censored"]) == ((x < 0).sum(), (x > 0).sum(), censored)
        finite = np.sort(x[np.isfinite(x)])
        for level, name in ((0.95, "ci95"), (0.90, "ci90")):
            lo, hi = t[name]
            for m in np.concatenate([(finite[1:] + finite[:-1]) / 2, [finite[0] - 1, finite[-1] + 1]]):
                below, above = int((x < m).sum()), int((x > m).sum())
                kept = stats.binomtest(below, below + above).pvalue > 1 - level
                assert kept == (lo < m < hi), (k, level, m)
    x = np.array([-1.0, -0.5, -0.4, -0.3, -0.2, 0.2, np.inf, np.inf, np.inf])
    t = sign_median(x, margin=0.1)
    assert t["change"] == -0.2 and t["ci95"][1] == np.inf and t["verdict"] == "inconclusive"
    assert sign_median(-np.arange(1.0, 10.0), margin=0.1)["verdict"] == "falls"
    assert sign_median(np.linspace(-0.05, 0.05, 12), margin=0.1)["verdict"] == "flat"
    assert sign_median(np.array([]), margin=0.1)["verdict"] == "inconclusive"
    # fewer than 6 seeds: no sign test rejects at 5%, the interval is the whole line, and says so
    from goldenpath.toys.experiments import _says_signs

    few = sign_median(np.array([-0.3, -0.2, -0.25, -0.1, -0.4]), margin=0.1)
    assert few["ci95"] == (-np.inf, np.inf) and not few["ci95_bounded"] and few["verdict"] == "inconclusive"
    assert "no 95% interval from 5 seeds" in _says_signs(few) and "beyond the bound" not in _says_signs(few)
    assert sign_median(-np.arange(1.0, 7.0), margin=0.1)["ci95_bounded"]


def test_sign_median_keeps_its_level_with_censored_seeds_where_leaving_them_out_does_not():
    """A simulation with a known truth: per seed, the change of log alpha_eff is N(0, 1) (no fall), and a
    seed whose alpha_eff would end above the bound is censored there. Kept as censored, "falls" comes out
    in at most 5% of 1000 studies of 16 seeds (and the 95% interval covers the true median 0 in at least
    95%); the rule that left them out finds a fall in far more. With a true fall of 1.5 per seed, it is
    found nearly always."""
    from scipy import stats

    from goldenpath.toys.experiments import sign_median

    rng = np.random.default_rng(1)
    falls = covered = dropped_falls = found = 0
    studies, seeds, bound = 1000, 16, 0.5  # censored where the change exceeds the bound's
    for _ in range(studies):
        x = rng.standard_normal(seeds)
        t = sign_median(np.where(x > bound, np.inf, x), margin=0.1)
        falls += t["verdict"] == "falls"
        covered += t["ci95"][0] < 0 < t["ci95"][1]
        kept = x[x <= bound]  # the earlier rule: censored seeds left out, a t-interval over the rest
        dropped_falls += stats.ttest_1samp(kept, 0).pvalue < 0.05 and kept.mean() < 0
        found += sign_median(rng.standard_normal(seeds) - 1.5, margin=0.1)["verdict"] == "falls"
    assert falls / studies <= 0.05 and covered / studies >= 0.95
    assert dropped_falls / studies > 0.5
    assert found / studies > 0.95


def test_alpha_changes_keep_censored_fits_by_their_side():
    import pandas as pd

    from goldenpath.toys.experiments import FIT_BOUNDS, alpha_changes

    lo, hi = FIT_BOUNDS
    ends = {0: (0.5, 0.25), 1: (0.5, hi), 2: (0.5, lo), 3: (hi, hi), 4: (hi, 0.4), 5: (lo, lo)}
    frame = pd.DataFrame([{"seed": s, "sigma": g, "alpha_eff": a, "at_bound": a in (lo, hi)}
                          for s, pair in ends.items() for g, a in zip((0.0, 1.0), pair)])
    changes = alpha_changes(frame, 0.0, 1.0)
    np.testing.assert_array_equal(changes, [np.log(0.5), np.inf, -np.inf, -np.inf])  # seeds 3 and 5: unknown


def test_rising_steps_finds_a_rise_between_adjacent_sigmas_and_the_verdict_says_it():
    from goldenpath.toys.experiments import dln_verdict, rising_steps

    frame = _trend_frame([-0.5, -0.4, -0.6, -0.45, -0.55, -0.5, -0.52, -0.48], noise=0.01)
    assert rising_steps(frame) == []
    bump = frame.assign(alpha_eff=frame.alpha_eff * np.where(frame.sigma == 0.4, 1.5, 1.0))
    assert rising_steps(bump) == [(0.2, 0.4)]
    text = dln_verdict(bump)
    assert "HOLDS" in text and "not monotone" in text and "0.2 to 0.4" in text and "8 of 8 seeds fall" in text
    assert "does NOT hold (flat)" in dln_verdict(_trend_frame([0.01, -0.01, 0.02, 0.0, -0.02]))


def test_a_fit_residual_above_the_level_at_any_sigma_makes_the_claim_not_identified():
    """The same fall in every seed: it HOLDS where the median fit residual stays at or below the level
    over the whole grid, and is NOT IDENTIFIED where it exceeds the level at a single sigma in the middle;
    then the sigmas before that one get their own reading."""
    from goldenpath.toys.experiments import RESIDUAL_LEVEL, dln_verdict

    frame = _trend_frame([-0.5, -0.4, -0.6, -0.45, -0.55, -0.5, -0.52, -0.48], residual=RESIDUAL_LEVEL)
    assert "falls HOLDS" in dln_verdict(frame)
    poor = frame.assign(fit_residual=np.where(frame.sigma == 0.6, 2 * RESIDUAL_LEVEL, RESIDUAL_LEVEL))
    text = dln_verdict(poor)
    assert "HOLDS" not in text and "NOT IDENTIFIED" in text and "at sigma 0.6" in text
    assert "over the identified sigmas 0 to 0.4: alpha_eff falls (8 of 8 seeds fall" in text


def test_a_diverged_run_has_no_fit_and_makes_its_sigma_not_identified():
    """A run whose weights blow up has no alpha_eff (nan, neither a fit nor a censored one); the sigma it
    diverged at is not identified, and its seeds count in no fall: before, a nan beta was fitted to alpha
    0.00116 inside the search range and read as a fall of x0.002 (and as "identified", nan <= 0.1 being
    skipped by the median)."""
    import warnings

    from goldenpath.toys.experiments import dln_verdict, run_dln

    p = make_problem(10, 30, seed=0)
    assert all(np.isnan(dln.fit_alpha(p.X, p.y, np.full(30, bad))).all() for bad in (np.nan, np.inf))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the overflow on the way to inf
        blown = run_dln(lr=0.5, sigmas=[0.0, 0.1], seeds=2, noise_steps=100, converge_steps=100)
    assert blown.alpha_eff.isna().all() and not blown.at_bound.any()
    text = dln_verdict(blown)
    assert "NOT IDENTIFIED: 2 of 2 seeds diverged at sigma 0" in text and "4 of 4 runs diverged" in text
    frame = _trend_frame([-0.5, -0.4, -0.6, -0.45, -0.55, -0.5, -0.52, -0.48])
    assert "falls HOLDS" in dln_verdict(frame)
    late = frame.assign(alpha_eff=frame.alpha_eff.where(~((frame.sigma == 1.0) & (frame.seed < 3))),
                        recovery_error=frame.recovery_error.where(~((frame.sigma == 1.0) & (frame.seed < 3))))
    text = dln_verdict(late)
    assert "NOT IDENTIFIED: 3 of 8 seeds diverged at sigma 1 " in text and "3 of 48 runs diverged" in text
    assert "alpha_eff inconclusive (5 of 5 seeds fall" in text and "over 5 seeds" in text  # 3 left out of both
    assert "over the identified sigmas 0 to 0.8: alpha_eff falls (8 of 8 seeds fall" in text


def test_a_seed_draws_the_same_rows_and_noise_at_every_sigma_zero_included():
    """Rows and noise come from separate streams of the seed: a mini-batch run at sigma 0 and at sigma 1e-9
    end 1e-9-ish apart (before, sigma 0 skipped the noise draws and took other rows: 1e-4 apart)."""
    p = make_problem(10, 30, seed=0)
    runs = {s: dln.run(p, 0.5, steps=2000, lr=0.01, batch=5, sigma=s, seeds=3, seed=1)[0] for s in (0.0, 1e-9, 2e-9)}
    step = np.abs(runs[2e-9] - runs[1e-9]).max()
    assert 0 < step < 1e-8 and np.abs(runs[1e-9] - runs[0.0]).max() < 2 * step


@pytest.mark.parametrize("which, text, field", [
    ("lls", "batch=0", "toys.batch"), ("lls", "steps=10", "toys.steps"), ("lls", "every=0", "toys.every"),
    ("lls", "seeds=1", "toys.seeds"), ("lls", "seeds=2.5", "toys.seeds"), ("lls", "seeds=true", "toys.seeds"),
    ("lls", "sigma=0", "toys.sigma"), ("lls", "batch=abc", "toys.batch"), ("lls", "n=30", "toys.n"),
    ("dln", "sigmas=[abc]", "toys.sigmas"), ("dln", "sigmas=[]", "toys.sigmas"), ("dln", "sigmas=[1]", "toys.sigmas"),
    ("dln", "sigmas=[0, -1]", "toys.sigmas"), ("dln", "batches=[0]", "toys.batches"),
    ("dln", "batches=[null, 10]", "toys.batches"), ("dln", "alpha=0", "toys.alpha"), ("dln", "lr=-1", "toys.lr"),
    ("dln", "sparsity=31", "toys.sparsity"), ("dln", "noise=none", "toys.noise"), ("dln", "steps=5", "toys.steps"),
])
def test_toy_options_name_the_bad_field(which, text, field):
    from goldenpath.config import ConfigError
    from goldenpath.toys.experiments import toy_options

    with pytest.raises(ConfigError) as e:
        toy_options(which, [text])
    assert e.value.field == field, str(e.value)


def test_toy_options_take_whole_floats_and_null_where_allowed():
    from goldenpath.toys.experiments import toy_options

    got = toy_options("lls", ["steps=1e3", "seeds=40.0", "batch=null", "sigma=2"])
    assert got == {"steps": 1000, "seeds": 40, "batch": None, "sigma": 2.0} and isinstance(got["steps"], int)
    assert toy_options("dln", ["sparsity=null", "batches=[null, 5]", "sigmas=[0, 1]"])["sparsity"] is None


def test_the_committed_verdicts_follow_from_the_committed_table():
    """verdict.txt against dln.parquet and drift.csv: each DLN line is what dln_verdict gives on its rows,
    and its counts, sign test, identification and claim are re-derived here from the raw columns (a fit
    at the upper bound is stored as 10, so it compares as larger than any fit inside the range)."""
    from pathlib import Path

    import pandas as pd
    from scipy import stats

    from goldenpath.toys.experiments import MARGINS, RESIDUAL_LEVEL, dln_verdict

    results = Path(__file__).resolve().parents[1] / "analysis" / "results" / "toys"
    table = pd.read_parquet(results / "dln.parquet")
    lines = (results / "verdict.txt").read_text().splitlines()
    names = {"param": "Noisy-SGD (isotropic noise on the weights)", "label": "SGD with label noise"}
    checked = 0
    for (regime, noise), part in table[table.noise != "sgd"].groupby(["regime", "noise"], sort=False):
        line = next(x for x in lines if x.startswith(f"{regime}, {names[noise]}: "))
        assert line == f"{regime}, {names[noise]}: " + dln_verdict(part)
        wide = part.pivot(index="seed", columns="sigma", values="alpha_eff")
        first, last = wide[wide.columns.min()], wide[wide.columns.max()]
        falls, rises = int((last < first).sum()), int((last > first).sum())
        p = stats.binomtest(falls, falls + rises).pvalue
        assert f"{falls} of {len(wide)} seeds fall, {rises} rise" in line and f"sign test p {p:.3g};" in line
        residual = part.groupby("sigma").fit_residual.median()
        identified = (residual <= RESIDUAL_LEVEL).all()
        assert ("NOT IDENTIFIED" in line) == (not identified)
        if not identified:
            poor = residual[residual > RESIDUAL_LEVEL].index.min()
            assert f"median fit residual {residual[poor]:.3g} > {RESIDUAL_LEVEL:g} at sigma {poor:g}" in line
        if "falls HOLDS" in line:
            assert identified and p < 0.05 and falls > rises
        median = np.median(np.log(last / first))  # valid while fewer than half sit at one bound
        if identified and p < 0.05 and falls > rises and median < -MARGINS["log_alpha_eff"]:
            assert "falls HOLDS" in line
        assert f"{int(part.at_bound.sum())} of {len(part)} fits at the search bound, kept as censored" in line
        checked += 1
    assert checked == 8  # two noises at n = 10 and n = 15, isotropic noise in the four further regimes
    drift = pd.read_csv(results / "drift.csv")
    for (regime, quantity), part in drift.groupby(["regime", "quantity"], sort=False):
        line = next(x for x in lines if x.startswith(f"{regime}, Ito drift of log(u v), {quantity} "))
        said = re.findall(r"sigma ([\d.]+): (\w+) \(", line)
        assert said == [(f"{t.sigma:g}", t.verdict) for t in part.itertuples()]
    sgd = table[table.noise == "sgd"].groupby("batch").alpha_eff.median().sort_index(ascending=False)
    assert "by batch size: " + ", ".join(f"B={b}: {v:.3g}" for b, v in sgd.items()) in "\n".join(lines)


def test_predicted_log_uv_drift_without_gradient_is_the_closed_form():
    """With X = 0 only the noise moves u and v from alpha, so the drift is -steps (lr sigma / B)^2 / alpha^2:
    the mean of log((alpha + t Z1)(alpha + t Z2)) over many seeds, to first order in t^2; its median falls
    by half that."""
    from goldenpath.toys.problems import Problem

    p = Problem(np.zeros((4, 6)), np.zeros(4), np.zeros(6))
    alpha, lr, sigma, steps = 0.5, 0.01, 1.0, 500
    tau2 = (lr * sigma / 4) ** 2
    pred = dln.predicted_log_uv_drift(p, alpha, lr=lr, sigma=sigma, steps=steps)
    np.testing.assert_allclose(pred, -steps * tau2 / alpha**2, rtol=1e-12)
    theta, _ = dln.optimise(dln.gradient(p), np.full(12, alpha), n=4, steps=steps, lr=lr, sigma=sigma,
                            seeds=20_000, seed=3)
    change = dln.log_uv(theta) - np.log(alpha**2)
    assert change.mean() == pytest.approx(pred[0], rel=0.05)  # the Ito drift is the mean's (coordinates alike)
    assert np.median(change) == pytest.approx(pred[0] / 2, rel=0.1)  # the median falls half as fast


def test_noisy_sgd_log_uv_drift_matches_the_ito_prediction_and_u_v_is_a_martingale():
    """On a real problem: the antithetic mean over seeds of the change of log(u v) is the predicted drift;
    the mean of u v itself does not move (up to GD's own discretisation, seen in the noise-free run)."""
    p = make_problem(5, 12, seed=8)
    alpha, lr, sigma, steps, seeds = 0.5, 0.01, 0.5, 2000, 2000
    clean, _ = dln.optimise(dln.gradient(p), np.full(24, alpha), n=5, steps=steps, lr=lr)
    runs = [dln.optimise(dln.gradient(p), np.full(24, alpha), n=5, steps=steps, lr=lr, sigma=s, seeds=seeds,
                         seed=4)[0] for s in (sigma, -sigma)]
    drift = np.mean([(dln.log_uv(t) - dln.log_uv(clean)).mean(0) for t in runs], axis=0)
    pred = dln.predicted_log_uv_drift(p, alpha, lr=lr, sigma=sigma, steps=steps)
    assert np.abs(pred).min() > 0
    np.testing.assert_allclose(drift.mean(), pred.mean(), rtol=0.1)
    uv = np.concatenate([t[:, :12] * t[:, 12:] for t in runs])
    np.testing.assert_allclose(uv.mean(0), clean[0, :12] * clean[0, 12:], rtol=0.02)


def test_toys_cli_writes_table_figure_and_verdict(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    import pandas as pd

    root = Path(__file__).resolve().parent.parent
    run = subprocess.run([sys.executable, "-m", "goldenpath", "toys", "dln", "noise=label", "sigmas=[0, 3]",
                          "seeds=3", "noise_steps=3000", "converge_steps=6000", "--out", str(tmp_path)],
                         capture_output=True, text=True, cwd=root, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    out = tmp_path / "toys-dln"
    table = pd.read_parquet(out / "table.parquet")
    assert len(table) == 6 and set(table.sigma) == {0, 3} and (out / "figure.png").exists()
    assert (out / "verdict.txt").read_text().strip() in run.stdout
    lls_run = subprocess.run([sys.executable, "-m", "goldenpath", "toys", "lls", "seeds=800", "--out", str(tmp_path)],
                             capture_output=True, text=True, cwd=root, timeout=300)
    assert lls_run.returncode == 0 and (tmp_path / "toys-lls" / "figure.png").exists()
    spread = pd.read_parquet(tmp_path / "toys-lls" / "table.parquet")
    assert ((spread.spread / spread.exact - 1).abs() < 0.15).all()
    bad = subprocess.run([sys.executable, "-m", "goldenpath", "toys", "dln", "sigma=1"], capture_output=True,
                         text=True, cwd=root, timeout=60)
    assert bad.returncode == 2 and "toys.sigma" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
