"""The figures of a compared sweep, as PNG files under ``figures/``, drawn from the ``compare/`` tables.

    goldenpath compare SWEEP_DIR      # writes the tables, then these figures

- ``heatmap-<metric>-target-<loss>.png``: the run x run distances (seed floors outlined; tv by default);
- ``ratios-<metric>-target-<loss>.png``: the setting x setting golden-path ratios, significant ones marked;
- ``compute-to-target.png``: the optimizer steps each setting needed to reach each target.

The matrices of one metric share one colour scale across targets; the reference is marked, online and
offline blocks are apart. ``ratio_grid`` puts a metric's ratio matrices on one figure (the report's view).
"""

from __future__ import annotations

import math
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from goldenpath.store import files
from goldenpath.draw import plots

DPI = 110


def figure(draw, size, *, panels: int = 1):
    """A matplotlib figure of ``size`` inches drawn by ``draw(ax)`` (``draw(axes)`` with ``panels`` > 1, side
    by side, one y axis)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, panels, figsize=size, sharey=panels > 1, squeeze=False)
    draw(axes[0, 0] if panels == 1 else list(axes[0]))
    fig.tight_layout()
    return fig


def save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    files.atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=DPI, format="png", bbox_inches="tight"))
    plt.close(fig)
    return path


def matrix_size(n: int, *, cell: float = 0.45) -> tuple[float, float]:
    """Inches for an n x n matrix with legible labels: cells of ``cell`` inches, smaller past 8 inches of cells."""
    cell = min(cell, 8.0 / max(n, 1))
    return 3.4 + cell * n, 2.8 + cell * n


def counted(settings: pd.DataFrame) -> pd.DataFrame:
    """The rows of ``settings.csv`` whose settings both have two seeds or more: the ones a verdict can use
    (a single seed has no floor of its own). A ratio matrix greys the others out of its colour scale."""
    if not {"n_a", "n_b"} <= set(settings.columns):
        return settings
    return settings[(settings.n_a >= 2) & (settings.n_b >= 2)]


def ratio_limit(ratios) -> float:
    """The top of a ratio colour scale shared by several matrices: the largest ratio or inverse ratio,
    between 1.25 and 10."""
    r = np.asarray(ratios, dtype=float)
    r = r[np.isfinite(r) & (r > 0)]
    return float(np.clip(np.exp(np.abs(np.log(r)).max()), 1.25, 10.0)) if len(r) else 2.0


def value_limits(values) -> tuple[float | None, float | None]:
    """(min, max) of the finite values: one colour scale for every target of a metric."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    return (float(v.min()), float(v.max())) if len(v) else (None, None)


def references(summary: pd.DataFrame, metric: str) -> dict[float, str]:
    """The reference setting at each target of ``metric`` (``summary.csv``), highest target first."""
    part = summary[summary.metric == metric]
    return part.groupby("target").reference.first().sort_index(ascending=False).to_dict()


def setting_order(summary: pd.DataFrame, metric: str | None = None) -> list[str]:
    """The settings of ``summary.csv`` in compare's order (least noisy first), online ones before offline."""
    part = summary if metric is None else summary[summary.metric == metric]
    offline = set(part.setting[part.regime == "offline"])
    return sorted(dict.fromkeys(part.setting), key=lambda s: s in offline)


def heatmap_order(configs: dict, present, regimes: dict) -> list[str]:
    """The runs of a run x run heatmap: online before offline, each from least to most noisy setting
    (:func:`goldenpath.draw.plots.run_order`); runs ``present`` without a config last, by name."""
    known = sorted((r for r in plots.run_order(configs) if r in present), key=lambda r: regimes.get(r) == "offline")
    return known + sorted(set(present) - set(known))


def run_regimes(distances: pd.DataFrame, settings: pd.DataFrame) -> dict[str, str]:
    """run -> online/offline, from the settings' regimes (``settings.csv``) and the runs' settings."""
    regime = {}
    for side in ("a", "b"):
        if f"regime_{side}" in settings:
            regime.update(zip(settings[f"setting_{side}"], settings[f"regime_{side}"]))
    out = {}
    for side in ("a", "b"):
        out.update({r: regime.get(s) for r, s in zip(distances[f"run_{side}"], distances[f"setting_{side}"])})
    return out


def ratio_grid(settings: pd.DataFrame, *, order: list[str], refs: dict[float, str], columns: int = 2):
    """One metric's setting x setting ratio matrices, one panel per target (highest loss first, the order of
    training), on one colour scale; every panel has the same rows (``order``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.cm import ScalarMappable

    targets = sorted(settings.target.unique(), reverse=True)
    n = len(order)
    cell = min(0.5, 4.6 / max(n, 1))
    cols = min(columns, len(targets))
    rows = math.ceil(len(targets) / cols)
    fig, axes = plt.subplots(rows, cols, squeeze=False, layout="constrained",
                             figsize=(2.4 + cols * (cell * n + 0.3) + 0.9, rows * (cell * n + 0.6) + 2.2))
    vmax = ratio_limit(counted(settings).ratio)
    for k, target in enumerate(targets):
        ax = axes.flat[k]
        plots.ratio_matrix(settings[settings.target == target], order=order, reference=refs.get(target),
                           vmax=vmax, cbar=False, ax=ax)
        ax.set_title(f"loss {target:g}", fontsize=10, pad=14)
        ax.set_xlabel("")
        if k % cols:
            ax.tick_params(labelleft=False)
        if k + cols < len(targets):
            ax.tick_params(labelbottom=False)
    for ax in list(axes.flat)[len(targets):]:
        ax.axis("off")
    bar = fig.colorbar(ScalarMappable(norm=plots.ratio_norm(vmax), cmap=plots.RATIO_CMAP), ax=axes, shrink=0.6,
                       label="ratio D / F (log scale)")
    bar.set_ticks(plots.ratio_ticks(vmax), labels=[f"{t:g}" for t in plots.ratio_ticks(vmax)])
    bar.minorticks_off()
    fig.supxlabel("* : p < 0.05 and interval above 1;  blue: the reference;  grey: one seed, out of the verdicts;  "
                  "blank: not compared", fontsize=8)
    return fig


def write_figures(sweep_dir: str | Path, *, run_order: list[str] | None = None,
                  heatmap_metrics=("tv",)) -> list[Path]:
    """The figures of ``compare/``'s tables (run x run heatmaps for ``heatmap_metrics`` only: they are the
    slow ones), with a progress bar over them; returns their paths."""
    sweep_dir = Path(sweep_dir)
    tables, out = sweep_dir / "compare", sweep_dir / "figures"
    out.mkdir(parents=True, exist_ok=True)
    distances = pd.read_parquet(tables / "distances.parquet")
    summary = _read(tables / "summary.csv")
    settings = _read(tables / "settings.csv")
    regimes = run_regimes(distances, settings) if len(settings) else {}
    jobs = []  # (file name, () -> figure), listed first so that the bar knows how many
    if run_order is None:  # as the report orders them: online and offline blocks apart, least noisy first
        from goldenpath.config import load_config

        present = set(distances.run_a) | set(distances.run_b)
        configs = {r: load_config(sweep_dir / r / "config.yaml") for r in present
                   if (sweep_dir / r / "config.yaml").exists()}
        run_order = heatmap_order(configs, present, regimes)
    for metric in heatmap_metrics:
        part = distances[distances.metric == metric]
        vmin, vmax = value_limits(part.value)
        refs = references(summary, metric) if len(summary) else {}
        for target, rows in sorted(part.groupby("target"), key=lambda kv: -kv[0]):
            runs = set(rows.run_a) | set(rows.run_b)
            jobs.append((f"heatmap-{metric}-target-{target:g}.png", partial(
                _heatmap, rows, title=f"{metric} at eval loss {target:g}", reference=refs.get(target),
                order=[r for r in run_order if r in runs] if run_order else None, regimes=regimes, vmin=vmin,
                vmax=vmax)))
    for metric, part in settings.groupby("metric", sort=False) if len(settings) else []:
        refs, vmax = references(summary, metric), ratio_limit(counted(part).ratio)
        order = setting_order(summary, metric) if len(summary) else None
        for target, rows in sorted(part.groupby("target"), key=lambda kv: -kv[0]):
            jobs.append((f"ratios-{metric}-target-{target:g}.png", partial(
                _ratios, rows, title=f"golden-path ratio ({metric}) at eval loss {target:g}",
                reference=refs.get(target), order=order, vmax=vmax)))
    compute = _read(tables / "compute.csv")
    if len(compute):
        jobs.append(("compute-to-target.png",
                     partial(figure, lambda ax: plots.compute_to_target(compute, ax=ax), (7, 4.5))))
    bar = tqdm(jobs, desc=f"figures {sweep_dir.name}", unit="figure", disable=None)
    return [save(draw(), out / name) for name, draw in bar]


def _heatmap(rows: pd.DataFrame, *, title: str, order, **options):
    n = len(set(rows.run_a) | set(rows.run_b))
    fig = figure(lambda ax: plots.distance_heatmap(rows, order=order, ax=ax, **options), matrix_size(n, cell=0.3))
    fig.axes[0].set_title(title, pad=16)
    return fig


def _ratios(rows: pd.DataFrame, *, title: str, order, **options):
    n = len(order or set(rows.setting_a) | set(rows.setting_b))
    fig = figure(lambda ax: plots.ratio_matrix(rows, order=order, ax=ax, **options), matrix_size(n))
    fig.axes[0].set_title(title, pad=16)
    return fig


def _read(path: Path) -> pd.DataFrame:
    try:
        return pd.read_csv(path)
    except (FileNotFoundError, pd.errors.EmptyDataError):
        return pd.DataFrame()


# ----------------------------------------------------------------------------- goldenpath toys, goldenpath noise


def write_toy_figure(frame: pd.DataFrame, which: str, path: Path) -> Path:
    """``figure.png`` of a toy's table: alpha_eff, fit residual, l1 norm and recovery error against sigma
    (dln), or the null-space spread against the exact law (lls)."""
    if which == "dln":
        panels = ("alpha_eff", "fit_residual", "l1", "recovery_error")

        def draw(axes):
            for ax, metric in zip(axes, panels):
                plots.toys_metric(frame, metric=metric, ax=ax, log=metric == "alpha_eff")

        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.4))
        draw(list(axes))
        fig.tight_layout()
    else:
        fig = figure(lambda ax: plots.null_space_spread(frame, ax=ax), (5, 3.4))
    return save(fig, path)


def write_noise_figures(table: pd.DataFrame, noise: np.ndarray, out: Path, *, title: str) -> list[Path]:
    """``<checkpoint>-tail-index.png``, ``-histogram.png`` and ``-qq.png`` of a goldenpath noise table."""
    from goldenpath.gradnoise.estimators import qq_data

    name = table.attrs["checkpoint"]
    pooled = table[(table.layer == "all") & (table.statistic == "tail_index_pooled")].value.iloc[0]
    draws = {"tail-index": lambda ax: plots.tail_index_by_layer(table, ax=ax),
             "histogram": lambda ax: plots.noise_histogram(noise, alpha=pooled, ax=ax),
             "qq": lambda ax: plots.qq_plot(*qq_data(noise), ax=ax)}
    paths = []
    for kind, draw in draws.items():
        def titled(ax, draw=draw, kind=kind):
            draw(ax)
            ax.set_title(f"{title} at {name}: {kind}", fontsize=8)
        paths.append(save(figure(titled, (6, 4)), out / f"{name}-{kind}.png"))
    return paths

