"""A sweep's learning curves as tables: every eval of every run (:func:`sweep_curves`), the seed bands of
each setting against samples (:func:`seed_bands`), and error against loss in bins (:func:`error_by_loss`).
Computed here, drawn by :mod:`goldenpath.draw.plots`, laid out by :mod:`goldenpath.draw.report`.
"""

from __future__ import annotations

import warnings as _warnings
from pathlib import Path

import numpy as np
import pandas as pd

from goldenpath.store import rundir as ckpt
from goldenpath.config import load_config
from goldenpath.config.identity import NOISE_KNOBS, curve_knobs, setting_label

KNOBS = ("regime", *NOISE_KNOBS, "fork")


def sweep_curves(sweep_dir: str | Path) -> pd.DataFrame:
    """One row per run and evaluation: run, step, samples, tokens, eval_loss, eval_error and the run's knobs."""
    rows = []
    for run_dir in sorted(p.parent for p in Path(sweep_dir).glob("*/metrics.jsonl")):
        run = ckpt.RunDir(run_dir)
        if not run.exists():
            continue
        c = load_config(run.config)
        knobs = curve_knobs(c)
        for r in ckpt.read_metrics(run_dir):
            if "eval_loss" in r:
                rows.append({"run": run_dir.name, "step": r["step"], "samples": r["samples"],
                             "tokens": r.get("tokens", 0), "eval_loss": r["eval_loss"],
                             "eval_error": r.get("eval_error"), **knobs})
    return pd.DataFrame(rows)


def _finite(curves: pd.DataFrame) -> pd.DataFrame:
    loss = pd.to_numeric(curves.eval_loss, errors="coerce")
    return curves[np.isfinite(loss)].assign(eval_loss=loss, setting=curves.run.map(setting_label))


def seed_bands(curves: pd.DataFrame, *, x: str = "samples", points: int = 80) -> pd.DataFrame:
    """Eval loss against ``x`` per setting (a run name without its seed): the mean, min and max over the seeds
    still running, each seed interpolated in log ``x`` onto ``points`` log-spaced values (x > 0).

    Returns one row per setting and grid point: setting, ``x``, mean, low, high, n_seeds and the knobs.
    """
    rows = []
    for setting, part in _finite(curves[curves[x] > 0]).groupby("setting", sort=False):
        grid = np.geomspace(part[x].min(), part[x].max(), points)
        seeds = []
        for _, run in part.groupby("run"):
            run = run.drop_duplicates(x, keep="last").sort_values(x)
            v = np.interp(np.log(grid), np.log(run[x].to_numpy(float)), run.eval_loss.to_numpy(float))
            v[(grid < run[x].min()) | (grid > run[x].max())] = np.nan
            seeds.append(v)
        v = np.vstack(seeds)
        n = np.isfinite(v).sum(0)
        with _warnings.catch_warnings():
            _warnings.simplefilter("ignore", RuntimeWarning)
            table = pd.DataFrame({x: grid, "mean": np.nanmean(v, 0), "low": np.nanmin(v, 0),
                                  "high": np.nanmax(v, 0), "n_seeds": n})[n > 0]
        rows.append(table.assign(setting=setting, **{k: part[k].iloc[0] for k in KNOBS}))
    return pd.concat(rows, ignore_index=True) if rows else pd.DataFrame()


def error_by_loss(curves: pd.DataFrame, *, bins: int = 30) -> pd.DataFrame:
    """Eval error in ``bins`` equal bins of eval loss (up to the highest starting loss) per setting: each
    seed's mean in a bin, then the mean, min and max over seeds.

    Returns one row per setting and bin holding evals: setting, eval_loss (the bin's centre), mean, low,
    high, n_seeds and the knobs.
    """
    part = _finite(curves.dropna(subset=["eval_error"]))
    top = part.sort_values("step").groupby("run").eval_loss.first().max()
    part = part[part.eval_loss <= top]
    if not len(part):
        return pd.DataFrame()
    edges = np.linspace(part.eval_loss.min(), top, bins + 1)
    part = part.assign(bin=np.clip(np.digitize(part.eval_loss, edges) - 1, 0, bins - 1))
    per_seed = part.groupby(["setting", "run", "bin"], sort=False).eval_error.mean().reset_index()
    table = per_seed.groupby(["setting", "bin"], sort=False).eval_error.agg(
        mean="mean", low="min", high="max", n_seeds="count").reset_index()
    table["eval_loss"] = (edges[table.bin] + edges[table.bin + 1]) / 2
    knobs = part.groupby("setting")[list(KNOBS)].first()
    return table.drop(columns="bin").join(knobs, on="setting")
