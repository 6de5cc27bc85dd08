"""analysis/noise_reduction.py: effective time, window smoothing, closeness, intervals and the verdict rule,
on constructed curves with known answers."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

ANALYSIS = Path(__file__).resolve().parent.parent / "analysis"
sys.path.insert(0, str(ANALYSIS))

import noise_reduction as nr  # noqa: E402

LR, B = 0.02, 16


def test_cumulative_lr_matches_a_step_loop():
    steps = np.arange(0, 300)
    assert np.allclose(nr.cumulative_lr(steps, lr=LR), LR * steps)
    # a fork at step 40 from lr 0.02 to 0.005: sum the lr of each step taken, one by one
    per_step = np.where(np.arange(300) < 40, 0.02, 0.005)
    loop = np.concatenate([[0.0], np.cumsum(per_step)])[steps]
    assert np.allclose(nr.cumulative_lr(steps, lr=0.005, fork_step=40, parent_lr=0.02), loop)
    with pytest.raises(ValueError, match="parent_lr"):
        nr.cumulative_lr(steps, lr=0.005, fork_step=40)


def test_window_mean_of_a_line_is_its_midpoint_and_does_not_extrapolate():
    x = np.array([0.0, 3.0, 10.0, 20.0])
    y = 2.0 - 0.05 * x
    assert nr.window_mean(x, y, lo=15.0, hi=20.0) == pytest.approx(2.0 - 0.05 * 17.5)
    # a curve with a kink: the grid mean approaches the integral mean (scipy.integrate.quad)
    from scipy.integrate import quad

    y2 = np.array([2.0, 1.0, 1.5, 0.5])
    exact = quad(lambda t: np.interp(t, x, y2), 2.0, 18.0, points=[3.0, 10.0])[0] / 16.0
    assert nr.window_mean(x, y2, lo=2.0, hi=18.0, points=4001) == pytest.approx(exact, abs=1e-3)
    with pytest.raises(ValueError, match="window"):
        nr.window_mean(x, y, lo=15.0, hi=25.0)


def _flat(level, *, start=0.0, end=100.0, n=51, wiggle=0.0):
    x = np.linspace(start, end, n)
    return x, level + wiggle * (-1.0) ** np.arange(n)


def test_closeness_known_answers_and_overshoot():
    parent, counter = _flat(2.0), _flat(1.5)
    assert nr.closeness_of(_flat(1.5, start=10), parent, counter)["closeness"] == pytest.approx(1.0)
    assert nr.closeness_of(_flat(2.0, start=10), parent, counter)["closeness"] == pytest.approx(0.0)
    assert nr.closeness_of(_flat(1.75, start=10), parent, counter)["closeness"] == pytest.approx(0.5)
    over = nr.closeness_of(_flat(1.2, start=10), parent, counter)
    assert over["closeness"] == pytest.approx(1.6)  # below the low-noise curve: a departure
    # curves not apart by more than MIN_GAP give no closeness
    assert np.isnan(nr.closeness_of(_flat(1.5), parent, _flat(2.0 - nr.MIN_GAP / 2))["closeness"])
    # a fork that starts inside the window gives none either
    assert np.isnan(nr.closeness_of(_flat(1.5, start=90), parent, counter)["closeness"])


def test_smoothing_removes_eval_noise_that_one_eval_would_keep():
    parent, counter = _flat(2.0), _flat(1.5)
    fork = _flat(1.5, start=10, n=41, wiggle=0.1)  # +-0.1 alternating: the last eval alone reads 1.6
    assert abs(fork[1][-1] - 1.5) == pytest.approx(0.1)
    assert nr.closeness_of(fork, parent, counter)["closeness"] == pytest.approx(1.0, abs=0.03)
    # the common end is the shortest curve's, with no extrapolation
    r = nr.closeness_of(_flat(1.5, start=10, end=80), parent, counter)
    assert r["at"] == 80 and r["lo"] == pytest.approx(60.0)


def _curves_lr_fork(fork_step=50, steps=768):
    """Loss a function of effective time only, g(t), plus a noise floor 0.4 * lr / LR: the lr /4 fork lies on
    its counterpart's curve in effective time, not in samples."""
    g = lambda t: 1.0 + 2.0 * np.exp(-t / 4)  # noqa: E731
    s = np.arange(0, steps + 1, 8)
    rows = []
    for seed in range(5):
        t_parent = nr.cumulative_lr(s, lr=LR)
        t_low = nr.cumulative_lr(s, lr=LR / 4)
        fs = s[s >= fork_step]
        t_fork = nr.cumulative_lr(fs, lr=LR / 4, fork_step=fork_step, parent_lr=LR)
        for name, st, t, floor in ((f"noisy (lr {LR:g}, B {B})", s, t_parent, 0.4),
                                   (f"low noise (lr {LR / 4:g}, B {B})", s, t_low, 0.1),
                                   ("fork: lr /4", fs, t_fork, 0.1)):
            rows += [{"seed": seed, "curve": name, "step": a, "samples": a * B, "effective_time": b,
                      "eval_loss": g(b) + floor} for a, b in zip(st, t)]
    return pd.DataFrame(rows)


def test_effective_time_axis_puts_the_lr_fork_on_its_counterpart():
    rows = nr.closeness(_curves_lr_fork(), LR, B)
    assert set(rows.axis) == {"samples", "effective_time"}  # steps = samples / B: not a third row
    eff = rows[rows.axis == "effective_time"]
    assert len(eff) == 5 and np.allclose(eff.closeness, 1.0)
    # on samples the slow lr /4 run lies above the noisy one here: no gap, so no closeness and no verdict
    samples = rows[rows.axis == "samples"]
    assert (samples.parent_loss < samples.counterpart_loss).all() and samples.closeness.isna().all()
    summary = nr.summarize(rows).set_index("axis")
    assert summary.loc["effective_time", "verdict"] == "drops onto the low-noise curve"
    assert summary.loc["samples", "verdict"] == "inconclusive at this scale"


def test_overshoot_over_seeds_is_a_departure_not_a_drop():
    parent, counter = _flat(2.0), _flat(1.5)
    rows = pd.DataFrame([{"fork": "fork: batch x4", "axis": "samples", "seed": seed,
                          **nr.closeness_of(_flat(1.2 + 0.02 * seed, start=10), parent, counter)}
                         for seed in range(5)])
    s = nr.summarize(rows).iloc[0]
    assert s.closeness_low > nr.OVERSHOOT_ABOVE and s.verdict == "overshoots (ends below the low-noise curve)"
    assert s.diff_high < 0  # the fork ends below the low-noise run, beyond the interval


def test_t_interval_matches_the_closed_form():
    v = np.array([0.9, 1.1, 1.05, 0.95, 1.2, np.nan])
    m, lo, hi, n = nr.t_interval(v)
    f = v[np.isfinite(v)]
    half = stats.t.ppf(0.975, len(f) - 1) * f.std(ddof=1) / np.sqrt(len(f))
    assert n == 5 and m == pytest.approx(f.mean())
    assert (lo, hi) == pytest.approx((f.mean() - half, f.mean() + half))
    assert np.isnan(nr.t_interval([1.0])[1])


@pytest.mark.parametrize("low, high, n, expected", [
    (0.8, 1.2, 5, "drops onto the low-noise curve"),
    (1.3, 1.7, 5, "overshoots (ends below the low-noise curve)"),
    (-0.1, 0.2, 5, "does not drop"),
    (0.3, 0.6, 5, "drops part of the way"),
    (0.6, 1.1, 5, "inconclusive at this scale"),   # straddles 0.75
    (1.1, 1.4, 5, "inconclusive at this scale"),   # straddles 1.25
    (0.8, 1.2, 4, "inconclusive at this scale"),   # too few seeds
    (float("nan"), float("nan"), 5, "inconclusive at this scale"),
])
def test_verdict_rule(low, high, n, expected):
    assert nr.verdict(low, high, n) == expected


def test_section_reads_its_tables(tmp_path):
    rows = nr.closeness(_curves_lr_fork(), LR, B)
    rows.to_csv(tmp_path / "closeness.csv", index=False)
    text = nr.section(tmp_path)
    assert "effective time (sum of lr)" in text and "drops onto the low-noise curve" in text
    assert "inconclusive at this scale" in text
