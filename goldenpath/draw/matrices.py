"""Heatmaps of a compared sweep's matrices: the run x run distances and the setting x setting golden-path
ratios (one target and metric each), with the readable labels they share. Like every function of
:mod:`goldenpath.draw.plots` (which re-exports these), each takes a table and keyword-only options, draws on
``ax`` (a new figure when None) and returns the Axes.
"""

from __future__ import annotations

import numpy as np


def _axes(ax):
    if ax is None:
        import matplotlib.pyplot as plt

        _, ax = plt.subplots()
    return ax


def run_label(name: str) -> str:
    """A run name made readable: ``lr=0.02_bs=16_seed=0`` -> ``lr=0.02 bs=16 seed=0``."""
    return name.replace("_", " ").replace("+fork-", " > fork ")


def short_labels(names) -> dict[str, str]:
    """Readable labels without the ``key=value`` parts every name shares (``n=none`` when no run is offline)."""
    parts = {n: run_label(n).split(" ") for n in names}
    common = set.intersection(*(set(p) for p in parts.values())) if len(parts) > 1 else set()
    return {n: " ".join(t for t in p if not ("=" in t and t in common)) or run_label(n) for n, p in parts.items()}


def _matrix_rows(names, order):
    """The rows of a matrix: ``order`` as given (absent names are blank rows, so targets line up), then the rest."""
    return list(order) + sorted(n for n in names if n not in order) if order is not None else sorted(names)


def _blocks(ax, names, regimes):
    """Black lines between the online and offline blocks of a matrix, each block named above it."""
    kinds = [(regimes or {}).get(n) for n in names]
    if len(set(kinds)) < 2:
        return
    start = 0
    for k in range(1, len(names) + 1):
        if k == len(names) or kinds[k] != kinds[start]:
            ax.annotate(kinds[start] or "", ((start + k) / 2, 0), xytext=(0, 2), textcoords="offset points",
                        ha="center", va="bottom", fontsize=8, fontweight="bold")
            if k < len(names):
                ax.axhline(k, color="k", linewidth=2)
                ax.axvline(k, color="k", linewidth=2)
            start = k


def _mark_reference(ax, names, members):
    """The reference's rows and columns outlined in blue and its tick labels in bold blue (lines, not patches)."""
    idx = [i for i, n in enumerate(names) if n in members]
    if not idx:
        return
    lo, hi, n = min(idx), max(idx) + 1, len(names)
    ax.plot([0, n, n, 0, 0], [lo, lo, hi, hi, lo], color="C0", linewidth=1.8)
    ax.plot([lo, hi, hi, lo, lo], [0, 0, n, n, 0], color="C0", linewidth=1.8)
    for labels in (ax.get_xticklabels(), ax.get_yticklabels()):
        for i in idx:
            labels[i].set_color("C0")
            labels[i].set_fontweight("bold")


def _matrix(ax, values, *, labels, mask, norm, cmap, cbar: bool, label: str, annot=None, fontsize: float = 7):
    """A square matrix as one QuadMesh (row 0 at the top), every row and column labelled, optional cell text."""
    from matplotlib.colors import LogNorm, Normalize

    ax.pcolormesh(np.ma.masked_array(values, mask), cmap=cmap, norm=norm or Normalize())
    n = len(labels)
    ax.set(xlim=(0, n), ylim=(n, 0), aspect="equal")
    ax.set_xticks(np.arange(n) + 0.5, labels, rotation=90, fontsize=7)
    ax.set_yticks(np.arange(n) + 0.5, labels, fontsize=7)
    ax.tick_params(length=0)
    for side in ax.spines.values():
        side.set_visible(False)
    mesh = ax.collections[-1]
    if cbar:
        bar = ax.figure.colorbar(mesh, ax=ax, label=label, shrink=0.6)
        bar.outline.set_linewidth(0)
        if isinstance(mesh.norm, LogNorm):  # plain ticks, not powers of ten
            bar.set_ticks(ratio_ticks(mesh.norm.vmax), labels=[f"{t:g}" for t in ratio_ticks(mesh.norm.vmax)])
            bar.minorticks_off()
    if annot is not None:
        colours = mesh.cmap(mesh.norm(np.ma.masked_array(values, mask)))
        for i, j in zip(*np.nonzero(~mask)):
            dark = np.dot(colours[i, j, :3], [0.299, 0.587, 0.114]) < 0.5
            ax.text(j + 0.5, i + 0.5, annot[i, j], ha="center", va="center", fontsize=fontsize,
                    color="white" if dark else "black")
    return mesh


def distance_heatmap(frame, *, order: list[str] | None = None, reference: str | None = None,
                     regimes: dict | None = None, vmin: float | None = None, vmax: float | None = None,
                     cbar: bool = True, ax=None, cmap: str = "viridis"):
    """The run-by-run matrix of one target's and one metric's distances; seed-floor pairs outlined in white,
    the runs of the ``reference`` setting in blue, online and offline blocks (``regimes``: run -> regime)
    apart. The diagonal (a run with itself) is blank and out of the colour scale; pass ``vmin``/``vmax`` to
    share one scale across targets.

    ``frame``: rows of ``compare/distances.parquet`` for one target and metric (run_a, run_b, value, kind).
    """
    from matplotlib.colors import Normalize
    from matplotlib.patches import Rectangle

    ax = _axes(ax)
    runs = _matrix_rows(set(frame["run_a"]) | set(frame["run_b"]), order)
    index = {r: i for i, r in enumerate(runs)}
    matrix = np.full((len(runs), len(runs)), np.nan)
    np.fill_diagonal(matrix, 0.0)
    floors = []
    for row in frame.itertuples():
        i, j = index[row.run_a], index[row.run_b]
        matrix[i, j] = matrix[j, i] = row.value
        if row.kind == "floor":
            floors += [(i, j), (j, i)]
    labels = short_labels(runs)
    metric = frame["metric"].iloc[0] if len(frame) else "distance"
    _matrix(ax, matrix, labels=[labels[r] for r in runs], mask=np.eye(len(runs), dtype=bool) | np.isnan(matrix),
            norm=Normalize(vmin, vmax), cmap=cmap, cbar=cbar, label=metric)
    for i, j in floors:
        ax.add_patch(Rectangle((j, i), 1, 1, fill=False, edgecolor="white", linewidth=1.2))
    if "setting_a" in frame and reference is not None:
        members = set(frame.run_a[frame.setting_a == reference]) | set(frame.run_b[frame.setting_b == reference])
        _mark_reference(ax, runs, members)
    _blocks(ax, runs, regimes)
    ax.set_xlabel("run (white outline: same knobs, another seed = seed floor; blue: the reference's seeds)")
    ax.set_ylabel("run")
    return ax


def ratio_norm(vmax: float = 2.0):
    """The colour scale of golden-path ratios: logarithmic, symmetric about 1 (1 / vmax .. vmax)."""
    from matplotlib.colors import LogNorm

    return LogNorm(vmin=1 / vmax, vmax=vmax)


def ratio_ticks(vmax: float) -> list[float]:
    return [t for t in (0.1, 0.2, 0.25, 0.33, 0.5, 0.67, 0.8, 1, 1.25, 1.5, 2, 3, 4, 5, 10) if 1 / vmax <= t <= vmax]


RATIO_CMAP = "RdBu_r"  # white at ratio 1 (as far apart as seeds), red above, blue below
SINGLE_SEED = "0.85"   # the grey of a ratio whose setting has one seed: no floor of its own, out of the verdicts


def ratio_matrix(settings, *, order: list[str] | None = None, reference: str | None = None, alpha: float = 0.05,
                 vmax: float | None = None, cbar: bool = True, ax=None):
    """The setting x setting matrix of golden-path ratios at one target and metric, on a log scale symmetric
    about 1 (``vmax``: share it across targets); ``*`` where the permutation p-value is below ``alpha`` and
    the interval lies above 1; grey, out of the colour scale, where a setting has a single seed (``n_a`` or
    ``n_b`` below 2: no floor of its own, left out of the verdicts); the reference outlined in blue; online
    and offline blocks apart; the diagonal blank. ``order``: the rows as given (a setting absent at this
    target is a blank row).

    ``settings``: rows of ``compare/settings.csv`` for one target and metric.
    """
    ax = _axes(ax)
    names = _matrix_rows(set(settings.setting_a) | set(settings.setting_b), order)
    index = {n: i for i, n in enumerate(names)}
    values = np.full((len(names), len(names)), np.nan)
    marks = np.full(values.shape, "", dtype=object)
    single = np.zeros(values.shape, dtype=bool)
    regimes = {}
    for r in settings.itertuples():
        i, j = index[r.setting_a], index[r.setting_b]
        values[i, j] = values[j, i] = r.ratio
        single[i, j] = single[j, i] = min(getattr(r, "n_a", 2), getattr(r, "n_b", 2)) < 2
        marks[i, j] = marks[j, i] = "*" if (r.p_value < alpha and r.ci_low > 1) else ""
        regimes.update({r.setting_a: getattr(r, "regime_a", None), r.setting_b: getattr(r, "regime_b", None)})
    text = np.where(np.isfinite(values), np.char.add(np.vectorize(lambda v: f"{v:.2f}")(np.nan_to_num(values)),
                                                     marks.astype(str)), "")
    labels = short_labels(names)
    size = 7 if len(names) <= 10 else 6 if len(names) <= 14 else 5
    _matrix(ax, np.nan_to_num(values, nan=1.0), labels=[labels[n] for n in names], mask=~np.isfinite(values) | single,
            norm=ratio_norm(vmax or 2.0), cmap=RATIO_CMAP, cbar=cbar, label="ratio D / F (log scale)", annot=text,
            fontsize=size)
    if single.any():
        from matplotlib.colors import ListedColormap

        ax.pcolormesh(np.ma.masked_array(np.zeros(values.shape), ~single), cmap=ListedColormap([SINGLE_SEED]))
        for i, j in zip(*np.nonzero(single & np.isfinite(values))):
            ax.text(j + 0.5, i + 0.5, f"{values[i, j]:.2f}", ha="center", va="center", fontsize=size, color="0.45")
    _mark_reference(ax, names, {reference})
    _blocks(ax, names, regimes)
    ax.set_xlabel(f"setting (* : p < {alpha:g} and interval above 1; blue: the reference; grey: one seed)")
    return ax
