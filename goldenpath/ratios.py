"""Golden-path tables of one sweep: settings, their ratios against the reference and each other, the trend
with noise, the compute each setting needed to reach each target, and the answer in plain words.

Pure functions from what ``goldenpath.compare`` collected (runs, their checkpoints at a target, pair sums)
to tidy rows; the statistics themselves are :mod:`goldenpath.stats`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np

from goldenpath import stats

SUMMARY = ["target", "metric", "regime", "setting", "reference", "n_seeds", "n_ref_seeds", "noise_scale", "d_cross",
           "d_floor", "ratio", "ci_low", "ci_high", "p_value", "p_holm"]
MATRIX = ["target", "metric", "setting_a", "setting_b", "regime_a", "regime_b", "n_a", "n_b", "d_cross", "d_floor",
          "ratio", "ci_low", "ci_high", "p_value", "permutations"]
TREND = ["target", "metric", "regime", "reference", "settings", "slope", "ci_low", "ci_high"]
COMPUTE = ["target", "setting", "regime", "n_seeds", "n_reached", "steps_mean", "steps_min", "steps_max",
           "samples_mean"]
EXCLUDED = ["target", "run", "checkpoint", "reason"]

ALPHA = 0.05  # the level of every test goldenpath reports (Holm-adjusted within a target, metric and regime)


@dataclass(frozen=True, eq=False)
class Setting:
    """One point of the knob grid (every seed of it); one object per setting, compared by identity."""

    label: str
    knobs: tuple           # the config minus seed, name and place
    regime: str            # online or offline
    noise: float           # the noise scale the trend uses: lr / B, times sigma with injected noise
    order: tuple           # sorts settings from least to most noisy, online first
    columns: dict          # the knobs that vary across the sweep, by dotted key


def setting_label(run: str) -> str:
    """A run's name without its seed: ``lr=0.02_bs=32_seed=1`` -> ``lr=0.02_bs=32``."""
    return re.sub(r"_?seed=\d+", "", run).strip("_") or "default"


def noise_scale(config) -> float:
    lr_b = config.optim.lr / config.optim.batch_size
    return lr_b * config.injected_sigma if config.injected_sigma > 0 else lr_b


def reference_of(settings: list[Setting], seeds: list[int]) -> int:
    """The least-noisy online setting with at least two seeds at this target (else with one)."""
    online = [k for k, s in enumerate(settings) if s.regime == "online"] or list(range(len(settings)))
    enough = [k for k in online if seeds[k] >= 2] or online
    return min(enough, key=lambda k: settings[k].order)


def setting_rows(target: float, metric: str, settings: list[Setting], groups: list[list[int]], sums: np.ndarray,
                 counts: np.ndarray, *, n_boot: int, seed: int = 0) -> tuple[list[dict], list[dict], list[dict]]:
    """At one target and metric: (summary rows: each setting against the reference, matrix rows: every pair
    of settings, trend rows: the slope of log ratio on log noise scale per regime)."""
    ref = reference_of(settings, [len(g) for g in groups])
    comparisons, draws = stats.compare_settings(sums, counts, groups, n_boot=n_boot, seed=seed)

    def get(k, r):
        c = comparisons[(min(k, r), max(k, r))]
        return c

    summary = []
    for k, s in enumerate(settings):
        row = {"target": target, "metric": metric, "regime": s.regime, "setting": s.label,
               "reference": settings[ref].label, "n_seeds": len(groups[k]), "n_ref_seeds": len(groups[ref]),
               "noise_scale": s.noise}
        if k == ref:
            row.update(d_cross=math.nan, d_floor=math.nan, ratio=math.nan, ci_low=math.nan, ci_high=math.nan,
                       p_value=math.nan)
        else:
            c = get(k, ref)
            row.update(d_cross=c.d_cross, d_floor=c.d_floor, ratio=c.ratio, ci_low=c.ci_low, ci_high=c.ci_high,
                       p_value=c.p_value)
        summary.append({**row, **s.columns})
    for regime in {r["regime"] for r in summary}:
        rows = [r for r in summary if r["regime"] == regime]
        for r, adjusted in zip(rows, stats.holm([r["p_value"] for r in rows])):
            r["p_holm"] = adjusted
    matrix = []
    for (k, r), c in comparisons.items():
        matrix.append({"target": target, "metric": metric, "setting_a": settings[k].label,
                       "setting_b": settings[r].label, "regime_a": settings[k].regime,
                       "regime_b": settings[r].regime, "n_a": c.n_a, "n_b": c.n_b, "d_cross": c.d_cross,
                       "d_floor": c.d_floor, "ratio": c.ratio, "ci_low": c.ci_low, "ci_high": c.ci_high,
                       "p_value": c.p_value, "permutations": c.permutations})
    trend = []
    for regime in sorted({s.regime for s in settings}):
        ks = [k for k, s in enumerate(settings) if s.regime == regime and k != ref]
        x = np.log([settings[k].noise for k in ks])
        with np.errstate(invalid="ignore", divide="ignore"):
            y = np.log(draws[:, ks, ref])
        per_draw = np.array([stats.slope(x, y[b]) for b in range(len(y))]) if ks else np.array([math.nan])
        low, high = stats.percentile_interval(per_draw[1:]) if len(per_draw) > 1 else (math.nan, math.nan)
        trend.append({"target": target, "metric": metric, "regime": regime, "reference": settings[ref].label,
                      "settings": len(ks), "slope": per_draw[0], "ci_low": low, "ci_high": high})
    return summary, matrix, trend


def answer(summary, trend=None, *, metric: str = "tv", alpha: float = ALPHA) -> dict[str, str]:
    """One plain sentence per regime from the summary rows (a DataFrame) of one metric, over every target.

    Only comparisons with at least two seeds on both sides count (a single seed's interval cannot hold the
    seed-to-seed spread). A setting *differs* from the reference where its Holm-adjusted p-value is below
    ``alpha`` and its interval lies above 1; the sentence names the strongest such case, else the largest
    ratio seen, then the trend with noise where its interval excludes 0 (``trend``: trend.csv's rows).
    """
    part = summary[(summary.metric == metric) & summary.ratio.notna()]
    out = {}
    for regime in ("online", "offline"):
        rows = part[part.regime == regime]
        if not len(rows):
            continue
        few = rows[(rows.n_seeds < 2) | (rows.n_ref_seeds < 2)]
        rows = rows.drop(few.index)
        if not len(rows):
            out[regime] = f"{regime}: no comparison with two seeds or more on both sides"
            continue
        differ = rows[(rows.p_holm < alpha) & (rows.ci_low > 1)]
        if len(differ):
            r = differ.sort_values("ratio", ascending=False).iloc[0]
            others = len(differ) - 1
            text = (f"{regime}: {r.setting} differs from the reference {r.reference} at loss {r.target:g} "
                    f"({metric} ratio {r.ratio:.2f} [{r.ci_low:.2f}, {r.ci_high:.2f}], p {r.p_value:.3g}, "
                    f"Holm {r.p_holm:.3g})"
                    + (f", and {others} more setting-target pair{'s' if others > 1 else ''} of "
                       f"{len(rows)}" if others else f", the only one of {len(rows)} comparisons"))
        else:
            r = rows.sort_values("ratio", ascending=False).iloc[0]
            text = (f"{regime}: no setting differs from the reference {r.reference} beyond its seeds (largest "
                    f"{metric} ratio {r.ratio:.2f} [{r.ci_low:.2f}, {r.ci_high:.2f}] for {r.setting} at loss "
                    f"{r.target:g}, p {r.p_value:.3g}; {len(rows)} comparisons)")
        if len(few):
            text += f"; {len(few)} comparison{'s' if len(few) > 1 else ''} with a single seed left out"
        if trend is not None and len(trend):
            t = trend[(trend.metric == metric) & (trend.regime == regime)]
            rising = t[(t.ci_low > 0) | (t.ci_high < 0)]
            if len(rising):
                text += "; the ratio " + ", ".join(
                    f"{'grows' if x.slope > 0 else 'falls'} with log noise at loss {x.target:g} (slope {x.slope:.2f} "
                    f"[{x.ci_low:.2f}, {x.ci_high:.2f}])" for x in rising.itertuples())
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
