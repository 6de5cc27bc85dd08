"""Noise reduction mid-run (Vyas et al.): fork a noisy run at a loss target with batch x 4, and separately
with lr / 4; does its loss drop onto the curve of the run trained with that low noise from the start?

    python analysis/noise_reduction.py [--quick]

Setting: the embedded teacher image stream (small CNN, SGD with momentum 0.9, constant lr, online). A noisy
run (lr, B), its two low-noise counterparts trained from scratch, (lr, 4B) and (lr / 4, B), and forks of
the noisy run at the fork target with batch x 4 and with lr / 4 (each fork keeps the parent's weights,
optimizer state and stream position). Every run trains to the same sample budget; at least 5 seeds
(``--quick``: 8 seeds, 12,288 samples, on CPU; the full setting: 10 seeds, 60,000 samples, sized for a GPU).

Axes. Each fork is compared with its parent and counterpart on two axes, never twice on one:

- batch x 4: samples seen, and optimizer steps. The lr is unchanged, so steps are the effective time
  (sum over steps of lr_t) divided by lr: one axis, not two.
- lr / 4: samples seen, and effective time, the SDE clock of the theory (sum over steps of lr_t; a fork
  counts the parent's lr up to the fork step, then its own). The batch is unchanged, so samples and steps
  are the same axis (samples = steps x B): steps are not repeated.

Closeness (per fork, seed and axis). Take the last point all three curves reach on the axis, x_end (no
extrapolation), and the window [(1 - WINDOW) x_end, x_end]; the fork must have started before it. Each
curve's eval loss is smoothed by its mean over the window (linear interpolation between evals, averaged on
GRID_POINTS evenly spaced points), not read at one noisy eval. Then

    closeness = (parent - fork) / (parent - counterpart)

is 1 when the fork sits on the low-noise curve, 0 when it stayed on the noisy one, above 1 when it ended
below the low-noise run (a departure from the curve, not a drop onto it). A seed whose gap parent -
counterpart is at most MIN_GAP (loss units) gives no closeness (the curves are not apart to tell).

Verdict rule (fixed before the runs; constants below). Over seeds, the two-sided CONFIDENCE t-interval of
the mean closeness (scipy.stats.t, n - 1 degrees of freedom), needing at least MIN_SEEDS seeds with a
closeness:

- "drops onto the low-noise curve": the interval lies within DROPS_ONTO = [0.75, 1.25] (an equivalence
  test, TOST-style, at margin 0.25 around 1);
- "overshoots": the interval lies above 1.25 (the fork ends below the low-noise curve: a departure);
- "does not drop": the interval lies below 0.25;
- "drops part of the way": the interval lies within (0.25, 0.75);
- otherwise "inconclusive at this scale" (also when fewer than MIN_SEEDS seeds have a closeness).

The table also gives the fork's smoothed loss minus the counterpart's, with its t-interval over seeds (the
same paired seeds), in loss units.

Writes analysis/results/noise_reduction/: curves.csv (every eval of every run, with the effective time),
closeness.csv (one row per fork, seed and axis), summary.csv (one row per fork and axis: interval and
verdict) and curves.png (loss against samples, steps and effective time).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from common import interval, markdown_table, parser, results_dir, run_grid

# ----------------------------------------------------------------------------- the rule (fixed before runs)
WINDOW = 0.25            # smoothing window: the last quarter of the common range of the axis
GRID_POINTS = 64         # points on which each curve is averaged over the window
MIN_GAP = 0.02           # loss units: parent - counterpart below this gives no closeness for that seed
CONFIDENCE = 0.95        # two-sided t-interval of the mean closeness over seeds
MIN_SEEDS = 5            # seeds with a closeness needed for any verdict but "inconclusive"
DROPS_ONTO = (0.75, 1.25)
PARTIAL = (0.25, 0.75)
NO_DROP_BELOW = 0.25
OVERSHOOT_ABOVE = 1.25

SETTINGS = {
    True: dict(lr=0.02, batch=16, fork_at=2.2, seeds=tuple(range(8)),
               fixed={"data.eval_size": 512, "data.probe_size": 512, "budget.samples": 12288,
                      "checkpoint.targets": [2.2, 2.1, 2.0], "checkpoint.eval_every": 10,
                      "checkpoint.target_eval_every": 10}),
    False: dict(lr=0.02, batch=16, fork_at=2.1, seeds=tuple(range(10)),
                fixed={"budget.samples": 60000, "checkpoint.targets": [2.2, 2.1, 2.0, 1.9, 1.8],
                       "checkpoint.eval_every": 20,
                       "checkpoint.target_eval_every": 20}),
}
# each fork: its change to the noisy parent, and the axes it is compared on (see the docstring)
FORKS = {"batch x4": {"set": {"optim.batch_size": "x4"}, "axes": ("samples", "step")},
         "lr /4": {"set": {"optim.lr": "/4"}, "axes": ("samples", "effective_time")}}
AXIS_LABEL = {"samples": "samples seen", "step": "optimizer steps (= effective time / lr)",
              "effective_time": "effective time (sum of lr)"}


def train(work: Path, *, quick: bool, jobs: int | None = None) -> Path:
    s = SETTINGS[quick]
    lr, b = s["lr"], s["batch"]
    return run_grid(f"noise-reduction{'-quick' if quick else ''}", "teacher-cnn.yaml", work, jobs=jobs,
                    fixed={"log.progress": False, "budget.stop_at_last_target": False,
                           "checkpoint.eval_min_every": 4, **s["fixed"]},
                    grid={"optim.lr,optim.batch_size": [[lr, b], [lr, 4 * b], [lr / 4, b]]}, seeds=s["seeds"],
                    forks=[{"at_loss": s["fork_at"], "set": f["set"], "where": {"optim.lr": lr, "optim.batch_size": b}}
                           for f in FORKS.values()])


# ----------------------------------------------------------------------------- pure pieces


def cumulative_lr(steps, *, lr: float, fork_step: int | None = None, parent_lr: float | None = None) -> np.ndarray:
    """Effective time after ``steps`` optimizer steps at a constant lr: the sum of lr over the steps taken.

    A fork counts ``parent_lr`` for the parent's first ``fork_step`` steps, then its own ``lr``.
    """
    steps = np.asarray(steps, dtype=float)
    if fork_step is None:
        return lr * steps
    if parent_lr is None:
        raise ValueError("parent_lr: a fork's effective time needs its parent's lr; pass parent_lr=")
    return parent_lr * np.minimum(steps, fork_step) + lr * np.maximum(steps - fork_step, 0)


def window_mean(x, y, *, lo: float, hi: float, points: int = GRID_POINTS) -> float:
    """The mean of the curve (x, y), linearly interpolated between its points, over [lo, hi]."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    order = np.argsort(x, kind="stable")
    x, y = x[order], y[order]
    if not (x[0] <= lo <= hi <= x[-1]):
        raise ValueError(f"window: [{lo:g}, {hi:g}] is not inside the curve's range [{x[0]:g}, {x[-1]:g}]; "
                         "no extrapolation")
    return float(np.interp(np.linspace(lo, hi, points), x, y).mean())


def closeness_of(fork: tuple, parent: tuple, counterpart: tuple, *, window: float = WINDOW,
                 min_gap: float = MIN_GAP) -> dict:
    """Closeness of one fork on one axis, each curve an (x, loss) pair over that axis.

    Returns at (x_end), lo (the window's start), fork_loss, parent_loss, counterpart_loss (window means)
    and closeness (NaN when the gap parent - counterpart is at most ``min_gap``, or the fork starts inside
    the window).
    """
    end = float(min(np.max(fork[0]), np.max(parent[0]), np.max(counterpart[0])))
    lo = (1 - window) * end
    nan = float("nan")
    if np.min(fork[0]) > lo or np.min(parent[0]) > lo or np.min(counterpart[0]) > lo:
        return {"at": end, "lo": lo, "fork_loss": nan, "parent_loss": nan, "counterpart_loss": nan,
                "closeness": nan}
    f, p, c = (window_mean(x, y, lo=lo, hi=end) for x, y in (fork, parent, counterpart))
    gap = p - c
    return {"at": end, "lo": lo, "fork_loss": f, "parent_loss": p, "counterpart_loss": c,
            "closeness": (p - f) / gap if gap > min_gap else nan}


def t_interval(values, level: float = CONFIDENCE) -> tuple[float, float, float, int]:
    """Mean and two-sided t-interval over the finite values: (mean, low, high, n); NaN bounds when n < 2."""
    v = np.asarray(values, float)
    v = v[np.isfinite(v)]
    n = len(v)
    if n == 0:
        return float("nan"), float("nan"), float("nan"), 0
    m = float(v.mean())
    if n < 2:
        return m, float("nan"), float("nan"), n
    sem = float(stats.sem(v))
    if sem == 0:  # all seeds equal: a zero-width interval
        return m, m, m, n
    low, high = stats.t.interval(level, n - 1, loc=m, scale=sem)
    return m, float(low), float(high), n


def verdict(low: float, high: float, n: int, *, min_seeds: int = MIN_SEEDS) -> str:
    """The rule of the docstring, on the interval [low, high] of the mean closeness over ``n`` seeds."""
    if n < min_seeds or not (np.isfinite(low) and np.isfinite(high)):
        return "inconclusive at this scale"
    if DROPS_ONTO[0] <= low and high <= DROPS_ONTO[1]:
        return "drops onto the low-noise curve"
    if low > OVERSHOOT_ABOVE:
        return "overshoots (ends below the low-noise curve)"
    if high < NO_DROP_BELOW:
        return "does not drop"
    if PARTIAL[0] < low and high < PARTIAL[1]:
        return "drops part of the way"
    return "inconclusive at this scale"


def summarize(rows: pd.DataFrame) -> pd.DataFrame:
    """One row per fork and axis from closeness.csv rows: intervals over seeds and the verdict."""
    out = []
    for (fork, axis), g in rows.groupby(["fork", "axis"], sort=False):
        m, lo, hi, n = t_interval(g.closeness)
        d, dlo, dhi, _ = t_interval(g.fork_loss - g.counterpart_loss)
        out.append({"fork": fork, "axis": axis, "seeds": len(g), "seeds_with_closeness": n,
                    "fork_loss": g.fork_loss.mean(), "parent_loss": g.parent_loss.mean(),
                    "counterpart_loss": g.counterpart_loss.mean(),
                    "closeness": m, "closeness_low": lo, "closeness_high": hi,
                    "closeness_min": g.closeness.min(), "closeness_max": g.closeness.max(),
                    "fork_minus_counterpart": d, "diff_low": dlo, "diff_high": dhi,
                    "verdict": verdict(lo, hi, n)})
    return pd.DataFrame(out)


# ----------------------------------------------------------------------------- from runs to tables


def label(row, lr: float, b: int) -> str:
    if row.fork:
        return "fork: batch x4" if row.batch == 4 * b else "fork: lr /4"
    if (row.lr, row.batch) == (lr, b):
        return f"noisy (lr {lr:g}, B {b})"
    return f"low noise (lr {row.lr:g}, B {row.batch})"


def with_effective_time(curves: pd.DataFrame, sweep_dir: Path) -> pd.DataFrame:
    """Add ``effective_time`` (sum of lr over the steps taken) and ``fork_step`` from each run's config.

    A fork's config gives its parent's directory and loss target; the parent's checkpoint meta gives the
    fork step, and the parent's config its lr.
    """
    from goldenpath.store import rundir as ckpt
    from goldenpath.config import load_config

    def constant(c, where):
        if c.optim.schedule != "constant" or c.optim.warmup:
            raise SystemExit(f"optim.schedule: {where} has schedule {c.optim.schedule!r}, warmup {c.optim.warmup}; "
                             "effective time here needs optim.schedule=constant optim.warmup=0")

    parts = []
    for run, g in curves.groupby("run", sort=False):
        c = load_config(ckpt.RunDir(Path(sweep_dir) / run).config)
        constant(c, run)
        fork_step, parent_lr = None, None
        if c.fork.parent is not None:
            parent = ckpt.RunDir(c.fork.parent)
            if not parent.exists():  # the sweep was moved: the parent sits beside the fork
                parent = ckpt.RunDir(Path(sweep_dir) / parent.name)
            pc = load_config(parent.config)
            constant(pc, parent.name)
            point = parent.checkpoint(at_loss=c.fork.at_loss, at_step=c.fork.at_step)
            if not (point / ckpt.META).exists():
                raise SystemExit(f"fork.parent: {point / ckpt.META} is missing; re-run the sweep so the fork's "
                                 "parent keeps its fork checkpoint")
            fork_step, parent_lr = int(ckpt.read_meta(point)["step"]), pc.optim.lr
        parts.append(g.assign(effective_time=cumulative_lr(g.step, lr=c.optim.lr, fork_step=fork_step,
                                                           parent_lr=parent_lr),
                              fork_step=fork_step if fork_step is not None else np.nan))
    return pd.concat(parts, ignore_index=True)


def closeness(curves: pd.DataFrame, lr: float, b: int) -> pd.DataFrame:
    """One row per fork, seed and axis (the axes of FORKS): window-mean losses and the closeness."""
    rows = []
    counterparts = {"batch x4": f"low noise (lr {lr:g}, B {4 * b})", "lr /4": f"low noise (lr {lr / 4:g}, B {b})"}
    for seed, part in curves.groupby("seed"):
        runs = {k: g.sort_values("step") for k, g in part.groupby("curve")}
        parent = runs.get(f"noisy (lr {lr:g}, B {b})")
        for name, spec in FORKS.items():
            fork, counter = runs.get(f"fork: {name}"), runs.get(counterparts[name])
            if fork is None or counter is None or parent is None:
                continue
            for axis in spec["axes"]:
                r = closeness_of(*((g[axis].to_numpy(float), g.eval_loss.to_numpy(float))
                                   for g in (fork, parent, counter)))
                rows.append({"fork": f"fork: {name}", "counterpart": counterparts[name], "seed": seed,
                             "axis": axis, **r})
    return pd.DataFrame(rows)


def plot(curves: pd.DataFrame, out: Path, fork_at: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted(curves.curve.unique(), key=lambda n: (n.startswith("fork"), n))
    colours = dict(zip(names, plt.get_cmap("tab10").colors))
    first = curves.seed.min()
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    for ax, axis in zip(axes, ("samples", "step", "effective_time")):
        for (name, seed), g in curves.groupby(["curve", "seed"]):
            g = g[g[axis] > 0].sort_values("step")
            ax.plot(g[axis], g.eval_loss, color=colours[name], linewidth=1.2 if name.startswith("fork") else 0.7,
                    linestyle="-" if name.startswith("fork") else "--", alpha=0.7,
                    label=name if seed == first else None)
        ax.axhline(fork_at, color="0.6", linewidth=0.6)
        ax.set_xscale("log")
        ax.set_xlabel({"step": "optimizer steps"}.get(axis, AXIS_LABEL[axis]))
        ax.set_ylabel("eval loss")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=110)
    plt.close(fig)


def section(results: Path) -> str:
    """The README block: closeness per fork and axis (mean, t-interval and range over seeds), and the verdict."""
    s = summarize(pd.read_csv(Path(results) / "closeness.csv"))
    table = pd.DataFrame({
        "fork": s.fork, "axis": s.axis.map(AXIS_LABEL),
        "seeds": [f"{k}/{n}" for k, n in zip(s.seeds_with_closeness, s.seeds)],
        "fork loss": s.fork_loss, "noisy parent": s.parent_loss, "low-noise run": s.counterpart_loss,
        "fork - low-noise [95% CI]": [interval(d, lo, hi, 3) for d, lo, hi in zip(s.fork_minus_counterpart,
                                                                                     s.diff_low, s.diff_high)],
        "closeness [95% CI]": [interval(m, lo, hi) for m, lo, hi in zip(s.closeness, s.closeness_low,
                                                                         s.closeness_high)],
        "range": [f"{lo:.2f} to {hi:.2f}" for lo, hi in zip(s.closeness_min, s.closeness_max)],
    })
    lines = [f"Losses are means over the last {WINDOW:.0%} of the range all three curves reach on each axis "
             "(mean over seeds); closeness 1 = on the low-noise curve, 0 = still on the noisy one, above 1 = below "
             "the low-noise curve. Intervals: 95% t-intervals over seeds. For lr /4 samples and steps are the "
             "same axis (batch unchanged); for batch x4 steps are effective time / lr (lr unchanged).", "",
             markdown_table(table), "",
             f"Rule (fixed before the runs): drops onto when the CI lies within [{DROPS_ONTO[0]}, {DROPS_ONTO[1]}]; "
             f"overshoots when above {OVERSHOOT_ABOVE}; does not drop when below {NO_DROP_BELOW}; part of the way "
             f"when within ({PARTIAL[0]}, {PARTIAL[1]}); otherwise inconclusive at this scale.", "", "Verdicts:", ""]
    lines += [f"- **{r.fork}**, against {AXIS_LABEL[r.axis]}: {r.verdict}." for r in s.itertuples()]
    return "\n".join(lines)


def main() -> None:
    args = parser(__doc__).parse_args()
    s = SETTINGS[args.quick]
    out = results_dir("noise_reduction")
    sweep_dir = train(Path(args.work), quick=args.quick, jobs=args.jobs)
    from goldenpath.draw.curves import sweep_curves

    curves = sweep_curves(sweep_dir)
    curves["curve"] = [label(r, s["lr"], s["batch"]) for r in curves.itertuples()]
    curves = with_effective_time(curves.drop(columns=["tokens"]), sweep_dir)
    curves.to_csv(out / "curves.csv", index=False)
    rows = closeness(curves, s["lr"], s["batch"])
    rows.to_csv(out / "closeness.csv", index=False)
    summarize(rows).to_csv(out / "summary.csv", index=False)
    plot(curves, out, s["fork_at"])
    print(section(out))
    print(out)


if __name__ == "__main__":
    main()
