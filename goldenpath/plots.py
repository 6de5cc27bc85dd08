"""Figures from tidy tables (seaborn). Each function takes a DataFrame and keyword-only options, draws on
``ax`` (a new figure when None) and returns the Axes; no file I/O here.
"""

from __future__ import annotations

import numpy as np


def _axes(ax):
    if ax is None:
        import matplotlib.pyplot as plt

        _, ax = plt.subplots()
    return ax


def run_order(configs: dict) -> list[str]:
    """Run names ordered by their knobs: regime, lr, batch, noise, then seed (forks after their parent)."""
    def key(name):
        c = configs[name]
        return (c.data.epochs, c.optim.lr, c.optim.batch_size, c.injected_sigma, c.fork.parent or "", c.seed, name)

    return sorted(configs, key=key)


def run_label(name: str) -> str:
    """A run name made readable: ``lr=0.02_bs=16_seed=0`` -> ``lr=0.02 bs=16 seed=0``."""
    return name.replace("_", " ").replace("+fork-", " > fork ")


def distance_heatmap(frame, *, order: list[str] | None = None, ax=None, cmap: str = "viridis"):
    """The run-by-run matrix of one target's and one metric's distances; seed-floor pairs outlined.

    ``frame``: rows of ``compare/distances.parquet`` for one target and metric (run_a, run_b, value, kind).
    """
    import seaborn as sns
    from matplotlib.patches import Rectangle

    ax = _axes(ax)
    runs = sorted(set(frame["run_a"]) | set(frame["run_b"]))
    if order is not None:
        runs = [r for r in order if r in runs] + [r for r in runs if r not in order]
    index = {r: i for i, r in enumerate(runs)}
    matrix = np.zeros((len(runs), len(runs)))
    floors = []
    for row in frame.itertuples():
        i, j = index[row.run_a], index[row.run_b]
        matrix[i, j] = matrix[j, i] = row.value
        if row.kind == "floor":
            floors += [(i, j), (j, i)]
    labels = [run_label(r) for r in runs]
    metric = frame["metric"].iloc[0] if len(frame) else "distance"
    sns.heatmap(matrix, ax=ax, cmap=cmap, square=True, xticklabels=labels, yticklabels=labels,
                cbar_kws={"label": metric})
    for i, j in floors:
        ax.add_patch(Rectangle((j, i), 1, 1, fill=False, edgecolor="white", linewidth=1.5))
    ax.set_xlabel("run (white outline: same knobs, another seed = seed floor)")
    ax.set_ylabel("run")
    ax.tick_params(axis="x", labelrotation=90, labelsize=7)
    ax.tick_params(axis="y", labelrotation=0, labelsize=7)
    return ax


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


def error_vs_loss(curves, *, hue: str = "lr", ax=None):
    """Eval error against eval loss, one curve per run: the same function at the same loss?"""
    ax = _axes(ax)
    colours = _palette(curves[hue])
    for run, part in curves.groupby("run", sort=False):
        part = part.sort_values("step")
        ax.plot(part["eval_loss"], part["eval_error"], color=colours[part[hue].iloc[0]], linewidth=1,
                linestyle="--" if part["regime"].iloc[0] == "offline" else "-", label=run)
    ax.invert_xaxis()
    ax.set_xlabel("eval loss (training goes right)")
    ax.set_ylabel("eval error (top-1, per image or token)")
    handles = [ax.plot([], [], color=c, label=f"{hue}={v}")[0] for v, c in colours.items()]
    ax.legend(handles=handles, fontsize=7)
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


# ----------------------------------------------------------------------------- setting-level statistics


def ratio_matrix(settings, *, order: list[str] | None = None, reference: str | None = None, alpha: float = 0.05,
                 ax=None, vmax: float | None = None):
    """The setting x setting matrix of golden-path ratios at one target and metric; ``*`` where the
    permutation p-value is below ``alpha`` and the interval lies above 1; the reference's row outlined.

    ``settings``: rows of ``compare/settings.csv`` for one target and metric.
    """
    import seaborn as sns
    from matplotlib.patches import Rectangle

    ax = _axes(ax)
    names = sorted(set(settings.setting_a) | set(settings.setting_b))
    if order is not None:
        names = [n for n in order if n in names] + [n for n in names if n not in order]
    index = {n: i for i, n in enumerate(names)}
    values = np.full((len(names), len(names)), np.nan)
    marks = np.full(values.shape, "", dtype=object)
    for r in settings.itertuples():
        i, j = index[r.setting_a], index[r.setting_b]
        values[i, j] = values[j, i] = r.ratio
        marks[i, j] = marks[j, i] = "*" if (r.p_value < alpha and r.ci_low > 1) else ""
    text = np.where(np.isfinite(values), np.char.add(np.vectorize(lambda v: f"{v:.2f}")(np.nan_to_num(values)),
                                                     marks.astype(str)), "")
    sns.heatmap(values, ax=ax, cmap="magma_r", vmin=1 / (vmax or 2), vmax=vmax or 2, square=True, annot=text,
                fmt="", annot_kws={"fontsize": 7}, xticklabels=[run_label(n) for n in names],
                yticklabels=[run_label(n) for n in names], cbar_kws={"label": "ratio D / F"}, mask=~np.isfinite(values))
    if reference in index:
        k = index[reference]
        ax.add_patch(Rectangle((0, k), len(names), 1, fill=False, edgecolor="C0", linewidth=2))
    ax.set_xlabel(f"setting (* : p < {alpha:g} and interval above 1; blue: the reference's row)")
    ax.tick_params(axis="x", labelrotation=90, labelsize=7)
    ax.tick_params(axis="y", labelrotation=0, labelsize=7)
    return ax


def compute_to_target(compute, *, x: str = "optim.lr", hue: str = "optim.batch_size", y: str = "steps_mean",
                      ax=None):
    """Steps (or samples) each setting needed to reach each target, against ``x``, one line per ``hue`` value
    and target; offline dashed. ``compute``: rows of ``compare/compute.csv``."""
    ax = _axes(ax)
    part = compute[compute.n_reached > 0]
    hues = sorted(part[hue].dropna().unique()) if hue in part else [None]
    targets = sorted(part.target.unique(), reverse=True)
    for ti, target in enumerate(targets):
        for h in hues:
            for regime, style in (("online", "-"), ("offline", "--")):
                rows = part[(part.target == target) & (part.regime == regime)]
                if h is not None:
                    rows = rows[rows[hue] == h]
                if x not in rows or not len(rows):
                    continue
                rows = rows.sort_values(x)
                ax.plot(rows[x], rows[y], style, marker="o", color=f"C{ti}", alpha=0.4 + 0.6 * (hues.index(h) + 1)
                        / len(hues), label=f"loss {target:g}, {hue.split('.')[-1]}={h} ({regime})")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(x)
    ax.set_ylabel(y.replace("_mean", " to reach the target (mean over seeds)"))
    ax.legend(fontsize=6)
    return ax
