"""Gradient-noise statistics against known distributions."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from goldenpath.gradnoise import (aggregate, aggregation_series, atom_fraction, default_k1, gaussianity, noise_scale,
                                  noise_scale_per_sample, pooled_sample, qq_data, tail_index, tail_index_ci)
from goldenpath.gradnoise.estimators import EPS

K = 100_000


def stable(alpha, size, seed):
    if alpha == 2.0:
        return np.random.default_rng(seed).standard_normal(size)
    return stats.levy_stable.rvs(alpha, 0.0, size=size, random_state=np.random.default_rng(seed))


@pytest.mark.parametrize("alpha", [1.2, 1.5, 1.8, 2.0])
def test_tail_index_recovers_alpha(alpha):
    assert tail_index(stable(alpha, K, seed=int(alpha * 10))) == pytest.approx(alpha, abs=0.15)


def test_tail_index_interval_covers_the_truth_at_its_level_and_holds_its_estimate():
    """Over 200 draws the 95% interval covers the true alpha 91-99% of the time (twice the Monte Carlo error of
    200 draws about 95%) and always holds its estimate; the bootstrap of single draws it replaced covered 100%
    and left its estimate out of 3-13% of draws."""
    for alpha in (1.5, 2.0):
        hits = 0
        for rep in range(200):
            x = stable(alpha, 4000, seed=1000 + rep)
            estimate, low, high = tail_index_ci(x)
            assert low < estimate < high and estimate == tail_index(x)
            hits += low <= alpha <= high
        assert 0.91 <= hits / 200 <= 0.99, (alpha, hits)


def test_tail_index_interval_is_the_t_interval_of_its_block_terms():
    """1 / alpha from each block of K1 draws, by a loop: the interval is the inverse of mean -/+ t sd / sqrt(K2)."""
    from scipy import stats as sps

    x = stable(1.7, 1000, seed=5)
    k1 = 25  # the largest divisor of 1000 below its root (31.6)
    terms = [(math.log(abs(sum(b)) + EPS) - sum(math.log(abs(v) + EPS) for v in b) / k1) / math.log(k1)
             for b in (x[i : i + k1] for i in range(0, 1000, k1))]
    mean, se = np.mean(terms), np.std(terms, ddof=1) / math.sqrt(len(terms))
    half = sps.t.ppf(0.975, len(terms) - 1) * se
    assert tail_index_ci(x) == pytest.approx((1 / mean, 1 / (mean + half), 1 / (mean - half)), rel=1e-10)


def test_pooled_values_are_shuffled_so_correlated_neighbours_do_not_bias_alpha():
    rng = np.random.default_rng(0)
    # 200 draws x 1000 coordinates in units of 50 whose coordinates move together (one unit's weights):
    # every value is N(0, 1), so the pooled tail index is 2, but blocks of neighbours are not independent.
    noise = np.repeat(rng.standard_normal((200, 20)), 50, axis=1) + 0.01 * rng.standard_normal((200, 1000))
    assert tail_index(noise.ravel()) < 1.5  # coordinate order: the bias this guards against
    pooled = pooled_sample(noise, 100_000, rng)
    assert len(pooled) == 100_000 and abs(tail_index(pooled) - 2) < 0.15


def test_the_pooled_tail_index_leaves_out_coordinates_that_never_move_whatever_the_units():
    """Gaussian noise with a tenth of its coordinates constant (a dead unit, an unused embedding row): each exact
    zero added log(EPS) = -36 to the mean log|X|, and alpha came out 1.0 at unit scale, 1.24 at 1e-6."""
    rng = np.random.default_rng(2)
    noise = rng.standard_normal((100, 2000))
    noise[:, :200] = 0.0
    got = [tail_index(pooled_sample(noise * scale, 200_000, np.random.default_rng(0))) for scale in (1.0, 1e-6)]
    assert got[0] == pytest.approx(got[1], rel=1e-9) and abs(got[0] - 2) < 0.1


def test_k1_is_the_largest_divisor_below_the_root_and_prime_sizes_still_work():
    assert default_k1(100_000) == 250 and default_k1(36) == 6 and default_k1(97) == 1
    x = stable(1.5, 99_991, seed=3)  # prime: sqrt(K) groups, the remainder dropped
    assert tail_index(x) == pytest.approx(1.5, abs=0.2)
    assert np.isfinite(tail_index(np.r_[np.zeros(500), stable(1.5, 500, seed=4)]))  # log 0 guarded (exact zeros)


def test_aggregate_sums_consecutive_draws_like_a_loop():
    x = np.random.default_rng(0).standard_normal((103, 4))
    loop = np.array([[sum(x[i * 5 + j, c] for j in range(5)) for c in range(4)] for i in range(20)])
    np.testing.assert_allclose(aggregate(x, 5), loop, rtol=1e-12)
    with pytest.raises(ValueError):
        aggregate(x, 0)


def test_summed_stable_draws_keep_alpha_and_finite_variance_drifts_to_two():
    """Stability: a sum of k symmetric alpha-stable draws is alpha-stable with the same alpha; a law of
    finite variance (Student t, 3 degrees of freedom, estimated alpha well below 2 on raw draws) tends to the
    Gaussian's alpha = 2 (the CLT)."""
    ks, draws = [1, 8, 64], 300
    x = stable(1.4, (draws * 64, 40), seed=5)
    kept = aggregation_series(x, ks, draws=draws)
    assert all(abs(v - 1.4) < 0.15 for v in kept.values())
    t3 = aggregation_series(np.random.default_rng(6).standard_t(3, (draws * 64, 40)), ks, draws=draws)
    assert t3[1] < 1.85 and t3[64] - t3[1] > 0.15 and abs(t3[64] - 2) < 0.15
    with pytest.raises(ValueError):
        aggregation_series(x[:100], [64])


def test_atom_fraction_counts_the_exact_zeros_of_the_raw_gradients():
    rng = np.random.default_rng(2)
    raw = rng.standard_normal((400, 30))
    zeros = rng.random((400, 30)) < np.linspace(0, 0.8, 30)  # column c silent with probability c / 36
    raw[zeros] = 0.0
    noise = raw - raw.mean(0)
    expected = [np.mean(raw[:, c] == 0) if np.sum(raw[:, c] == 0) > 1 else 0.0 for c in range(30)]
    np.testing.assert_allclose(atom_fraction(noise), expected)
    assert (atom_fraction(rng.standard_normal((400, 5))) == 0).all()


def test_gaussianity_accepts_gaussian_and_rejects_cauchy_noise():
    rng = np.random.default_rng(0)
    gauss = gaussianity(rng.standard_normal((200, 50)))
    cauchy = gaussianity(rng.standard_cauchy((200, 50)))
    assert gauss["coordinates_shapiro_p"] > 0.01 and gauss["projections_shapiro_p"] > 0.01
    assert gauss["coordinates_anderson_p"] > 0.05 and gauss["projections_anderson_p"] > 0.05
    smallest = 1 / 101  # no simulation of 100 is as extreme
    assert all(cauchy[f"{view}_{test}_p"] == smallest
               for view in ("coordinates", "projections") for test in ("anderson", "shapiro"))
    assert np.isfinite([cauchy["coordinates_anderson"], cauchy["coordinates_shapiro"]]).all()  # scores stay finite
    theoretical, ordered = qq_data(rng.standard_normal(5000))
    assert np.corrcoef(theoretical, ordered)[0, 1] > 0.99


def test_normal_scores_of_few_gaussian_draws_are_exactly_normal():
    """One score per column of 20,000 Gaussian columns of M draws against N(0, 1) (Kolmogorov-Smirnov): exact
    at M = 4, 5 and 10. Without the residual's leverage, sqrt(1 - 1/M), they were not (sd 0.74 at M = 4, KS
    p 7e-39 at M = 10)."""
    from scipy import stats

    from goldenpath.gradnoise.estimators import _normal_scores

    rng = np.random.default_rng(5)
    for m in (4, 5, 10):
        scores = _normal_scores(rng.standard_normal((m, 20_000)) * 3 + 1)[0]
        assert stats.kstest(scores, "norm").pvalue > 0.01, m
        assert scores.std() == pytest.approx(1, abs=0.02)


@pytest.mark.parametrize("m", [300, 106])  # 106 = 2 x 53: no divisor near sqrt(106), so K1 = 10, not 2
def test_the_per_coordinate_tail_index_is_tail_index_of_each_column(m):
    from goldenpath.gradnoise.estimators import per_coordinate_tail_index

    x = np.random.default_rng(4).standard_t(3, (m, 6))
    assert per_coordinate_tail_index(x) == pytest.approx([tail_index(x[:, j]) for j in range(6)], rel=1e-12)


def test_gaussianity_tests_have_their_level_on_correlated_gaussian_noise_where_textbook_p_values_do_not():
    """Exactly Gaussian noise, 60 times each: 20 batches of 200 independent coordinates with unequal scales, and
    30 batches of 200 coordinates moving together (5 strong directions and a little independent noise, as a
    network's gradient noise concentrates in a few directions). Each test's p-value, from 39 Gaussian
    simulations of the noise's own covariance, rejects at 5% about 5% of the time in both; the textbook
    Anderson-Darling p-value of the pooled scores rejects the correlated noise most of the time. t-distributed
    noise (3 degrees of freedom) is rejected."""
    from scipy import stats

    from goldenpath.gradnoise.estimators import _normal_scores

    rng = np.random.default_rng(3)
    worlds = {"independent": lambda: rng.standard_normal((20, 200)) * np.exp(rng.standard_normal(200)),
              "correlated": lambda: 3 * rng.standard_normal((30, 5)) @ rng.standard_normal((5, 200))
              + 0.5 * rng.standard_normal((30, 200))}
    for world, draw in worlds.items():
        rejected, textbook = {}, 0
        for rep in range(60):
            x = draw()
            for key, p in gaussianity(x, simulations=39, seed=rep).items():
                if key.endswith("_p"):
                    rejected[key] = rejected.get(key, 0) + (p <= 0.05)
            pooled = _normal_scores(x).ravel()
            textbook += stats.anderson(pooled, dist="norm", method="interpolate").pvalue <= 0.05
        assert max(rejected.values()) <= 9, (world, rejected)  # 60 x 0.05 = 3 expected; P(>= 10 | 5%) < 0.002
        if world == "correlated":
            assert textbook >= 30, textbook
    heavy = gaussianity(rng.standard_t(3, (20, 200)), simulations=39)
    assert heavy["coordinates_anderson_p"] <= 0.05 and heavy["coordinates_shapiro_p"] <= 0.05


def test_noise_scale_on_a_gradient_model_with_known_mean_and_covariance():
    rng = np.random.default_rng(1)
    d = 40
    g_true = rng.standard_normal(d) * 0.5
    scales = np.linspace(0.2, 2.0, d)  # diagonal covariance: tr Sigma = sum of squares
    trace_true, grad_true = float((scales**2).sum()), float(g_true @ g_true)

    def mean_sq_norm(b, draws=4000):
        batches = g_true + rng.standard_normal((draws, b, d)).mean(1) * scales
        return float((batches**2).sum(1).mean())

    trace, grad_sq, b_simple = noise_scale(mean_sq_norm(4), mean_sq_norm(64), 4, 64)
    assert trace == pytest.approx(trace_true, rel=0.05) and grad_sq == pytest.approx(grad_true, rel=0.05)
    assert b_simple == pytest.approx(trace_true / grad_true, rel=0.1)
    per_sample = g_true + rng.standard_normal((20000, d)) * scales
    batch = per_sample.mean(0)
    t2, g2, _ = noise_scale_per_sample((per_sample**2).sum(1), float(batch @ batch), 20000)
    assert t2 == pytest.approx(trace_true, rel=0.05) and g2 == pytest.approx(grad_true, rel=0.05)
    with pytest.raises(ValueError):
        noise_scale(1.0, 1.0, 8, 8)


def test_noise_cli_on_a_small_teacher_cnn_run(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    import pandas as pd

    from goldenpath.config import load_config
    from goldenpath.training.trainer import train

    from .conftest import TINY_TEACHER

    run = train(load_config(None, [*TINY_TEACHER, f"out={tmp_path}", "name=r", "budget.samples=640",
                                   "checkpoint.steps=[10]"]))
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, "-m", "goldenpath", "noise", str(run), "--at-step", "10", "--batches", "40",
                          "--batch-size", "16", "--max-coords", "3000"], capture_output=True, text=True, cwd=root,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    table = pd.read_parquet(run / "noise" / "step-10.parquet")
    whole = table[table.layer == "all"].set_index("statistic")
    assert 0.5 < whole.value["tail_index_pooled"] <= 2.5
    assert whole.ci_low["tail_index_pooled"] <= whole.ci_high["tail_index_pooled"]
    assert whole.value["b_simple"] > 0 and whole.value["coordinates"] <= 3000
    from goldenpath.models import build_model

    config = load_config(run / "config.yaml")
    model = build_model(config.model, config.data.build().info, seed=0)
    layers = {n.rsplit(".", 1)[0] for n, _ in model.named_parameters()}
    assert set(table.layer) == {"all"} | layers and len(layers) >= 3  # the whole model and every layer
    for kind in ("tail-index", "histogram", "qq"):
        assert (run / "noise" / f"step-10-{kind}.png").exists()
    assert "training subset" not in out.stdout  # fresh samples past what training used
    bad = subprocess.run([sys.executable, "-m", "goldenpath", "noise", str(run), "--at-loss", "0.01"],
                         capture_output=True, text=True, cwd=root, timeout=120)
    assert bad.returncode == 2 and "target-0.01" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


def test_noise_at_a_checkpoint_the_run_lacks_names_the_ones_it_has(tmp_path, capsys):
    from goldenpath import cli

    from .test_compare import make_run

    run = make_run(tmp_path, "r", [], [(2.2, 2.19), (1.95, 1.94), (2.0, 1.99)])
    for args, field, have in ((["--at-loss", "1.5"], "--at-loss", "pick a loss target the run reached: 2.2, 2, 1.95"),
                              (["--at-step", "7"], "--at-step", "pick a step with a checkpoint (checkpoint.steps): "
                                                                "none yet")):
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["noise", str(run), *args])
        err = capsys.readouterr().err.strip().splitlines()
        assert exit_info.value.code == 2 and len(err) == 1
        assert err[0].startswith(f"goldenpath: {field}: {run} has no checkpoint ") and err[0].endswith(have)
