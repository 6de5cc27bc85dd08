"""analysis/noisy_sgd_batch.py: the statistics against closed forms, the lr rule, the window means, the
design (epsilon <= 8 everywhere, a valid goldenpath sweep) and section() on a synthetic results table."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "analysis"))
import noisy_sgd_batch as m  # noqa: E402


def welch_reference(a, b):
    """Welch difference, its df (Welch-Satterthwaite) and standard error, written out."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    return a.mean() - b.mean(), df, math.sqrt(va + vb)


def test_compare_matches_the_welch_closed_form():
    rng = np.random.default_rng(0)
    a, b = rng.normal(0.32, 0.01, 5), rng.normal(0.30, 0.02, 6)
    d, df, se = welch_reference(a, b)
    c = m.compare(a, b, margin=0.01)
    q = stats.t.ppf(0.975, df)
    assert c["d"] == pytest.approx(d)
    assert c["ci_low"] == pytest.approx(d - q * se, rel=1e-9)
    assert c["ci_high"] == pytest.approx(d + q * se, rel=1e-9)
    # TOST: the larger of P(T <= (d - M) / se) and P(T >= (d + M) / se) under t(df)
    p_upper = stats.t.cdf((d - 0.01) / se, df)
    p_lower = stats.t.sf((d + 0.01) / se, df)
    assert c["p_tost"] == pytest.approx(max(p_upper, p_lower), rel=1e-9)


def test_verdict_rule():
    rng = np.random.default_rng(1)
    base = rng.normal(0.30, 0.002, 5)
    assert m.verdict(m.compare(base + 0.05, base)) == "holds"
    assert m.verdict(m.compare(base - 0.05, base)).startswith("does not hold (larger batch better")
    flat = m.compare(rng.normal(0.30, 0.002, 5), base)
    assert flat["p_tost"] < 0.05 and m.verdict(flat).startswith("does not hold (flat")
    wide = m.compare(rng.normal(0.30, 0.05, 5), rng.normal(0.30, 0.05, 5))
    assert m.verdict(wide) == "inconclusive at this scale"
    assert m.verdict(m.compare([0.3], [0.3, 0.31])) == "inconclusive at this scale"


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


def tune_frame(errors: dict, states: dict | None = None) -> pd.DataFrame:
    rows = []
    for lr, errs in errors.items():
        for seed, e in zip(m.TUNE_SEEDS, errs):
            rows.append({"kind": "dp", "regime": "online, fixed steps", "batch": 64, "lr": lr, "seed": seed,
                         "state": (states or {}).get(lr, "completed"), "last_error": e})
    return pd.DataFrame(rows)


def test_choose_lr_lowest_mean_eligible_and_ties_to_smaller():
    c = m.choose_lr(tune_frame({0.1: [0.5, 0.5], 0.3: [0.4, 0.42], 1.0: [0.3, 0.3]}, {1.0: "diverged"}))
    assert c.lr.tolist() == [0.3] and c.eligible.tolist() == [2]
    tie = m.choose_lr(tune_frame({0.1: [0.4, 0.4], 0.3: [0.4, 0.4]}))
    assert tie.lr.tolist() == [0.1]


@pytest.mark.parametrize("quick", [True, False])
def test_design_epsilon_and_regimes(quick):
    s = m.setting(quick)
    rows = s["rows"]
    m.check_rows(rows)  # raises past epsilon 8
    for row in rows:
        if row[1] == "dp":
            assert m.row_epsilon(row) <= m.EPSILON_MAX
        else:
            assert m.row_epsilon(row) is None
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
    for r in rows:  # sigma / B fixed for the noised kinds
        if r[1] != "none":
            assert r[2] / r[0] == pytest.approx(rows[-1][2] / rows[-1][0])


def test_row_epsilon_is_what_goldenpath_records():
    from goldenpath.config import load_config
    from goldenpath.privacy import privacy_spent

    s = m.setting(True)
    dp = [r for r in s["rows"] if r[1] == "dp"]
    for row in [next(r for r in dp if r[4] > 1), next(r for r in dp if r[4] == 1)]:
        keys = m.JOINT.split(",")
        over = [f"{k}={'null' if v is None else v}" for k, v in zip(keys, row)]
        config = load_config(s["base"], over)
        assert privacy_spent(config, row[6] // row[0])["epsilon"] == pytest.approx(m.row_epsilon(row))


def test_full_sweep_is_a_valid_goldenpath_sweep():
    from goldenpath.sweep import expand, load_sweep

    points = expand(load_sweep(m.FULL_SWEEP))
    assert len(points) == len(m.setting(False)["rows"]) * len(m.TUNE_SEEDS)


def test_check_rows_names_the_field():
    bad = [[16, "dp", 0.1, 1.0, 1, None, 1600, 10, 0.1]]
    with pytest.raises(SystemExit, match="noise.sigma"):
        m.check_rows(bad)


def synthetic_results() -> pd.DataFrame:
    rng = np.random.default_rng(2)
    rows = []
    for stage, seeds in (("tune", m.TUNE_SEEDS), ("main", m.SEEDS)):
        for kind in m.KINDS:
            for regime in m.REGIMES:
                for b in (64, 256):
                    for lr in ((0.1, 0.3) if stage == "tune" else (0.1,)):
                        for seed in seeds:
                            shift = 0.05 if kind == "dp" and b == 256 else 0.0
                            e = 0.3 + shift + rng.normal(0, 0.003)
                            rows.append({"stage": stage, "kind": kind, "regime": regime, "batch": b,
                                         "sigma": 0.0 if kind == "none" else b / 64, "ratio": 1 / 64, "lr": lr,
                                         "steps": 100, "samples": 100 * b, "seed": seed, "state": "completed",
                                         "last_error": e, "last_loss": 1.5 + shift + rng.normal(0, 0.01), "prev_error": e + 0.001,
                                         "prev_loss": 1.5, "last_evals": 3, "eval_loss": 1.5,
                                         "eval_error": e, "epsilon": 2.0 if kind == "dp" else np.nan,
                                         "run": f"{stage}-{kind}-{regime}-{b}-{lr}-{seed}"})
    return pd.DataFrame(rows)


def test_section_from_a_results_table(tmp_path):
    synthetic_results().to_csv(tmp_path / "results.csv", index=False)
    text = m.section(tmp_path)
    assert "- **dp, offline, fixed steps**: holds." in text
    assert "- **none, online, fixed samples**: does not hold (flat within 1 pp)" in text
    assert text.count("\n- **") == len(m.KINDS) * len(m.REGIMES)
    v = m.verdicts(synthetic_results())
    assert set(v.verdict[v.kind == "dp"]) == {"holds"}
