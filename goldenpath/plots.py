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
        sigma = c.noise.sigma if c.noise.kind != "none" else 0.0
        return (c.data.epochs, c.optim.lr, c.optim.batch_size, sigma, c.fork.parent or "", c.seed, name)

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
