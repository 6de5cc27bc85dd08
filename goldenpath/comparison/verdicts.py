"""Golden-path tables of one sweep: settings, their ratios against the reference and each other, the family
test per target and regime, the trend with noise, the compute each setting needed, and the answer in words.

Pure functions from what ``goldenpath.comparison.compare`` collected (runs, their checkpoints at a target, pair sums)
to tidy rows; the statistics themselves are :mod:`goldenpath.comparison.stats`.

The rules, fixed before any run (``goldenpath sweep --plan`` prints what a design can reach):

- **reference**: per regime, the least-noisy setting of that regime with two seeds or more (offline
  settings are compared with the least-noisy *offline* setting; their ratio against the online reference is
  a second reading, ``online_*`` columns);
- **family**: per metric and regime, every grid setting with two seeds or more (forks are reported but not
  in it) at every non-trivial target. A verdict says "differs" only from this family: at each target the
  min-P permutation test over the family's settings (:func:`goldenpath.comparison.stats.family_test`), then Bonferroni
  over the family's targets (``p_adjusted`` = targets x min-P p). Where the seeds cannot reach an adjusted
  p below ``ALPHA`` the answer says so ("cannot be decided with N seeds"), never "no setting differs";
- **trivial targets**: a target at or above the dataset's trivial loss (``trivial_loss``: the unigram loss
  for text, a linear model for images) is flagged and left out of the family.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from goldenpath.comparison import stats

from goldenpath.comparison.design import Design, smallest_p

SUMMARY = ["target", "metric", "regime", "setting", "reference", "design", "n_seeds", "n_ref_seeds", "noise_scale",
           "d_cross", "d_floor", "floor", "ref_floor", "ratio", "ci_low", "ci_high", "p_value", "p_adjusted",
           "in_family", "spread", "spread_low", "spread_high", "spread_p_adjusted", "location", "location_low",
           "location_high", "location_p", "location_p_adjusted", "online_reference", "online_ratio",
           "online_ci_low", "online_ci_high", "online_p_value", "trivial"]
MATRIX = ["target", "metric", "setting_a", "setting_b", "regime_a", "regime_b", "design", "n_a", "n_b", "d_cross",
          "d_floor", "floor_a", "floor_b", "ratio", "ci_low", "ci_high", "p_value", "spread", "spread_low",
          "spread_high", "location", "location_low", "location_high", "location_p", "permutations"]
FAMILY = ["target", "metric", "regime", "reference", "design", "settings", "seeds", "p_global", "p_adjusted",
          "smallest_p", "smallest_adjusted", "targets", "permutations", "exact", "trivial", "trivial_loss"]
TREND = ["target", "metric", "regime", "reference", "settings", "slope", "ci_low", "ci_high"]
COMPUTE = ["target", "setting", "regime", "n_seeds", "n_reached", "steps_mean", "steps_min", "steps_max",
           "samples_mean"]
EXCLUDED = ["target", "run", "checkpoint", "reason"]

ALPHA = 0.05  # the level of every test goldenpath reports (family-wise, over a verdict's family)


@dataclass(frozen=True, eq=False)
class Setting:
    """One point of the knob grid (every seed of it); one object per setting, compared by identity."""

    label: str
    knobs: tuple           # the config minus seed, replicate, name and place
    regime: str            # online or offline
    noise: float           # the noise scale the trend uses: lr / B, times sigma with injected noise
    order: tuple           # sorts settings from least to most noisy, online first
    columns: dict          # the knobs that vary across the sweep, by dotted key
    fork: bool = False     # a fork of other runs (not in the verdict's family)


def reference_of(settings: list[Setting], seeds: list[int], regime: str | None = None) -> int | None:
    """The least-noisy setting of ``regime`` (every regime when None) with at least two seeds at this target
    (else with one); grid settings before forks. None when the regime has no setting."""
    pool = [k for k, s in enumerate(settings) if regime is None or s.regime == regime]
    if not pool:
        return None
    enough = [k for k in pool if seeds[k] >= 2] or pool
    return min(enough, key=lambda k: (settings[k].fork, settings[k].order))


def family_of(settings: list[Setting], groups: list[list[int]], ref: int) -> list[int]:
    """The grid settings of the reference's regime with two seeds or more, the reference excluded."""
    return [k for k, s in enumerate(settings) if k != ref and s.regime == settings[ref].regime and not s.fork
            and len(groups[k]) >= 2]


def _nan_row() -> dict:
    return {k: math.nan for k in ("d_cross", "d_floor", "ratio", "ci_low", "ci_high", "p_value", "spread",
                                  "spread_low", "spread_high", "location", "location_low", "location_high",
                                  "location_p")}


def _pair_row(comparisons: dict, k: int, r: int) -> dict:
    """Setting ``k`` against setting ``r``: the ratio, location and spread columns (spread: k's floor over r's)."""
    c = comparisons[(min(k, r), max(k, r))]
    row = {"d_cross": c.d_cross, "d_floor": c.d_floor, "ratio": c.ratio, "ci_low": c.ci_low,
           "ci_high": c.ci_high, "p_value": c.p_value, "location": c.location, "location_low": c.location_low,
           "location_high": c.location_high, "location_p": c.location_p}
    if k < r:
        row.update(spread=c.spread, spread_low=c.spread_low, spread_high=c.spread_high, spread_p=c.spread_p)
    else:
        row.update(spread=_inverse(c.spread), spread_low=_inverse(c.spread_high), spread_high=_inverse(c.spread_low),
                   spread_p=c.spread_p)
    return row


def _inverse(x: float) -> float:
    """1 / x, inf at 0 (a setting whose seeds give one function: floor 0, as lmc's barriers can be), nan at nan."""
    return math.inf if x == 0 else 1 / x


def setting_rows(target: float, metric: str, settings: list[Setting], design: Design, sums: np.ndarray,
                 counts: np.ndarray, *, sq_sums: np.ndarray | None = None, trivial: bool = False,
                 trivial_loss: float = math.nan, n_perm: int = 2000, seed: int = 0) -> dict[str, list[dict]]:
    """At one target and metric: {"summary": each setting against its regime's reference, "settings": every
    pair of settings, "family": the family test per regime, "trend": the slope of log ratio on log noise
    per regime}. ``p_adjusted`` is filled in by :func:`adjust` once every target is known."""
    groups = [list(g) for g in design.groups]
    sizes = [len(g) for g in groups]
    comparisons, cells = stats.compare_settings(sums, counts, design, sq_sums=sq_sums, n_perm=n_perm, seed=seed)

    refs = {regime: reference_of(settings, sizes, regime) for regime in ("online", "offline")}
    online_ref = refs["online"]
    families, trend = [], []
    tests = {}
    for regime, ref in refs.items():
        if ref is None:
            continue
        family = family_of(settings, groups, ref)
        base = {"target": target, "metric": metric, "regime": regime, "reference": settings[ref].label,
                "design": design.relation([ref, *family]) if family else "none", "settings": len(family),
                "seeds": ",".join(str(sizes[k]) for k in [ref, *family]), "trivial": trivial,
                "trivial_loss": trivial_loss}
        if family and len(groups[ref]) >= 2 and base["design"] != "partial":
            x = np.log([settings[k].noise for k in family])
            test = stats.family_test(sums, counts, design, family, ref, sq_sums=sq_sums, n_perm=n_perm,
                                     seed=seed, x=x)
            tests[regime] = (family, test)
            families.append({**base, "p_global": test.p_global, "smallest_p": test.smallest,
                             "permutations": test.permutations, "exact": test.exact,
                             # a setting's adjusted p is never below its pairwise p (adjust): the floor of both
                             "smallest_pair_p": min(smallest_p(design, [k, ref], n_perm=n_perm) for k in family)})
            slope, low, high = stats.trend(x, cells, family, ref, null_var=test.slope_null_var,
                                           dof_=stats.dof(design, [ref, *family]))
        else:
            families.append({**base, "p_global": math.nan, "smallest_p": math.nan, "permutations": 0,
                             "exact": False})
            slope = low = high = math.nan
        trend.append({"target": target, "metric": metric, "regime": regime, "reference": settings[ref].label,
                      "settings": len(family), "slope": slope, "ci_low": low, "ci_high": high})

    summary = []
    for k, s in enumerate(settings):
        ref = refs[s.regime]
        row = {"target": target, "metric": metric, "regime": s.regime, "setting": s.label,
               "reference": settings[ref].label, "design": design.relation([k, ref]) if k != ref else "",
               "n_seeds": sizes[k], "n_ref_seeds": sizes[ref], "noise_scale": s.noise,
               "floor": cells.means[cells.index(k, k)], "ref_floor": cells.means[cells.index(ref, ref)],
               "trivial": trivial}
        row.update(_nan_row() if k == ref else _pair_row(comparisons, k, ref))
        family, test = tests.get(s.regime, ([], None))
        row["in_family"] = k in family
        row["p_min"] = test.adjusted.get(k, math.nan) if test else math.nan
        row["location_p_min"] = test.location.get(k, math.nan) if test else math.nan
        row["family_size"] = len(family)
        if s.regime == "offline" and online_ref is not None:
            o = _pair_row(comparisons, k, online_ref)
            row.update(online_reference=settings[online_ref].label, online_ratio=o["ratio"],
                       online_ci_low=o["ci_low"], online_ci_high=o["ci_high"], online_p_value=o["p_value"])
        summary.append({**row, **s.columns})

    matrix = []
    for (k, r), c in comparisons.items():
        matrix.append({"target": target, "metric": metric, "setting_a": settings[k].label,
                       "setting_b": settings[r].label, "regime_a": settings[k].regime,
                       "regime_b": settings[r].regime, "design": c.design, "n_a": c.n_a, "n_b": c.n_b,
                       "d_cross": c.d_cross, "d_floor": c.d_floor, "floor_a": c.floor_a, "floor_b": c.floor_b,
                       "ratio": c.ratio, "ci_low": c.ci_low, "ci_high": c.ci_high, "p_value": c.p_value,
                       "spread": c.spread, "spread_low": c.spread_low, "spread_high": c.spread_high,
                       "location": c.location, "location_low": c.location_low, "location_high": c.location_high,
                       "location_p": c.location_p, "permutations": c.permutations})
    return {"summary": summary, "settings": matrix, "family": families, "trend": trend}


def adjust(summary: list[dict], family: list[dict]) -> None:
    """Fill in the family-wise adjusted p-values once every target is in: per metric and regime the family
    is every tested, non-trivial target; a setting's ``p_adjusted`` is targets x its min-P p (Bonferroni
    over targets), and at least its own pairwise p, ``location_p_adjusted`` the same for location,
    ``spread_p_adjusted`` its spread p times the family's comparisons; a family row's ``p_adjusted`` is
    targets x its global p, ``smallest_adjusted`` the smallest adjusted p a setting's seeds allow: targets x
    the smallest min-P p, and at least the smallest pairwise p of a setting against the reference (changes
    the rows in place)."""
    tested: dict[tuple, int] = {}
    comparisons: dict[tuple, int] = {}
    for f in family:
        if np.isfinite(f["p_global"]) and not f["trivial"]:
            key = (f["metric"], f["regime"])
            tested[key] = tested.get(key, 0) + 1
            comparisons[key] = comparisons.get(key, 0) + f["settings"]
    for f in family:
        t = tested.get((f["metric"], f["regime"]), 0)
        ok = np.isfinite(f["p_global"]) and not f["trivial"]
        f["targets"] = t
        f["p_adjusted"] = min(1.0, t * f["p_global"]) if ok else math.nan
        pair = f.pop("smallest_pair_p", 0.0)
        f["smallest_adjusted"] = min(1.0, max(t * f["smallest_p"], pair)) if ok else math.nan
    for r in summary:
        key = (r["metric"], r["regime"])
        t, m = tested.get(key, 0), comparisons.get(key, 0)
        ok = r["in_family"] and not r["trivial"] and t > 0
        p, loc = r.pop("p_min"), r.pop("location_p_min")
        # never below the setting's own pairwise p: the family's relabellings range over every setting's runs
        # and can resolve a smaller p than a pair's own few splits (two seeds against five: 21); the larger
        # of two valid p-values is valid, and an adjusted p under the unadjusted one would only confuse
        r["p_adjusted"] = min(1.0, max(t * p, r["p_value"])) if ok and np.isfinite(p) else math.nan
        r["location_p_adjusted"] = (min(1.0, max(t * loc, r["location_p"])) if ok and np.isfinite(loc)
                                    else math.nan)
        sp = r.pop("spread_p", math.nan)
        r["spread_p_adjusted"] = min(1.0, m * sp) if ok and np.isfinite(sp) else math.nan
        r.pop("family_size", None)


# ----------------------------------------------------------------------------- the answer in words


def _interval(value: float, low: float, high: float) -> str:
    return f"{value:.2f} [{low:.2f}, {high:.2f}]" if np.isfinite(low) else f"{value:.2f}"


def _equal_seeds(r) -> bool:
    """Whether a summary row's setting and reference have as many seeds (where the location test is exact)."""
    return bool(getattr(r, "n_seeds", math.nan) == getattr(r, "n_ref_seeds", math.nan))


def _why(r, metric: str, alpha: float) -> str:
    """Which of location and spread sets a differing setting apart, in words."""
    spread_differs = np.isfinite(r.spread_p_adjusted) and r.spread_p_adjusted < alpha
    location_differs = np.isfinite(r.location_p_adjusted) and r.location_p_adjusted < alpha
    spread = f"spread {_interval(r.spread, r.spread_low, r.spread_high)}"
    location = (f"location {_interval(r.location, r.location_low, r.location_high)}, adjusted p "
                f"{r.location_p_adjusted:.2g}") if np.isfinite(r.location) else ""
    if location_differs and not _equal_seeds(r):  # the location test is not exact then: say so, claim less
        return (f": its mean function may differ ({location}; {spread}), though with {r.n_seeds:g} seeds against "
                f"the reference's {r.n_ref_seeds:g} the location test can take a difference in spread for one in "
                f"location (docs/science.md, unequal seed counts)")
    if location_differs and spread_differs:
        return (f": its mean function differs ({location}) and its seeds scatter {r.spread:.1f}x as widely as the "
                f"reference's ({spread})")
    if location_differs:
        return f": its mean function differs ({location}; {spread})"
    if spread_differs:
        wider = "wider" if r.spread > 1 else "narrower"
        # not "around the same mean function": a location test that does not reject shows no sameness (that
        # needs a margin and an equivalence test), and its unadjusted interval may even exclude 1
        return (f": it scatters {r.spread:.1f}x {wider} than the reference, its mean function not shown to differ "
                f"({spread}; {location or 'location not measured'})")
    return f" (neither location nor spread alone is significant: {location or 'location not measured'}; {spread})"


def _count(n: int, noun: str) -> str:
    """``1 target``, ``2 targets``."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


def answer(summary, trend=None, *, family=None, metric: str = "tv", alpha: float = ALPHA) -> dict[str, str]:
    """One plain sentence per regime from the summary rows (a DataFrame) of one metric, over every target,
    and the family rows (``family.csv``): differs (naming the strongest setting and whether its mean
    function or its spread differs), no setting differs, or cannot be decided with these seeds."""
    part = summary[(summary.metric == metric) & summary.ratio.notna()]
    fam = family[family.metric == metric] if family is not None and len(family) else None
    out = {}
    for regime in ("online", "offline"):
        rows = part[part.regime == regime]
        if not len(rows):
            continue
        f = fam[fam.regime == regime] if fam is not None else None
        tested = f[f.p_adjusted.notna()] if f is not None else rows.iloc[:0]
        trivial = sorted(set(f[f.trivial.astype(bool)].target), reverse=True) if f is not None else []
        members = rows[rows.in_family.astype(bool) & ~rows.trivial.astype(bool)] if "in_family" in rows else rows
        if not len(tested) or not len(members):
            text = f"{regime}: no family to test (a reference and another setting with two seeds or more at a " \
                   f"non-trivial target)"
        else:
            ref = members.reference.iloc[0]
            seeds = sorted(set(members.n_seeds) | set(members.n_ref_seeds))
            n = f"{seeds[0]}" if len(seeds) == 1 else f"{seeds[0]}-{seeds[-1]}"
            reach = float(tested.smallest_adjusted.min())
            differ = members[members.p_adjusted < alpha]
            top = members.sort_values("ratio", ascending=False).iloc[0]
            largest = (f"largest {metric} ratio {_interval(top.ratio, top.ci_low, top.ci_high)} for {top.setting} at "
                       f"loss {top.target:g}")
            if len(differ):
                r = differ.sort_values(["p_adjusted", "ratio"], ascending=[True, False]).iloc[0]
                others = len(differ) - 1
                text = (f"{regime}: {r.setting} differs from the reference {r.reference} at loss {r.target:g} "
                        f"({metric} ratio {_interval(r.ratio, r.ci_low, r.ci_high)}, adjusted p {r.p_adjusted:.2g})"
                        + _why(r, metric, alpha)
                        + (f"; {others} more setting-target pair{'s' if others > 1 else ''} of {len(members)} differ"
                           if others else f"; none of the other {_count(len(members) - 1, 'comparison')} reaches "
                           f"{alpha:g} (which does not make them alike)" if len(members) > 1 else ""))
            elif reach >= alpha:
                text = (f"{regime}: cannot be decided with {n} seeds per setting: the smallest adjusted p these "
                        f"seeds allow is {reach:.2g} (family of {_count(len(members), 'comparison')} over "
                        f"{_count(len(tested), 'target')}; {largest})")
            else:
                text = (f"{regime}: no setting differs from the reference {ref} beyond its seeds (family of "
                        f"{_count(len(members), 'comparison')} over {_count(len(tested), 'target')}, smallest "
                        f"adjusted p "
                        f"{members.p_adjusted.min():.2g}, reachable {reach:.2g}; {largest}); how large a "
                        f"difference these seeds would detect is a power curve's question")
        if trivial:
            loss = f.trivial_loss.dropna()
            text += (f"; target{'s' if len(trivial) > 1 else ''} {', '.join(f'{t:g}' for t in trivial)} left out "
                     f"as trivial (at or above the trivial loss {loss.iloc[0]:.3g})" if len(loss) else "")
        if trend is not None and len(trend):
            t = trend[(trend.metric == metric) & (trend.regime == regime) & trend.slope.notna()]
            for word, moving in (("grows", t[t.ci_low > 0]), ("falls", t[t.ci_high < 0])):
                if len(moving):
                    text += (f"; the ratio {word} with log noise at {len(moving)} of {len(t)} targets (slope "
                             + ", ".join(f"{x.slope:.2f} [{x.ci_low:.2f}, {x.ci_high:.2f}] at {x.target:g}"
                                         for x in moving.itertuples()) + "; not adjusted)")
        out[regime] = text
    return out


def compute_rows(reached: list[dict]) -> list[dict]:
    """Samples and steps each setting needed to reach each target (``reached``: one dict per run and target
    with setting, target, step, samples, and n_seeds of its setting)."""
    by: dict[tuple, list[dict]] = {}
    for r in reached:
        by.setdefault((r["target"], r["setting"]), []).append(r)
    rows = []
    for (target, setting), part in sorted(by.items(), key=lambda kv: (-kv[0][0], kv[0][1])):
        got = [p for p in part if p["step"] is not None]
        steps = np.array([p["step"] for p in got], float)
        samples = np.array([p["samples"] for p in got], float)
        first = part[0]
        rows.append({"target": target, "setting": setting, "regime": first["regime"],
                     "n_seeds": len(part), "n_reached": len(got),
                     "steps_mean": steps.mean() if len(got) else math.nan,
                     "steps_min": steps.min() if len(got) else math.nan,
                     "steps_max": steps.max() if len(got) else math.nan,
                     "samples_mean": samples.mean() if len(got) else math.nan, **first["columns"]})
    return rows
