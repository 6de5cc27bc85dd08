"""Noise reduction mid-run (Vyas et al.): fork a noisy run at a loss target with batch x 4, and separately
with lr / 4; does its loss drop onto the curve of the run trained with that low noise from the start?

    python analysis/noise_reduction.py [--quick]

On the embedded teacher image stream (small CNN, SGD with momentum, online): a noisy run (lr, B), its two
low-noise counterparts trained from scratch, (lr, 4B) and (lr / 4, B), and forks of the noisy run at the
fork target with batch x 4 and with lr / 4 (each fork keeps the parent's weights, optimizer state and
stream position). Every run trains to the same sample budget; 3 seeds.

At the end of each fork (or the last point its counterpart reaches), its eval loss is placed between the
noisy parent's and its counterpart's at the same samples seen, and at the same optimizer steps: closeness = (parent - fork) / (parent - counterpart),
1 when the fork has dropped onto the low-noise curve, 0 when it stayed on the noisy one.

Writes analysis/results/noise_reduction/: curves.csv (every eval of every run), closeness.csv (one row per
fork, seed and axis) and curves.png (loss against samples and against steps).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from common import markdown_table, parser, results_dir, run_grid

SETTINGS = {
    True: dict(lr=0.02, batch=16, fork_at=2.2, seeds=(0, 1, 2),
               fixed={"data.eval_size": 512, "data.probe_size": 512, "budget.samples": 12288,
                      "checkpoint.targets": [2.2, 2.1, 2.0], "checkpoint.eval_every": 10}),
    False: dict(lr=0.02, batch=16, fork_at=2.1, seeds=(0, 1, 2, 3, 4),
                fixed={"budget.samples": 60000, "checkpoint.targets": [2.2, 2.1, 2.0, 1.9, 1.8],
                       "checkpoint.eval_every": 20}),
}
FORKS = {"batch x4": {"optim.batch_size": "x4"}, "lr /4": {"optim.lr": "/4"}}


def train(work: Path, *, quick: bool, jobs: int | None = None) -> Path:
    s = SETTINGS[quick]
    lr, b = s["lr"], s["batch"]
    return run_grid(f"noise-reduction{'-quick' if quick else ''}", "teacher-cnn.yaml", work, jobs=jobs,
                    fixed={"log.progress": False, "budget.stop_at_last_target": False,
                           "checkpoint.eval_min_every": 4, **s["fixed"]},
                    grid={"optim.lr,optim.batch_size": [[lr, b], [lr, 4 * b], [lr / 4, b]]}, seeds=s["seeds"],
                    forks=[{"at_loss": s["fork_at"], "set": change, "where": {"optim.lr": lr, "optim.batch_size": b}}
                           for change in FORKS.values()])


def label(row, lr: float, b: int) -> str:
    if row.fork:
        return "fork: batch x4" if row.batch == 4 * b else "fork: lr /4"
    if (row.lr, row.batch) == (lr, b):
        return f"noisy (lr {lr:g}, B {b})"
    return f"low noise (lr {row.lr:g}, B {row.batch})"


def closeness(curves: pd.DataFrame, lr: float, b: int) -> pd.DataFrame:
    """One row per fork, seed and axis (samples, step): the fork's final loss against parent and counterpart."""
    rows = []
    for seed, part in curves.groupby("seed"):
        runs = {k: g.sort_values("step") for k, g in part.groupby("curve")}
        parent = runs.get(f"noisy (lr {lr:g}, B {b})")
        for fork, counter in (("fork: batch x4", f"low noise (lr {lr:g}, B {4 * b})"),
                              ("fork: lr /4", f"low noise (lr {lr / 4:g}, B {b})")):
            if fork not in runs or counter not in runs or parent is None:
                continue
            for axis in ("samples", "step"):
                # the fork's last eval, or the last point all three curves reach (no extrapolation)
                x = float(min(runs[fork][axis].max(), parent[axis].max(), runs[counter][axis].max()))
                f, p, c = (float(np.interp(x, r[axis], r.eval_loss)) for r in (runs[fork], parent, runs[counter]))
                gap = p - c
                rows.append({"fork": fork, "counterpart": counter, "seed": seed, "axis": axis, "at": x,
                             "fork_loss": f, "parent_loss": p, "counterpart_loss": c,
                             "closeness": (p - f) / gap if abs(gap) > 0.02 else math.nan})
    return pd.DataFrame(rows)


def plot(curves: pd.DataFrame, out: Path, fork_at: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted(curves.curve.unique(), key=lambda n: (n.startswith("fork"), n))
    colours = dict(zip(names, plt.get_cmap("tab10").colors))
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, axis in zip(axes, ("samples", "step")):
        for (name, seed), g in curves.groupby(["curve", "seed"]):
            g = g.sort_values("step")
            ax.plot(g[axis], g.eval_loss, color=colours[name], linewidth=1.4 if name.startswith("fork") else 0.8,
                    linestyle="-" if name.startswith("fork") else "--", alpha=0.8, label=name if seed == 0 else None)
        ax.axhline(fork_at, color="0.6", linewidth=0.6)
        ax.set_xscale("log")
        ax.set_xlabel({"samples": "samples seen", "step": "optimizer steps"}[axis])
        ax.set_ylabel("eval loss")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=110)
    plt.close(fig)


def section(results: Path) -> str:
    """The README block: closeness per fork and axis (mean and range over seeds), and the verdict."""
    c = pd.read_csv(results / "closeness.csv")
    g = c.groupby(["fork", "axis"], sort=False)
    table = g.agg(seeds=("seed", "size"), fork_loss=("fork_loss", "mean"), parent_loss=("parent_loss", "mean"),
                  counterpart_loss=("counterpart_loss", "mean"), closeness=("closeness", "mean"),
                  low=("closeness", "min"), high=("closeness", "max")).reset_index()
    table["closeness (range)"] = [f"{m:.2f} ({lo:.2f} to {hi:.2f})"
                                  for m, lo, hi in zip(table.closeness, table.low, table.high)]
    table = table.drop(columns=["closeness", "low", "high"]).rename(columns={
        "fork_loss": "fork loss", "parent_loss": "noisy parent", "counterpart_loss": "low-noise run"})
    lines = ["Losses at the fork's last eval, or the last point all three curves reach (mean over seeds); "
             "closeness 1 = on the low-noise curve, 0 = still on the noisy one.", "", markdown_table(table), "", "Verdicts:", ""]
    for r in g.closeness.agg(["mean", "min"]).reset_index().itertuples():
        if r.mean != r.mean:
            v = "inconclusive (the noisy and low-noise curves are too close to tell)"
        elif r.mean >= 0.75:
            v = "drops onto the low-noise curve (mean closeness >= 0.75)"
        elif r.mean <= 0.25:
            v = "does not drop onto the low-noise curve (mean closeness <= 0.25)"
        else:
            v = "drops part of the way (mean closeness between 0.25 and 0.75)"
        lines.append(f"- **{r.fork}**, against {r.axis}: {v}.")
    return "\n".join(lines)


def main() -> None:
    args = parser(__doc__).parse_args()
    s = SETTINGS[args.quick]
    out = results_dir("noise_reduction")
    sweep_dir = train(Path(args.work), quick=args.quick, jobs=args.jobs)
    from goldenpath.report import sweep_curves

    curves = sweep_curves(sweep_dir)
    curves["curve"] = [label(r, s["lr"], s["batch"]) for r in curves.itertuples()]
    curves = curves.drop(columns=["tokens"])
    curves.to_csv(out / "curves.csv", index=False)
    closeness(curves, s["lr"], s["batch"]).to_csv(out / "closeness.csv", index=False)
    plot(curves, out, s["fork_at"])
    print(section(out))
    print(out)


if __name__ == "__main__":
    main()
