"""Noisy-SGD and DP-SGD at a fixed noise-to-batch ratio sigma / B (Sander et al. 2024): with the number of
steps fixed, does growing the batch B (and sigma with it) make the final model worse, offline and online?

    python analysis/noisy_sgd_batch.py [--quick]
    python analysis/noisy_sgd_batch.py --sweep SWEEP_DIR   # a sweep trained elsewhere (e.g. the full one on a GPU)

For each noise kind (gaussian: Noisy-SGD, g = mean gradient + (sigma / B) xi; dp: DP-SGD, per-sample
clipping at C, g = (sum clip(g_i) + sigma C xi) / B) and each batch B, sigma = ratio x B and the sample
budget is steps x B, so every run takes the same number of optimizer steps with the same noise on its
averaged gradient. Offline, the runs cycle over one fixed subset (a larger B repeats it more often);
online, each sample is used once (a larger B sees more fresh samples). One learning rate per kind, not
tuned per batch. Quick: the group-norm CNN of configs/teacher-cnn-dp.yaml on the embedded teacher stream,
B = 16, 64, 256 for 128 steps, 2 seeds (about 4 minutes on 2 CPU cores); full: the
batches, steps, seeds and regimes of configs/sweeps/dp-cifar5m-batch.yaml (ResNet-18 on CIFAR-5m, a GPU).

Writes analysis/results/noisy_sgd_batch/: results.csv (one row per run: kind, regime, batch, sigma,
steps, seed, state, final eval loss and error, epsilon for dp), loss_vs_batch.png (final loss and error
against B) and curves.png (eval loss against steps). The runs stay under --work (analysis/runs by
default; a re-run only trains what is missing).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from common import CONFIGS, interval, markdown_table, parser, results_dir, run_grid

FULL_SWEEP = CONFIGS / "sweeps" / "dp-cifar5m-batch.yaml"  # the GPU-scale version of this experiment
# Noisy-SGD runs at the dp learning rate x this: 0.02 on the teacher CNN, the learning rate of the plain-SGD
# config of this model (configs/teacher-cnn.yaml). Without clipping the mean gradient is several times
# larger; a first quick run at 0.05 stalled at the class prior after an early loss spike at B = 16, a
# confound (the lr did not train at all batches), not a result about sigma / B.
GAUSSIAN_LR = 0.04
QUICK = {"base": "teacher-cnn-dp.yaml", "ratio": 1 / 256, "steps": 128, "batches": (256, 64, 16),
         "offline": (32, 1024),  # 32 epochs of 1024 samples cover 128 steps x 256; B=16 makes 2 epochs
         "seeds": (0, 1),
         "fixed": {"data.probe_size": 64, "checkpoint.targets": [],  # no targets: only the final loss counts
                   "checkpoint.eval_every": 32, "checkpoint.eval_min_every": 8}}  # 8 evals of 1024 images a run
COMMON = {"budget.stop_at_last_target": False, "log.progress": False}  # every run takes all its steps
# Rule of the verdicts: how far the per-B mean loss may move, as a fraction of the loss, and still "hold".
TOLERANCE = 0.02


def setting(quick: bool) -> dict:
    """The base config, fixed overrides, (B, sigma, samples) triples, offline (epochs, size) and seeds."""
    if quick:
        s = QUICK
        triples = [[b, s["ratio"] * b, s["steps"] * b] for b in s["batches"]]  # largest first: fills the jobs
        return {"base": CONFIGS / s["base"], "fixed": s["fixed"], "triples": triples,
                "offline": list(s["offline"]), "seeds": s["seeds"]}
    spec = yaml.safe_load(FULL_SWEEP.read_text())
    grid = spec["grid"]
    offline = next(v for v in grid["data.epochs,data.train_size"] if v[0] > 1)
    return {"base": (FULL_SWEEP.parent / spec["base"]).resolve(), "fixed": spec.get("set", {}),
            "triples": sorted(grid["optim.batch_size,noise.sigma,budget.samples"], reverse=True),
            "offline": offline, "seeds": tuple(spec["seeds"])}


def train(work: Path, *, quick: bool, jobs: int | None = None) -> Path:
    """Run (or continue) the kind x batch x regime x seed grid; returns its sweep dir."""
    from goldenpath.config import load_config

    s = setting(quick)
    base = load_config(s["base"])  # the dp learning rate and clipping norm are the base config's
    kinds = [["gaussian", None, base.optim.lr * GAUSSIAN_LR], ["dp", base.noise.clip, base.optim.lr]]
    return run_grid(f"noisy-sgd-batch{'-quick' if quick else ''}", s["base"], work, fixed={**COMMON, **s["fixed"]},
                    seeds=s["seeds"], jobs=jobs,
                    grid={"optim.batch_size,noise.sigma,budget.samples": s["triples"],
                          "noise.kind,noise.clip,optim.lr": kinds,
                          "data.epochs,data.train_size": [[1, None], s["offline"]]})


def tidy(sweep_dir: Path) -> pd.DataFrame:
    """One row per run: kind, regime, batch, sigma, steps, seed, state, final eval loss and error, epsilon."""
    runs = pd.read_csv(sweep_dir / "runs.csv")
    return pd.DataFrame({
        "kind": runs["noise.kind"], "regime": np.where(runs["data.epochs"] > 1, "offline", "online"),
        "batch": runs["optim.batch_size"], "sigma": runs["noise.sigma"],
        "ratio": runs["noise.sigma"] / runs["optim.batch_size"], "lr": runs["optim.lr"], "steps": runs.step,
        "samples": runs.samples,
        "seed": runs.seed, "state": runs.state, "eval_loss": runs.eval_loss,
        "eval_error": runs.eval_error, "epsilon": runs.epsilon, "loss_floor": runs.loss_floor, "run": runs.run})


# ----------------------------------------------------------------------------- figures


def plot(frame: pd.DataFrame, sweep_dir: Path, out: Path) -> None:
    """loss_vs_batch.png (final eval loss and error against B) and curves.png (eval loss against steps)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from goldenpath.plots import loss_curves
    from goldenpath.report import sweep_curves

    kinds = list(dict.fromkeys(frame.kind))
    colours = {"online": "C0", "offline": "C3"}
    fig, axes = plt.subplots(2, len(kinds), figsize=(4.4 * len(kinds), 6.2), squeeze=False)
    for col, kind in enumerate(kinds):
        for row, metric in enumerate(("eval_loss", "eval_error")):
            ax = axes[row, col]
            for regime, colour in colours.items():
                part = frame[(frame.kind == kind) & (frame.regime == regime)]
                done = part[part.state == "completed"]
                shift = 1.04 if regime == "offline" else 1 / 1.04  # side by side on the log axis
                ax.scatter(done.batch * shift, done[metric], s=14, color=colour, alpha=0.7)
                mean = done.groupby("batch")[metric].mean()
                ax.plot(mean.index, mean.values, color=colour, linewidth=1, label=f"{regime} (mean over seeds)")
                lost = part[part.state != "completed"]
                if len(lost):  # diverged (or unfinished) runs: an x on the top edge, never dropped silently
                    ax.scatter(lost.batch * shift, [ax.get_ylim()[1]] * len(lost), marker="x", color=colour,
                               label=f"{regime}: {len(lost)} not completed")
            ax.set_xscale("log", base=2)
            ax.set_xlabel("batch B (sigma = ratio x B, same steps)")
            ax.set_ylabel({"eval_loss": "final eval loss", "eval_error": "final eval error"}[metric])
            ax.set_title(f"{kind}, sigma/B = {frame[frame.kind == kind].ratio.iloc[0]:.3g}", fontsize=9)
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "loss_vs_batch.png", dpi=110)
    plt.close(fig)

    curves = sweep_curves(sweep_dir).merge(frame[["run", "kind"]], on="run")
    floor = frame.loss_floor.dropna()
    fig, axes = plt.subplots(1, len(kinds), figsize=(4.8 * len(kinds), 3.6), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        loss_curves(curves[curves.kind == kind], x="step", hue="batch", ax=ax,
                    floor=float(floor.iloc[0]) if len(floor) else None)
        ax.set_title(kind, fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- the README block


def verdicts(frame: pd.DataFrame, metric: str = "eval_loss", tolerance: float = TOLERANCE) -> pd.DataFrame:
    """One row per (kind, regime): does the final ``metric`` (eval_loss or eval_error) rise with the batch?

    d: mean final value over completed seeds at the largest B minus at the smallest B; seeds: the largest
    max - min over seeds at one B. The claim (a larger batch ends worse at fixed sigma / B and steps) holds
    if d > 2 seeds and d > tolerance x the mean value; does not hold if the value falls as clearly
    (d < -2 seeds and |d| > tolerance x the value) or stays flat (|d| <= tolerance x the value);
    inconclusive at this scale otherwise, or when runs diverged or did not finish.
    """
    rows = []
    for (kind, regime), part in frame.groupby(["kind", "regime"], sort=False):
        done = part[part.state == "completed"]
        g = done.groupby("batch")[metric]
        mean = g.mean()
        seeds = float(g.agg(lambda x: x.max() - x.min()).max()) if len(done) else math.nan
        lost = part[part.state != "completed"]
        small, large = min(part.batch), max(part.batch)
        level = float(done[metric].mean()) if len(done) else math.nan
        d = float(mean[large] - mean[small]) if small in mean.index and large in mean.index else math.nan
        numbers = (f"B={large} against B={small}: {mean.get(small, math.nan):.3f} -> {mean.get(large, math.nan):.3f} "
                   f"({d:+.3f}, {100 * d / level:+.1f}%), seed range {seeds:.3f}")
        if len(lost) or math.isnan(d) or g.size().min() < 2:
            verdict = "inconclusive at this scale"
            reason = (f"{len(lost)} run(s) {'/'.join(sorted(set(lost.state)))}; " if len(lost) else
                      "fewer than two completed seeds at some batch; ") + numbers
        elif d > 2 * seeds and d > tolerance * level:
            verdict, reason = "holds", "the larger batch ends worse, beyond twice the seed range; " + numbers
        elif abs(d) <= tolerance * level:
            verdict, reason = "does not hold", f"flat within {100 * tolerance:g}%; " + numbers
        elif d < -2 * seeds:
            verdict, reason = "does not hold", "the larger batch ends better, beyond twice the seed range; " + numbers
        else:
            verdict, reason = "inconclusive at this scale", "the change is within twice the seed range; " + numbers
        rows.append({"kind": kind, "regime": regime, "metric": metric, "delta": d, "relative": d / level,
                     "seed_range": seeds, "verdict": verdict, "reason": reason})
    return pd.DataFrame(rows)


def section(results: Path) -> str:
    """The README block: final loss and error per kind, regime and batch, and a verdict per (kind, regime)."""
    frame = pd.read_csv(results / "results.csv")
    g = frame[frame.state == "completed"].groupby(["kind", "regime", "batch"], sort=False)
    table = pd.DataFrame({
        "sigma": g.sigma.first(), "steps": g.steps.max(),
        "final loss, mean [min, max] over seeds": g.eval_loss.agg(lambda x: interval(x.mean(), x.min(), x.max(), 3)),
        "final error (mean)": g.eval_error.mean(), "epsilon (mean)": g.epsilon.mean(),
    }).reset_index()
    counts = frame.groupby(["kind", "regime", "batch"]).apply(
        lambda x: f"{int((x.state == 'completed').sum())}/{len(x)}", include_groups=False).rename("completed")
    table = table.merge(counts.reset_index(), on=["kind", "regime", "batch"], how="right")
    table = table.sort_values(["kind", "regime", "batch"], ascending=[False, False, True], kind="stable")
    ratios = ", ".join(f"{k} {r:.3g}" for k, r in frame.groupby("kind", sort=False).ratio.first().items())
    states = frame.state.value_counts().to_dict()
    head = (f"{len(frame)} runs ({', '.join(f'{n} {s}' for s, n in sorted(states.items()))}); sigma / B fixed "
            f"({ratios}), the same number of steps at every B; epsilon at the runs' delta (dp only).")
    rule = (f"Rule, for the final loss and for the final error: d = mean at the largest B minus at the smallest; "
            f"the claim (larger batch ends worse) holds if d exceeds twice the largest seed-to-seed range at one B "
            f"and {100 * TOLERANCE:g}% of the value; does not hold if it falls as clearly or stays within "
            f"{100 * TOLERANCE:g}%; inconclusive at this scale otherwise.")
    lines = [head, "", markdown_table(table), "", rule, ""]
    by_error = {(r.kind, r.regime): r for r in verdicts(frame, "eval_error").itertuples()}
    for r in verdicts(frame).itertuples():
        e = by_error[(r.kind, r.regime)]
        lines.append(f"- **{r.kind}, {r.regime}**: in loss {r.verdict} ({r.reason}); in error {e.verdict} "
                     f"({e.reason}).")
    return "\n".join(lines)


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--sweep", help="analyse this sweep directory (already trained) instead of training")
    args = p.parse_args()
    out = results_dir("noisy_sgd_batch")
    sweep_dir = Path(args.sweep) if args.sweep else train(Path(args.work), quick=args.quick, jobs=args.jobs)
    frame = tidy(sweep_dir)
    frame.to_csv(out / "results.csv", index=False)
    plot(frame, sweep_dir, out)
    print(section(out))
    print(out)


if __name__ == "__main__":
    main()
