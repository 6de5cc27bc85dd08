"""analysis/tail_index.py: the Gaussianity effect size, the paired test against the scale-matched control,
the noise cache, and the README's verdict lines re-derived from the committed table."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import integrate, stats

ANALYSIS = Path(__file__).resolve().parents[1] / "analysis"
sys.path.insert(0, str(ANALYSIS))

import tail_index  # noqa: E402
import tail_index_rules as rules  # noqa: E402

RESULTS = ANALYSIS / "results" / "tail_index"


def _t_distance(nu: float) -> float:
    """W1 between a Student-t scaled to unit variance and N(0, 1), by quadrature of the quantile gap."""
    scale = np.sqrt((nu - 2) / nu)
    return integrate.quad(lambda u: abs(stats.t.ppf(u, nu) * scale - stats.norm.ppf(u)), 0, 1, limit=200)[0]


def _anderson(z):
    return stats.anderson(z, dist="norm", method="interpolate").statistic


def test_normal_distance_is_scipy_s_wasserstein_distance_to_the_normal():
    z = np.random.default_rng(0).standard_t(6, 2000)
    z = (z - z.mean()) / z.std()
    grid = stats.norm.ppf((np.arange(200_000) + 0.5) / 200_000)  # N(0, 1) through its quantiles
    assert tail_index.normal_distance(z) == pytest.approx(stats.wasserstein_distance(z, grid), abs=1e-3)


def test_the_gaussianity_effect_size_settles_with_the_sample_count_where_anderson_darling_grows():
    rng = np.random.default_rng(1)

    def draws(law, n):
        x = rng.standard_normal(n) if law == "normal" else rng.standard_t(8, n)
        return (x - x.mean()) / x.std()

    small = {law: [draws(law, 1_000) for _ in range(20)] for law in ("normal", "t")}
    large = {law: draws(law, 100_000) for law in ("normal", "t")}
    w1_small = {law: np.mean([tail_index.normal_distance(z) for z in zs]) for law, zs in small.items()}
    w1_large = {law: tail_index.normal_distance(z) for law, z in large.items()}
    truth = _t_distance(8)  # 0.057: beyond the "not Gaussian" margin
    assert truth > rules.W1_APART
    assert w1_small["t"] == pytest.approx(truth, abs=0.015) and w1_large["t"] == pytest.approx(truth, abs=0.006)
    assert w1_large["normal"] <= w1_small["normal"] < rules.W1_SAME * 3 and w1_large["normal"] < 0.01
    ad_small = np.mean([_anderson(z) for z in small["t"]])
    assert _anderson(large["t"]) > 20 * ad_small  # the raw statistic grows about linearly with n
    assert _anderson(large["normal"]) < 3  # and stays small under the null


def test_the_margins_are_the_student_t_distances_the_rules_name():
    assert _t_distance(20) == pytest.approx(rules.W1_SAME, abs=0.001)
    assert _t_distance(11) == pytest.approx(rules.W1_APART, abs=0.002)


def test_noise_statistics_tell_student_t_coordinates_from_their_scale_matched_control():
    """t(5) coordinates of mixed scales: per coordinate far from the normal (close to the law's W1), the
    control not; random projections of independent coordinates are Gaussian (the CLT) for both."""
    rng = np.random.default_rng(2)
    noise = rng.standard_t(5, (300, 600)) * rng.lognormal(0.0, 1.0, 600)
    rows = pd.DataFrame(tail_index._both(noise, {"seed": 0}, {"max_pooled": 50_000}, orders=1, interval=False))
    value = rows.set_index(["noise", "statistic"]).value
    excess = value["sgd", "coordinates_w1"] - value["gaussian_matched", "coordinates_w1"]
    assert excess == pytest.approx(_t_distance(5), abs=0.02)
    assert rules.gaussian_verdict(pd.Series([excess])) == "not Gaussian"
    assert value["gaussian_matched", "coordinates_w1"] < 0.01
    along = value["sgd", "projections_w1"] - value["gaussian_matched", "projections_w1"]
    assert rules.gaussian_verdict(pd.Series([along])) == "as Gaussian as the control"


def _pooled(d: np.ndarray) -> pd.DataFrame:
    """A results table with pooled alpha of SGD = control + d, for 10 models x 3 seeds."""
    rows = []
    for i, (model, seed) in enumerate(np.ndindex(10, 3)):
        key = {"family": "mlp", "width": 16 * (model + 1), "depth": 2, "batch_size": 64, "at_loss": 1.9,
               "layer": "all", "seed": seed, "statistic": "tail_index_pooled"}
        control = 1.6 + 0.02 * model + 0.01 * seed
        rows += [{**key, "noise": "gaussian_matched", "value": control},
                 {**key, "noise": "sgd", "value": control + d[i]}]
    return pd.DataFrame(rows)


@pytest.mark.parametrize("shift, says", [(-0.024, "holds, small"), (-0.3, "holds"), (0.024, "does not hold (lighter"),
                                         (0.0, "does not hold (the same")])
def test_paired_sign_test_against_the_control(shift, says):
    rng = np.random.default_rng(3)
    d = shift + rng.normal(0, 0.01, 30)
    d[[4, 11, 25]] = -shift if shift else d[[4, 11, 25]]  # three model-seeds the other way
    claim, h = rules.heavier(_pooled(d), 64, 1.9)
    assert claim.startswith(says), claim
    assert claim != "holds" or "small" not in claim
    by_model = d.reshape(10, 3).mean(1)
    below = int((d < 0).sum())
    assert h["seeds"] == (below, 30, pytest.approx(stats.binomtest(below, 30, 0.5).pvalue))
    assert h["models"][:2] == (int((by_model < 0).sum()), 10)
    half = stats.t.ppf(0.975, 9) * by_model.std(ddof=1) / np.sqrt(10)
    assert h["mean"] == pytest.approx((by_model.mean(), by_model.mean() - half, by_model.mean() + half))


def test_noise_is_drawn_once_and_then_read_from_the_cache(tmp_path, monkeypatch):
    from goldenpath import gradnoise

    calls = []

    def analyse(run_dir, **kw):
        calls.append(kw)
        table = pd.DataFrame([{"layer": "all", "statistic": "b_simple", "value": 3.0}])
        table.attrs["layers"] = {"fc": [(0, 4)]}
        return table, np.arange(12.0).reshape(3, 4)

    monkeypatch.setattr(gradnoise, "analyse", analyse)
    setting = {"batches": 3, "max_coords": 4, "max_pooled": 10}
    first = tail_index.noise_at(tmp_path, 1.9, 16, setting, 0)
    again = tail_index.noise_at(tmp_path, 1.9, 16, setting, 0)
    assert len(calls) == 1 and calls[0]["batch_size"] == 16
    assert (first[0] == again[0]).all() and first[1] == again[1] == {
        "whole": [{"statistic": "b_simple", "value": 3.0}], "layers": {"fc": [[0, 4]]}}
    tail_index.noise_at(tmp_path, 1.9, 64, setting, 0)  # another noise batch: drawn
    assert len(calls) == 2


# ----------------------------------------------------------------------------- the committed table


@pytest.fixture(scope="module")
def committed():
    return pd.read_csv(RESULTS / "results.csv")


@pytest.fixture(scope="module")
def readme_block():
    text = (ANALYSIS / "README.md").read_text()
    return text.split("<!-- results:tail_index -->")[1].split("<!-- /results:tail_index -->")[0]


def _main(frame: pd.DataFrame, statistic: str) -> pd.DataFrame:
    """seeds x models of SGD and of the control at the training batch and the last target."""
    part = frame[(frame.layer == "all") & (frame.batch_size == 64) & (frame.at_loss == frame.at_loss.min())
                 & (frame.statistic == statistic)]
    return part.pivot_table(index=["family", "width", "depth", "seed"], columns="noise", values="value")


def test_the_heavier_verdict_follows_from_the_committed_table(committed, readme_block):
    pairs = _main(committed, "tail_index_pooled")
    d = pairs.sgd - pairs.gaussian_matched
    by_model = d.groupby(level=["family", "width", "depth"]).mean()
    p_pairs = stats.binomtest(int((d < 0).sum()), len(d)).pvalue
    p_models = stats.binomtest(int((by_model < 0).sum()), len(by_model)).pvalue
    low, high = stats.ttest_1samp(by_model, 0).confidence_interval()
    heavier = p_pairs < 0.05 and p_models < 0.05 and by_model.mean() < 0
    line = next(x for x in readme_block.splitlines() if x.startswith("- Heavier-tailed"))
    assert f"in {int((d < 0).sum())} of {len(d)} model-seeds (sign test p {p_pairs:.2g})" in line
    assert f"in {int((by_model < 0).sum())} of {len(by_model)} models (p {p_models:.2g})" in line
    assert f"mean difference {by_model.mean():+.3f} [{low:+.3f}, {high:+.3f}]" in line
    assert (": holds" in line) == heavier and ("small" in line) == (heavier and low > -0.1)


@pytest.mark.parametrize("view, statistic", [("per coordinate (Panigrahi), all", "coordinates_w1"),
                                             ("along random directions", "projections_w1")])
def test_the_gaussian_verdicts_follow_from_the_committed_table(committed, readme_block, view, statistic):
    pairs = _main(committed, statistic)
    excess = pairs.sgd - pairs.gaussian_matched
    line = next(x for x in readme_block.splitlines() if x.startswith(f"- The noise looks Gaussian {view}"))
    for family, f in excess.groupby(level="family"):
        models = f.groupby(level=["width", "depth"])
        same = models.apply(lambda e: (e <= 0.02).all()).sum()
        apart = models.apply(lambda e: (e > 0.04).all()).sum()
        n = models.ngroups
        claim = "holds" if same == n else "does not hold" if apart == n else "inconclusive at this scale"
        assert f"{family}: {claim}" in line, (family, line)


def test_the_readme_block_is_the_verdicts_of_the_committed_tables(committed, readme_block):
    control = pd.read_csv(RESULTS / "controls.csv")
    for line in rules.verdicts(committed, control):
        assert f"- {line}" in readme_block
    for statistic in ("coordinates_w1", "projections_w1", "coordinates_w1_dense"):
        assert statistic in set(committed.statistic), f"results.csv lacks {statistic}: re-run the study"
