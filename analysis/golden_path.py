"""The golden-path test (Vyas et al.): at matched loss, are runs with different SGD noise the same function?

    python analysis/golden_path.py [--quick] [--datasets teacher markov fashion shakespeare]
    python analysis/golden_path.py --sweep SWEEP_DIR --dataset NAME   # a sweep run elsewhere (e.g. on a GPU)

For each dataset, a learning rate x batch size grid with 5 seeds per setting is trained online (one pass over
a stream, no sample seen twice) and offline (epochs over a fixed subset, the same sample budget). At each
loss target every setting is compared with the reference (every seed of the least-noisy online setting):
the golden-path ratio D / F (mean cross-seed distance over the pooled seed floor), a hierarchical-bootstrap
interval (seeds, then probe points) and a permutation p-value (seeds reassigned between the two settings),
Holm-adjusted within a target and regime; and the trend of log ratio against log(lr / B).

The test is believed only where it shows power, so on the teacher stream it also runs controls:
- *null*: the reference setting's seeds 0-4 against seeds 5-9 of the same setting (a knob that changes
  nothing, log.every, tells them apart): it must not detect a difference;
- *width*: the reference against the same training with a narrower network (128, 64, 32 units): planted
  differences of growing size; the smallest one detected is the quick mode's resolution;
- *subsets*: offline, the same setting trained on two disjoint subsets of the same size;
- *offline contrast*: settings where noise is known to change the function offline (networks trained to
  fit a small subset with plain SGD, lr x B); every setting tried is reported.

The verdict rules below (``RULES``) were fixed before the runs. Writes analysis/results/golden_path/:
summary.csv (one row per study, target, metric and setting), trend.csv, runs.csv, ratios.png,
controls.png, final_loss.png; a run of some datasets (--datasets) replaces only their rows. Runs stay
under --work (analysis/runs by default; a re-run trains only what is missing).
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd

from common import interval, markdown_table, parser, results_dir, run_grid

# ----------------------------------------------------------------------------- the rules, fixed before the runs

RULES = {
    "alpha": 0.05,          # a setting differs: Holm-adjusted p < alpha and the interval lies above 1
    "margin": 1.2,          # equivalent: every interval within [1 / margin, margin]
    "metric": "tv",
}

# ----------------------------------------------------------------------------- the studies

COMMON = {"log.progress": False, "budget.stop_at_last_target": False}
MLP = {"model.name": "mlp", "model.width": 256, "model.depth": 2}
STUDIES = {
    "teacher": dict(  # the embedded teacher images, 3 x 16 x 16, a 2-layer MLP: chance 2.27, floor 1.40
        base="teacher-mlp.yaml",
        quick=dict(fixed={"budget.samples": 40960, "checkpoint.targets": [2.0, 1.9, 1.8, 1.7],
                          "checkpoint.eval_every": 20},
                   lr=[0.02, 0.05], batch=[32, 128], offline=[10, 4096]),
        full=dict(fixed={"data.eval_size": 2048, "data.probe_size": 2048, "budget.samples": 163840,
                         "checkpoint.targets": [2.0, 1.9, 1.8, 1.7, 1.6]},
                  lr=[0.01, 0.02, 0.05], batch=[32, 128, 512], offline=[20, 8192])),
    "markov": dict(  # an order-1 chain over 16 symbols, tiny GPT-2: chance 2.67, floor 1.70
        base="markov-gpt2.yaml",
        quick=dict(fixed={"data.order": 1, "data.vocab_size": 16, "data.seq_len": 32, "budget.samples": 4096,
                          "checkpoint.targets": [2.2, 2.0, 1.9, 1.8], "checkpoint.eval_every": 20},
                   lr=[0.003, 0.01], batch=[8, 32], offline=[4, 1024]),
        full=dict(fixed={"budget.samples": 40000, "checkpoint.targets": [3.0, 2.7, 2.4]},
                  lr=[0.001, 0.003, 0.01], batch=[8, 16, 64], offline=[10, 4000])),
    "fashion": dict(  # Fashion-MNIST through the idx loader, a 2-layer MLP: chance 2.29
        base="fashion-mnist-cnn.yaml",
        quick=dict(fixed={**MLP, "data.eval_size": 1000, "data.probe_size": 1000, "budget.samples": 12288,
                          "checkpoint.targets": [0.9, 0.75, 0.65], "checkpoint.eval_every": 20},
                   lr=[0.02, 0.05], batch=[32, 128], offline=[6, 2048]),
        full=dict(fixed={**MLP, "budget.samples": 60000, "checkpoint.targets": [0.8, 0.6, 0.5, 0.45]},
                  lr=[0.01, 0.02, 0.05], batch=[16, 64, 256], offline=[10, 6000])),
    "shakespeare": dict(  # real text: the plays (Hamlet held out for eval, Macbeth for the probe), byte-level
        # BPE of 2048 tokens, sequences of 64, tiny GPT-2 (width 64): uniform 7.62, the eval unigram 5.73. The
        # quick targets lie above the unigram loss: they are what every setting reaches in 2,560 sequences
        # (measured: lr 0.005-0.015, batch 8-32), so they compare the functions on the way to the unigram fit
        base="shakespeare-gpt2.yaml",
        quick=dict(fixed={"model.width": 64, "data.seq_len": 64, "data.eval_size": 64, "data.probe_size": 64,
                          "budget.samples": 2560, "budget.min_progress": None,
                          "checkpoint.targets": [6.6, 6.3, 6.1], "checkpoint.eval_every": 20},
                   lr=[0.01, 0.02], batch=[8, 32], offline=[4, 640]),
        full=dict(fixed={"budget.samples": 12800, "budget.min_progress": None,
                         "checkpoint.targets": [6.6, 6.3, 6.0, 5.7]},
                  lr=[0.003, 0.01, 0.02], batch=[8, 16, 32], offline=[10, 1280])),
}
SEEDS = (0, 1, 2, 3, 4)
NULL_SEEDS = (5, 6, 7, 8, 9)
WIDTHS = (128, 64, 32)
# Offline contrast: fit a small subset with plain SGD (no momentum) far past its best eval loss; the
# targets lie above the best offline eval loss every setting reaches.
CONTRASTS = {
    "teacher-1024": dict(base="teacher-mlp.yaml", fixed={"optim.momentum": 0.0, "data.epochs": 40,
                                                         "data.train_size": 1024, "checkpoint.targets": [2.1, 2.0],
                                                         "checkpoint.eval_every": 20},
                         lr=[0.05, 0.2], batch=[16, 128]),
    "fashion-1024": dict(base="fashion-mnist-cnn.yaml",
                         fixed={**MLP, "optim.momentum": 0.0, "data.epochs": 40, "data.train_size": 1024,
                                "data.eval_size": 1000, "data.probe_size": 1000,
                                "checkpoint.targets": [0.9, 0.8], "checkpoint.eval_every": 20},
                         lr=[0.05, 0.2], batch=[16, 128]),
}


def train(name: str, study: dict, work: Path, *, quick: bool, seeds=SEEDS, jobs: int | None = None) -> Path:
    """Run (or continue) one study's lr x batch x seed grid, online and offline; returns its sweep dir."""
    s = study["quick" if quick else "full"]
    epochs, size = s["offline"]
    return run_grid(f"golden-path-{name}{'-quick' if quick else ''}", study["base"], work,
                    fixed={**COMMON, **s["fixed"]}, seeds=seeds, jobs=jobs,
                    grid={"optim.lr": s["lr"], "optim.batch_size": s["batch"],
                          "data.epochs,data.train_size": [[1, None], [epochs, size]]})


def controls(study: dict, main: Path, work: Path, *, quick: bool, jobs: int | None = None) -> dict[str, Path]:
    """The null (seed-split), width and subset controls around the least-noisy setting of ``main``;
    {control: sweep dir} (a study is not named "null": pandas reads that back as a missing value)."""
    s = study["quick" if quick else "full"]
    lr, batch = min(s["lr"]), max(s["batch"])
    epochs, size = s["offline"]
    fixed = {**COMMON, **s["fixed"], "optim.lr": lr, "optim.batch_size": batch}
    tag = "-quick" if quick else ""
    ref = [p for p in main.iterdir() if p.name.startswith(f"lr={lr:g}_bs={batch}_epochs=1_")]
    off = [p for p in main.iterdir() if p.name.startswith(f"lr={lr:g}_bs={batch}_epochs={epochs}_")]
    null = run_grid(f"gp-null{tag}", study["base"], work, fixed=fixed, grid={"log.every": [11]}, seeds=NULL_SEEDS,
                    jobs=jobs)
    width = run_grid(f"gp-width{tag}", study["base"], work, fixed=fixed, grid={"model.width": list(WIDTHS)},
                     seeds=SEEDS, jobs=jobs)
    subset = run_grid(f"gp-subset{tag}", study["base"], work, seeds=SEEDS, jobs=jobs,
                      fixed={**fixed, "data.epochs": epochs, "data.train_size": size}, grid={"data.subset": [1]})
    return {"seed-split": _combined(work / f"gp-null-vs-ref{tag}", [*ref, *_runs(null)]),
            "width": _combined(work / f"gp-width-vs-ref{tag}", [*ref, *_runs(width)]),
            "subsets": _combined(work / f"gp-subsets{tag}", [*off, *_runs(subset)])}


def _runs(sweep_dir: Path) -> list[Path]:
    return [p.parent for p in sweep_dir.glob("*/config.yaml")]


def _combined(path: Path, runs: list[Path]) -> Path:
    """A sweep directory of links to runs of other sweeps (compare reads it like any sweep)."""
    path.mkdir(parents=True, exist_ok=True)
    for link in path.iterdir():
        if link.is_symlink():
            link.unlink()
    for run in runs:
        (path / run.name).symlink_to(run.resolve(), target_is_directory=True)
    shutil.rmtree(path / "compare" / "cache", ignore_errors=True)  # links may point elsewhere now
    return path


def contrast(name: str, spec: dict, work: Path, *, jobs: int | None = None) -> Path:
    return run_grid(f"gp-contrast-{name}", spec["base"], work, fixed={**COMMON, **spec["fixed"]}, seeds=SEEDS,
                    jobs=jobs, grid={"optim.lr": spec["lr"], "optim.batch_size": spec["batch"]})


# ----------------------------------------------------------------------------- tables


def tables(sweep_dir: Path, dataset: str, study: str = "main",
           metrics=("tv", "js", "top1")) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Compare the sweep's settings; returns (summary, trend, runs) with dataset and study columns."""
    from goldenpath.compare import compare

    compare(sweep_dir, metrics=metrics)
    summary = pd.read_csv(sweep_dir / "compare" / "summary.csv")
    trend = pd.read_csv(sweep_dir / "compare" / "trend.csv")
    rows = []
    from goldenpath.checkpoints import RunDir
    from goldenpath.config import load_config

    for run_dir in [RunDir(p.parent) for p in sorted(sweep_dir.glob("*/config.yaml"))]:
        c, s = load_config(run_dir.config), run_dir.status()
        rows.append({"run": run_dir.name, "lr": c.optim.lr, "batch": c.optim.batch_size, "regime": c.regime,
                     "width": getattr(c.model, "width", None), "seed": c.seed, "state": s.get("state"),
                     "final_loss": s.get("eval_loss"), "best_loss": s.get("best_eval_loss"),
                     "final_error": s.get("eval_error"), "chance": s.get("chance_loss"),
                     "floor": s.get("loss_floor"), "samples": s.get("samples")})
    runs = pd.DataFrame(rows)
    runs["noise"] = runs.lr / runs.batch  # SGD's noise temperature
    for frame in (summary, trend, runs):
        frame.insert(0, "study", study)
        frame.insert(0, "dataset", dataset)
    return summary, trend, runs


# ----------------------------------------------------------------------------- verdicts


def _compared(rows: pd.DataFrame) -> pd.DataFrame:
    """Comparisons with at least two seeds on both sides (a single seed's interval misses the seed spread)."""
    return rows[rows.ratio.notna() & (rows.n_seeds >= 2) & (rows.n_ref_seeds >= 2)]


def differs(rows: pd.DataFrame, alpha: float = RULES["alpha"]) -> pd.Series:
    return (rows.p_holm < alpha) & (rows.ci_low > 1)


def equivalent(rows: pd.DataFrame, margin: float = RULES["margin"]) -> pd.Series:
    return (rows.ci_low >= 1 / margin) & (rows.ci_high <= margin)


def claim(rows: pd.DataFrame) -> str:
    """'differs' if any comparison differs; 'same' if every one is equivalent within the margin; else
    'inconclusive' (none differs, some interval too wide to call them the same)."""
    rows = _compared(rows)
    if not len(rows):
        return "inconclusive (no comparison with two seeds on both sides)"
    if differs(rows).any():
        r = rows[differs(rows)].sort_values("ratio", ascending=False).iloc[0]
        return (f"differs ({int(differs(rows).sum())} of {len(rows)} comparisons; largest {r.setting} at "
                f"{r.target:g}: {interval(r.ratio, r.ci_low, r.ci_high)}, Holm p {r.p_holm:.2g})")
    if equivalent(rows).all():
        return f"same (all {len(rows)} intervals within [{1 / RULES['margin']:.2f}, {RULES['margin']:.2f}])"
    wide = rows[~equivalent(rows)].sort_values("ci_high", ascending=False).iloc[0]
    return (f"inconclusive (none differs, {int((~equivalent(rows)).sum())} of {len(rows)} intervals reach outside "
            f"the margin, e.g. {wide.setting} at {wide.target:g}: {interval(wide.ratio, wide.ci_low, wide.ci_high)})")


def verdicts(summary: pd.DataFrame, trend: pd.DataFrame, runs: pd.DataFrame) -> pd.DataFrame:
    """One row per dataset: the rules applied to the main grid (and the controls where they were run).

    - power (controls): the null (one setting's seeds split in two) is not detected and a planted difference
      (disjoint subsets, narrower widths) is; without it, a 'same' online is reported as inconclusive; the
      smallest planted ratio detected is the quick mode's resolution;
    - online: the golden path holds if every online setting is the same as the reference within the
      margin, does not hold if one differs, else inconclusive;
    - offline: noise changes the function if an offline setting differs from the reference;
    - trend: the slope of log ratio on log(lr / B) online, with its interval.
    """
    metric = RULES["metric"]
    rows = []
    for d, part in summary[summary.metric == metric].groupby("dataset", sort=False):
        main = part[part.study == "main"]
        power = "not measured"
        ctl = part[part.study.isin(["seed-split", "width", "subsets"])]
        if len(ctl):
            null = _compared(ctl[ctl.study == "seed-split"])
            width = _compared(ctl[ctl.study == "width"])
            subsets = _compared(ctl[ctl.study == "subsets"])
            planted = pd.concat([width, subsets])
            detected = planted[differs(planted)]
            shown = len(null) and not differs(null).any() and len(detected)
            power = (("shown" if shown else "not shown")
                     + f" (seed split, a null: {int(differs(null).sum())} of {len(null)} comparisons differ; planted:"
                     f" disjoint subsets {int(differs(subsets).sum())} of {len(subsets)} detected, narrower widths "
                     f"{int(differs(width).sum())} of {len(width)}; smallest ratio detected "
                     + (interval(*detected.loc[detected.ratio.idxmin(), ["ratio", "ci_low", "ci_high"]])
                        if len(detected) else "none") + ")")
        online = claim(main[main.regime == "online"])
        if online.startswith("same") and not power.startswith("shown"):
            online = "inconclusive: " + online + ", but the test's power is " + power.split(" (")[0]
        offline = claim(main[main.regime == "offline"])
        t = trend[(trend.dataset == d) & (trend.study == "main") & (trend.metric == metric) &
                  (trend.regime == "online")]
        slopes = "; ".join(f"{x.target:g}: {interval(x.slope, x.ci_low, x.ci_high)}" for x in t.itertuples()
                           if np.isfinite(x.slope))
        contrasts = part[part.study.str.startswith("contrast")]
        found = [f"{s.split('-', 1)[1]}: {claim(g)}" for s, g in contrasts.groupby("study")]
        rows.append({"dataset": d, "power": power, "online": online, "offline": offline,
                     "online_trend": slopes or "none", "offline_contrast": "; ".join(found) or "not run",
                     "final_loss": _final_loss(runs[(runs.dataset == d) & (runs.study == "main")])})
    return pd.DataFrame(rows)


def _final_loss(runs: pd.DataFrame) -> str:
    """Spearman rho of final eval loss with lr / B per regime, over completed runs (Vyas et al.: offline, more
    noise ends lower; online it does not)."""
    from scipy.stats import spearmanr

    out = []
    for regime, r in runs[runs.state == "completed"].groupby("regime"):
        if len(r) >= 3:
            rho = spearmanr(r.noise, r.final_loss)
            out.append(f"{regime} rho {rho.statistic:.2f} (p {rho.pvalue:.2g}, {len(r)} runs)")
    return "; ".join(out) or "too few completed runs"


# ----------------------------------------------------------------------------- figures


def plot(summary: pd.DataFrame, runs: pd.DataFrame, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = RULES["metric"]
    main = summary[(summary.study == "main") & (summary.metric == metric) & summary.ratio.notna()]
    datasets = list(dict.fromkeys(summary.dataset))
    fig, axes = plt.subplots(1, len(datasets), figsize=(4.4 * len(datasets), 3.6), squeeze=False)
    for ax, d in zip(axes[0], datasets):
        part = main[main.dataset == d]
        targets = sorted(part.target.unique(), reverse=True)
        for k, (regime, colour) in enumerate((("online", "C0"), ("offline", "C3"))):
            rows = part[part.regime == regime]
            for i, t in enumerate(targets):
                r = rows[rows.target == t].reset_index(drop=True)
                x = i + (k - 0.5) * 0.35 + np.linspace(-0.12, 0.12, max(len(r), 1))[: len(r)]
                ax.errorbar(x, r.ratio, yerr=[r.ratio - r.ci_low, r.ci_high - r.ratio], fmt="o", ms=3,
                            color=colour, elinewidth=0.6, label=regime if i == 0 else None)
        ax.axhline(1, color="k", linewidth=0.7, linestyle=":")
        ax.axhspan(1 / RULES["margin"], RULES["margin"], color="0.9", zorder=0)
        ax.set_xticks(range(len(targets)), [f"{t:g}" for t in targets])
        ax.set_xlabel("loss target")
        ax.set_ylabel(f"ratio against the reference ({metric}), 95%")
        ax.set_title(d)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "ratios.png", dpi=110)
    plt.close(fig)

    ctl = summary[summary.study.isin(["seed-split", "width", "subsets"]) & (summary.metric == metric) & summary.ratio.notna()]
    if len(ctl):
        fig, ax = plt.subplots(figsize=(7, 3.6))
        labels = []
        for i, r in enumerate(ctl.sort_values(["study", "target"]).itertuples()):
            colour = {"seed-split": "0.4", "width": "C2", "subsets": "C4"}[r.study]
            ax.errorbar(i, r.ratio, yerr=[[r.ratio - r.ci_low], [r.ci_high - r.ratio]], fmt="o", color=colour, ms=4)
            labels.append(f"{r.study}: {r.setting.split('_')[-1]} @ {r.target:g}")
        ax.axhline(1, color="k", linewidth=0.7, linestyle=":")
        ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=6)
        ax.set_ylabel(f"ratio ({metric}), 95%")
        ax.set_title("controls: a null (grey) and planted differences (width, disjoint subsets)", fontsize=9)
        fig.tight_layout()
        fig.savefig(out / "controls.png", dpi=110)
        plt.close(fig)

    fig, axes = plt.subplots(1, len(datasets), figsize=(4.4 * len(datasets), 3.4), squeeze=False)
    for ax, d in zip(axes[0], datasets):
        for regime, colour in (("online", "C0"), ("offline", "C3")):
            r = runs[(runs.dataset == d) & (runs.study == "main") & (runs.regime == regime) &
                     (runs.state == "completed")]
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


def section(results: Path) -> str:
    """The README block: the comparisons per dataset, target and regime, the controls, and the verdicts."""
    summary = pd.read_csv(results / "summary.csv")
    trend = pd.read_csv(results / "trend.csv")
    runs = pd.read_csv(results / "runs.csv")
    metric = RULES["metric"]
    main = _compared(summary[(summary.study == "main") & (summary.metric == metric)])
    g = main.groupby(["dataset", "target", "regime"], sort=False)
    table = pd.DataFrame({
        "settings": g.ratio.size(),
        "largest ratio [interval]": g.apply(lambda x: interval(*x.loc[x.ratio.idxmax(), ["ratio", "ci_low", "ci_high"]]),
                                            include_groups=False),
        "differ (Holm p < 0.05, above 1)": g.apply(lambda x: f"{int(differs(x).sum())}/{len(x)}", include_groups=False),
        "within the margin": g.apply(lambda x: f"{int(equivalent(x).sum())}/{len(x)}", include_groups=False),
        "seed floor": g.d_floor.median(),
    }).reset_index().sort_values(["dataset", "target", "regime"], ascending=[True, False, False], kind="stable")
    states = runs.state.value_counts().to_dict()
    lines = [f"{len(runs)} runs ({', '.join(f'{n} {s}' for s, n in sorted(states.items()))}); {metric} ratios "
             f"against the reference setting, 95% hierarchical-bootstrap intervals (seeds, then probe points), "
             f"permutation p-values Holm-adjusted within a target and regime; margin {RULES['margin']}.", "",
             markdown_table(table), ""]
    ctl = summary[summary.study.isin(["seed-split", "width", "subsets"]) & (summary.metric == metric) & summary.ratio.notna()]
    if len(ctl):
        rows = ctl.assign(result=[interval(r.ratio, r.ci_low, r.ci_high) for r in ctl.itertuples()],
                          p=ctl.p_holm.map(lambda p: f"{p:.2g}"))
        lines += ["Controls (teacher):", "", markdown_table(rows[["study", "setting", "target", "n_seeds", "result",
                                                                   "p"]]), ""]
    contrasts = summary[summary.study.str.startswith("contrast") & (summary.metric == metric) & summary.ratio.notna()]
    if len(contrasts):
        rows = contrasts.assign(result=[interval(r.ratio, r.ci_low, r.ci_high) for r in contrasts.itertuples()],
                                p=contrasts.p_holm.map(lambda p: f"{p:.2g}"))
        lines += ["Offline contrast search (every setting tried):", "",
                  markdown_table(rows[["study", "setting", "target", "n_seeds", "result", "p"]]), ""]
    lines += ["Verdicts (rules fixed before the runs: `RULES` and `verdicts` in the script):", ""]
    for r in verdicts(summary, trend, runs).itertuples():
        lines.append(f"- **{r.dataset}**: power: {r.power}. Online, the same function as the reference: {r.online}. "
                     f"Offline: {r.offline}. Online trend of log ratio on log(lr/B), by target: {r.online_trend}. "
                     f"Offline contrast: {r.offline_contrast}. Final loss against lr/B: {r.final_loss}.")
    return "\n".join(lines)


def _merged(path: Path, new: pd.DataFrame) -> pd.DataFrame:
    """``new`` in place of the rows of its (dataset, study) pairs in the table at ``path``: a run of some
    datasets (or without controls) keeps every other committed row, datasets in the table's order (then
    new ones), each dataset's kept rows before its new ones. A run that replaces every row writes ``new``."""
    if not path.exists():
        return new
    old = pd.read_csv(path)
    replaced = pd.MultiIndex.from_frame(old[["dataset", "study"]]).isin(
        pd.MultiIndex.from_frame(new[["dataset", "study"]]))
    if replaced.all():
        return new
    columns = [*new.columns, *(c for c in old.columns if c not in new.columns)]
    merged = pd.concat([old[~replaced], new], ignore_index=True)[columns]
    order = {d: i for i, d in enumerate(dict.fromkeys([*old.dataset, *new.dataset]))}
    return merged.sort_values("dataset", key=lambda c: c.map(order), kind="stable").reset_index(drop=True)


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--datasets", nargs="+", default=list(STUDIES), choices=list(STUDIES))
    p.add_argument("--sweep", help="analyse this sweep directory (already trained) instead of training")
    p.add_argument("--dataset", default="sweep", help="the name to give --sweep's dataset")
    p.add_argument("--no-controls", action="store_true", help="skip the power controls and the contrast search")
    args = p.parse_args()
    out = results_dir("golden_path")
    work = Path(args.work)
    parts = []
    if args.sweep:
        parts.append(tables(Path(args.sweep), args.dataset))
    for d in [] if args.sweep else args.datasets:
        main_dir = train(d, STUDIES[d], work, quick=args.quick, jobs=args.jobs)
        parts.append(tables(main_dir, d))
        if d == "teacher" and not args.no_controls:
            for name, path in controls(STUDIES[d], main_dir, work, quick=args.quick, jobs=args.jobs).items():
                parts.append(tables(path, d, name))
    if not args.sweep and not args.no_controls:
        for name, spec in CONTRASTS.items():
            d = name.split("-")[0]
            if d in args.datasets:
                parts.append(tables(contrast(name, spec, work, jobs=args.jobs), d, f"contrast-{name}"))
    names = ("summary", "trend", "runs")
    frames = [_merged(out / f"{name}.csv", pd.concat([p[k] for p in parts], ignore_index=True))
              for k, name in enumerate(names)]
    for name, frame in zip(names, frames):
        frame.to_csv(out / f"{name}.csv", index=False)
    summary, trend, runs = frames
    plot(summary, runs, out)
    print(section(out))
    print(out)


if __name__ == "__main__":
    main()
