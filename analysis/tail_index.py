"""The tail index of SGD's gradient noise (Simsekli et al. 2019; Panigrahi et al. 2019): is it heavy-tailed
(alpha < 2), does alpha fall with width and depth, and does it look Gaussian per coordinate at larger batch?

    python analysis/tail_index.py [--quick]

MLPs and CNNs of several widths and depths are trained online on the embedded teacher image stream, with
one lr and batch, to the same held-out loss; at that checkpoint ``gradnoise.analyse`` draws 100 (full: 200)
fresh mini-batches and returns their gradient noise n_j = g_j - mean_j g_j on a random subset of the
coordinates. On each noise matrix this script runs the same estimators as on two Gaussian controls:
i.i.d. N(0, 1) samples of the same shape, and Gaussian samples with each coordinate's own standard
deviation (pooling coordinates of different scales alone pulls the pooled estimate below 2). For one model
per family the noise is also measured at several noise batch sizes (the Panigrahi contrast).

Writes analysis/results/tail_index/: results.csv (one row per family, noise source, width, depth, noise
batch size, seed and statistic), alpha.png (alpha against width, depth and noise batch size, Gaussian
controls as reference lines) and noise.png (histogram and normal QQ plot of one model's noise). The runs
stay under --work (analysis/runs by default; a re-run only trains what is missing).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from common import interval, markdown_table, parser, results_dir, run_grid

TARGET = 1.9  # held-out loss (nats; uniform guess 2.30, teacher floor about 1.40) where noise is measured
TRAIN = {"optim.lr": 0.02, "optim.batch_size": 64, "checkpoint.targets": [TARGET], "checkpoint.eval_every": 20,
         "checkpoint.eval_min_every": 4, "log.progress": False}  # momentum 0.9 from teacher-cnn.yaml
# Each family: sizes as (width, depth) pairs (a width series at one depth, a depth series at one width),
# and the model whose noise is also measured at other batch sizes. Quick: 1-2 minutes on 2 idle CPU cores.
SETTINGS = {
    "quick": {
        "fixed": {"data.eval_size": 512, "data.probe_size": 256, "budget.samples": 30720},
        "families": {"mlp": {"sizes": [(16, 2), (64, 2), (256, 2), (64, 1), (64, 4)], "reference": (64, 2)},
                     "cnn": {"sizes": [(8, 2), (16, 2), (32, 2), (16, 1), (16, 3)], "reference": None}},
        "noise_batches": [1, 4, 16, 64, 256], "seeds": (0,),
        "batches": 100, "max_coords": 5_000, "max_pooled": 200_000},  # noise draws, coordinates kept, pooled
    "full": {
        "fixed": {"budget.samples": 61440},
        "families": {"mlp": {"sizes": [(16, 2), (32, 2), (64, 2), (128, 2), (256, 2), (512, 2),
                                       (64, 1), (64, 3), (64, 4), (64, 6)], "reference": (64, 2)},
                     "cnn": {"sizes": [(8, 2), (16, 2), (32, 2), (64, 2), (16, 1), (16, 3), (16, 4)],
                             "reference": (16, 2)}},
        "noise_batches": [1, 4, 16, 64, 256, 1024], "seeds": (0, 1, 2),
        "batches": 200, "max_coords": 50_000, "max_pooled": 1_000_000},
}
GAUSSIAN = {"tail_index_pooled", "tail_index_per_coordinate_median", "coordinates_anderson",
            "projections_anderson", "projections_shapiro_p"}  # the estimators run on noise and on controls
KEEP = GAUSSIAN | {"trace_sigma", "grad_sq", "b_simple"}  # from analyse's whole-model rows
ORDERS = 20  # random orders of the pooled values averaged in the pooled estimate (see noise_statistics)
NEAR = 0.1  # |per-coordinate median - Gaussian control's| that counts as "looks Gaussian"


def train(family: str, setting: dict, work: Path, *, quick: bool, jobs: int | None = None) -> Path:
    """Run (or continue) one family's sizes x seeds to the loss target; returns the sweep dir."""
    sizes = [list(s) for s in setting["families"][family]["sizes"]]
    return run_grid(f"tail-index-{family}{'-quick' if quick else ''}", "teacher-cnn.yaml", work,
                    fixed={**TRAIN, **setting["fixed"], "model.name": family},
                    grid={"model.width,model.depth": sizes}, seeds=setting["seeds"], jobs=jobs)


def noise_statistics(noise: np.ndarray, *, max_pooled: int, seed: int = 0) -> list[dict]:
    """The tail-index and normality estimators on a noise matrix ``[batches, coordinates]``.

    The pooled estimate (Simsekli) is taken on a random subset of the pooled values in random order: the
    estimator sums K1 consecutive values and its bootstrap resamples i.i.d., so on values in coordinate order
    the estimate and its interval would measure different things. The estimate is the mean over ``ORDERS``
    random orders, as one order's grouping noise alone can put it outside its bootstrap interval. The
    per-coordinate median (Panigrahi) comes with its quartiles over coordinates.
    """
    from goldenpath import gradnoise

    rng = np.random.default_rng(seed)
    pooled = gradnoise.pooled_sample(noise, max_pooled, rng)
    _, low, high = gradnoise.tail_index_ci(pooled, n_boot=100, seed=seed)
    alpha = np.mean([gradnoise.tail_index(rng.permutation(pooled)) for _ in range(ORDERS)])
    per = gradnoise.per_coordinate_tail_index(noise[:, noise.std(0) > 0])
    q1, median, q3 = np.quantile(per, [0.25, 0.5, 0.75])
    rows = [{"statistic": "tail_index_pooled", "value": alpha, "ci_low": low, "ci_high": high},
            {"statistic": "tail_index_per_coordinate_median", "value": median, "ci_low": q1, "ci_high": q3}]
    tests = gradnoise.gaussianity(noise, seed=seed)
    return rows + [{"statistic": k, "value": tests[k]} for k in sorted(GAUSSIAN) if k in tests]


def measure(sweep_dir: Path, family: str, setting: dict) -> tuple[list[dict], dict]:
    """Noise statistics of every run at the target (and of the reference model at each noise batch size),
    each with its scale-matched Gaussian control; returns (rows, {noise batch size: noise} of the reference,
    seed 0)."""
    from goldenpath import gradnoise

    runs = pd.read_csv(sweep_dir / "runs.csv").rename(columns={"model.width": "width", "model.depth": "depth"})
    reference = setting["families"][family]["reference"]
    batch = TRAIN["optim.batch_size"]
    rows, kept = [], {}
    for r in runs.to_dict("records"):
        key = {"family": family, "width": int(r["width"]), "depth": int(r["depth"]), "seed": int(r["seed"])}
        reached = f"{TARGET:g}" in str(r["targets_reached"]).split(";")
        rows.append({**key, "noise": "sgd", "batch_size": batch, "statistic": "steps_to_target",
                     "value": float(r[f"step_at_{TARGET:g}"]) if reached else np.nan})
        if not reached:
            continue
        is_reference = (key["width"], key["depth"]) == reference
        for b in setting["noise_batches"] if is_reference else [batch]:
            table, noise = gradnoise.analyse(sweep_dir / r["run"], at_loss=TARGET, batches=setting["batches"],
                                             batch_size=b, max_coords=setting["max_coords"],
                                             max_pooled=setting["max_pooled"], seed=key["seed"], progress=False)
            whole = table[(table.layer == "all") & table.statistic.isin(KEEP - GAUSSIAN)]
            matched = np.random.default_rng(key["seed"]).standard_normal(noise.shape) * noise.std(0)
            for source, x in (("sgd", noise), ("gaussian_matched", matched)):
                rows += [{**key, "noise": source, "batch_size": b, **stat}
                         for stat in noise_statistics(x, max_pooled=setting["max_pooled"], seed=key["seed"])]
            rows += [{**key, "noise": "sgd", "batch_size": b, **stat}
                     for stat in whole[["statistic", "value"]].to_dict("records")]
            if is_reference and key["seed"] == 0:
                kept[b] = noise
    return rows, kept


# ----------------------------------------------------------------------------- tables and rules


def summarise(results: pd.DataFrame) -> pd.DataFrame:
    """One row per family, noise source, size, noise batch and statistic: the mean over seeds, with the
    envelope of the seeds' intervals (lowest ci_low, highest ci_high)."""
    keys = ["family", "noise", "width", "depth", "batch_size", "statistic"]
    g = results.groupby(keys, sort=False, dropna=False)
    return g.agg(seeds=("seed", "nunique"), value=("value", "mean"), ci_low=("ci_low", "min"),
                 ci_high=("ci_high", "max")).reset_index()


def train_batch(results: pd.DataFrame) -> int:
    """The training batch size: the noise batch of the rows every run has (steps_to_target)."""
    return int(results.loc[results.statistic == "steps_to_target", "batch_size"].iloc[0])


def series(summary: pd.DataFrame, family: str, along: str, *, statistic: str = "tail_index_pooled",
           noise: str = "sgd") -> pd.DataFrame:
    """The rows of one family varying ``along`` (width, depth or batch_size), the other knobs held where
    that series has the most points; sorted by ``along``."""
    batch = train_batch(summary)
    part = summary[(summary.family == family) & (summary.noise == noise) & (summary.statistic == statistic)]
    if along != "batch_size":
        part = part[part.batch_size == batch]
    held = [k for k in ("width", "depth", "batch_size") if k != along]
    if part.empty:
        return part
    counts = part.groupby(held)[along].nunique()
    best = counts.idxmax() if counts.max() > 1 else None
    if best is None:
        return part.iloc[:0]
    mask = np.logical_and.reduce([part[k] == v for k, v in zip(held, best)])
    return part[mask].sort_values(along)


def trend(points: pd.DataFrame, along: str) -> str:
    """Does alpha fall with ``along``? holds: it falls monotonically and the intervals at the smallest and
    largest size are disjoint; does not hold: those intervals are disjoint the other way; else inconclusive."""
    if len(points) < 2:
        return "inconclusive at this scale (fewer than two sizes reached the loss target)"
    first, last = points.iloc[0], points.iloc[-1]
    values = ", ".join(f"{getattr(p, along):g}: {p.value:.2f}" for p in points.itertuples())
    if last.ci_high < first.ci_low:
        if (np.diff(points.value) < 0).all():
            return f"holds (alpha falls monotonically, extremes' intervals disjoint; {values})"
        return f"inconclusive at this scale (lower at the largest {along} but not monotonically; {values})"
    if last.ci_low > first.ci_high:
        return f"does not hold (alpha is higher at the largest {along}, intervals disjoint; {values})"
    return f"inconclusive at this scale (intervals at the smallest and largest {along} overlap; {values})"


def verdicts(results: pd.DataFrame) -> list[str]:
    """The README's verdict lines, each decided by the rule it states."""
    s = summarise(results)
    batch = train_batch(results)
    lines = []
    iid = s[s.noise == "gaussian_iid"].set_index("statistic")
    if len(iid):
        pooled, per = iid.loc["tail_index_pooled"], iid.loc["tail_index_per_coordinate_median"]
        ok = abs(pooled.value - 2) <= NEAR and abs(per.value - 2) <= NEAR
        lines.append(f"Gaussian control (i.i.d. N(0, 1), the shape of one noise matrix) gives alpha about 2: "
                     f"{'holds' if ok else 'does not hold'} (pooled "
                     f"{interval(pooled.value, pooled.ci_low, pooled.ci_high)}, per-coordinate median "
                     f"{per.value:.2f}; rule: both within {NEAR} of 2).")
    pooled = s[(s.noise == "sgd") & (s.statistic == "tail_index_pooled") & (s.batch_size == batch)]
    matched = s[(s.noise == "gaussian_matched") & (s.statistic == "tail_index_pooled") & (s.batch_size == batch)]
    both = pooled.merge(matched, on=["family", "width", "depth"], suffixes=("", "_gauss"))
    n = len(pooled)
    below = int((pooled.ci_high < 2).sum())
    if n == 0:
        return lines + ["No model reached the loss target: every claim is inconclusive at this scale."]
    claim = "holds" if below == n else "does not hold" if below == 0 else "inconclusive at this scale"
    lines.append(f"Pooled alpha < 2 (Simsekli's measurement, batch {batch}): {claim} (interval wholly below 2 "
                 f"in {below} of {n} models; range {pooled.value.min():.2f} to {pooled.value.max():.2f}).")
    heavier = int((both.ci_high < both.ci_low_gauss).sum())
    claim = ("holds" if heavier == len(both) else "does not hold" if heavier == 0 else "inconclusive at this scale")
    lines.append(f"Heavier-tailed than Gaussian noise with the same per-coordinate scales (pooled alpha's "
                 f"interval wholly below the scale-matched control's): {claim} ({heavier} of {len(both)} models; "
                 f"control range {both.value_gauss.min():.2f} to {both.value_gauss.max():.2f}).")
    for family in dict.fromkeys(s.family[s.noise == "sgd"]):
        for along in ("width", "depth"):
            claim = trend(series(s, family, along), along)
            control = series(s, family, along, noise="gaussian_matched")
            values = ", ".join(f"{getattr(p, along):g}: {p.value:.2f}" for p in control.itertuples())
            same = claim.startswith("holds") and trend(control, along).startswith("holds")
            lines.append(f"{family}: alpha (pooled) falls with {along}: {claim}; scale-matched Gaussian control "
                         f"{values}" + (": it falls the same way, so the fall is in the spread of the "
                                        "coordinates' scales, not in the tails." if same else "."))
    iid_per = iid.loc["tail_index_per_coordinate_median"].value if len(iid) else 2.0
    for family in dict.fromkeys(s.family[s.noise == "sgd"]):
        per = series(s, family, "batch_size", statistic="tail_index_per_coordinate_median")
        if len(per) < 2:
            continue
        last = per.iloc[-1]
        near = abs(last.value - iid_per) <= NEAR
        values = ", ".join(f"{p.batch_size:g}: {p.value:.2f}" for p in per.itertuples())
        pooled = series(s, family, "batch_size").set_index("batch_size").value
        control = series(s, family, "batch_size", noise="gaussian_matched").set_index("batch_size").value
        ends = "; ".join(f"batch {b:g}: {pooled.get(b, np.nan):.2f} against {control.get(b, np.nan):.2f}"
                         for b in (per.batch_size.iloc[0], last.batch_size))
        lines.append(f"{family} (width {last.width}, depth {last.depth}): per coordinate, the noise looks Gaussian "
                     f"at the largest batch (Panigrahi): {'holds' if near else 'does not hold'} (median "
                     f"per-coordinate alpha by noise batch {values}; rule: within {NEAR} of the Gaussian "
                     f"control's {iid_per:.2f} at batch {last.batch_size:g}). Pooled alpha against its "
                     f"scale-matched Gaussian control: {ends}.")
    return lines


def section(results: Path) -> str:
    """The README block: alpha per model and noise batch with the Gaussian controls, then the verdicts."""
    frame = pd.read_csv(results / "results.csv")
    s = summarise(frame)
    wide = s.pivot_table(index=["family", "width", "depth", "batch_size"], columns=["noise", "statistic"],
                         values=["value", "ci_low", "ci_high", "seeds"], aggfunc="first", sort=False)

    def cell(row, noise, statistic, digits=2):
        v = [row.get((k, noise, statistic), np.nan) for k in ("value", "ci_low", "ci_high")]
        return "" if np.isnan(v[0]) else interval(*v, digits=digits)

    rows = []
    for (family, width, depth, batch), row in wide.iterrows():
        row = row.to_dict()
        if np.isnan(row.get(("value", "sgd", "tail_index_pooled"), np.nan)):
            continue
        steps = row.get(("value", "sgd", "steps_to_target"), np.nan)
        rows.append({"family": family, "width": width, "depth": depth, "noise batch": batch,
                     "seeds": int(row[("seeds", "sgd", "tail_index_pooled")]),
                     "pooled alpha [95%]": cell(row, "sgd", "tail_index_pooled"),
                     "pooled, Gaussian same scales": cell(row, "gaussian_matched", "tail_index_pooled"),
                     "per-coordinate median [quartiles]": cell(row, "sgd", "tail_index_per_coordinate_median"),
                     "steps to target": "" if np.isnan(steps) else f"{steps:.0f}"})
    table = pd.DataFrame(rows)
    if len(table):  # families in their order, then by size and noise batch
        table["order"] = table.family.map({f: i for i, f in enumerate(dict.fromkeys(table.family))})
        table = table.sort_values(["order", "width", "depth", "noise batch"]).drop(columns="order")
    runs = frame[frame.statistic == "steps_to_target"]
    iid = s[(s.noise == "gaussian_iid")].set_index("statistic")
    head = (f"Noise at held-out loss {frame.at_loss.iloc[0]:g}, training batch {train_batch(frame)}; "
            f"{int(runs.value.notna().sum())} of {len(runs)} runs reached it. Pooled alpha: 95% bootstrap "
            f"interval (envelope over seeds); per coordinate: median and quartiles over coordinates.")
    lines = [head, "", markdown_table(table), ""]
    if len(iid):
        p, c = iid.loc["tail_index_pooled"], iid.loc["tail_index_per_coordinate_median"]
        lines += [(f"I.i.d. Gaussian control of the same shape: pooled {interval(p.value, p.ci_low, p.ci_high)}, "
                   f"per-coordinate median {interval(c.value, c.ci_low, c.ci_high)}."), ""]
    lines += ["Verdicts:", ""] + [f"- {v}" for v in verdicts(frame)]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- figures


def plot(results: pd.DataFrame, noises: dict, out: Path) -> None:
    """alpha.png (alpha against width, depth and noise batch) and noise.png (one model's noise)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from goldenpath import gradnoise
    from goldenpath.plots import noise_histogram, qq_plot

    s = summarise(results)
    iid = s[(s.noise == "gaussian_iid") & (s.statistic == "tail_index_pooled")]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, along in zip(axes, ("width", "depth", "batch_size")):
        for k, family in enumerate(dict.fromkeys(s.family[s.noise == "sgd"])):
            for statistic, noise, style, label in (
                    ("tail_index_pooled", "sgd", "o-", "pooled"),
                    ("tail_index_per_coordinate_median", "sgd", "s--", "per-coordinate median"),
                    ("tail_index_pooled", "gaussian_matched", ":", "pooled, Gaussian same scales")):
                p = series(s, family, along, statistic=statistic, noise=noise)
                if p.empty:
                    continue
                err = None if noise != "sgd" or statistic != "tail_index_pooled" else \
                    np.clip([p.value - p.ci_low, p.ci_high - p.value], 0, None)
                ax.errorbar(p[along], p.value, yerr=err, fmt=style, color=f"C{k}", ms=4, capsize=2,
                            mfc="none" if "per-coordinate" in label else None, label=f"{family}: {label}")
        ax.axhline(2.0, color="0.3", linestyle="--", linewidth=1, label="alpha = 2")
        if len(iid):
            ax.axhspan(iid.ci_low.iloc[0], iid.ci_high.iloc[0], color="0.8", alpha=0.6,
                       label="i.i.d. Gaussian control (pooled)")
        ax.set_xscale("log", base=2)
        ax.set_xlabel({"width": "width (units / channels)", "depth": "depth (hidden layers / conv blocks)",
                       "batch_size": "noise batch size"}[along])
        ax.set_ylabel("tail index alpha")
        ax.set_title({"width": "alpha against width", "depth": "alpha against depth",
                      "batch_size": "alpha against noise batch (one model)"}[along], fontsize=9)
    fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=4, fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.14, 1, 1))
    fig.savefig(out / "alpha.png", dpi=110)
    plt.close(fig)
    if not noises:
        return
    family, kept = next(iter(noises.items()))
    batch = train_batch(results)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    if batch in kept:
        alpha = gradnoise.tail_index(np.random.default_rng(0).permutation(kept[batch].ravel()))
        noise_histogram(kept[batch], alpha=alpha, ax=axes[0])
        axes[0].set_title(f"{family} reference, noise batch {batch}: coordinates pooled (Simsekli)", fontsize=9)
    for b in (min(kept), max(kept)):  # each coordinate standardised first (Panigrahi): no mixing of scales
        x = kept[b][:, kept[b].std(0) > 0]
        qq_plot(*gradnoise.qq_data((x - x.mean(0)) / x.std(0)), ax=axes[1], label=f"noise batch {b}")
    axes[1].set_title("normal QQ, each coordinate standardised", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "noise.png", dpi=110)
    plt.close(fig)


def main() -> None:
    args = parser(__doc__).parse_args()
    setting = SETTINGS["quick" if args.quick else "full"]
    out = results_dir("tail_index")
    rows, noises = [], {}
    for family in setting["families"]:
        sweep_dir = train(family, setting, Path(args.work), quick=args.quick, jobs=args.jobs)
        measured, kept = measure(sweep_dir, family, setting)
        rows += measured
        if kept:
            noises[family] = kept
    # the i.i.d. Gaussian control: the estimators on N(0, 1) samples of the first reference's noise shape
    family = next(iter(setting["families"]))
    width, depth = setting["families"][family]["reference"] or setting["families"][family]["sizes"][0]
    batch = TRAIN["optim.batch_size"]
    kept = noises.get(family, {})
    shape = kept[batch].shape if batch in kept else (setting["batches"], setting["max_coords"])
    iid = np.random.default_rng(0).standard_normal(shape)
    rows += [{"family": family, "width": width, "depth": depth, "seed": 0, "noise": "gaussian_iid",
              "batch_size": batch, **stat} for stat in noise_statistics(iid, max_pooled=setting["max_pooled"])]
    columns = ["family", "noise", "width", "depth", "batch_size", "seed", "statistic", "value", "ci_low", "ci_high"]
    results = pd.DataFrame(rows).reindex(columns=columns).assign(at_loss=TARGET)
    results.to_csv(out / "results.csv", index=False)
    plot(results, noises, out)
    print(section(out))
    print(out)


if __name__ == "__main__":
    main()
