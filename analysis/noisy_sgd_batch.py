"""Noisy-SGD and DP-SGD at a fixed noise-to-batch ratio sigma / B (Sander et al. 2024): with the number of
steps fixed, does a larger batch B (and sigma = ratio x B with it) end at a higher test *error*?

    python analysis/noisy_sgd_batch.py --quick      # the small setting, on CPU (723 CPU-s: ~6 min on 2 idle cores)
    python analysis/noisy_sgd_batch.py              # configs/sweeps/dp-cifar5m-batch.yaml: ResNet-18, a GPU
    python analysis/noisy_sgd_batch.py --sweep DIR  # analyse runs trained elsewhere (DIR: stage 2, DIR-tune: stage 1)

Arms, each at every batch B of the grid (sigma is the std of the noise on the *summed* gradient, so the
averaged gradient gets sigma / B = ratio whatever B):

- none: plain SGD, noise.kind none. A larger B only lowers the mini-batch noise; this separates the
  mini-batch noise from the injected noise.
- gaussian: Noisy-SGD, g = mean gradient + (sigma / B) xi.
- dp: DP-SGD, g = (sum clip_C(g_i) + sigma C xi) / B. Epsilon is goldenpath's (goldenpath/privacy.py):
  online each sample enters one noised sum (one Gaussian mechanism, delta 1e-5); offline the RDP accountant
  of the subsampled Gaussian over all steps, at delta = 1 / N. The settings keep epsilon <= 8 everywhere.

Regimes: "offline, fixed steps" (S steps over a fixed subset of N samples; a larger B makes more epochs),
"online, fixed steps" (S steps on the fresh stream: a larger B also sees more fresh samples) and
"online, fixed samples" (every B gets the S x B_min samples of the smallest batch: a larger B makes fewer
steps). At B_min the two online regimes are the same run.

Pre-registered protocol (written before any run; the constants below hold it):

1. Learning rate. Stage 1 trains every (kind, regime, B) cell at each lr of its grid (3 or 4 values) on the tuning
   seeds TUNE_SEEDS, which are not used for the verdict. The lr chosen for a cell is the one with the
   lowest mean over those seeds of the last-k error (ties: the smaller lr); an lr with a run that diverged,
   stalled or failed is not eligible. Separate tuning seeds keep the winner's-curse bias of the selection
   out of the evaluation seeds.
2. Stage 2 trains each cell at its chosen lr on the seeds SEEDS (5).
3. The last-k error of a run is the mean eval error over the evals in the last LAST_FRACTION of its steps
   (about 3 evals: eval every 1/10 of the run). A cell is "settled" when the mean over seeds of the last-k
   error minus that of the window before it (the evals in [1 - 2 LAST_FRACTION, 1 - LAST_FRACTION) of the
   steps) is at most SETTLE_TOLERANCE in absolute value; an unsettled cell is named in the verdict line.
4. Verdict per (kind, regime), on the error (the paper's quantity): d = mean last-k error at the largest B
   minus at the smallest B over stage-2 seeds, with a Welch 95% t-interval. The claim (a larger batch
   ends worse) **holds** if the interval lies above 0; **does not hold** if it lies below 0 (a larger
   batch ends better) or if the two one-sided Welch tests (TOST) at the margin +-MARGIN (1 percentage point
   of error) both reject at ALPHA ("flat"); **inconclusive at this scale** otherwise, or when a stage-2 run
   did not complete or fewer than MIN_SEEDS seeds completed at either end.
5. The same d, interval and TOST are reported for the last-k eval *loss* as a secondary quantity. Loss
   rising while the error does not (interval of d_loss above 0, error verdict not "holds") is reported as
   overconfidence, not as the claim.

Quick: a 2-layer width-64 MLP (configs/teacher-mlp.yaml, DP fast path) on the embedded teacher stream,
B = 128, 256, 512 at sigma / B = 1/128 (dp: sigma = 1, 2, 4, C = 1), S = 250 steps, N = 8192 offline, lr grids
{0.01, 0.03, 0.1, 0.3} for every kind (dp first had {0.03, 0.1, 0.3}; its lower edge won).
Full: the rows of configs/sweeps/dp-cifar5m-batch.yaml (ResNet-18 on CIFAR-5m; a GPU), read by this script.

Writes analysis/results/noisy_sgd_batch/: results.csv (one row per run and regime it belongs to: stage,
kind, regime, batch, sigma, lr, steps, samples, seed, state, last-k and earlier-window error and loss,
final eval loss and error, epsilon), cells.csv and verdicts.csv (what section() shows), error_vs_batch.png
(last-k error and loss against B with 95% intervals) and curves.png (eval error against steps, stage 2).
The runs stay under --work (analysis/runs by default; a re-run only trains what is missing).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from common import CONFIGS, markdown_table, parser, results_dir, run_grid

# ----------------------------------------------------------------------------- the pre-registered rule
MARGIN = 0.01             # equivalence margin on error for "flat": 1 percentage point
ALPHA = 0.05              # both TOST one-sided tests and the 95% intervals
MIN_SEEDS = 3             # completed stage-2 seeds needed at each end for a verdict
LAST_FRACTION = 0.25      # the last-k window: evals in the last quarter of a run's steps
SETTLE_TOLERANCE = 0.005  # a cell is settled if its last-k error moved by at most 0.5 pp from the window before
TUNE_SEEDS = (1000, 1001)  # stage 1 (lr choice); never used for a verdict
SEEDS = (0, 1, 2, 3, 4)    # stage 2 (the verdict)
EVALS_PER_RUN = 10        # eval every steps / 10 (after the log-spaced early evals)

KINDS = ("none", "gaussian", "dp")
REGIMES = ("offline, fixed steps", "online, fixed steps", "online, fixed samples")
EPSILON_MAX = 8.0         # the dp settings must keep epsilon at or below this (checked before training)

FULL_SWEEP = CONFIGS / "sweeps" / "dp-cifar5m-batch.yaml"  # stage 1 of the GPU-scale version
QUICK = {
    "base": "teacher-mlp.yaml",
    "design": {"batches": (128, 256, 512), "ratio": 1 / 128, "steps": 250, "offline_size": 8192, "clip": 1.0,
               # the lr grids (x sqrt(10) apart) bracket the base lr of each optimizer family: plain SGD with
               # momentum 0.9 at 0.02 (teacher-mlp) up to 0.3 (at 100 steps 0.1 won at the larger B); clipped
               # DP-SGD first had 0.03-0.3, and 0.03, its lower edge, won in 7 of 9 cells, so its grid was
               # extended by one step down to the grid of the other kinds
               "lrs": {"none": (0.01, 0.03, 0.1, 0.3), "gaussian": (0.01, 0.03, 0.1, 0.3),
                       "dp": (0.01, 0.03, 0.1, 0.3)}},
    "set": {"model.width": 64, "data.eval_size": 1024, "data.probe_size": 64, "checkpoint.targets": [],
            "optim.schedule": "constant", "budget.min_progress": None},
}
COMMON = {"budget.stop_at_last_target": False, "log.progress": False}  # every run takes all its steps
JOINT = ("optim.batch_size,noise.kind,noise.sigma,noise.clip,data.epochs,data.train_size,budget.samples,"
         "checkpoint.eval_every,optim.lr")


# ----------------------------------------------------------------------------- the design


def design_rows(*, batches, ratio, steps, offline_size, clip, lrs) -> list[list]:
    """Stage-1 rows of the joint grid key JOINT: every kind x regime x B x lr (the shared B_min online run once).

    Fixed steps: budget.samples = steps x B. Fixed samples: budget.samples = steps x min(batches). Offline:
    data.epochs is the number of passes the budget needs (+1), over data.train_size = offline_size.
    """
    rows, seen = [], set()
    small = min(batches)
    for kind in KINDS:
        for regime in REGIMES:
            for b in sorted(batches, reverse=True):  # largest first: the longest runs start first
                samples = steps * (small if regime == "online, fixed samples" else b)
                sigma = 0.0 if kind == "none" else ratio * b
                epochs, size = (math.ceil(samples / offline_size) + 1, offline_size) if regime.startswith("offline") \
                    else (1, None)
                every = max(1, samples // b // EVALS_PER_RUN)
                for lr in lrs[kind]:
                    row = [b, kind, sigma, clip if kind == "dp" else None, epochs, size, samples, every, lr]
                    if tuple(row) not in seen:
                        seen.add(tuple(row))
                        rows.append(row)
    return rows


def setting(quick: bool) -> dict:
    """base config, fixed overrides and the stage-1 rows (quick: QUICK; full: the sweep file)."""
    if quick:
        return {"base": CONFIGS / QUICK["base"], "set": dict(QUICK["set"]), "rows": design_rows(**QUICK["design"])}
    spec = yaml.safe_load(FULL_SWEEP.read_text())
    if list(spec.get("grid", {})) != [JOINT]:
        raise SystemExit(f"{FULL_SWEEP}: grid must have the one joint key {JOINT!r}; write the rows of design_rows()")
    return {"base": (FULL_SWEEP.parent / spec["base"]).resolve(), "set": dict(spec.get("set") or {}),
            "rows": spec["grid"][JOINT]}


def row_epsilon(row: list, delta_online: float = 1e-5) -> float | None:
    """epsilon of a dp row as goldenpath records it (goldenpath.privacy), None for the other kinds."""
    from goldenpath.privacy import epsilon

    b, kind, sigma, _clip, epochs, size, samples, _every, _lr = row
    if kind != "dp":
        return None
    if epochs > 1:
        return epsilon(sigma, 1 / size, steps=samples // b, sample_rate=b / size)
    return epsilon(sigma, delta_online)


def check_rows(rows: list[list]) -> None:
    """Every dp row keeps epsilon <= EPSILON_MAX; every kind x B has the same number of steps in fixed steps."""
    for row in rows:
        eps = row_epsilon(row)
        if eps is not None and eps > EPSILON_MAX:
            raise SystemExit(f"noise.sigma={row[2]} at optim.batch_size={row[0]} gives epsilon {eps:.1f} > "
                             f"{EPSILON_MAX:g}: raise sigma / B, or use fewer steps or a larger data.train_size")


# ----------------------------------------------------------------------------- training


def _train_point(task: tuple) -> str:
    base, overrides = task
    from goldenpath.config import load_config
    from goldenpath.train import train

    try:
        train(load_config(base, list(overrides)))
    except Exception as error:  # noqa: BLE001 - the run's status says failed; the others go on
        return f"failed: {error}"
    return "done"


def run_stage(name: str, base: Path, work: Path, *, fixed: dict, rows: list, seeds, jobs: int,
              in_process: bool) -> Path:
    """Train (or continue) one stage as a goldenpath sweep; returns its dir (runs.csv written by goldenpath).

    ``in_process``: the same run directories and runs.csv as ``goldenpath sweep``, but each of ``jobs``
    worker processes imports torch once for all its runs instead of once a run (about 5 s of CPU a run
    on the quick setting, more than a run's training).
    """
    grid = {JOINT: rows}
    if not in_process:
        return run_grid(name, base, work, fixed=fixed, grid=grid, seeds=seeds, jobs=jobs)
    import multiprocessing

    from goldenpath import checkpoints as ckpt
    from goldenpath.sweep import expand, load_sweep, write_runs_csv

    work.mkdir(parents=True, exist_ok=True)
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"name": name, "base": str(base), "set": fixed, "grid": grid,
                                    "seeds": list(seeds)}, sort_keys=False))
    sweep = load_sweep(path)
    points = expand(sweep)
    sweep_dir = work / sweep.name
    sweep_dir.mkdir(parents=True, exist_ok=True)
    ckpt.write_text(sweep_dir / "sweep.yaml", path.read_text())

    todo = [(str(sweep.base), (*p.overrides, f"out={sweep_dir}", f"name={p.name}")) for p in points
            if ckpt.RunDir(sweep_dir / p.name).state() not in ("completed", "stalled", "diverged")]
    print(f"{name}: {len(points)} runs, {len(todo)} to train", flush=True)
    if todo:
        with multiprocessing.get_context("spawn").Pool(jobs) as pool:
            for i, outcome in enumerate(pool.imap_unordered(_train_point, todo), 1):
                if outcome != "done" or i % 25 == 0 or i == len(todo):
                    print(f"{name}: {i}/{len(todo)} {outcome}", flush=True)
    write_runs_csv(sweep_dir, points)
    return sweep_dir


def train(work: Path, *, quick: bool, jobs: int) -> tuple[Path, Path]:
    """Stage 1 (lr grid on TUNE_SEEDS), the lr choice, then stage 2 (chosen lr on SEEDS); both sweep dirs."""
    s = setting(quick)
    check_rows(s["rows"])
    fixed = {**COMMON, **s["set"]}
    tag = "-quick" if quick else ""
    tune_dir = run_stage(f"noisy-sgd-batch{tag}-tune", s["base"], work, fixed=fixed, rows=s["rows"],
                         seeds=TUNE_SEEDS, jobs=jobs, in_process=quick)
    chosen = choose_lr(tidy(tune_dir, stage="tune"))
    keep = {(c.kind, c.regime, c.batch, c.lr) for c in chosen.itertuples()}
    rows = [r for r in s["rows"] if any(_row_key(r, regime) in keep for regime in _regimes(r, s["rows"]))]
    main_dir = run_stage(f"noisy-sgd-batch{tag}", s["base"], work, fixed=fixed, rows=rows, seeds=SEEDS,
                         jobs=jobs, in_process=quick)
    return tune_dir, main_dir


def _row_key(row: list, regime: str) -> tuple:
    return (row[1], regime, row[0], row[8])


def _regimes(row: list, rows: list) -> list[str]:
    """The regimes a row belongs to (the online B_min run to both online ones)."""
    b, epochs, samples = row[0], row[4], row[6]
    if epochs > 1:
        return ["offline, fixed steps"]
    small = min(r[0] for r in rows)
    steps = {r[6] // r[0] for r in rows if r[0] == small}  # S: every B_min run makes the fixed step count
    out = []
    if samples // b in steps:
        out.append("online, fixed steps")
    if samples in {small * x for x in steps}:
        out.append("online, fixed samples")
    return out


# ----------------------------------------------------------------------------- tables


def window_means(curves: pd.DataFrame, *, last: float = LAST_FRACTION) -> pd.DataFrame:
    """Per run: mean eval error and loss over the evals in the last ``last`` of its steps (last_*), and over
    the window of the same width before it (prev_*), with the number of evals in the last window."""
    rows = []
    for run, part in curves.groupby("run", sort=False):
        total = part.step.max()
        lo, mid = (1 - 2 * last) * total, (1 - last) * total
        tail, prev = part[part.step >= mid], part[(part.step >= lo) & (part.step < mid)]
        rows.append({"run": run, "last_error": tail.eval_error.mean(), "last_loss": tail.eval_loss.mean(),
                     "prev_error": prev.eval_error.mean(), "prev_loss": prev.eval_loss.mean(),
                     "last_evals": len(tail)})
    return pd.DataFrame(rows, columns=["run", "last_error", "last_loss", "prev_error", "prev_loss", "last_evals"])


def tidy(sweep_dir: Path, *, stage: str) -> pd.DataFrame:
    """One row per run and regime it belongs to: stage, kind, regime, batch, sigma, lr, steps, samples, seed,
    state, last-k and earlier-window error and loss, final eval loss and error, epsilon, run."""
    from goldenpath.curves import sweep_curves

    runs = pd.read_csv(sweep_dir / "runs.csv")
    spec = yaml.safe_load((sweep_dir / "sweep.yaml").read_text())
    rows = spec["grid"][JOINT]
    curves = sweep_curves(sweep_dir)
    means = window_means(curves) if len(curves) else window_means(pd.DataFrame(
        columns=["run", "step", "eval_error", "eval_loss"]))
    runs = runs.merge(means, on="run", how="left")
    records = []
    for _, r in runs.iterrows():
        row = [int(r["optim.batch_size"]), r["noise.kind"], float(r["noise.sigma"]),
               None if pd.isna(r["noise.clip"]) else float(r["noise.clip"]), int(r["data.epochs"]),
               None if pd.isna(r["data.train_size"]) else int(r["data.train_size"]), int(r["budget.samples"]),
               int(r["checkpoint.eval_every"]), float(r["optim.lr"])]
        for regime in _regimes(row, rows):
            records.append({
                "stage": stage, "kind": row[1], "regime": regime, "batch": row[0], "sigma": row[2],
                "ratio": row[2] / row[0], "lr": row[8], "steps": r.step, "samples": r.samples, "seed": r.seed,
                "state": r.state, "last_error": r.last_error, "last_loss": r.last_loss,
                "prev_error": r.prev_error, "prev_loss": r.prev_loss, "last_evals": r.last_evals,
                "eval_loss": r.eval_loss, "eval_error": r.eval_error, "epsilon": r.epsilon, "run": r.run})
    return pd.DataFrame(records)


def choose_lr(tune: pd.DataFrame) -> pd.DataFrame:
    """Rule 1: per (kind, regime, batch), the lr with the lowest mean last-k error over the tuning seeds; an
    lr with any run not completed is not eligible; ties go to the smaller lr. One row per cell with a choice:
    kind, regime, batch, lr, tune_error (that mean), eligible (how many lrs were)."""
    rows = []
    for (kind, regime, batch), part in tune.groupby(["kind", "regime", "batch"], sort=False):
        scores = {}
        for lr, runs in part.groupby("lr"):
            if (runs.state == "completed").all() and len(runs) == len(TUNE_SEEDS) and runs.last_error.notna().all():
                scores[lr] = runs.last_error.mean()
        if scores:
            lr = min(scores, key=lambda k: (scores[k], k))
            rows.append({"kind": kind, "regime": regime, "batch": batch, "lr": lr, "tune_error": scores[lr],
                         "eligible": len(scores), "grid": part.lr.nunique()})
    return pd.DataFrame(rows, columns=["kind", "regime", "batch", "lr", "tune_error", "eligible", "grid"])


def t_interval(x, level: float = 1 - ALPHA) -> tuple[float, float, float]:
    """Mean and the Student-t interval of the mean of ``x`` (nan for fewer than 2 values)."""
    from scipy import stats

    x = np.asarray(x, float)
    x = x[np.isfinite(x)]
    if len(x) < 2:
        return (float(x.mean()) if len(x) else math.nan, math.nan, math.nan)
    lo, hi = stats.t.interval(level, len(x) - 1, loc=x.mean(), scale=stats.sem(x))
    return float(x.mean()), float(lo), float(hi)


def compare(large, small, *, margin: float = MARGIN, alpha: float = ALPHA) -> dict:
    """d = mean(large) - mean(small), its Welch (1 - alpha) interval, and the TOST p-value at +-margin
    (the larger of the two one-sided Welch p-values: H0 d >= margin, H0 d <= -margin)."""
    from scipy import stats

    a, b = np.asarray(large, float), np.asarray(small, float)
    if len(a) < 2 or len(b) < 2:
        return {"d": math.nan, "ci_low": math.nan, "ci_high": math.nan, "p_tost": math.nan}
    res = stats.ttest_ind(a, b, equal_var=False)
    ci = res.confidence_interval(1 - alpha)
    upper = stats.ttest_ind(a - margin, b, equal_var=False, alternative="less").pvalue
    lower = stats.ttest_ind(a + margin, b, equal_var=False, alternative="greater").pvalue
    return {"d": float(a.mean() - b.mean()), "ci_low": float(ci.low), "ci_high": float(ci.high),
            "p_tost": float(max(upper, lower))}


def verdict(c: dict, *, margin: float = MARGIN, alpha: float = ALPHA) -> str:
    """Rule 4 on a compare() result: holds, does not hold (better / flat) or inconclusive at this scale."""
    if not np.isfinite(c["d"]):
        return "inconclusive at this scale"
    if c["ci_low"] > 0:
        return "holds"
    if c["ci_high"] < 0:
        return "does not hold (larger batch better)"
    if c["p_tost"] < alpha:
        return f"does not hold (flat within {100 * margin:g} pp)"
    return "inconclusive at this scale"


def cells(frame: pd.DataFrame) -> pd.DataFrame:
    """Stage 2 per kind x regime x batch: lr, seeds completed, last-k error and loss (mean, 95% t-interval),
    drift of the error from the window before, settled, epsilon (dp)."""
    main = frame[frame.stage == "main"]
    rows = []
    for (kind, regime, batch), part in main.groupby(["kind", "regime", "batch"], sort=False):
        done = part[part.state == "completed"]
        e, elo, ehi = t_interval(done.last_error)
        lo, llo, lhi = t_interval(done.last_loss)
        drift = float((done.last_error - done.prev_error).mean()) if len(done) else math.nan
        rows.append({"kind": kind, "regime": regime, "batch": int(batch), "sigma": float(part.sigma.iloc[0]),
                     "lr": float(part.lr.iloc[0]), "steps": float(part.steps.max()),
                     "samples": float(part.samples.max()), "seeds": f"{len(done)}/{len(part)}",
                     "error": e, "error_low": elo, "error_high": ehi, "loss": lo, "loss_low": llo, "loss_high": lhi,
                     "drift": drift, "settled": bool(abs(drift) <= SETTLE_TOLERANCE),
                     "epsilon": float(done.epsilon.mean()) if kind == "dp" and len(done) else math.nan})
    out = pd.DataFrame(rows)
    if len(out):
        out["kind"] = pd.Categorical(out.kind, KINDS, ordered=True)
        out["regime"] = pd.Categorical(out.regime, REGIMES, ordered=True)
        out = out.sort_values(["kind", "regime", "batch"]).reset_index(drop=True)
        out["kind"], out["regime"] = out.kind.astype(str), out.regime.astype(str)
    return out


def verdicts(frame: pd.DataFrame) -> pd.DataFrame:
    """Rules 3-5 per (kind, regime): d, interval, TOST p, verdict for the error and for the loss."""
    main = frame[frame.stage == "main"]
    table = cells(frame)
    rows = []
    for kind in KINDS:
        for regime in REGIMES:
            part = main[(main.kind == kind) & (main.regime == regime)]
            if not len(part):
                continue
            small, large = part.batch.min(), part.batch.max()
            done = part[part.state == "completed"]
            a, b = done[done.batch == large], done[done.batch == small]
            ce, cl = compare(a.last_error, b.last_error), compare(a.last_loss, b.last_loss)
            v = verdict(ce)
            lost = part[part.state != "completed"]
            if len(lost) or len(a) < MIN_SEEDS or len(b) < MIN_SEEDS:
                v = "inconclusive at this scale"
            mine = table[(table.kind == kind) & (table.regime == regime)]
            unsettled = [int(x) for x in mine.batch[~mine.settled]]
            rows.append({"kind": kind, "regime": regime, "small": int(small), "large": int(large),
                         "n_small": len(b), "n_large": len(a), "not_completed": len(lost),
                         **{f"error_{k}": x for k, x in ce.items()}, "verdict": v,
                         **{f"loss_{k}": x for k, x in cl.items()}, "loss_verdict": verdict(cl, margin=math.nan),
                         "overconfident": bool(cl["ci_low"] > 0 and v != "holds"),
                         "unsettled": ";".join(map(str, unsettled))})
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------- figures


def plot(frame: pd.DataFrame, curves: pd.DataFrame, out: Path) -> None:
    """error_vs_batch.png (last-k error and loss with 95% intervals against B) and curves.png (stage 2)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = cells(frame)
    colours = {"none": "C7", "gaussian": "C0", "dp": "C3"}
    fig, axes = plt.subplots(2, len(REGIMES), figsize=(4.4 * len(REGIMES), 6.4), squeeze=False)
    for col, regime in enumerate(REGIMES):
        for row, (metric, label) in enumerate((("error", "last-k eval error"), ("loss", "last-k eval loss"))):
            ax = axes[row, col]
            for i, kind in enumerate(KINDS):
                t = table[(table.kind == kind) & (table.regime == regime)]
                if not len(t):
                    continue
                x = t.batch * (1.04 ** (i - 1))  # side by side on the log axis
                ax.errorbar(x, t[metric], yerr=[t[metric] - t[f"{metric}_low"], t[f"{metric}_high"] - t[metric]],
                            color=colours[kind], marker="o", ms=4, capsize=3, linewidth=1, label=kind)
            ax.set_xscale("log", base=2)
            ax.set_xlabel("batch B (sigma = ratio x B)")
            ax.set_ylabel(label)
            ax.set_title(regime, fontsize=9)
            ax.legend(fontsize=7)
    fig.suptitle("stage 2: mean over seeds, 95% t-interval; lr chosen per B on tuning seeds", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "error_vs_batch.png", dpi=100)
    plt.close(fig)

    main = frame[frame.stage == "main"][["run", "kind", "regime", "batch"]]
    data = curves.merge(main, on="run", suffixes=("_c", ""))
    fig, axes = plt.subplots(len(KINDS), len(REGIMES), figsize=(4.4 * len(REGIMES), 3.0 * len(KINDS)),
                             squeeze=False, sharey=True)
    batch_colours = {b: f"C{i}" for i, b in enumerate(sorted(main.batch.unique()))}
    for r, kind in enumerate(KINDS):
        for c, regime in enumerate(REGIMES):
            ax = axes[r, c]
            for run, part in data[(data.kind == kind) & (data.regime == regime)].groupby("run"):
                part = part.sort_values("step")
                ax.plot(part.step.clip(lower=1), part.eval_error, color=batch_colours[part.batch.iloc[0]],
                        linewidth=0.8, alpha=0.6)
            for b, colour in batch_colours.items():
                ax.plot([], [], color=colour, label=f"B={b}")
            ax.set_xscale("log")
            ax.set_title(f"{kind}, {regime}", fontsize=9)
            ax.set_xlabel("step")
            ax.set_ylabel("eval error")
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------- the README block


def _ci(m, lo, hi, digits: int = 3) -> str:
    return "" if not np.isfinite(m) else f"{m:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def _span(counts: pd.Series) -> str:
    """'3' when every cell has the same count, '3-4' otherwise."""
    low, high = int(counts.min()), int(counts.max())
    return f"{low}" if low == high else f"{low}-{high}"


def section(results: Path) -> str:
    """The README block, from results.csv alone: the protocol, a table per kind, the lr choices and the
    verdict lines."""
    frame = pd.read_csv(results / "results.csv")
    table, verdict_table = cells(frame), verdicts(frame)
    tune = frame[frame.stage == "tune"]
    chosen = choose_lr(tune)
    states = frame.drop_duplicates("run").groupby("stage").state.value_counts().to_dict()
    ratio = frame[frame.kind != "none"].ratio.iloc[0] if (frame.kind != "none").any() else math.nan
    lines = [
        f"{frame.run.nunique()} runs ({', '.join(f'{st} {s}: {n}' for (st, s), n in sorted(states.items()))}); "
        f"sigma / B = {ratio:.3g} for gaussian and dp at every B; none is plain SGD. Stage 1 picks the lr per "
        f"kind x regime x B (grid of {_span(tune.groupby(['kind', 'regime', 'batch']).lr.nunique())}) on tuning "
        f"seeds {', '.join(map(str, TUNE_SEEDS))}; stage 2 runs it on seeds {', '.join(map(str, SEEDS))}. Error "
        f"and loss are the mean over the evals in the last {100 * LAST_FRACTION:g}% of a run's steps (last-k), "
        f"then mean [95% t-interval] over stage-2 seeds; drift is the last-k error minus that of the window "
        f"before (settled: |drift| <= {100 * SETTLE_TOLERANCE:g} pp). Epsilon: dp only, delta 1e-5 online, "
        f"1/N offline.", ""]
    for kind in KINDS:
        t = table[table.kind == kind]
        if not len(t):
            continue
        shown = pd.DataFrame({
            "regime": t.regime, "B": t.batch, "sigma": t.sigma, "lr": t.lr, "steps": t.steps.astype(int),
            "samples": t.samples.astype(int), "seeds": t.seeds,
            "last-k error [95% CI]": [_ci(*x) for x in zip(t.error, t.error_low, t.error_high)],
            "last-k loss [95% CI]": [_ci(*x) for x in zip(t.loss, t.loss_low, t.loss_high)],
            "drift (pp)": 100 * t.drift, "epsilon": t.epsilon if kind == "dp" else ""})
        lines += [f"**{kind}**", "", markdown_table(shown), ""]
    if len(chosen):
        grids = tune.groupby("kind").lr.agg(["min", "max"])
        chosen = chosen.assign(edge=[lr in (grids.loc[k, "min"], grids.loc[k, "max"]) for k, lr in
                                     zip(chosen.kind, chosen.lr)])
        picks = chosen.groupby(["kind", "regime"], sort=False).apply(
            lambda x: ", ".join(f"B={b}: {lr:g}{'*' if e else ''}" for b, lr, e in zip(x.batch, x.lr, x.edge)),
            include_groups=False)
        grid_text = "; ".join(f"{k} {', '.join(f'{v:g}' for v in sorted(tune[tune.kind == k].lr.unique()))}"
                              for k in KINDS if (tune.kind == k).any())
        lines += [f"lr grid: {grid_text}. lr chosen (stage 1; * at the edge of its grid, so the best lr may lie "
                  "outside it): " + "; ".join(f"{k}, {r}: {v}" for (k, r), v in picks.items()) + ".", ""]
    lines += [f"Rule (fixed before the runs): d = last-k error at the largest B minus at the smallest, Welch 95% "
              f"interval over stage-2 seeds. Holds if the interval lies above 0; does not hold if it lies below "
              f"0, or if TOST at +-{100 * MARGIN:g} pp rejects both sides at {ALPHA:g} (flat); inconclusive at "
              f"this scale otherwise, or with a run not completed or fewer than {MIN_SEEDS} seeds at either end. "
              f"The loss gets the same d and interval as a secondary quantity.", ""]
    for v in verdict_table.itertuples():
        eps = table[(table.kind == v.kind) & (table.regime == v.regime)].epsilon
        extra = f"; epsilon {eps.min():.2g}-{eps.max():.2g}" if v.kind == "dp" and eps.notna().any() else ""
        note = (" Loss rises while the error does not: overconfidence, not the claim." if v.overconfident else "")
        note += f" Not settled at B={v.unsettled}." if isinstance(v.unsettled, str) and v.unsettled else ""
        lines.append(
            f"- **{v.kind}, {v.regime}**: {v.verdict}. Error B={v.large} minus B={v.small}: "
            f"{100 * v.error_d:+.2f} pp [{100 * v.error_ci_low:+.2f}, {100 * v.error_ci_high:+.2f}], TOST p "
            f"{v.error_p_tost:.2g} (n = {v.n_large}, {v.n_small}); loss {v.loss_d:+.3f} "
            f"[{v.loss_ci_low:+.3f}, {v.loss_ci_high:+.3f}]{extra}.{note}")
    return "\n".join(lines)


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--sweep", help="analyse this stage-2 sweep dir (and its sibling <name>-tune) instead of training")
    args = p.parse_args()
    out = results_dir("noisy_sgd_batch")
    if args.sweep:
        main_dir = Path(args.sweep)
        tune_dir = main_dir.with_name(main_dir.name + "-tune")
        for d in (main_dir, tune_dir):
            if not (d / "runs.csv").exists():
                raise SystemExit(f"--sweep: {d / 'runs.csv'} not found; give the stage-2 sweep dir (its stage 1 "
                                 "is the sibling <name>-tune), e.g. analysis/runs/noisy-sgd-batch")
    else:
        tune_dir, main_dir = train(Path(args.work), quick=args.quick, jobs=args.jobs)
    from goldenpath.curves import sweep_curves

    frame = pd.concat([tidy(tune_dir, stage="tune"), tidy(main_dir, stage="main")], ignore_index=True)
    frame.to_csv(out / "results.csv", index=False)
    cells(frame).to_csv(out / "cells.csv", index=False)
    verdicts(frame).to_csv(out / "verdicts.csv", index=False)
    plot(frame, sweep_curves(main_dir), out)
    print(section(out))
    print(out)


if __name__ == "__main__":
    main()
