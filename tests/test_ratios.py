"""The golden-path tables' rules: the family adjustment over targets and the answer's words (differs, and
by location or spread; no setting differs; cannot be decided with these seeds; trivial targets)."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from goldenpath.comparison import verdicts


def summary_row(target, setting, *, p_min, ratio=1.3, spread=1.0, spread_p=0.5, location=1.2, location_p_min=0.5,
                in_family=True, trivial=False, regime="online", seeds=10):
    return {"target": target, "metric": "tv", "regime": regime, "setting": setting, "reference": "ref",
            "n_seeds": seeds, "n_ref_seeds": seeds, "ratio": ratio, "ci_low": ratio - 0.1, "ci_high": ratio + 0.1,
            "p_value": p_min, "p_min": p_min, "in_family": in_family, "trivial": trivial, "spread": spread,
            "spread_low": spread * 0.8, "spread_high": spread * 1.2, "spread_p": spread_p, "location": location,
            "location_low": location - 0.1, "location_high": location + 0.1, "location_p_min": location_p_min,
            "location_p": location_p_min,
            "family_size": 2}


def family_row(target, *, p_global, smallest=0.0005, trivial=False, regime="online", settings=2):
    return {"target": target, "metric": "tv", "regime": regime, "reference": "ref", "settings": settings,
            "p_global": p_global, "smallest_p": smallest, "trivial": trivial, "trivial_loss": 1.73}


def adjusted(summary, family):
    verdicts.adjust(summary, family)
    return pd.DataFrame(summary), pd.DataFrame(family)


def test_the_family_is_every_setting_at_every_non_trivial_target():
    summary = [summary_row(1.7, "a", p_min=0.01), summary_row(1.7, "b", p_min=0.2, spread_p=0.01),
               summary_row(1.6, "a", p_min=0.03), summary_row(1.8, "a", p_min=0.001, trivial=True)]
    family = [family_row(1.7, p_global=0.01), family_row(1.6, p_global=0.03),
              family_row(1.8, p_global=0.001, trivial=True)]
    s, f = adjusted(summary, family)
    # two tested targets (1.8 is trivial): Bonferroni x 2 on the min-P p; spread: x 4 comparisons
    assert s.p_adjusted.tolist()[:3] == pytest.approx([0.02, 0.4, 0.06]) and math.isnan(s.p_adjusted.iloc[3])
    assert s.spread_p_adjusted.iloc[1] == pytest.approx(0.04)
    assert f.targets.tolist() == [2, 2, 2] and f.p_adjusted.tolist()[:2] == pytest.approx([0.02, 0.06])
    assert f.smallest_adjusted.iloc[0] == pytest.approx(0.001) and math.isnan(f.p_adjusted.iloc[2])


def test_the_answer_says_whether_location_or_spread_sets_a_setting_apart():
    summary = [summary_row(1.7, "noisy", p_min=0.001, ratio=1.4, spread=1.9, spread_p=0.001, location=1.01),
               summary_row(1.7, "other", p_min=0.4, ratio=1.05)]
    s, f = adjusted(summary, [family_row(1.7, p_global=0.001)])
    text = verdicts.answer(s, family=f)["online"]
    assert text.startswith("online: noisy differs from the reference ref at loss 1.7 (tv ratio 1.40")
    assert "scatters 1.9x wider than the reference, its mean function not shown to differ (spread 1.9" in text
    assert "same mean function" not in text  # no equivalence test says so
    assert text.endswith("; none of the other 1 comparison reaches 0.05 (which does not make them alike)")
    summary = [summary_row(1.7, "shifted", p_min=0.001, location=1.5, location_p_min=0.001)]
    s, f = adjusted(summary, [family_row(1.7, p_global=0.001)])
    assert "its mean function differs (location 1.50" in verdicts.answer(s, family=f)["online"]
    # with unequal seed counts the location test is not exact (a spread difference can pass for one in location)
    unequal = summary_row(1.7, "shifted", p_min=0.001, location=1.5, location_p_min=0.001)
    unequal["n_ref_seeds"] = 5
    s, f = adjusted([unequal], [family_row(1.7, p_global=0.001)])
    text = verdicts.answer(s, family=f)["online"]
    assert "its mean function may differ (location 1.50" in text and "10 seeds against the reference's 5" in text


def test_the_answer_says_cannot_be_decided_where_the_seeds_cannot_reach_the_level():
    summary = [summary_row(t, "a", p_min=2 / 252, seeds=5) for t in (1.7, 1.65, 1.6, 1.55, 1.5, 1.45, 1.4)]
    family = [family_row(t, p_global=2 / 252, smallest=2 / 252) for t in (1.7, 1.65, 1.6, 1.55, 1.5, 1.45, 1.4)]
    s, f = adjusted(summary, family)
    text = verdicts.answer(s, family=f)["online"]
    assert text.startswith("online: cannot be decided with 5 seeds per setting: the smallest adjusted p these "
                           "seeds allow is 0.056")
    assert "no setting differs" not in text


def test_the_answer_says_no_setting_differs_and_names_trivial_targets():
    summary = [summary_row(1.7, "a", p_min=0.3, ratio=1.02), summary_row(1.9, "a", p_min=0.001, trivial=True)]
    family = [family_row(1.7, p_global=0.3), family_row(1.9, p_global=0.001, trivial=True)]
    s, f = adjusted(summary, family)
    text = verdicts.answer(s, family=f)["online"]
    assert text.startswith("online: no setting differs from the reference ref beyond its seeds (family of 1 "
                           "comparison over 1 target, smallest adjusted p 0.3")
    assert "target 1.9 left out as trivial (at or above the trivial loss 1.73)" in text
    assert "power curve" in text  # not "the same": that needs the test's power


@pytest.mark.parametrize("seeds,design,reach", [(3, "independent", 2 / 20), (3, "paired", 2 / 8), (5, "independent",
                                                                                                  2 / 252)])
def test_the_reach_counts_a_setting_s_own_pairwise_floor(seeds, design, reach):
    """Three settings, each far from the others: a setting's adjusted p is never below its pairwise p against the
    reference, so with 3 seeds a side no outcome can reach 0.05 (2 of C(6, 3) splits; 2 of 2^3 swaps paired), and
    the answer says so, where the family's relabellings alone (1680, or 216) suggested 0.0006 and 0.005."""
    import itertools

    import numpy as np

    from goldenpath.comparison.design import Design

    rng = np.random.default_rng(0)
    x = np.concatenate([50.0 * k + rng.normal(size=(seeds, 40)) for k in range(3)])
    sums = np.stack([np.abs(x[i] - x[j]) for i, j in itertools.combinations(range(len(x)), 2)])
    groups = tuple(tuple(range(k * seeds, (k + 1) * seeds)) for k in range(3))
    design_ = Design(groups, tuple(i % seeds for i in range(len(x))) if design == "paired" else tuple(range(len(x))))
    settings = [verdicts.Setting(f"s{k}", (k,), "online", 0.1 * 2**k, (0, k), {"lr": 0.1 * 2**k}) for k in range(3)]
    got = verdicts.setting_rows(2.0, "tv", settings, design_, sums, np.ones(40), sq_sums=sums**2)
    s, f = adjusted(got["summary"], got["family"])
    assert f.smallest_adjusted.iloc[0] == pytest.approx(reach)
    assert (s[s.in_family].p_adjusted >= reach * (1 - 1e-12)).all()
    text = verdicts.answer(s, family=f)["online"]
    if reach >= 0.05:
        assert text.startswith(f"online: cannot be decided with {seeds} seeds per setting") and "no setting" not in text
    else:
        assert "differs from the reference s0" in text
