"""The figures of a compared sweep, as PNG files under ``figures/``, drawn from the ``compare/`` tables.

    goldenpath compare SWEEP_DIR      # writes the tables, then these figures

- ``heatmap-<metric>-target-<loss>.png``: the run x run distances (seed floors outlined; tv by default);
- ``ratios-<metric>-target-<loss>.png``: the setting x setting golden-path ratios, significant ones marked;
- ``compute-to-target.png``: the optimizer steps each setting needed to reach each target.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from goldenpath import checkpoints as ckpt
from goldenpath import plots

DPI = 110


def figure(draw, size):
    """A matplotlib figure of ``size`` inches drawn by ``draw(ax)``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=size)
    draw(ax)
    fig.tight_layout()
    return fig


def save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    ckpt.atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=DPI, format="png", bbox_inches="tight"))
    plt.close(fig)
    return path


def matrix_size(n: int) -> tuple[float, float]:
    """Inches for an n x n matrix with legible labels."""
    return 3.0 + 0.45 * n, 2.4 + 0.4 * n


def write_figures(sweep_dir: str | Path, *, run_order: list[str] | None = None,
                  heatmap_metrics=("tv",)) -> list[Path]:
    """The figures of ``compare/``'s tables (run x run heatmaps for ``heatmap_metrics`` only: they are the
    slow ones); returns their paths."""
    sweep_dir = Path(sweep_dir)
    tables, out = sweep_dir / "compare", sweep_dir / "figures"
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    distances = pd.read_parquet(tables / "distances.parquet")
    for (target, metric), part in distances[distances.metric.isin(list(heatmap_metrics))].groupby(["target", "metric"]):
        n = len(set(part.run_a) | set(part.run_b))
        fig = figure(lambda ax, p=part: plots.distance_heatmap(p, order=run_order, ax=ax), matrix_size(n))
        fig.axes[0].set_title(f"{metric} at eval loss {target:g}")
        paths.append(save(fig, out / f"heatmap-{metric}-target-{target:g}.png"))
    summary = _read(tables / "summary.csv")
    settings = _read(tables / "settings.csv")
    order = list(dict.fromkeys(summary.setting)) if len(summary) else None
    for (target, metric), part in settings.groupby(["target", "metric"]) if len(settings) else []:
        ref = summary[(summary.target == target) & (summary.metric == metric)].reference
        n = len(set(part.setting_a) | set(part.setting_b))
        fig = figure(lambda ax, p=part: plots.ratio_matrix(p, order=order, reference=ref.iloc[0] if len(ref) else None,
                                                           ax=ax), matrix_size(n))
        fig.axes[0].set_title(f"golden-path ratio ({metric}) at eval loss {target:g}")
        paths.append(save(fig, out / f"ratios-{metric}-target-{target:g}.png"))
    compute = _read(tables / "compute.csv")
    if len(compute):
        paths.append(save(figure(lambda ax: plots.compute_to_target(compute, ax=ax), (7, 4.5)),
                          out / "compute-to-target.png"))
    return paths


def _read(path: Path) -> pd.DataFrame:
    try:
        return pd.read_csv(path)
    except (FileNotFoundError, pd.errors.EmptyDataError):
        return pd.DataFrame()
