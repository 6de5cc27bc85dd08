"""analysis/noisy_sgd_batch.py: the paired statistics and Holm against closed forms and loops, the r, lr and
learning rules, the window means, the design (one noise on the averaged gradient in both noised arms, a valid
goldenpath sweep), section() on a synthetic results table, and the committed verdicts re-derived from the
committed results table by a second implementation."""

from __future__ import annotations

import itertools
import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "analysis"))
import noisy_sgd_batch as m  # noqa: E402

RESULTS = Path(m.__file__).resolve().parent / "results" / "noisy_sgd_batch"


def test_paired_matches_the_closed_form():
    rng = np.random.default_rng(0)
    x = rng.normal(0.012, 0.006, 8)
    c = m.paired(x, margin=0.01)
    n, mean, se = len(x), x.mean(), x.std(ddof=1) / math.sqrt(len(x))
    q = stats.t.ppf(0.975, n - 1)
    assert (c["d"], c["ci_low"], c["ci_high"]) == pytest.approx((mean, mean - q * se, mean + q * se), rel=1e-9)
    assert c["p"] == pytest.approx(2 * stats.t.sf(abs(mean) / se, n - 1), rel=1e-9)
    # TOST: the larger of P(T <= (d - M) / se) and P(T >= (d + M) / se) under t(n - 1)
    tost = max(stats.t.cdf((mean - 0.01) / se, n - 1), stats.t.sf((mean + 0.01) / se, n - 1))
    assert c["p_tost"] == pytest.approx(tost, rel=1e-9)
    # paired over seeds: the same as scipy's related-samples test on the two ends
    small = rng.normal(0.6, 0.02, 8)
    assert m.paired((small + x) - small)["p"] == pytest.approx(stats.ttest_rel(small + x, small).pvalue, rel=1e-9)
    assert math.isnan(m.paired([0.1])["ci_low"])


def holm_loop(p):
    """Holm by its definition: sort, multiply the i-th smallest by (m - i), carry the running maximum, cap at 1."""
    p = [1.0 if math.isnan(v) else v for v in p]
    order = sorted(range(len(p)), key=lambda i: p[i])
    out, running = [0.0] * len(p), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(p) - rank) * p[i]))
        out[i] = running
    return out


def test_holm_is_the_step_down_of_its_definition():
    rng = np.random.default_rng(3)
    for _ in range(50):
        p = rng.uniform(0, 0.2, rng.integers(1, 11))
        p[rng.uniform(size=len(p)) < 0.2] = math.nan
        assert m.holm(p) == pytest.approx(holm_loop(p))
    # Holm controls the family-wise error: under the null, 10 uniform p-values reject somewhere at most 5% of
    # the time (binomial bound over 4,000 families)
    rejects = np.mean([(m.holm(rng.uniform(size=10)) < 0.05).any() for _ in range(4000)])
    assert rejects < 0.05 + 3 * math.sqrt(0.05 * 0.95 / 4000)


def line(d, p, p_tost, name="dp", why=""):
    return {"line": name, "d": d, "p_holm": p, "p_tost_holm": p_tost, "why": why}


def test_verdict_rule():
    assert m.verdict(line(0.02, 0.01, 0.9)) == "holds"
    assert m.verdict(line(-0.02, 0.01, 0.9)).startswith("does not hold (larger batch better")
    assert m.verdict(line(0.001, 0.8, 0.01)) == "does not hold (flat within 1 pp)"
    assert m.verdict(line(0.001, 0.8, 0.2)) == "inconclusive at this scale"
    assert m.verdict(line(0.02, 0.001, 0.001, why="dp does not learn at B=512")) == "inconclusive at this scale"
    assert m.verdict(line(0.02, 0.01, 0.9, name="gaussian - none")) == "larger for gaussian"
    assert m.verdict(line(-0.02, 0.01, 0.9, name="dp - gaussian")) == "larger for gaussian"
    assert m.verdict(line(0.0, 0.9, 0.01, name="dp - gaussian")) == "the same within 1 pp"


def test_t_interval_matches_closed_form():
    x = np.array([0.1, 0.2, 0.25, 0.4])
    mean, lo, hi = m.t_interval(x)
    half = stats.t.ppf(0.975, 3) * x.std(ddof=1) / 2
    assert (mean, lo, hi) == pytest.approx((x.mean(), x.mean() - half, x.mean() + half))


def test_window_means_pick_the_last_quarter():
    steps = np.array([1, 2, 4, 8, 20, 40, 60, 80, 100])
    curves = pd.DataFrame({"run": "r", "step": steps, "eval_error": steps / 100, "eval_loss": 2 - steps / 100})
    w = m.window_means(curves).iloc[0]
    assert w.last_evals == 2  # steps 80 and 100 lie in [75, 100]
    assert w.last_error == pytest.approx(0.9)
    assert w.prev_error == pytest.approx(0.6)  # step 60 alone in [50, 75)
    assert w.last_loss == pytest.approx(1.1)


def tune_frame(errors: dict, states: dict | None = None, *, kind="dp", ratio=1 / 64, loss=1.8) -> pd.DataFrame:
    rows = []
    for lr, errs in errors.items():
        for seed, e in zip(m.TUNE_SEEDS, errs):
            rows.append({"kind": kind, "regime": "online, fixed steps", "batch": 64, "ratio": ratio, "lr": lr,
                         "seed": seed, "state": (states or {}).get(lr, "completed"), "last_error": e,
                         "last_loss": loss + e, "chance": 2.3})
    return pd.DataFrame(rows)


def test_choose_lr_lowest_mean_eligible_and_ties_to_smaller():
    c = m.choose_lr(tune_frame({0.1: [0.5, 0.5], 0.3: [0.4, 0.42], 1.0: [0.3, 0.3]}, {1.0: "diverged"}))
    assert c.lr.tolist() == [0.3] and c.eligible.tolist() == [2]
    tie = m.choose_lr(tune_frame({0.1: [0.4, 0.4], 0.3: [0.4, 0.4]}))
    assert tie.lr.tolist() == [0.1]


def stage0(errors: dict, losses: dict) -> pd.DataFrame:
    """A stage-0 frame: plain SGD at error 0.60, loss 1.70 (chance 2.3); each (kind, r) at the given values."""
    parts = [tune_frame({0.01: [0.6, 0.6]}, kind="none", ratio=0.0, loss=1.1)]
    for (kind, r), e in errors.items():
        parts.append(tune_frame({0.01: [e, e]}, kind=kind, ratio=r, loss=losses[kind, r] - e))
    return pd.concat(parts, ignore_index=True)


def test_choose_ratio_takes_the_smallest_r_where_the_noise_matters_and_both_arms_learn():
    # gap chance - plain = 0.6; learning 3/4 of it means a loss <= 1.85
    errors = {("gaussian", 1 / 64): 0.605, ("dp", 1 / 64): 0.61, ("gaussian", 1 / 32): 0.62, ("dp", 1 / 32): 0.63,
              ("gaussian", 1 / 16): 0.66, ("dp", 1 / 16): 0.70}
    losses = {("gaussian", 1 / 64): 1.72, ("dp", 1 / 64): 1.75, ("gaussian", 1 / 32): 1.76, ("dp", 1 / 32): 1.84,
              ("gaussian", 1 / 16): 1.80, ("dp", 1 / 16): 1.95}
    r = m.choose_ratio(stage0(errors, losses))
    assert r.attrs["chosen"] == 1 / 32
    assert r.ok_differs.tolist() == [False, True, True] and r.ok_learns.tolist() == [True, True, False]
    assert r.dp_learns.iloc[1] == pytest.approx((2.3 - 1.84) / (2.3 - 1.7))
    # nowhere does the noise matter while both learn: the largest r at which both learn
    errors[("gaussian", 1 / 32)] = 0.605
    assert m.choose_ratio(stage0(errors, losses)).attrs["chosen"] == 1 / 32
    losses[("dp", 1 / 32)] = 1.9
    assert m.choose_ratio(stage0(errors, losses)).attrs["chosen"] == 1 / 64


@pytest.mark.parametrize("quick", [True, False])
def test_design_noise_and_regimes(quick):
    s = m.setting(quick)
    rows = s["rows"]
    if not quick:
        m.check_rows(rows)  # raises past epsilon 8
        for row in rows:
            assert (m.row_epsilon(row) <= m.EPSILON_MAX) if row[1] == "dp" else m.row_epsilon(row) is None
    regimes = {(r[1], reg, r[0]) for r in rows for reg in m._regimes(r, rows)}
    batches = sorted({r[0] for r in rows})
    assert regimes == {(k, reg, b) for k in m.KINDS for reg in m.REGIMES for b in batches}
    lrs = {}
    for r in rows:
        lrs.setdefault((r[1], r[0], r[4]), set()).add(r[8])
    assert min(len(v) for v in lrs.values()) >= 3
    small = min(batches)
    steps = {r[6] // r[0] for r in rows if r[0] == small}
    assert len(steps) == 1  # every B_min run makes S steps
    noised = {m.row_ratio(r) for r in rows if r[1] != "none"}
    assert len(noised) == 1 and all(m.row_ratio(r) == 0 for r in rows if r[1] == "none")
    if quick:  # both noised arms put the same noise on the averaged gradient: sigma / B and sigma C / B
        for r in rows:
            if r[1] == "gaussian":
                assert r[2] / r[0] == pytest.approx(m.QUICK["ratios"][0])
            if r[1] == "dp":
                assert r[2] * r[3] / r[0] == pytest.approx(m.QUICK["ratios"][0])
        zero = s["ratio_rows"]
        assert {m.row_ratio(r) for r in zero} == {0.0, *m.QUICK["ratios"]}
        assert {r[0] for r in zero} == {small} and {r[4] for r in zero} == {1}
        (s_steps,) = steps  # stage 0's plain SGD runs are stage 1's at B_min online, fixed steps
        assert sorted(tuple(r) for r in zero if r[1] == "none") == sorted(
            tuple(r) for r in rows if r[1] == "none" and r[0] == small and r[6] == small * s_steps and r[4] == 1)


def test_row_epsilon_is_what_goldenpath_records():
    from goldenpath.config import load_config
    from goldenpath.dp.privacy import privacy_spent

    s = m.setting(True, ratio=1 / 32)
    dp = [r for r in s["rows"] if r[1] == "dp"]
    for row in [next(r for r in dp if r[4] > 1), next(r for r in dp if r[4] == 1)]:
        keys = m.JOINT.split(",")
        over = [f"{k}={'null' if v is None else v}" for k, v in zip(keys, row)]
        config = load_config(s["base"], over)
        assert privacy_spent(config, row[6] // row[0])["epsilon"] == pytest.approx(m.row_epsilon(row))


def test_full_sweep_is_a_valid_goldenpath_sweep():
    from goldenpath.config.grid import expand, load_sweep

    points = expand(load_sweep(m.FULL_SWEEP))
    assert len(points) == len(m.setting(False)["rows"]) * len(m.TUNE_SEEDS)


def test_check_rows_names_the_field():
    bad = [[16, "dp", 0.1, 1.0, 1, None, 1600, 10, 0.1]]
    with pytest.raises(SystemExit, match="noise.sigma"):
        m.check_rows(bad)


def synthetic_results(*, dp_shift=0.05, dp_loss=1.5) -> pd.DataFrame:
    """Two B, every kind and regime; dp ends 5 pp worse at the large B, the rest flat; seeds share an offset."""
    rng = np.random.default_rng(2)
    rows = []
    for stage, seeds in (("tune", m.TUNE_SEEDS), ("main", m.SEEDS)):
        offsets = dict(zip(seeds, rng.normal(0, 0.02, len(seeds))))
        for kind, regime, b in itertools.product(m.KINDS, m.REGIMES, (64, 256)):
            for lr in ((0.1, 0.3) if stage == "tune" else (0.1,)):
                for seed in seeds:
                    shift = dp_shift if kind == "dp" and b == 256 else 0.0
                    e = 0.3 + offsets[seed] + shift + rng.normal(0, 0.002)
                    loss = (dp_loss if kind == "dp" else 1.5) + shift + rng.normal(0, 0.01)
                    rows.append({"stage": stage, "kind": kind, "regime": regime, "batch": b,
                                 "sigma": 0.0 if kind == "none" else b / 64 / (8 if kind == "dp" else 1),
                                 "ratio": 0.0 if kind == "none" else 1 / 64, "lr": lr, "steps": 100,
                                 "samples": 100 * b, "seed": seed, "state": "completed", "last_error": e,
                                 "last_loss": loss, "prev_error": e + 0.001, "prev_loss": 1.5, "last_evals": 3,
                                 "eval_loss": 1.5, "eval_error": e, "chance": 2.3,
                                 "epsilon": 2.0 if kind == "dp" else np.nan,
                                 "run": f"{stage}-{kind}-{regime}-{b}-{lr}-{seed}"})
    return pd.DataFrame(rows)


def test_verdicts_on_a_synthetic_table(tmp_path):
    frame = synthetic_results()
    v = m.verdicts(frame).set_index(["regime", "line"])
    assert len(v) == 5 * len(m.REGIMES)
    for regime in m.REGIMES:
        assert v.loc[(regime, "dp"), "verdict"] == "holds"
        assert v.loc[(regime, "none"), "verdict"] == "does not hold (flat within 1 pp)"
        assert v.loc[(regime, "dp - gaussian"), "verdict"] == "larger for dp"
        assert v.loc[(regime, "gaussian - none"), "verdict"] == "the same within 1 pp"
    # the seeds' shared offset cancels in the paired difference: Welch over the two ends could not say "flat"
    none = frame[(frame.stage == "main") & (frame.kind == "none") & (frame.regime == m.REGIMES[0])]
    welch = stats.ttest_ind(none[none.batch == 256].last_error, none[none.batch == 64].last_error, equal_var=False)
    assert welch.confidence_interval().high > 0.01
    # an arm that does not learn makes its lines inconclusive, with the reason
    slow = m.verdicts(synthetic_results(dp_loss=2.2)).set_index(["regime", "line"])
    assert slow.loc[(m.REGIMES[0], "dp"), "verdict"] == "inconclusive at this scale"
    assert "dp does not learn at B=64" in slow.loc[(m.REGIMES[0], "dp"), "why"]
    assert slow.loc[(m.REGIMES[0], "none"), "verdict"] == "does not hold (flat within 1 pp)"


def test_section_from_a_results_table(tmp_path):
    synthetic_results().to_csv(tmp_path / "results.csv", index=False)
    text = m.section(tmp_path)
    assert "- **offline, fixed steps, dp**: holds." in text
    assert "- **online, fixed samples, none**: does not hold (flat within 1 pp)" in text
    assert "- **online, fixed steps, dp - gaussian**: larger for dp." in text
    assert text.count("\n- **") == 5 * len(m.REGIMES)


# ----------------------------------------------------------------------------- the committed tables


def rederived(results: pd.DataFrame) -> dict:
    """The verdict of every line from results.csv by a second implementation: pivot the stage-2 runs to seeds
    x cells, scipy's related-samples t-test and two one-sided one-sample tests, Holm by its loop."""
    main = results[(results.stage == "main") & (results.state == "completed")]
    wide = main.pivot_table(index="seed", columns=["regime", "kind", "batch"], values="last_error")
    loss = main.groupby(["regime", "kind", "batch"]).last_loss.mean()
    chance = main.chance.mean()
    lines = []
    for reading, regimes in m.READINGS.items():
        family = []
        for regime in regimes:
            small, large = main[main.regime == regime].batch.min(), main[main.regime == regime].batch.max()
            effect = {k: wide[(regime, k, large)] - wide[(regime, k, small)] for k in m.KINDS}
            named = [(k, effect[k], [k]) for k in m.KINDS] + [
                (f"{a} - {b}", effect[a] - effect[b], [a, b]) for a, b in m.CONTRASTS]
            for name, x, arms in named:
                x = x.dropna()
                learns = all((chance - loss[regime, k, b]) / (chance - loss[regime, "none", b]) >= m.LEARNS
                             for k in arms for b in (small, large))
                p = stats.ttest_rel(x + 0.0, 0.0 * x).pvalue if learns else math.nan
                tost = max(stats.ttest_1samp(x, m.MARGIN, alternative="less").pvalue,
                           stats.ttest_1samp(x, -m.MARGIN, alternative="greater").pvalue) if learns else math.nan
                family.append((regime, name, x.mean(), p, tost))
        p_holm, tost_holm = holm_loop([f[3] for f in family]), holm_loop([f[4] for f in family])
        for (regime, name, d, _, _), ph, th in zip(family, p_holm, tost_holm):
            a, _, b = name.partition(" - ")
            if ph < m.ALPHA:
                said = ("holds" if d > 0 else "does not hold (larger batch better)") if not b else \
                    f"larger for {a if d > 0 else b}"
            elif th < m.ALPHA:
                said = "does not hold (flat within 1 pp)" if not b else "the same within 1 pp"
            else:
                said = "inconclusive at this scale"
            lines.append((regime, name, said))
    return {(r, n): s for r, n, s in lines}


def test_committed_verdicts_follow_from_the_committed_results_by_the_stated_rule():
    results = pd.read_csv(RESULTS / "results.csv")
    assert (results[results.stage == "main"].state == "completed").all()  # the rederivation assumes it
    expected = rederived(results)
    committed = pd.read_csv(RESULTS / "verdicts.csv")
    assert {(r.regime, r.line): r.verdict for r in committed.itertuples()} == expected
    readme = (RESULTS.parents[1] / "README.md").read_text()
    for (regime, name), said in expected.items():
        assert f"- **{regime}, {name}**: {said}." in readme
