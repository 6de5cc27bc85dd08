"""The tail-index study's tables and verdict rules (analysis/tail_index.py runs the study): pure functions
of its results table, fixed before the runs."""

from __future__ import annotations

import numpy as np
import pandas as pd

NEAR = 0.1  # |alpha - reference| that counts as "the same" (per-coordinate median, pooled per layer)
# The rules, fixed before the runs. Per coordinate, "Gaussian" means an Anderson-Darling statistic (pooled
# standardised coordinates) within AD_SAME times the scale-matched Gaussian control's in every seed; "not
# Gaussian" beyond AD_APART times it in every seed. Aggregation: alpha-stable noise keeps its per-coordinate
# alpha as the noise batch grows (change within AGG_MARGIN in every seed); finite-variance noise rises by
# more than AGG_MARGIN and ends within NEAR of the Gaussian control at the same number of draws.
AD_SAME, AD_APART, AGG_MARGIN = 1.5, 3.0, 0.15


def summarise(results: pd.DataFrame) -> pd.DataFrame:
    """One row per family, noise source, size, noise batch, target, layer and statistic: the mean over seeds,
    with the envelope of the seeds' intervals (lowest ci_low, highest ci_high)."""
    keys = ["family", "noise", "width", "depth", "batch_size", "at_loss", "layer", "statistic"]
    g = results.groupby(keys, sort=False, dropna=False)
    return g.agg(seeds=("seed", "nunique"), value=("value", "mean"), ci_low=("ci_low", "min"),
                 ci_high=("ci_high", "max")).reset_index()


def train_batch(results: pd.DataFrame) -> int:
    """The training batch size: the noise batch of the rows every run has (steps_to_target)."""
    return int(results.loc[results.statistic == "steps_to_target", "batch_size"].iloc[0])


def series(summary: pd.DataFrame, family: str, along: str, *, statistic: str = "tail_index_pooled",
           noise: str = "sgd") -> pd.DataFrame:
    """The whole-model rows of one family varying ``along`` (width, depth, batch_size or at_loss), the other
    knobs held where that series has the most points; sorted by ``along``."""
    batch, target = train_batch(summary), summary.at_loss.min()
    part = summary[(summary.family == family) & (summary.noise == noise) & (summary.statistic == statistic)
                   & (summary.layer == "all")]
    part = part[part.batch_size == batch] if along != "batch_size" else part
    part = part[part.at_loss == target] if along != "at_loss" else part
    held = [k for k in ("width", "depth", "batch_size", "at_loss") if k != along]
    if part.empty:
        return part
    counts = part.groupby(held)[along].nunique()
    if counts.max() < 2:
        return part.iloc[:0]
    mask = np.logical_and.reduce([part[k] == v for k, v in zip(held, counts.idxmax())])
    return part[mask].sort_values(along, ascending=along != "at_loss")


def trend(points: pd.DataFrame, along: str) -> str:
    """Does alpha fall with ``along``? holds: it falls monotonically and the intervals at the smallest and
    largest size are disjoint; does not hold: those intervals are disjoint the other way; else inconclusive."""
    if len(points) < 2:
        return "inconclusive at this scale (fewer than two sizes reached the loss target)"
    first, last = points.iloc[0], points.iloc[-1]
    values = ", ".join(f"{getattr(p, along):g}: {p.value:.2f}" for p in points.itertuples())
    if last.ci_high < first.ci_low:
        if (np.diff(points.value) < 0).all():
            return f"holds (alpha falls monotonically, extremes' intervals disjoint; {values})"
        return f"inconclusive at this scale (lower at the largest {along} but not monotonically; {values})"
    if last.ci_low > first.ci_high:
        return f"does not hold (alpha is higher at the largest {along}, intervals disjoint; {values})"
    return f"inconclusive at this scale (intervals at the smallest and largest {along} overlap; {values})"


def per_seed(results: pd.DataFrame, statistic: str, noise: str = "sgd", **where) -> pd.DataFrame:
    """value by seed (rows) for the rows matching ``where`` (columns: the remaining model keys)."""
    part = results[(results.statistic == statistic) & (results.noise == noise)]
    for k, v in where.items():
        part = part[part[k] == v]
    return part


def ad_ratio(results: pd.DataFrame, *, dense: bool = False) -> pd.DataFrame:
    """Per model, noise batch, target, layer and seed: SGD's Anderson-Darling statistic over the scale-matched
    control's (``dense``: SGD's on the coordinates without exact zeros)."""
    keys = ["family", "width", "depth", "batch_size", "at_loss", "layer", "seed"]
    sgd = per_seed(results, "coordinates_anderson_dense" if dense else "coordinates_anderson")
    gauss = per_seed(results, "coordinates_anderson", "gaussian_matched")
    both = sgd.merge(gauss, on=keys, suffixes=("", "_gauss"))
    return both.assign(ratio=both.value / both.value_gauss)[keys + ["value", "value_gauss", "ratio"]]


def ad_verdict(ratios: pd.Series) -> str:
    if len(ratios) and (ratios > AD_APART).all():
        return "not Gaussian"
    if len(ratios) and (ratios < AD_SAME).all():
        return "as Gaussian as the control"
    return "inconclusive"


def _ad_lines(results: pd.DataFrame, batch: int, target: float) -> list[str]:
    lines = []
    for dense in (False, True):
        r = ad_ratio(results, dense=dense)
        r = r[(r.batch_size == batch) & (r.at_loss == target) & (r.layer == "all")]
        by_model = {k: ad_verdict(g.ratio) for k, g in r.groupby(["family", "width", "depth"], sort=False)}
        counts = pd.Series(by_model).value_counts().to_dict()
        which = "coordinates without exact zeros only" if dense else "all coordinates"
        lines.append(f"Per coordinate the noise looks Gaussian (Panigrahi), batch {batch}, {which}: "
                     f"{'does not hold' if counts.get('not Gaussian', 0) == len(by_model) else 'holds' if counts.get('as Gaussian as the control', 0) == len(by_model) else 'inconclusive at this scale'} "
                     f"(models by verdict: {counts}; Anderson-Darling {r.value.min():.3g} to {r.value.max():.3g} "
                     f"against the scale-matched control's {r.value_gauss.min():.3g} to {r.value_gauss.max():.3g}; "
                     f"rule: within x{AD_SAME} of the control in every seed, beyond x{AD_APART} for not Gaussian).")
    return lines


def _widest(part: pd.DataFrame, column: str):
    """The model size (width, depth) measured at the most values of ``column``, and its seeds x ``column``
    table of values; None where no size has two values."""
    counts = part.groupby(["width", "depth"])[column].nunique()
    if counts.empty or counts.max() < 2:
        return None
    w, d = counts.idxmax()
    return w, d, part[(part.width == w) & (part.depth == d)].pivot_table(index="seed", columns=column, values="value")


def _aggregation_line(results: pd.DataFrame, family: str, control: pd.DataFrame | None) -> str | None:
    """Per-coordinate median alpha against the noise batch (sums of more draws), with the controls."""
    part = per_seed(results, "tail_index_per_coordinate_median", family=family, layer="all",
                    at_loss=results.at_loss.min())
    picked = _widest(part, "batch_size")
    if picked is None:
        return None
    w, d, wide = picked
    lo, hi = wide.columns.min(), wide.columns.max()
    change = wide[hi] - wide[lo]
    if control is not None:
        control = control[control.use == "aggregation"]
    gauss = control[control.law == "gaussian"].set_index("k").median_alpha if control is not None else {}
    end = gauss.get(hi, 2.0) if len(gauss) else 2.0
    if ((change > AGG_MARGIN) & ((wide[hi] - end).abs() <= NEAR)).all():
        claim = "finite variance: alpha drifts to 2 as draws are summed (not alpha-stable)"
    elif (change.abs() <= AGG_MARGIN).all():
        claim = "alpha-stable: alpha kept as draws are summed"
    else:
        claim = "inconclusive at this scale"
    means = ", ".join(f"{b:g}: {v:.2f}" for b, v in wide.mean().items())
    ctrl = ""
    if control is not None:
        st = control[control.law == "stable"].set_index("k").median_alpha
        ctrl = (f"; alpha-stable control (alpha {control[control.law == 'stable'].alpha.iloc[0]:.2f}) "
                + ", ".join(f"{k:g}: {v:.2f}" for k, v in st.items())
                + "; Gaussian control " + ", ".join(f"{k:g}: {v:.2f}" for k, v in gauss.items()))
    return (f"{family} ({w} x {d}), aggregation (per-coordinate median alpha against the noise batch, mean over "
            f"{len(wide)} seeds): {claim} ({means}; change {change.min():+.2f} to {change.max():+.2f} over seeds"
            f"{ctrl}; rule: change within {AGG_MARGIN} in every seed for alpha-stable, above it and ending within "
            f"{NEAR} of the Gaussian control for finite variance).")


def _training_line(results: pd.DataFrame, family: str) -> str | None:
    """Per-coordinate median alpha and the AD ratio at each target (points along training)."""
    batch = train_batch(results)
    part = per_seed(results, "tail_index_per_coordinate_median", family=family, layer="all", batch_size=batch)
    picked = _widest(part, "at_loss")
    if picked is None:
        return None
    w, d, wide = picked
    first, last = wide.columns.max(), wide.columns.min()
    change = (wide[last] - wide[first]).dropna()
    claim = ("stable along training" if len(change) and (change.abs() <= NEAR).all() else
             "changes along training" if len(change) and ((change > NEAR).all() or (change < -NEAR).all())
             else "inconclusive at this scale")
    r = ad_ratio(results)
    r = r[(r.family == family) & (r.width == w) & (r.depth == d) & (r.batch_size == batch) & (r.layer == "all")]
    ads = ", ".join(f"{t:g}: x{g.ratio.mean():.0f}" for t, g in r.groupby("at_loss", sort=False))
    means = ", ".join(f"{t:g}: {v:.2f}" for t, v in wide.mean().sort_index(ascending=False).items())
    return (f"{family} ({w} x {d}) along training (held-out loss {first:g} to {last:g}): per-coordinate "
            f"median alpha {claim} ({means}; rule: change within {NEAR} in every seed); Anderson-Darling over "
            f"the scale-matched control's, mean over seeds: {ads}.")


def _layer_lines(results: pd.DataFrame) -> list[str]:
    """Per layer: pooled alpha of SGD against the scale-matched control, per seed, and the zeros."""
    keys = ["family", "width", "depth", "layer", "seed"]
    part = results[(results.layer != "all") & (results.at_loss == results.at_loss.min())
                   & (results.batch_size == train_batch(results))]
    sgd = per_seed(part, "tail_index_pooled")
    gauss = per_seed(part, "tail_index_pooled", "gaussian_matched")
    both = sgd.merge(gauss, on=keys, suffixes=("", "_gauss"))
    both["d"] = both.value - both.value_gauss
    lines = []
    for family, f in both.groupby("family", sort=False):
        verdict = f.groupby(["width", "depth", "layer"]).d.apply(
            lambda d: "heavier" if (d < -NEAR).all() else "same" if (d.abs() <= NEAR).all() else "inconclusive")
        counts = verdict.value_counts().to_dict()
        heavier = ", ".join(f"{w}x{d} {layer}" for (w, d, layer), v in verdict.items() if v == "heavier")
        lines.append(f"{family}, per layer at batch {train_batch(results)}: pooled alpha heavier-tailed than the "
                     f"scale-matched control (below it by more than {NEAR} in every seed) in "
                     f"{counts.get('heavier', 0)} of {len(verdict)} layers, within {NEAR} in "
                     f"{counts.get('same', 0)}, inconclusive in {counts.get('inconclusive', 0)}"
                     + (f" (heavier: {heavier})" if heavier else "") + ".")
    return lines


def verdicts(results: pd.DataFrame, control: pd.DataFrame | None = None) -> list[str]:
    """The README's verdict lines, each decided by the rule it states."""
    s = summarise(results)
    batch, target = train_batch(results), results.at_loss.min()
    main = s[(s.layer == "all") & (s.batch_size == batch) & (s.at_loss == target)]
    pooled = main[(main.noise == "sgd") & (main.statistic == "tail_index_pooled")]
    matched = main[(main.noise == "gaussian_matched") & (main.statistic == "tail_index_pooled")]
    both = pooled.merge(matched, on=["family", "width", "depth"], suffixes=("", "_gauss"))
    n = len(pooled)
    if n == 0:
        return ["No model reached the loss target: every claim is inconclusive at this scale."]
    below = int((pooled.ci_high < 2).sum())
    claim = "holds" if below == n else "does not hold" if below == 0 else "inconclusive at this scale"
    lines = [f"Pooled alpha < 2 (Simsekli's measurement, batch {batch}): {claim} (interval wholly below 2 "
             f"in {below} of {n} models; range {pooled.value.min():.2f} to {pooled.value.max():.2f})."]
    heavier = int((both.ci_high < both.ci_low_gauss).sum())
    claim = ("holds" if heavier == len(both) else "does not hold" if heavier == 0 else "inconclusive at this scale")
    lines.append(f"Heavier-tailed than Gaussian noise with the same per-coordinate scales (pooled alpha's "
                 f"interval wholly below the scale-matched control's): {claim} ({heavier} of {len(both)} models; "
                 f"control range {both.value_gauss.min():.2f} to {both.value_gauss.max():.2f}).")
    lines += _ad_lines(results, batch, target)
    atoms = main[(main.noise == "sgd") & (main.statistic == "atom_fraction")].set_index(["family", "width", "depth"])
    dense = main[(main.noise == "sgd") & (main.statistic == "tail_index_per_coordinate_median_dense")]
    alld = main[(main.noise == "sgd") & (main.statistic == "tail_index_per_coordinate_median")]
    lines.append("ReLU sparsity: the share of noise entries that are exact zeros of the gradient (one value "
                 "repeated after centring), by family: " + "; ".join(
                     f"{f}: {g.value.min():.1%} to {g.value.max():.1%}" for f, g in atoms.groupby("family", sort=False))
                 + f". Per-coordinate median alpha, all coordinates {alld.value.min():.2f} to {alld.value.max():.2f}; "
                 f"coordinates without zeros {dense.value.min():.2f} to {dense.value.max():.2f}.")
    for family in dict.fromkeys(s.family[s.noise == "sgd"]):
        for along in ("width", "depth"):
            claim = trend(series(s, family, along), along)
            ctrl = series(s, family, along, noise="gaussian_matched")
            values = ", ".join(f"{getattr(p, along):g}: {p.value:.2f}" for p in ctrl.itertuples())
            same = claim.startswith("holds") and trend(ctrl, along).startswith("holds")
            lines.append(f"{family}: alpha (pooled) falls with {along}: {claim}; scale-matched Gaussian control "
                         f"{values}" + (": it falls the same way, so the fall is in the spread of the "
                                        "coordinates' scales, not in the tails." if same else "."))
    for family in dict.fromkeys(s.family[s.noise == "sgd"]):
        lines += [x for x in (_aggregation_line(results, family, control), _training_line(results, family)) if x]
    return lines + _layer_lines(results)


