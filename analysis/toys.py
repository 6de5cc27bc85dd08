"""Theory toys (Sander et al.; Pesme et al.; Woodworth et al.): does noise lower the effective alpha of a
diagonal linear network, and does the LLS null space spread as the exact law says?

    python analysis/toys.py [--quick]

Writes analysis/results/toys/: dln.parquet (one row per noise kind, sigma and seed), dln.png, lls.parquet,
lls.png and verdict.txt. A thin composition of goldenpath.toys.experiments and goldenpath.plots.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from goldenpath.plots import null_space_spread, toys_metric  # noqa: E402
from goldenpath.toys import experiments as ex  # noqa: E402

OUT = Path(__file__).resolve().parent / "results" / "toys"


def section(results: Path) -> str:
    """The README block: medians over seeds by noise kind and sigma (or batch), then the verdict lines."""
    from common import markdown_table

    dln = pd.read_parquet(results / "dln.parquet")
    g = dln.groupby(["noise", "sigma", "batch"], sort=False)
    table = g.agg(seeds=("seed", "size"), alpha_eff=("alpha_eff", "median"), alpha_min=("alpha_eff", "min"),
                  alpha_max=("alpha_eff", "max"), fit_residual=("fit_residual", "median"),
                  recovery_error=("recovery_error", "median")).reset_index()
    lines = ["Medians over seeds (alpha_eff with its range over seeds):", "", markdown_table(table), ""]
    if (results / "regimes.csv").exists():
        regimes = pd.read_csv(results / "regimes.csv")
        lines += ["Other regimes (full mode, 8 seeds each):", "",
                  markdown_table(regimes[["regime", "sigma", "alpha_min", "alpha_median", "alpha_max",
                                          "recovery_error", "consistent_fall"]]), ""]
    lines += ["Verdict lines (`verdict.txt`):", ""]
    lines += [f"- {line}" for line in (results / "verdict.txt").read_text().splitlines() if line.strip()]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer seeds and steps (about a minute on 2 cores)")
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    scale = {"seeds": 4, "noise_steps": 10_000, "converge_steps": 20_000} if args.quick else {"seeds": 16}
    frames = [ex.run_dln(noise="param", sigmas=[0.0, 0.01, 0.03, 0.1, 0.3], **scale),
              ex.run_dln(noise="label", sigmas=[0.0, 1.0, 3.0], **scale)]
    batches = ex.run_dln(noise="param", sigmas=[0.0], batches=[None, 5, 2], **scale)  # SGD's own noise
    dln = pd.concat([*frames, batches.assign(noise="sgd")], ignore_index=True)
    dln.to_parquet(OUT / "dln.parquet", index=False)
    fig, axes = plt.subplots(2, 3, figsize=(12, 6.5))
    for row, frame in zip(axes, frames):
        for ax, metric in zip(row, ("alpha_eff", "fit_residual", "recovery_error")):
            toys_metric(frame, metric=metric, ax=ax, log=metric == "alpha_eff")
            ax.set_title(f"{frame.noise.iloc[0]} noise", fontsize=9)
    fig.tight_layout()
    fig.savefig(OUT / "dln.png", dpi=110)
    lls = ex.run_lls(seeds=500 if args.quick else 4000)
    lls.to_parquet(OUT / "lls.parquet", index=False)
    fig, ax = plt.subplots(figsize=(5, 3.4))
    null_space_spread(lls, ax=ax)
    fig.tight_layout()
    fig.savefig(OUT / "lls.png", dpi=110)
    gap = float((lls.spread / lls.exact - 1).abs().max())
    regimes = []  # where might isotropic Noisy-SGD lower alpha_eff consistently? (full mode only)
    for name, setting in ([] if args.quick else [
            ("noise only early", dict(sigmas=[0.0, 0.3, 1.0], noise_steps=2000)),
            ("smaller alpha", dict(alpha=0.2, sigmas=[0.0, 0.03, 0.1])),
            ("larger problem", dict(n=20, d=60, sigmas=[0.0, 0.1, 0.3])),
            ("small steps, long noise", dict(sigmas=[0.0, 0.1], noise_steps=100_000, lr=0.002))]):
        frame = ex.run_dln(seeds=8, **setting)
        stats = frame.groupby("sigma").agg(alpha_min=("alpha_eff", "min"), alpha_median=("alpha_eff", "median"),
                                           alpha_max=("alpha_eff", "max"), fit_residual=("fit_residual", "median"),
                                           recovery_error=("recovery_error", "median")).reset_index()
        regimes.append(stats.assign(regime=name, consistent_fall=ex.dln_verdict(frame).count("HOLDS") > 0))
    if regimes:
        pd.concat(regimes).to_csv(OUT / "regimes.csv", index=False)
    verdict = "\n".join([
        "Noisy-SGD (isotropic noise on the weights): " + ex.dln_verdict(frames[0]),
        "SGD with label noise: " + ex.dln_verdict(frames[1]),
        "SGD without injected noise, alpha_eff (median over seeds) by batch size: " + ", ".join(
            f"B={b}: {v:.3g}" for b, v in batches.groupby("batch").alpha_eff.median().sort_index(ascending=False).items()),
        f"LLS null-space spread against the exact law: largest relative gap {gap:.3f}",
        *(f"regime '{r.regime.iloc[0]}': alpha_eff falls consistently: {bool(r.consistent_fall.iloc[0])}"
          for r in regimes)])
    (OUT / "verdict.txt").write_text(verdict + "\n")
    print(verdict)
    print(OUT)


if __name__ == "__main__":
    main()
