"""Figures from tidy tables (seaborn). Each function takes a DataFrame and keyword-only options, draws on
``ax`` (a new figure when None) and returns the Axes; no file I/O here. The run x run and setting x setting
heatmaps live in :mod:`goldenpath.draw.matrices` and are re-exported here.
"""

from __future__ import annotations

import itertools
import math

import numpy as np

from goldenpath.config.identity import run_order_key
from goldenpath.draw.matrices import (  # noqa: F401 - the matrices are plots too
    RATIO_CMAP, distance_heatmap, ratio_matrix, ratio_norm, ratio_ticks, run_label, short_labels)


def _axes(ax):
    if ax is None:
        import matplotlib.pyplot as plt

        _, ax = plt.subplots()
    return ax


def run_order(configs: dict) -> list[str]:
    """Run names from least to most noisy setting (:func:`goldenpath.config.identity.run_order_key`)."""
    return sorted(configs, key=lambda name: run_order_key(configs[name], name))


def tail_index_by_layer(table, *, ax=None):
    """Tail index per layer (pooled, and the median per coordinate with its quartiles); alpha = 2 is Gaussian.

    ``table``: the rows of ``noise/<checkpoint>.parquet`` (layer, statistic, value, ci_low, ci_high).
    """
    ax = _axes(ax)
    stats_ = {"tail_index_pooled": "pooled (Simsekli)", "tail_index_per_coordinate_median": "per coordinate (median)"}
    part = table[table.statistic.isin(list(stats_))]
    layers = list(dict.fromkeys(part.layer))
    width = 0.4
    for k, (stat, label) in enumerate(stats_.items()):
        rows = part[part.statistic == stat].set_index("layer").reindex(layers)
        x = np.arange(len(layers)) + (k - 0.5) * width
        err = np.vstack([rows.value - rows.ci_low, rows.ci_high - rows.value])
        ax.bar(x, rows.value, width, yerr=np.clip(np.nan_to_num(err), 0, None), label=label, color=f"C{k}", capsize=2)
    ax.axhline(2.0, color="0.3", linestyle="--", linewidth=1, label="Gaussian (alpha = 2)")
    ax.set_xticks(np.arange(len(layers)), layers, rotation=90, fontsize=7)
    ax.set_ylabel("tail index alpha")
    ax.set_ylim(0, 2.3)
    ax.legend(fontsize=7)
    return ax


def noise_histogram(samples, *, alpha: float, ax=None, bins: int = 120):
    """Standardised pooled noise against a Gaussian and a symmetric alpha-stable law of the same IQR."""
    from scipy import stats

    ax = _axes(ax)
    x = np.asarray(samples, dtype=np.float64).ravel()
    x = (x - np.median(x)) / (np.subtract(*np.quantile(x, [0.75, 0.25])) or 1.0)  # unit interquartile range
    lim = np.quantile(np.abs(x), 0.995)
    ax.hist(x[np.abs(x) <= lim], bins=bins, density=True, color="0.7", label="noise (unit IQR)")
    grid = np.linspace(-lim, lim, 200)
    ax.plot(grid, stats.norm.pdf(grid, scale=1 / (2 * stats.norm.ppf(0.75))), label="Gaussian", color="C0")
    a = float(np.clip(alpha, 0.5, 2.0))
    if a < 2.0:
        scale = 1 / (2 * stats.levy_stable.ppf(0.75, a, 0.0))
        ax.plot(grid, stats.levy_stable.pdf(grid, a, 0.0, scale=scale), label=f"alpha-stable, alpha={a:.2f}",
                color="C3")
    ax.set_yscale("log")
    ax.set_xlabel("gradient noise (coordinates pooled, unit interquartile range)")
    ax.set_ylabel("density")
    ax.legend(fontsize=7)
    return ax


def qq_plot(theoretical, ordered, *, ax=None, label: str = "noise"):
    """A normal QQ plot from ``gradnoise.qq_data``."""
    ax = _axes(ax)
    ax.plot(theoretical, ordered, ".", markersize=2, label=label)
    lim = float(np.max(np.abs(theoretical)))
    ax.plot([-lim, lim], [-lim, lim], color="0.3", linewidth=1, label="Gaussian")
    ax.set_xlabel("normal quantile")
    ax.set_ylabel("standardised noise quantile")
    ax.legend(fontsize=7)
    return ax


def toys_metric(frame, *, metric: str = "alpha_eff", ax=None, log: bool = True):
    """A toys metric against sigma: the median over seeds and the 2.5-97.5% range, one line per batch size.

    ``frame``: rows of ``goldenpath.toys.experiments.run_dln`` (sigma, batch, seed, metric columns).
    """
    ax = _axes(ax)
    for k, (batch, part) in enumerate(frame.groupby("batch")):
        g = part.groupby("sigma")[metric]
        med, lo, hi = g.median(), g.quantile(0.025), g.quantile(0.975)
        ax.plot(med.index, med.values, "o-", color=f"C{k}", label=f"batch {batch}")
        ax.fill_between(med.index, lo.values, hi.values, color=f"C{k}", alpha=0.2)
    if log and (frame[metric] > 0).all():
        ax.set_yscale("log")
    ax.set_xlabel("noise sigma")
    ax.set_ylabel(metric.replace("_", " "))
    ax.legend(fontsize=7)
    return ax


def null_space_spread(frame, *, ax=None):
    """LLS: the measured spread of the null-space part against steps, and the exact law."""
    ax = _axes(ax)
    ax.plot(frame["step"], frame["spread"], "o", label="Noisy-SGD, over seeds")
    ax.plot(frame["step"], frame["exact"], "-", color="0.3", label="exact: k (lr sigma / B)^2 (d - n)")
    ax.set_xlabel("steps")
    ax.set_ylabel("tr Cov(P beta)")
    ax.legend(fontsize=7)
    return ax


# ----------------------------------------------------------------------------- sweeps: curves and distances


def _palette(values):
    import seaborn as sns

    values = sorted(set(values), key=lambda v: (v is None, v))
    return dict(zip(values, sns.color_palette("colorblind", len(values))))


def loss_curves(curves, *, x: str = "samples", hue: str = "lr", floor: float | None = None,
                targets=(), ax=None):
    """Eval loss against ``x`` (samples, step or tokens), one line per run coloured by ``hue``; offline dashed,
    forks drawn from their fork point (their curves start there); the Bayes floor and the loss targets.

    ``curves``: one row per run and eval (run, step, samples, tokens, eval_loss, regime, and the hue column).
    """
    ax = _axes(ax)
    colours = _palette(curves[hue])
    for run, part in curves.groupby("run", sort=False):
        part = part.sort_values(x)
        offline = part["regime"].iloc[0] == "offline"
        ax.plot(part[x].clip(lower=1), part["eval_loss"], color=colours[part[hue].iloc[0]],
                linestyle="--" if offline else "-", linewidth=1, label=run)
    for t in targets:
        ax.axhline(t, color="0.6", linewidth=0.6, alpha=0.5)
    if floor is not None:
        ax.axhline(floor, color="k", linewidth=1, linestyle=":", label="Bayes-optimal loss")
    ax.set_xscale("log")
    unit = {"samples": "samples seen", "step": "optimizer steps", "tokens": "tokens seen"}[x]
    ax.set_xlabel(unit)
    ax.set_ylabel("eval loss")
    handles = [ax.plot([], [], color=c, label=f"{hue}={v:g}" if isinstance(v, float) else f"{hue}={v}")[0]
               for v, c in colours.items()]
    ax.legend(handles=handles, fontsize=7, title="solid online, dashed offline", title_fontsize=7)
    return ax


def _dashes(values):
    values = sorted(set(values), key=lambda v: (v is None, v))
    return dict(zip(values, ["-", (0, (5, 2)), (0, (1, 1.5)), (0, (6, 2, 1, 2)), (0, (2, 3))] * 4))


def _knob(name, value):
    value = f"{value:g}" if isinstance(value, float) else value
    return f"{'batch' if name == 'batch' else name} {value}" if name in ("batch", "sigma") else f"{name}={value}"


def _band_legend(ax, frame, *, hue, style, extra=()):
    handles = [ax.plot([], [], color=c, linewidth=2, label=_knob(hue, v))[0] for v, c in _palette(frame[hue]).items()]
    if style:
        handles += [ax.plot([], [], color="0.3", linestyle=d, label=_knob(style, v))[0]
                    for v, d in _dashes(frame[style]).items()]
    from matplotlib.patches import Patch

    handles += [*extra, Patch(color="0.5", alpha=0.25, label="min-max over seeds")]
    ax.legend(handles=handles, fontsize=7, loc="best")


def loss_bands(bands, *, x: str = "samples", hue: str = "lr", style: str | None = "batch",
               floor: float | None = None, targets=(), legend: bool = True, palette_rows=None, ax=None):
    """Eval loss against ``x`` per setting: the mean over its seeds and their min-max band, coloured by
    ``hue`` and dashed by ``style``; the Bayes floor and the loss targets.

    ``bands``: rows of ``goldenpath.draw.curves.seed_bands`` (setting, x, mean, low, high, the hue and style knobs).
    ``palette_rows``: the rows of every panel drawn beside this one (default ``bands``): a knob value has one
    colour and one dash in all of them, and the legend of one panel reads for all.
    """
    ax = _axes(ax)
    keyed = bands if palette_rows is None else palette_rows
    colours, dashes = _palette(keyed[hue]), _dashes(keyed[style]) if style else {}
    for setting, part in bands.groupby("setting", sort=False):
        colour, dash = colours[part[hue].iloc[0]], dashes.get(part[style].iloc[0], "-") if style else "-"
        ax.fill_between(part[x], part["low"], part["high"], color=colour, alpha=0.18, linewidth=0)
        ax.plot(part[x], part["mean"], color=colour, linestyle=dash, linewidth=1.6, label=setting)
    for t in targets:
        ax.axhline(t, color="0.6", linewidth=0.6, alpha=0.6)
    extra = [ax.axhline(floor, color="k", linewidth=1, linestyle=":", label="Bayes-optimal loss")] \
        if floor is not None else []
    if len(bands):  # a diverging setting leaves the top; the start (near chance) stays in view
        top = bands.groupby("setting", sort=False)["high"].first().min()
        low = min(bands["low"].min(), floor if floor is not None else np.inf)
        ax.set_ylim(low - 0.03 * (top - low), top + 0.08 * (top - low))
    ax.set_xscale("log")
    ax.set_xlabel({"samples": "samples seen", "step": "optimizer steps", "tokens": "tokens seen"}[x])
    ax.set_ylabel("eval loss (mean over seeds)")
    if legend:
        _band_legend(ax, keyed, hue=hue, style=style, extra=extra)
    return ax


def error_bands(bins, *, hue: str = "lr", style: str | None = "batch", legend: bool = True, palette_rows=None,
                ax=None):
    """Eval error against eval loss per setting, binned by loss: the mean over seeds and the min-max band
    (gaps where no eval fell in a bin): are settings the same function at the same loss?

    ``bins``: rows of ``goldenpath.draw.curves.error_by_loss`` (setting, eval_loss, mean, low, high, the knobs);
    ``palette_rows``: as :func:`loss_bands`'.
    """
    ax = _axes(ax)
    keyed = bins if palette_rows is None else palette_rows
    colours, dashes = _palette(keyed[hue]), _dashes(keyed[style]) if style else {}
    centres = np.sort(bins["eval_loss"].unique())
    for setting, part in bins.groupby("setting", sort=False):
        colour, dash = colours[part[hue].iloc[0]], dashes.get(part[style].iloc[0], "-") if style else "-"
        part = part.set_index("eval_loss").reindex(centres)  # empty bins break the line
        ax.fill_between(centres, part["low"], part["high"], color=colour, alpha=0.18, linewidth=0)
        ax.plot(centres, part["mean"], color=colour, linestyle=dash, linewidth=1.6, marker=".", markersize=3,
                label=setting)
    ax.invert_xaxis()
    ax.set_xlabel("eval loss, binned (training goes right)")
    ax.set_ylabel("eval error (top-1), mean over seeds")
    if legend:
        _band_legend(ax, keyed, hue=hue, style=style)
    return ax


def distance_vs_loss(distances, *, metric: str = "tv", regimes: dict | None = None, ax=None):
    """Distance to the reference run and the seed floor against the loss target, with bootstrap bands.

    ``distances``: rows of ``compare/distances.parquet``; ``regimes``: run -> "online"/"offline" (the
    regime of a reference pair is its non-reference run's; a floor pair's is its runs').
    """
    ax = _axes(ax)
    part = distances[distances.metric == metric].copy()
    regimes = regimes or {}
    part["regime"] = [regimes.get(b, regimes.get(a, "online")) for a, b in zip(part.run_a, part.run_b)]
    styles = {"reference": "-", "floor": ":"}
    for (kind, regime), rows in part[part.kind.isin(list(styles))].groupby(["kind", "regime"]):
        g = rows.groupby("target")[["value", "ci_low", "ci_high"]].mean().sort_index(ascending=False)
        colour = "C0" if regime == "online" else "C3"
        ax.plot(g.index, g["value"], styles[kind], marker="o", color=colour,
                label=f"{regime}: {'to reference' if kind == 'reference' else 'seed floor'}")
        ax.fill_between(g.index, g["ci_low"], g["ci_high"], color=colour, alpha=0.15)
    ax.invert_xaxis()
    ax.set_xlabel("loss target (training goes right)")
    ax.set_ylabel(f"{metric} distance (mean over pairs, 95% bands)")
    ax.legend(fontsize=7)
    return ax


# ----------------------------------------------------------------------------- compute to target


def _plain_log(axis) -> None:
    """Plain numbers on a log axis (0.02, 50, not 2 x 10^-2). Where fewer than two powers of ten lie in view,
    minor ticks are labelled too: every one within a decade, else those at 2 and 5 x 10^k."""
    from matplotlib.ticker import FuncFormatter, NullFormatter

    axis.axes.autoscale_view()
    lo, hi = sorted(axis.get_view_interval())
    decades = math.floor(math.log10(hi) + 1e-9) - math.ceil(math.log10(lo) - 1e-9) + 1 if lo > 0 else 2

    def some(v, _):
        return f"{v:g}" if round(v / 10 ** math.floor(math.log10(v) + 1e-9)) in (2, 5) else ""

    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}") if hi < 10 * lo else
                             FuncFormatter(some) if decades < 2 else NullFormatter())


def compute_to_target(compute, *, x: str = "optim.lr", hue: str = "optim.batch_size", y: str = "steps_mean",
                      ax=None):
    """Steps (or samples) each setting needed to reach each target, against ``x``: colour by target, dashes
    by ``hue`` (batch size), circles online and squares offline (offline lines thinner).
    ``compute``: rows of ``compare/compute.csv``. Grid settings only: a fork's steps count its parent's, taken
    under other knobs (a fork at x4 batch sat on the parent's batch line, at the parent's lr)."""
    ax = _axes(ax)
    part = compute[compute.n_reached > 0]
    if "fork.parent" in part:
        part = part[part["fork.parent"].isna()]
    hues = sorted(part[hue].dropna().unique()) if hue in part else [None]
    dashes = _dashes(hues)
    targets = sorted(part.target.unique(), reverse=True)
    for (ti, target), h, (regime, marker) in itertools.product(enumerate(targets), hues,
                                                               (("online", "o"), ("offline", "s"))):
        rows = part[(part.target == target) & (part.regime == regime)]
        rows = rows[rows[hue] == h] if h is not None else rows
        if x in rows and len(rows):
            rows = rows.sort_values(x)
            ax.plot(rows[x], rows[y], linestyle=dashes[h], marker=marker, markersize=4, color=f"C{ti}",
                    linewidth=1.4 if regime == "online" else 0.8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    if x in part:
        ax.set_xticks(sorted(part[x].unique()), [f"{v:g}" for v in sorted(part[x].unique())], minor=False)
        ax.set_xticks([], minor=True)
    _plain_log(ax.yaxis)
    ax.set_xlabel(x)
    ax.set_ylabel(y.replace("_mean", " to reach the target (mean over seeds)"))
    handles = [ax.plot([], [], color=f"C{k}", linewidth=2, label=f"loss {t:g}")[0] for k, t in enumerate(targets)]
    handles += [ax.plot([], [], color="0.3", linestyle=dashes[h], label=f"{hue.split('.')[-1]} {h:g}")[0]
                for h in hues if h is not None]
    handles += [ax.plot([], [], m, color="0.3", label=r)[0] for r, m in (("online", "o"), ("offline", "s"))
                if (part.regime == r).any()]
    ax.legend(handles=handles, fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return ax
