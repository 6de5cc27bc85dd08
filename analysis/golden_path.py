"""The golden-path test (Vyas et al.): at matched loss, are runs with different SGD noise the same function?

    python analysis/golden_path.py [--quick] [--datasets teacher markov fashion]
    python analysis/golden_path.py --sweep SWEEP_DIR --dataset NAME   # a sweep run elsewhere (e.g. on a GPU)

For each dataset, a learning rate x batch size grid with 3 seeds is trained online (one pass over a stream,
no sample seen twice) and offline (several epochs over a small subset) with the same sample budget, then
``goldenpath compare`` measures, at each loss target, every run's distance to the least-noisy online run
(the reference) against the seed-to-seed floor: the golden-path ratio, with a bootstrap interval over probe
points. The datasets: the embedded teacher image stream (small CNN), the embedded Markov text stream (tiny
GPT-2, per-token distances) and Fashion-MNIST (one pass over the training images against many epochs on a
small subset).

Writes analysis/results/golden_path/: ratios.csv (one row per dataset, target, run and metric),
runs.csv (one row per run: knobs, state, final loss and error), ratios.png, final_loss.png. The runs stay
under --work (analysis/runs by default; a re-run only trains what is missing).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from common import interval, markdown_table, parser, results_dir, run_grid

# Quick: about 8 minutes on 2 CPU cores; full: the same three studies, a 3 x 3 grid and longer runs.
STUDIES = {
    "teacher": dict(
        base="teacher-cnn.yaml",
        quick=dict(fixed={"data.eval_size": 512, "data.probe_size": 512, "budget.samples": 12288,
                          "checkpoint.targets": [2.1, 2.0], "checkpoint.eval_every": 20},
                   lr=[0.02, 0.05], batch=[16, 64], offline=[6, 2048]),
        full=dict(fixed={"budget.samples": 60000, "checkpoint.targets": [2.1, 2.0, 1.9, 1.8]},
                  lr=[0.01, 0.02, 0.05], batch=[16, 64, 256], offline=[10, 6000])),
    "markov": dict(  # quick: an order-1 chain over 16 symbols, learnt within a few thousand sequences
        base="markov-gpt2.yaml",
        quick=dict(fixed={"data.order": 1, "data.vocab_size": 16, "data.seq_len": 32, "budget.samples": 4096,
                          "checkpoint.targets": [2.2, 1.9], "checkpoint.eval_every": 20},
                   lr=[0.003, 0.01], batch=[8, 32], offline=[4, 1024]),
        full=dict(fixed={"budget.samples": 40000, "checkpoint.targets": [3.0, 2.7, 2.4]},
                  lr=[0.001, 0.003, 0.01], batch=[8, 16, 64], offline=[10, 4000])),
    "fashion": dict(
        base="fashion-mnist-cnn.yaml",
        quick=dict(fixed={"data.eval_size": 1000, "data.probe_size": 1000, "budget.samples": 12288,
                          "checkpoint.targets": [0.8, 0.65], "checkpoint.eval_every": 20},
                   lr=[0.02, 0.05], batch=[16, 64], offline=[6, 2048]),
        full=dict(fixed={"budget.samples": 60000, "checkpoint.targets": [0.8, 0.6, 0.5, 0.45]},
                  lr=[0.01, 0.02, 0.05], batch=[16, 64, 256], offline=[10, 6000])),
}
SEEDS = (0, 1, 2)
COMMON = {"log.progress": False, "budget.stop_at_last_target": False, "checkpoint.eval_min_every": 4}


def train(name: str, study: dict, work: Path, *, quick: bool, seeds=SEEDS, jobs: int | None = None) -> Path:
    """Run (or continue) one study's lr x batch x seed grid, online and offline; returns its sweep dir."""
    s = study["quick" if quick else "full"]
    epochs, size = s["offline"]
    return run_grid(f"golden-path-{name}{'-quick' if quick else ''}", study["base"], work,
                    fixed={**COMMON, **s["fixed"]}, seeds=seeds, jobs=jobs,
                    grid={"optim.lr": s["lr"], "optim.batch_size": s["batch"],
                          "data.epochs,data.train_size": [[1, None], [epochs, size]]})


def tables(sweep_dir: Path, dataset: str, metrics=("tv", "js", "top1")) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Compare the sweep's runs; returns (ratios, runs): the golden-path ratios and each run's final state."""
    from goldenpath.compare import compare

    compare(sweep_dir, metrics=metrics)
    runs = pd.read_csv(sweep_dir / "runs.csv")
    runs = pd.DataFrame({
        "dataset": dataset, "run": runs.run, "lr": runs["optim.lr"], "batch": runs["optim.batch_size"],
        "regime": np.where(runs["data.epochs"] > 1, "offline", "online"), "seed": runs.seed, "state": runs.state,
        "final_loss": runs.eval_loss, "samples": runs.samples, "final_error": runs.eval_error})
    runs["noise"] = runs.lr / runs.batch  # SGD's noise temperature
    summary = pd.read_csv(sweep_dir / "compare" / "summary.csv")
    ratios = summary.merge(runs.drop(columns=["dataset", "final_loss", "final_error", "samples"]), on="run")
    ratios.insert(0, "dataset", dataset)
    return ratios.dropna(subset=["ratio"]).reset_index(drop=True), runs


def plot(ratios: pd.DataFrame, runs: pd.DataFrame, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = list(dict.fromkeys(runs.dataset))
    fig, axes = plt.subplots(1, len(datasets), figsize=(4.2 * len(datasets), 3.4), squeeze=False)
    for ax, d in zip(axes[0], datasets):
        part = ratios[(ratios.dataset == d) & (ratios.metric == "tv")]
        targets = sorted(part.target.unique(), reverse=True)
        for k, (regime, colour) in enumerate((("online", "C0"), ("offline", "C3"))):
            rows = part[part.regime == regime]
            for i, t in enumerate(targets):
                r = rows[rows.target == t].reset_index(drop=True)
                x = i + (k - 0.5) * 0.35 + np.linspace(-0.12, 0.12, max(len(r), 1))[: len(r)]
                ax.errorbar(x, r.ratio, yerr=[r.ratio - r.ci_low, r.ci_high - r.ratio], fmt="o", ms=3,
                            color=colour, elinewidth=0.6, label=regime if i == 0 else None)
        ax.axhline(1, color="k", linewidth=0.7, linestyle=":")
        ax.set_xticks(range(len(targets)), [f"{t:g}" for t in targets])
        ax.set_xlabel("loss target")
        ax.set_ylabel("golden-path ratio (tv), 95% interval")
        ax.set_title(d)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "ratios.png", dpi=110)
    plt.close(fig)
    fig, axes = plt.subplots(1, len(datasets), figsize=(4.2 * len(datasets), 3.4), squeeze=False)
    for ax, d in zip(axes[0], datasets):
        for regime, colour in (("online", "C0"), ("offline", "C3")):
            r = runs[(runs.dataset == d) & (runs.regime == regime) & (runs.state == "completed")]
            ax.scatter(r.noise, r.final_loss, s=12, color=colour, label=regime)
            m = r.groupby("noise").final_loss.mean()
            ax.plot(m.index, m.values, color=colour, linewidth=0.8)
        ax.set_xscale("log")
        ax.set_xlabel("noise level lr / batch")
        ax.set_ylabel("final eval loss (same samples)")
        ax.set_title(d)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "final_loss.png", dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- the README block


def verdicts(ratios: pd.DataFrame, runs: pd.DataFrame, metric: str = "tv", near: float = 1.25) -> pd.DataFrame:
    """One row per dataset: the rules behind the README's verdicts, on the ``metric`` ratios.

    Online claim: the median online ratio is at most ``near`` at every target (holds), or above it with more
    than half the online intervals lying wholly above 1 at some target (does not hold); else inconclusive.
    Offline contrast: the median offline ratio exceeds the online one at every target.
    Final loss (Vyas et al.: offline, more noise ends at a lower loss; online it does not): Spearman
    correlation rho of the final loss with lr / batch, per regime, over runs; holds if it is negative and
    significant (p < 0.05) offline and not online.
    """
    rows = []
    for d, part in ratios[ratios.metric == metric].groupby("dataset", sort=False):
        med = part.groupby(["target", "regime"]).ratio.median().unstack()
        above = part.assign(a=part.ci_low > 1).groupby(["target", "regime"]).a.mean().unstack()
        online, offline = med.get("online"), med.get("offline")
        if online is None or online.isna().all():
            claim = "inconclusive at this scale (no online ratios)"
        elif (online <= near).all():
            claim = f"holds (median online ratio <= {near} at every target)"
        elif ((online > near) & (above["online"] > 0.5)).any():
            claim = (f"does not hold (median online ratio > {near} with most intervals above 1 at "
                     f"{', '.join(f'{t:g}' for t in online.index[(online > near) & (above['online'] > 0.5)])})")
        else:
            claim = f"inconclusive at this scale (median online ratio > {near} but most intervals include 1)"
        if offline is None or offline.isna().all() or online is None:
            contrast = "inconclusive (no offline ratios)"
        elif (offline > online).all():
            contrast = "holds (offline ratio above online at every target)"
        elif (offline <= online).all():
            contrast = "does not hold (offline ratio at or below online at every target)"
        else:
            contrast = "inconclusive (the order changes with the target)"
        r = runs[(runs.dataset == d) & (runs.state == "completed")]
        rho = {g: _spearman(x.noise, x.final_loss) for g, x in r.groupby("regime")}
        (on, p_on), (off, p_off) = rho.get("online", (math.nan,) * 2), rho.get("offline", (math.nan,) * 2)
        if math.isnan(on) or math.isnan(off):
            final = "inconclusive (too few completed runs)"
        elif off < 0 and p_off < 0.05:
            final = ("does not hold (more noise ends lower online too)" if on < 0 and p_on < 0.05 else
                     "holds (offline, more noise ends lower; online it does not)")
        elif off > 0 and p_off < 0.05:
            final = "does not hold (offline, more noise ends higher)"
        else:
            final = "inconclusive (no significant trend offline)"
        rows.append({"dataset": d, "online_claim": claim, "offline_contrast": contrast, "final_loss": final,
                     "rho_online": on, "p_online": p_on, "rho_offline": off, "p_offline": p_off})
    return pd.DataFrame(rows)


def _spearman(x, y) -> tuple[float, float]:
    """Spearman's rho and its two-sided p-value (nan with fewer than 3 points)."""
    from scipy.stats import spearmanr

    if len(x) < 3:
        return math.nan, math.nan
    result = spearmanr(x, y)
    return float(result.statistic), float(result.pvalue)


def section(results: Path) -> str:
    """The README block: ratios per dataset, target and regime, final losses, and the verdicts."""
    ratios = pd.read_csv(results / "ratios.csv")
    runs = pd.read_csv(results / "runs.csv")
    tv = ratios[ratios.metric == "tv"]
    g = tv.groupby(["dataset", "target", "regime"], sort=False)
    table = pd.DataFrame({
        "runs": g.ratio.size(),
        "median ratio [median interval]": g.apply(lambda x: interval(x.ratio.median(), x.ci_low.median(),
                                                                     x.ci_high.median()), include_groups=False),
        "range over runs": g.ratio.agg(lambda x: f"{x.min():.2f} to {x.max():.2f}"),
        "intervals above 1": g.apply(lambda x: f"{int((x.ci_low > 1).sum())}/{len(x)}", include_groups=False),
        "d to reference": g.d_reference.median(), "seed floor": g.d_floor.median(),
    }).reset_index().sort_values(["dataset", "target", "regime"], ascending=[True, False, False], kind="stable")
    done = runs[runs.state == "completed"]
    loss = done.groupby(["dataset", "regime", "lr", "batch"]).final_loss.agg(["mean", "std"]).reset_index()
    loss["final loss"] = [f"{m:.3f} ± {s:.3f}" for m, s in zip(loss["mean"], loss["std"])]
    loss = loss.pivot_table(index=["dataset", "lr", "batch"], columns="regime", values="final loss",
                            aggfunc="first").reset_index()
    v = verdicts(ratios, runs)
    states = runs.state.value_counts().to_dict()
    lines = [f"{len(runs)} runs ({', '.join(f'{n} {s}' for s, n in sorted(states.items()))}); "
             f"ratio = d_tv(run, reference) / d_tv(seed floor), 95% bootstrap intervals over probe points.", "",
             markdown_table(table), "", "Final eval loss (mean ± sd over seeds, same sample budget):", "",
             markdown_table(loss.rename_axis(None, axis=1)), "", "Verdicts:", ""]
    for r in v.itertuples():
        lines.append(f"- **{r.dataset}**: online ratio near 1: {r.online_claim}. Offline farther than online: "
                     f"{r.offline_contrast}. Noise lowers the final loss offline only: {r.final_loss} "
                     f"(Spearman rho of final loss with lr/B: online {r.rho_online:.2f}, p {r.p_online:.2g}; offline "
                     f"{r.rho_offline:.2f}, p {r.p_offline:.2g}).")
    return "\n".join(lines)


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--datasets", nargs="+", default=list(STUDIES), choices=list(STUDIES))
    p.add_argument("--sweep", help="analyse this sweep directory (already trained) instead of training")
    p.add_argument("--dataset", default="sweep", help="the name to give --sweep's dataset")
    args = p.parse_args()
    out = results_dir("golden_path")
    if args.sweep:
        sweeps = {args.dataset: Path(args.sweep)}
    else:
        sweeps = {d: train(d, STUDIES[d], Path(args.work), quick=args.quick, jobs=args.jobs) for d in args.datasets}
    parts = [tables(path, d) for d, path in sweeps.items()]
    ratios = pd.concat([r for r, _ in parts], ignore_index=True)
    runs = pd.concat([r for _, r in parts], ignore_index=True)
    ratios.to_csv(out / "ratios.csv", index=False)
    runs.to_csv(out / "runs.csv", index=False)
    plot(ratios, runs, out)
    print(section(out))
    print(out)


if __name__ == "__main__":
    main()
