"""The tail index of SGD's gradient noise (Simsekli et al. 2019; Panigrahi et al. 2019): is it heavy-tailed
(alpha < 2), does alpha fall with width and depth, and does it look Gaussian per coordinate at larger batch?

    python analysis/tail_index.py [--quick]

MLPs and CNNs of several widths and depths, 3 seeds each, are trained online on the embedded teacher image
stream, with one lr and batch, to the same held-out losses; at the last one ``gradnoise.analyse`` draws 300
(full: 1,000) fresh mini-batches and returns their gradient noise n_j = g_j - mean_j g_j on a random subset
of the coordinates. On each noise matrix, whole model and per layer, this script runs the tail-index
estimators (pooled, Simsekli; per coordinate, Panigrahi), the distance to the normal of the standardised
coordinates and of random projections (Wasserstein-1; Anderson-Darling kept for reference) and a count of
exact zeros (ReLU sparsity), and the same on Gaussian noise with each coordinate's own standard deviation
(pooling coordinates of different scales alone pulls the pooled estimate below 2). For
one model per family the noise is also measured at several noise batch sizes (a batch of k samples sums k
draws: the aggregation test) and at the earlier losses (points along training); alpha-stable and Gaussian
draws summed the same way, at the same number of draws, are the estimator's controls and give its bias.
The rules are in tail_index_rules.py, fixed before the runs.

Writes analysis/results/tail_index/: results.csv (one row per family, noise source, width, depth, noise
batch size, loss, layer, seed and statistic), controls.csv (the estimator on summed alpha-stable and
Gaussian draws), alpha.png (alpha against width, depth and noise batch size, with the scale-matched
control) and noise.png (histogram and normal QQ plot of one model's noise). The runs stay under --work
(analysis/runs by default; a re-run only trains what is missing), each measured noise matrix next to its run
(tail_index_noise/; a re-run draws only what is missing).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
from common import interval, markdown_table, parser, results_dir, rounded, run_grid
from tail_index_rules import gaussian, per_seed, series, summarise, train_batch, verdicts

TARGETS = (2.1, 2.0, 1.9)  # held-out losses (nats; chance 2.27, teacher floor about 1.40) where noise is measured
TARGET = TARGETS[-1]  # the main one: every model and noise batch; the earlier ones for the reference models
TRAIN = {"optim.lr": 0.02, "optim.batch_size": 64, "checkpoint.targets": list(TARGETS), "checkpoint.eval_every": 20,
         "checkpoint.target_eval_every": 20,
         "checkpoint.eval_min_every": 4, "log.progress": False}  # momentum 0.9 from teacher-cnn.yaml
# Each family: sizes as (width, depth) pairs (a width series at one depth, a depth series at one width),
# and the model whose noise is also measured at other batch sizes. Quick, from scratch: about 450 CPU seconds
# (training about 180, noise measurements and statistics about 270); with the noise cached about 140.
SETTINGS = {
    "quick": {
        "fixed": {"data.eval_size": 512, "data.probe_size": 256, "budget.samples": 30720},
        "families": {"mlp": {"sizes": [(16, 2), (64, 2), (256, 2), (64, 1), (64, 4)], "reference": (64, 2)},
                     "cnn": {"sizes": [(8, 2), (16, 2), (32, 2), (16, 1), (16, 3)], "reference": (16, 2)}},
        "noise_batches": [1, 4, 16, 64, 256], "seeds": (0, 1, 2),
        "batches": 300, "max_coords": 2_000, "max_pooled": 200_000},  # noise draws, coordinates kept, pooled
    "full": {
        "fixed": {"budget.samples": 61440},
        "families": {"mlp": {"sizes": [(16, 2), (32, 2), (64, 2), (128, 2), (256, 2), (512, 2),
                                       (64, 1), (64, 3), (64, 4), (64, 6)], "reference": (64, 2)},
                     "cnn": {"sizes": [(8, 2), (16, 2), (32, 2), (64, 2), (16, 1), (16, 3), (16, 4)],
                             "reference": (16, 2)}},
        "noise_batches": [1, 4, 16, 64, 256, 1024], "seeds": (0, 1, 2),
        "batches": 1000, "max_coords": 50_000, "max_pooled": 1_000_000},
}
# normality statistics kept (the shape is judged by W1 against the control: the tests' p-values need
# gaussianity's simulations, and a p-value of 600,000 pooled values would measure their number as much)
GAUSSIAN = {"coordinates_anderson", "projections_anderson", "projections_shapiro"}
KEEP = GAUSSIAN | {"trace_sigma", "grad_sq", "b_simple"}  # from analyse's whole-model rows
ORDERS = 20  # random orders of the pooled values averaged in the pooled estimate (see noise_statistics)
DIRECTIONS = 100  # random unit directions the noise vectors are projected on (Gaussianity along directions)


def train(family: str, setting: dict, work: Path, *, quick: bool, jobs: int | None = None) -> Path:
    """Run (or continue) one family's sizes x seeds to the loss target; returns the sweep dir."""
    sizes = [list(s) for s in setting["families"][family]["sizes"]]
    return run_grid(f"tail-index-{family}{'-quick' if quick else ''}", "teacher-cnn.yaml", work,
                    fixed={**TRAIN, **setting["fixed"], "model.name": family},
                    grid={"model.width,model.depth": sizes}, seeds=setting["seeds"], jobs=jobs)


def standardised(noise: np.ndarray) -> np.ndarray:
    """Each column of ``[draws, columns]`` centred and scaled to unit standard deviation over the draws;
    columns with no spread left out."""
    sd = noise.std(0)
    return (noise[:, sd > 0] - noise[:, sd > 0].mean(0)) / sd[sd > 0]


def normal_distance(z: np.ndarray) -> float:
    """Wasserstein-1 distance between the values ``z`` (standardised) and N(0, 1), in standard deviations:
    the mean gap between the ordered values and the normal quantiles at (i - 1/2) / n. For a fixed law it
    settles as the values grow (their own noise shrinks), where a normality test's statistic grows."""
    from scipy import stats

    z = np.sort(np.ravel(z))
    return float(np.abs(z - stats.norm.ppf((np.arange(len(z)) + 0.5) / len(z))).mean())


def projections(noise: np.ndarray, directions: int = DIRECTIONS, seed: int = 0) -> np.ndarray:
    """The noise vectors (rows) projected on ``directions`` random unit directions, each standardised."""
    u = np.random.default_rng(seed).standard_normal((noise.shape[1], directions))
    return standardised(noise @ (u / np.linalg.norm(u, axis=0)))


def noise_statistics(noise: np.ndarray, *, max_pooled: int, seed: int = 0, orders: int = ORDERS,
                     interval: bool = True) -> list[dict]:
    """The tail-index, normality and sparsity estimators on a noise matrix ``[batches, coordinates]``.

    The pooled estimate (Simsekli) is taken on a random subset of the pooled values in random order: the
    estimator sums K1 consecutive values, which must be independent draws (in coordinate order neighbours move
    together). The estimate is the mean over ``orders`` random orders (less grouping noise than one); its
    interval is the t interval over the first order's blocks (``tail_index_ci``). The
    per-coordinate median (Panigrahi) comes with its quartiles over coordinates. ``atom_fraction``: the share
    of entries that are exact zeros of the raw gradient; the ``_dense`` statistics use only the coordinates
    with no such zero, to tell ReLU sparsity from a tail. ``coordinates_w1`` and ``projections_w1``: the
    distance to N(0, 1) (``normal_distance``) of the standardised coordinates and of random projections.
    """
    from goldenpath import gradnoise

    rng = np.random.default_rng(seed)
    pooled = gradnoise.pooled_sample(noise, max_pooled, rng)
    low = high = np.nan
    if interval:
        _, low, high = gradnoise.tail_index_ci(pooled)
    alpha = np.mean([gradnoise.tail_index(rng.permutation(pooled)) for _ in range(orders)])
    live = noise[:, noise.std(0) > 0]
    per = gradnoise.per_coordinate_tail_index(live)
    q1, median, q3 = np.quantile(per, [0.25, 0.5, 0.75])
    atoms = gradnoise.atom_fraction(live)
    rows = [{"statistic": "tail_index_pooled", "value": alpha, "ci_low": low, "ci_high": high},
            {"statistic": "tail_index_per_coordinate_median", "value": median, "ci_low": q1, "ci_high": q3},
            {"statistic": "atom_fraction", "value": float(atoms.mean())},
            {"statistic": "atom_coordinates", "value": float((atoms > 0).mean())}]
    tests = gradnoise.gaussianity(live, simulations=0, max_values=None, seed=seed)
    rows += [{"statistic": k, "value": tests[k]} for k in sorted(GAUSSIAN) if k in tests]
    rows += [{"statistic": "coordinates_w1", "value": normal_distance(standardised(live))},
             {"statistic": "projections_w1", "value": normal_distance(projections(live, seed=seed))}]
    dense = live[:, atoms == 0]
    if dense.shape[1] >= 2:
        rows += [{"statistic": "tail_index_per_coordinate_median_dense",
                  "value": float(np.median(gradnoise.per_coordinate_tail_index(dense)))},
                 {"statistic": "coordinates_anderson_dense",
                  "value": gradnoise.gaussianity(dense, projections=2, simulations=0, max_values=None,
                                                 seed=seed)["coordinates_anderson"]},
                 {"statistic": "coordinates_w1_dense", "value": normal_distance(standardised(dense))}]
    return rows


def _both(noise: np.ndarray, key: dict, setting: dict, **kw) -> list[dict]:
    """noise_statistics of SGD's noise and of Gaussian noise with each coordinate's own scale."""
    matched = np.random.default_rng(key["seed"]).standard_normal(noise.shape) * noise.std(0)
    return [{**key, "noise": source, **stat} for source, x in (("sgd", noise), ("gaussian_matched", matched))
            for stat in noise_statistics(x, max_pooled=setting["max_pooled"], seed=key["seed"], **kw)]


def noise_at(run_dir: Path, at_loss: float, batch_size: int, setting: dict, seed: int) -> tuple[np.ndarray, dict]:
    """(noise, {"whole": analyse's whole-model rows, "layers": each layer's noise columns}) of a run's
    checkpoint at ``at_loss`` and noise batch ``batch_size``, from ``gradnoise.analyse``; cached next to the
    run (tail_index_noise/), so that a re-run of the statistics does not draw the noise again."""
    from goldenpath import gradnoise

    path = run_dir / "tail_index_noise" / (f"loss{at_loss:g}_batch{batch_size}_draws{setting['batches']}"
                                           f"_coords{setting['max_coords']}_seed{seed}.npz")
    if path.exists():
        cached = np.load(path)
        return cached["noise"], json.loads(str(cached["meta"]))
    table, noise = gradnoise.analyse(run_dir, at_loss=at_loss, batches=setting["batches"], batch_size=batch_size,
                                     max_coords=setting["max_coords"], max_pooled=setting["max_pooled"], seed=seed,
                                     progress=False, estimators=False)
    whole = table[(table.layer == "all") & table.statistic.isin(KEEP - GAUSSIAN)]
    meta = json.dumps({"whole": whole[["statistic", "value"]].to_dict("records"), "layers": table.attrs["layers"]})
    path.parent.mkdir(exist_ok=True)
    np.savez(path, noise=noise, meta=meta)
    return noise, json.loads(meta)  # as a cached read gives it


def measure(sweep_dir: Path, family: str, setting: dict) -> tuple[list[dict], dict]:
    """Noise statistics of every run at the main target (whole model and per layer), and of the reference
    model at each noise batch size and at each earlier target, each with its scale-matched Gaussian control;
    returns (rows, {noise batch size: noise} of the reference's first replicate at the main target)."""
    import torch

    # One intra-op thread: these models are small, and on shared CPU cores a second thread mostly spins
    # (measured: 3 to 10 times the CPU time per noise draw at the same wall time or worse).
    torch.set_num_threads(1)
    runs = pd.read_csv(sweep_dir / "runs.csv").rename(columns={"model.width": "width", "model.depth": "depth"})
    reference = setting["families"][family]["reference"]
    batch = TRAIN["optim.batch_size"]
    rows, kept = [], {}
    for r in runs.to_dict("records"):
        key = {"family": family, "width": int(r["width"]), "depth": int(r["depth"]), "seed": int(r["seed"])}
        reached = str(r["targets_reached"]).split(";")
        for t in TARGETS:
            rows.append({**key, "noise": "sgd", "batch_size": batch, "at_loss": t, "layer": "all",
                         "statistic": "steps_to_target",
                         "value": float(r[f"step_at_{t:g}"]) if f"{t:g}" in reached else np.nan})
        is_reference = (key["width"], key["depth"]) == reference
        points = [(TARGET, b) for b in (setting["noise_batches"] if is_reference else [batch])]
        points += [(t, batch) for t in TARGETS[:-1]] if is_reference else []
        for at_loss, b in points:
            if f"{at_loss:g}" not in reached:
                continue
            noise, meta = noise_at(sweep_dir / r["run"], at_loss, b, setting, key["seed"])
            print(f"  {r['run']}: loss {at_loss:g}, noise batch {b}", flush=True)
            here = {**key, "batch_size": b, "at_loss": at_loss}
            rows += _both(noise, {**here, "layer": "all"}, setting)
            rows += [{**here, "layer": "all", "noise": "sgd", **stat} for stat in meta["whole"]]
            if b == batch and at_loss == TARGET:  # per layer: the same estimators, lighter (no bootstrap)
                for layer, spans in meta["layers"].items():
                    part = np.concatenate([noise[:, lo:hi] for lo, hi in spans], axis=1)
                    if part.shape[1] >= 16:
                        rows += _both(part, {**here, "layer": layer}, setting, orders=4, interval=False)
            if is_reference and int(r["replicate"]) == 0 and at_loss == TARGET:
                kept[b] = noise
    return rows, kept


def controls(setting: dict, alpha: float, *, coords: int = 100, seed: int = 0) -> list[dict]:
    """The estimators' behaviour at this study's number of draws: per-coordinate median alpha of sums of k
    draws (k = each noise batch size) of an alpha-stable law with the given alpha and of a Gaussian, each
    with ``setting["batches"]`` sums per coordinate, as for the data; and the bias at 100 draws too."""
    from scipy import stats

    from goldenpath import gradnoise

    rng = np.random.default_rng(seed)
    ks, m = setting["noise_batches"], setting["batches"]
    rows = []
    for law, truth in (("stable", alpha), ("gaussian", 2.0)):
        shape = (m * max(ks), coords)
        x = rng.standard_normal(shape) if law == "gaussian" else \
            stats.levy_stable.rvs(alpha, 0.0, size=shape, random_state=rng)
        for k, value in gradnoise.aggregation_series(x, ks, draws=m).items():
            rows.append({"law": law, "alpha": truth, "draws": m, "k": k, "median_alpha": value, "use": "aggregation"})
        value = float(np.median(gradnoise.per_coordinate_tail_index(x[:100] - x[:100].mean(0))))
        rows.append({"law": law, "alpha": truth, "draws": 100, "k": 1, "median_alpha": value, "use": "bias"})
    return rows


def _cell(part: pd.DataFrame, noise: str, statistic: str, digits: int = 2, bounds: bool = True) -> str:
    row = part[(part.noise == noise) & (part.statistic == statistic)]
    if row.empty or np.isnan(row.value.iloc[0]):
        return ""
    r = row.iloc[0]
    if bounds and not np.isnan(r.ci_low):
        return interval(r.value, r.ci_low, r.ci_high, digits)
    return f"{r.value:.{digits}f}"


def _w1(table: pd.DataFrame, key: tuple) -> str:
    if key not in table.index:
        return ""
    return f"{table.loc[key, 'value']:.3f} ({table.loc[key, 'value_gauss']:.3f})"


def section(results: Path) -> str:
    """The README block: alpha per model, per noise batch and along training with the controls, the
    estimators' controls, then the verdicts."""
    frame = pd.read_csv(results / "results.csv")
    control = pd.read_csv(results / "controls.csv") if (results / "controls.csv").exists() else None
    s = summarise(frame)
    batch, target = train_batch(frame), frame.at_loss.min()
    model = ["family", "width", "depth", "batch_size", "at_loss", "layer"]
    w1 = {view: gaussian(frame, view).groupby(model)[["value", "value_gauss"]].mean()
          for view in ("coordinates", "projections")}
    rows = []
    for (family, width, depth, b, t), part in s[s.layer == "all"].groupby(
            ["family", "width", "depth", "batch_size", "at_loss"], sort=False):
        if part[(part.noise == "sgd") & (part.statistic == "tail_index_pooled")].empty:
            continue
        steps = part[(part.statistic == "steps_to_target")].value
        rows.append({"family": family, "width": width, "depth": depth, "loss": t, "noise batch": b,
                     "seeds": int(part.seeds.max()),
                     "pooled alpha [95%]": _cell(part, "sgd", "tail_index_pooled"),
                     "pooled, Gaussian same scales": _cell(part, "gaussian_matched", "tail_index_pooled"),
                     "per-coordinate median [quartiles]": _cell(part, "sgd", "tail_index_per_coordinate_median"),
                     "same, no-zero coordinates": _cell(part, "sgd", "tail_index_per_coordinate_median_dense"),
                     **{f"W1 {view} (control)": _w1(w1[view], (family, width, depth, b, t, "all"))
                        for view in ("coordinates", "projections")},
                     "zeros": f"{part[(part.noise == 'sgd') & (part.statistic == 'atom_fraction')].value.iloc[0]:.1%}",
                     "steps to loss": "" if steps.empty or np.isnan(steps.iloc[0]) else f"{steps.iloc[0]:.0f}"})
    table = pd.DataFrame(rows)
    main = table[(table["noise batch"] == batch) & (table.loss == target)]
    more = table[(table["noise batch"] != batch) | (table.loss != target)].sort_values(
        ["family", "width", "depth", "loss", "noise batch"], ascending=[True, True, True, False, True])
    more = pd.concat([more, main.merge(more[["family", "width", "depth"]].drop_duplicates())])
    runs = frame[(frame.statistic == "steps_to_target") & (frame.at_loss == target)]
    lines = [f"Noise of the teacher-stream models trained with batch {batch}; {int(runs.value.notna().sum())} of "
             f"{len(runs)} runs reached held-out loss {target:g}. {int(s.seeds.max())} seeds per model (each run its "
             "own seed), "
             f"{int(control.draws.max()) if control is not None else 'several hundred'} noise draws per coordinate. "
             "Pooled alpha: mean over seeds, 95% t "
             "interval over its blocks (envelope over seeds); per coordinate: median and quartiles over coordinates "
             "(mean over "
             "seeds); W1: Wasserstein-1 distance to N(0, 1) of the standardised noise, coordinates or "
             f"{DIRECTIONS} random projections pooled, in standard deviations, with the scale-matched Gaussian "
             "control's in brackets (mean over seeds); zeros: share of noise entries that are exact zeros of the "
             "gradient.", "", f"Every model at loss {target:g}, noise batch {batch}:", "",
             markdown_table(main.drop(columns=["loss", "noise batch"])), "",
             "The reference models at other noise batches (aggregation) and earlier along training:", "",
             markdown_table(more.sort_values(["family", "loss", "noise batch"], ascending=[True, False, True])), ""]
    if control is not None:
        lines += ["Controls: per-coordinate median alpha of sums of k draws, at the study's draws per coordinate "
                  "(and at 100 draws, k = 1); the estimator's bias is the gap to the true alpha:", "",
                  markdown_table(control.assign(bias=control.median_alpha - control.alpha)), ""]
    lines += ["Verdicts (rules in `tail_index_rules.py`, fixed on 2026-12-04 before these runs):", ""]
    lines += [f"- {v}" for v in verdicts(frame, control)]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- figures


def plot(results: pd.DataFrame, noises: dict, out: Path) -> None:
    """alpha.png (alpha against width, depth and noise batch) and noise.png (one model's noise)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from goldenpath import gradnoise
    from goldenpath.draw.plots import noise_histogram, qq_plot

    s = summarise(results)
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


def _cpu() -> float:
    """User + system CPU seconds of this process and its finished children (the training runs)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def main() -> None:
    args = parser(__doc__).parse_args()
    start = time.time()
    setting = SETTINGS["quick" if args.quick else "full"]
    out = results_dir("tail_index")
    rows, noises = [], {}
    for family in setting["families"]:
        before = _cpu()
        sweep_dir = train(family, setting, Path(args.work), quick=args.quick, jobs=args.jobs)
        trained = _cpu()
        measured, kept = measure(sweep_dir, family, setting)
        print(f"{family}: CPU seconds, training {trained - before:.0f}, noise measurements {_cpu() - trained:.0f} "
              f"({time.time() - start:.0f} s wall so far)", flush=True)
        rows += measured
        if kept:
            noises[family] = kept
    columns = ["family", "noise", "width", "depth", "batch_size", "at_loss", "layer", "seed", "statistic",
               "value", "ci_low", "ci_high"]
    results = rounded(pd.DataFrame(rows).reindex(columns=columns))
    results.to_csv(out / "results.csv", index=False)
    # the estimators' controls, an alpha-stable law at the alpha SGD's noise shows at the smallest noise batch
    small = per_seed(results, "tail_index_per_coordinate_median", layer="all", at_loss=TARGET,
                     batch_size=min(setting["noise_batches"]))
    alpha = float(np.clip(small.value.mean(), 1.1, 1.9)) if len(small) else 1.5
    before = _cpu()
    rounded(pd.DataFrame(controls(setting, round(alpha, 2)))).to_csv(out / "controls.csv", index=False)
    plot(results, noises, out)
    print(section(out))
    print(f"controls, figures and tables: {_cpu() - before:.0f} CPU seconds")
    print(f"{out} ({time.time() - start:.0f} s wall, {_cpu():.0f} CPU seconds)")


if __name__ == "__main__":
    main()
