"""Noisy-SGD and DP-SGD at a fixed noise-to-batch ratio sigma / B (Sander et al. 2024): with the number of
steps fixed, does a larger batch B (and the noise with it) end at a higher test *error*?

    python analysis/noisy_sgd_batch.py --quick      # the small setting, on CPU (about 11 minutes on 2 idle cores)
    python analysis/noisy_sgd_batch.py              # configs/sweeps/dp-cifar5m-batch.yaml: ResNet-18, a GPU
    python analysis/noisy_sgd_batch.py --sweep DIR  # analyse runs trained elsewhere (DIR: stage 2, DIR-tune: stage 1)

Arms, each at every batch B of the grid; r = sigma / B is the std of the noise on the *averaged* gradient,
the same at every B and in both noised arms:

- none: plain SGD, noise.kind none. A larger B only lowers the mini-batch noise; this separates the
  mini-batch noise from the injected noise.
- gaussian: Noisy-SGD, g = mean gradient + r xi (noise.sigma = r B on the summed gradient).
- dp: DP-SGD, g = (sum clip_C(g_i) + sigma C xi) / B with sigma = r B / C, so its noise is Noisy-SGD's and the
  two arms differ by the clipping alone. Epsilon is goldenpath's (goldenpath/dp/privacy.py): online each sample
  enters one noised sum (one Gaussian mechanism, delta 1e-5); offline the RDP accountant of the subsampled
  Gaussian over all steps, at delta = 1 / N. It is recorded, not bounded, in quick mode: the noise that
  changes what this small model learns leaves no meaningful guarantee; the full mode keeps epsilon <= 8.

Regimes: "offline, fixed steps" (S steps over a fixed subset of N samples; a larger B makes more epochs) and
"online, fixed steps" (S steps on the fresh stream: a larger B also sees more fresh samples) are the paper's
setting and the headline; "online, fixed samples" (every B gets the S x B_min samples of the smallest batch:
a larger B makes fewer steps) is a second reading. At B_min the two online regimes are the same run.

Pre-registered protocol (fixed on 2026-12-04 before any run of this design; the constants below hold it):

0. Noise level (quick mode). Stage 0 trains, at B_min online, plain SGD and both noised arms at every r of
   RATIOS, each at every lr of its grid, on the tuning seeds TUNE_SEEDS. Per r, each arm takes its best lr
   (rule 1). The chosen r is the smallest at which Noisy-SGD ends at least DIFFERS above plain SGD's error
   (the noise measurably matters) while both noised arms learn (rule 3); if none does, the largest r at which
   both learn. The full mode's r is the one written in its sweep file.
1. Learning rate. Stage 1 trains every (kind, regime, B) cell at each lr of its grid on TUNE_SEEDS, which are
   not used for the verdict. The lr chosen for a cell is the one with the lowest mean over those seeds of the
   last-k error (ties: the smaller lr); an lr with a run that diverged, stalled or failed is not eligible.
2. Stage 2 trains each cell at its chosen lr on the seeds SEEDS as a paired goldenpath sweep (design:
   paired): seed s sets the initialisation, the stream and the noise draws in every cell, so the analysis
   pairs cells by seed. (Stages 0 and 1 give every run its own seed.)
3. The last-k error of a run is the mean eval error over the evals in the last LAST_FRACTION of its steps.
   An arm *learns* in a cell when it closes at least LEARNS of the gap from the chance loss (the eval labels'
   entropy) to plain SGD's last-k loss in the same regime and B (mean over seeds); a line whose cells do not
   all learn is inconclusive. A cell is "settled" when the mean over seeds of the last-k error minus that of
   the window before it is at most SETTLE_TOLERANCE in absolute value; an unsettled cell is named.
4. Lines, per regime: for each kind, d = last-k error at the largest B minus at the smallest; for the
   contrasts (gaussian - none: the injected noise beyond mini-batch noise; dp - gaussian: the clipping), the
   difference of the two kinds' d. Each is a per-seed paired difference; over seeds its mean, a 95%
   t-interval, the two-sided t-test p and the TOST p at +-MARGIN (1 percentage point of error). The family
   is a reading (fixed steps: 10 lines; fixed samples: 5), Holm-adjusted within it for each of the two tests.
   A kind's claim (a larger batch ends worse) **holds** if the adjusted p < ALPHA with d > 0; **does not
   hold** if the adjusted p < ALPHA with d < 0 (a larger batch ends better) or if the adjusted TOST p < ALPHA
   ("flat"); **inconclusive at this scale** otherwise, or when a run did not complete, fewer than MIN_SEEDS
   seeds are paired, or an arm did not learn. A contrast reads the same way ("larger for gaussian", "larger
   for none", "the same within 1 pp").
5. The same paired d and interval are reported for the last-k eval *loss* as a secondary quantity. Loss
   rising while the error does not (interval of d_loss above 0, error verdict not "holds") is reported as
   overconfidence, not as the claim.

Quick: a 2-layer width-64 MLP (configs/teacher-mlp.yaml, DP fast path) on the embedded teacher stream,
B = 128, 256, 512, S = 500 steps, N = 8192 offline, C = 8 (per-sample gradient norms of this model are 5-20,
so clipping binds on most samples), r from {1/128, 1/64, 1/32, 1/16}, lr grid {0.01, 0.03, 0.1} for every
kind. Full: the rows of configs/sweeps/dp-cifar5m-batch.yaml (ResNet-18 on CIFAR-5m, C = 1, r = 1/1024; a
GPU), read by this script.

Writes analysis/results/noisy_sgd_batch/: results.csv (one row per run and regime it belongs to: stage,
kind, regime, batch, sigma, ratio, lr, steps, samples, seed, state, last-k and earlier-window error and
loss, final eval loss and error, chance loss, epsilon), ratio.csv (stage 0), cells.csv and verdicts.csv
(what section() shows), error_vs_batch.png (last-k error and loss against B with 95% intervals) and
curves.png (eval error against steps, stage 2). The runs stay under --work (analysis/runs by default; a
re-run only trains what is missing).
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
ALPHA = 0.05              # both tests (Holm-adjusted within a reading) and the 95% intervals
MIN_SEEDS = 3             # paired stage-2 seeds needed for a verdict
LAST_FRACTION = 0.25      # the last-k window: evals in the last quarter of a run's steps
SETTLE_TOLERANCE = 0.005  # a cell is settled if its last-k error moved by at most 0.5 pp from the window before
LEARNS = 0.75             # an arm learns when it closes 3/4 of the gap from chance to plain SGD's loss
DIFFERS = 0.01            # stage 0: Noisy-SGD's error must exceed plain SGD's by this (1 pp) at B_min
TUNE_SEEDS = (1000, 1001)  # stages 0 and 1 (r and lr choice); never used for a verdict
SEEDS = tuple(range(8))   # stage 2 (the verdict)
EVALS_PER_RUN = 10        # eval every steps / 10 (after the log-spaced early evals)

KINDS = ("none", "gaussian", "dp")
CONTRASTS = (("gaussian", "none"), ("dp", "gaussian"))  # the injected noise; the clipping
REGIMES = ("offline, fixed steps", "online, fixed steps", "online, fixed samples")
READINGS = {"fixed steps": REGIMES[:2], "fixed samples": REGIMES[2:]}
EPSILON_MAX = 8.0         # the full mode's dp rows must keep epsilon at or below this (checked before training)

FULL_SWEEP = CONFIGS / "sweeps" / "dp-cifar5m-batch.yaml"  # stage 1 of the GPU-scale version
QUICK = {
    "base": "teacher-mlp.yaml",
    "ratios": (1 / 128, 1 / 64, 1 / 32, 1 / 16),
    # lr grids x sqrt(10) apart around plain SGD's best at B = 128 (0.01; 0.003 was measured worse for
    # every arm, and the larger batches want larger lrs)
    "design": {"batches": (128, 256, 512), "steps": 500, "offline_size": 8192, "clip": 8.0,
               "lrs": {"none": (0.01, 0.03, 0.1), "gaussian": (0.01, 0.03, 0.1), "dp": (0.01, 0.03, 0.1)}},
    "set": {"model.width": 64, "data.eval_size": 1024, "data.probe_size": 64, "checkpoint.targets": [],
            "optim.schedule": "constant", "budget.min_progress": None},
}
COMMON = {"budget.stop_at_last_target": False, "log.progress": False}  # every run takes all its steps
JOINT = ("optim.batch_size,noise.kind,noise.sigma,noise.clip,data.epochs,data.train_size,budget.samples,"
         "checkpoint.eval_every,optim.lr")


# ----------------------------------------------------------------------------- the design


def _row(kind: str, b: int, *, ratio: float, clip: float, epochs: int, size, samples: int, lr: float) -> list:
    """One row of JOINT; the noise on the averaged gradient is ``ratio`` in both noised arms."""
    sigma = 0.0 if kind == "none" else ratio * b / (clip if kind == "dp" else 1.0)
    return [b, kind, sigma, clip if kind == "dp" else None, epochs, size, samples,
            max(1, samples // b // EVALS_PER_RUN), lr]


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
                epochs, size = (math.ceil(samples / offline_size) + 1, offline_size) if regime.startswith("offline") \
                    else (1, None)
                for lr in lrs[kind]:
                    row = _row(kind, b, ratio=ratio, clip=clip, epochs=epochs, size=size, samples=samples, lr=lr)
                    if tuple(row) not in seen:
                        seen.add(tuple(row))
                        rows.append(row)
    return rows


def ratio_rows(*, ratios, batches, steps, clip, lrs, **_) -> list[list]:
    """Stage-0 rows: at B_min online (S steps), plain SGD once and both noised arms at every r, every lr."""
    b = min(batches)
    rows = [_row("none", b, ratio=0.0, clip=clip, epochs=1, size=None, samples=steps * b, lr=lr)
            for lr in lrs["none"]]
    return rows + [_row(kind, b, ratio=r, clip=clip, epochs=1, size=None, samples=steps * b, lr=lr)
                   for r in ratios for kind in KINDS[1:] for lr in lrs[kind]]


def setting(quick: bool, ratio: float | None = None) -> dict:
    """base config, fixed overrides and the stage-1 rows (quick: QUICK at ``ratio``, or at the smallest r when
    None; full: the sweep file)."""
    if quick:
        design = QUICK["design"]
        return {"base": CONFIGS / QUICK["base"], "set": dict(QUICK["set"]),
                "rows": design_rows(**design, ratio=QUICK["ratios"][0] if ratio is None else ratio),
                "ratio_rows": ratio_rows(**design, ratios=QUICK["ratios"])}
    spec = yaml.safe_load(FULL_SWEEP.read_text())
    if list(spec.get("grid", {})) != [JOINT]:
        raise SystemExit(f"{FULL_SWEEP}: grid must have the one joint key {JOINT!r}; write the rows of design_rows()")
    return {"base": (FULL_SWEEP.parent / spec["base"]).resolve(), "set": dict(spec.get("set") or {}),
            "rows": spec["grid"][JOINT], "ratio_rows": None}


def row_ratio(row: list) -> float:
    """The std of the noise on the averaged gradient of a row (0 for plain SGD)."""
    b, kind, sigma, clip = row[:4]
    return sigma * (clip if kind == "dp" else 1.0) / b


def row_epsilon(row: list, delta_online: float = 1e-5) -> float | None:
    """epsilon of a dp row as goldenpath records it (goldenpath.dp.privacy), None for the other kinds."""
    from goldenpath.dp.privacy import epsilon

    b, kind, sigma, _clip, epochs, size, samples, _every, _lr = row
    if kind != "dp":
        return None
    if epochs > 1:
        return epsilon(sigma, 1 / size, steps=samples // b, sample_rate=b / size)
    return epsilon(sigma, delta_online)


def check_rows(rows: list[list]) -> None:
    """Every dp row keeps epsilon <= EPSILON_MAX (the full mode, where the guarantee is part of the claim)."""
    for row in rows:
        eps = row_epsilon(row)
        if eps is not None and eps > EPSILON_MAX:
            raise SystemExit(f"noise.sigma={row[2]} at optim.batch_size={row[0]} gives epsilon {eps:.1f} > "
                             f"{EPSILON_MAX:g}: raise sigma / B, or use fewer steps or a larger data.train_size")


# ----------------------------------------------------------------------------- training


def _train_point(task: tuple) -> str:
    base, overrides = task
    from goldenpath.config import load_config
    from goldenpath.training.trainer import train

    try:
        train(load_config(base, list(overrides)))
    except Exception as error:  # noqa: BLE001 - the run's status says failed; the others go on
        return f"failed: {error}"
    return "done"


def run_stage(name: str, base: Path, work: Path, *, fixed: dict, rows: list, seeds, jobs: int,
              in_process: bool, design: str = "independent") -> Path:
    """Train (or continue) one stage as a goldenpath sweep; returns its dir (runs.csv written by goldenpath).

    ``in_process``: the same run directories and runs.csv as ``goldenpath sweep``, but each of ``jobs``
    worker processes imports torch once for all its runs instead of once a run (about 5 s of CPU a run
    on the quick setting, more than a run's training).
    """
    grid = {JOINT: rows}
    if not in_process:
        return run_grid(name, base, work, fixed=fixed, grid=grid, seeds=seeds, jobs=jobs, design=design)
    import multiprocessing

    from goldenpath.store import files, rundir as ckpt
    from goldenpath.config.grid import expand, load_sweep
    from goldenpath.training.sweep import write_runs_csv

    work.mkdir(parents=True, exist_ok=True)
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"name": name, "base": str(base), "set": fixed, "grid": grid,
                                    "seeds": list(seeds), "design": design}, sort_keys=False))
    sweep = load_sweep(path)
    points = expand(sweep)
    sweep_dir = work / sweep.name
    sweep_dir.mkdir(parents=True, exist_ok=True)
    files.write_text(sweep_dir / "sweep.yaml", path.read_text())

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


def train(work: Path, *, quick: bool, jobs: int) -> tuple[Path | None, Path, Path]:
    """Stage 0 (quick: the r grid on TUNE_SEEDS) and the r choice, stage 1 (lr grid on TUNE_SEEDS) and the lr
    choice, then stage 2 (chosen lr on SEEDS); the three sweep dirs (None for stage 0 in full mode)."""
    fixed = {**COMMON, **setting(quick)["set"]}
    tag = "-quick" if quick else ""
    ratio_dir, ratio = None, None
    if quick:
        s = setting(quick)
        ratio_dir = run_stage(f"noisy-sgd-batch{tag}-ratio", s["base"], work, fixed=fixed, rows=s["ratio_rows"],
                              seeds=TUNE_SEEDS, jobs=jobs, in_process=quick)
        ratio = choose_ratio(tidy(ratio_dir, stage="ratio")).attrs["chosen"]
    s = setting(quick, ratio)
    if not quick:
        check_rows(s["rows"])
    tune_dir = run_stage(f"noisy-sgd-batch{tag}-tune", s["base"], work, fixed=fixed, rows=s["rows"],
                         seeds=TUNE_SEEDS, jobs=jobs, in_process=quick)
    chosen = choose_lr(tidy(tune_dir, stage="tune"))
    keep = {(c.kind, c.regime, c.batch, c.lr) for c in chosen.itertuples()}
    rows = [r for r in s["rows"] if any(_row_key(r, regime) in keep for regime in _regimes(r, s["rows"]))]
    main_dir = run_stage(f"noisy-sgd-batch{tag}", s["base"], work, fixed=fixed, rows=rows, seeds=SEEDS,
                         jobs=jobs, in_process=quick, design="paired")
    return ratio_dir, tune_dir, main_dir


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
    """One row per run and regime it belongs to (stage 0: online, fixed steps only): stage, kind, regime,
    batch, sigma, ratio, lr, steps, samples, seed, state, last-k and earlier-window error and loss, final eval
    loss and error, chance loss, epsilon, run."""
    from goldenpath.store import rundir as ckpt
    from goldenpath.draw.curves import sweep_curves

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
        chance = ckpt.RunDir(sweep_dir / r.run).status().get("chance_loss", math.nan)
        for regime in _regimes(row, rows):
            if stage == "ratio" and regime != "online, fixed steps":
                continue
            records.append({
                "stage": stage, "kind": row[1], "regime": regime, "batch": row[0], "sigma": row[2],
                "ratio": row_ratio(row), "lr": row[8], "steps": r.step, "samples": r.samples, "seed": r.seed,
                "state": r.state, "last_error": r.last_error, "last_loss": r.last_loss,
                "prev_error": r.prev_error, "prev_loss": r.prev_loss, "last_evals": r.last_evals,
                "eval_loss": r.eval_loss, "eval_error": r.eval_error, "chance": chance, "epsilon": r.epsilon,
                "run": r.run})
    return pd.DataFrame(records)


def choose_lr(tune: pd.DataFrame) -> pd.DataFrame:
    """Rule 1: per (kind, regime, batch, ratio), the lr with the lowest mean last-k error over the tuning seeds;
    an lr with any run not completed is not eligible; ties go to the smaller lr. One row per cell with a
    choice: kind, regime, batch, ratio, lr, tune_error and tune_loss (those means), chance, eligible (how many
    lrs were), grid."""
    rows = []
    for (kind, regime, batch, ratio), part in tune.groupby(["kind", "regime", "batch", "ratio"], sort=False):
        scores = {}
        for lr, runs in part.groupby("lr"):
            if (runs.state == "completed").all() and len(runs) == len(TUNE_SEEDS) and runs.last_error.notna().all():
                scores[lr] = (runs.last_error.mean(), runs.last_loss.mean())
        if scores:
            lr = min(scores, key=lambda k: (scores[k][0], k))
            rows.append({"kind": kind, "regime": regime, "batch": batch, "ratio": ratio, "lr": lr,
                         "tune_error": scores[lr][0], "tune_loss": scores[lr][1], "chance": part.chance.mean(),
                         "eligible": len(scores), "grid": part.lr.nunique()})
    return pd.DataFrame(rows, columns=["kind", "regime", "batch", "ratio", "lr", "tune_error", "tune_loss", "chance",
                                       "eligible", "grid"])


def learned(loss: float, plain: float, chance: float) -> float:
    """The share of the gap from the chance loss to plain SGD's loss that an arm's loss closes (rule 3)."""
    return (chance - loss) / (chance - plain)


def choose_ratio(frame: pd.DataFrame) -> pd.DataFrame:
    """Rule 0 on stage 0: per r, each noised arm at its best lr, its error above plain SGD's and the share of
    the gap it learns; ``attrs["chosen"]`` is the r the rule picks. Columns: ratio, gaussian_error, dp_error,
    none_error, gaussian_above (error minus plain's), gaussian_learns, dp_learns (shares), ok_differs,
    ok_learns, chosen."""
    best = choose_lr(frame)
    plain = best[best.kind == "none"].iloc[0]
    rows = []
    for ratio in sorted(set(best.ratio) - {0.0}):
        arm = {k: best[(best.kind == k) & (best.ratio == ratio)] for k in KINDS[1:]}
        if any(not len(a) for a in arm.values()):
            continue
        g, d = arm["gaussian"].iloc[0], arm["dp"].iloc[0]
        rows.append({"ratio": ratio, "none_error": plain.tune_error, "gaussian_error": g.tune_error,
                     "dp_error": d.tune_error, "gaussian_above": g.tune_error - plain.tune_error,
                     "gaussian_learns": learned(g.tune_loss, plain.tune_loss, plain.chance),
                     "dp_learns": learned(d.tune_loss, plain.tune_loss, plain.chance),
                     "gaussian_lr": g.lr, "dp_lr": d.lr})
    out = pd.DataFrame(rows)
    out["ok_differs"] = out.gaussian_above >= DIFFERS
    out["ok_learns"] = (out.gaussian_learns >= LEARNS) & (out.dp_learns >= LEARNS)
    both, learns = out[out.ok_differs & out.ok_learns], out[out.ok_learns]
    chosen = both.ratio.min() if len(both) else learns.ratio.max() if len(learns) else out.ratio.min()
    out["chosen"] = out.ratio == chosen
    out.attrs["chosen"] = float(chosen)
    return out


def t_interval(x, level: float = 1 - ALPHA) -> tuple[float, float, float]:
    """Mean and the Student-t interval of the mean of ``x`` (nan for fewer than 2 values)."""
    from scipy import stats

    x = np.asarray(x, float)
    x = x[np.isfinite(x)]
    if len(x) < 2:
        return (float(x.mean()) if len(x) else math.nan, math.nan, math.nan)
    lo, hi = stats.t.interval(level, len(x) - 1, loc=x.mean(), scale=stats.sem(x))
    return float(x.mean()), float(lo), float(hi)


def paired(diffs, *, margin: float = MARGIN, alpha: float = ALPHA) -> dict:
    """Per-seed paired differences: their mean d, its (1 - alpha) t-interval, the two-sided t-test p (H0 d = 0)
    and the TOST p at +-margin (the larger of the one-sided p-values of H0 d >= margin and H0 d <= -margin)."""
    from scipy import stats

    x = np.asarray(diffs, float)
    if len(x) < 2:
        return {"d": float(x.mean()) if len(x) else math.nan, "ci_low": math.nan, "ci_high": math.nan,
                "p": math.nan, "p_tost": math.nan}
    d, lo, hi = t_interval(x, 1 - alpha)
    p = stats.ttest_1samp(x, 0.0).pvalue
    upper = stats.ttest_1samp(x, margin, alternative="less").pvalue
    lower = stats.ttest_1samp(x, -margin, alternative="greater").pvalue
    return {"d": d, "ci_low": lo, "ci_high": hi, "p": float(p), "p_tost": float(max(upper, lower))}


def holm(p) -> np.ndarray:
    """Holm's step-down adjusted p-values (nan counts as 1: a line that cannot be tested stays in its family)."""
    p = np.nan_to_num(np.asarray(p, float), nan=1.0)
    order = np.argsort(p, kind="stable")
    adjusted = np.maximum.accumulate(np.minimum(1.0, (len(p) - np.arange(len(p))) * p[order]))
    out = np.empty_like(p)
    out[order] = adjusted
    return out


WORDS = {"kind": ("holds", "does not hold (larger batch better)", "does not hold (flat within {m:g} pp)"),
         "contrast": ("larger for {a}", "larger for {b}", "the same within {m:g} pp")}


def verdict(line: dict, *, alpha: float = ALPHA, margin: float = MARGIN) -> str:
    """Rule 4 on one line (Holm-adjusted p and p_tost, its kind and arms, why it cannot be tested)."""
    if line["why"]:
        return "inconclusive at this scale"
    up, down, flat = WORDS["contrast" if " - " in line["line"] else "kind"]
    a, _, b = line["line"].partition(" - ")
    fill = {"a": a, "b": b, "m": 100 * margin}
    if line["p_holm"] < alpha:
        return (up if line["d"] > 0 else down).format(**fill)
    if line["p_tost_holm"] < alpha:
        return flat.format(**fill)
    return "inconclusive at this scale"


def cells(frame: pd.DataFrame) -> pd.DataFrame:
    """Stage 2 per kind x regime x batch: lr, seeds completed, last-k error and loss (mean, 95% t-interval),
    the share of the gap to plain SGD it learns, drift of the error from the window before, settled, epsilon."""
    main = frame[frame.stage == "main"]
    rows = []
    for (kind, regime, batch), part in main.groupby(["kind", "regime", "batch"], sort=False):
        done = part[part.state == "completed"]
        e, elo, ehi = t_interval(done.last_error)
        lo, llo, lhi = t_interval(done.last_loss)
        plain = main[(main.kind == "none") & (main.regime == regime) & (main.batch == batch) &
                     (main.state == "completed")]
        drift = float((done.last_error - done.prev_error).mean()) if len(done) else math.nan
        rows.append({"kind": kind, "regime": regime, "batch": int(batch), "sigma": float(part.sigma.iloc[0]),
                     "lr": float(part.lr.iloc[0]), "steps": float(part.steps.max()),
                     "samples": float(part.samples.max()), "seeds": f"{len(done)}/{len(part)}",
                     "error": e, "error_low": elo, "error_high": ehi, "loss": lo, "loss_low": llo, "loss_high": lhi,
                     "learns": learned(lo, plain.last_loss.mean(), done.chance.mean()) if len(plain) else math.nan,
                     "drift": drift, "settled": bool(abs(drift) <= SETTLE_TOLERANCE),
                     "epsilon": float(done.epsilon.mean()) if kind == "dp" and len(done) else math.nan})
    out = pd.DataFrame(rows)
    if len(out):
        out["kind"] = pd.Categorical(out.kind, KINDS, ordered=True)
        out["regime"] = pd.Categorical(out.regime, REGIMES, ordered=True)
        out = out.sort_values(["kind", "regime", "batch"]).reset_index(drop=True)
        out["kind"], out["regime"] = out.kind.astype(str), out.regime.astype(str)
    return out


def _batch_effect(main: pd.DataFrame, kind: str, regime: str, metric: str) -> pd.Series:
    """Per seed: ``metric`` at the largest B minus at the smallest, for seeds completed at both."""
    part = main[(main.kind == kind) & (main.regime == regime) & (main.state == "completed")]
    wide = part.pivot_table(index="seed", columns="batch", values=metric)
    small, large = main[main.regime == regime].batch.min(), main[main.regime == regime].batch.max()
    if small not in wide or large not in wide:
        return pd.Series(dtype=float)
    return (wide[large] - wide[small]).dropna()


def verdicts(frame: pd.DataFrame) -> pd.DataFrame:
    """Rules 3-5 per reading, regime and line (each kind's batch effect, then the contrasts): paired d,
    interval, p and TOST p, Holm-adjusted within the reading, the verdict, and the same d for the loss."""
    main = frame[frame.stage == "main"]
    table = cells(frame)
    rows = []
    for reading, regimes in READINGS.items():
        for regime in regimes:
            part = main[main.regime == regime]
            if not len(part):
                continue
            small, large = int(part.batch.min()), int(part.batch.max())
            mine = table[table.regime == regime]
            for line in [*KINDS, *(f"{a} - {b}" for a, b in CONTRASTS)]:
                arms = line.split(" - ")
                effect = {m: [_batch_effect(main, k, regime, m) for k in arms] for m in ("last_error", "last_loss")}
                if len(arms) == 2:
                    effect = {m: [(a - b).dropna()] for m, (a, b) in effect.items()}
                errors, losses = effect["last_error"][0], effect["last_loss"][0]
                lost = part[part.kind.isin(arms) & (part.state != "completed")]
                slow = mine[mine.kind.isin(arms) & ~(mine.learns >= LEARNS)]
                why = "; ".join(filter(None, [
                    f"{len(lost)} runs not completed" if len(lost) else "",
                    f"{len(errors)} paired seeds" if len(errors) < MIN_SEEDS else "",
                    ", ".join(f"{k} does not learn at B={b}" for k, b in zip(slow.kind, slow.batch))]))
                unsettled = mine[mine.kind.isin(arms) & ~mine.settled]
                ce, cl = paired(errors), paired(losses)
                rows.append({"reading": reading, "regime": regime, "line": line, "small": small, "large": large,
                             "n": len(errors), **{f"error_{k}": x for k, x in ce.items()},
                             **{f"loss_{k}": x for k, x in cl.items()}, "why": why,
                             "unsettled": ";".join(f"{k} B={b}" for k, b in zip(unsettled.kind, unsettled.batch))})
    out = pd.DataFrame(rows)
    if not len(out):
        return out
    for reading in READINGS:
        mask = out.reading == reading
        untestable = out.why[mask] != ""
        out.loc[mask, "p_holm"] = holm(out.error_p[mask].where(~untestable))
        out.loc[mask, "p_tost_holm"] = holm(out.error_p_tost[mask].where(~untestable))
    out["verdict"] = [verdict({"line": r.line, "d": r.error_d, "p_holm": r.p_holm, "p_tost_holm": r.p_tost_holm,
                               "why": r.why}) for r in out.itertuples()]
    out["overconfident"] = (out.loss_ci_low > 0) & (out.verdict != "holds") & ~out.line.str.contains(" - ")
    return out

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
            ax.set_xlabel("batch B (noise r on the averaged gradient fixed)")
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


def _pp(m, lo, hi) -> str:
    return f"{100 * m:+.2f} pp [{100 * lo:+.2f}, {100 * hi:+.2f}]" if np.isfinite(lo) else f"{100 * m:+.2f} pp"


def _span(counts: pd.Series) -> str:
    """'3' when every cell has the same count, '3-4' otherwise."""
    low, high = int(counts.min()), int(counts.max())
    return f"{low}" if low == high else f"{low}-{high}"


def _fraction(r: float) -> str:
    return f"1/{1 / r:.0f}" if r > 0 and abs(1 / r - round(1 / r)) < 1e-9 else f"{r:.3g}"


def section(results: Path) -> str:
    """The README block, from results.csv alone: the noise-level choice, a table per kind, the lr choices, the
    rule and the verdict lines per reading."""
    frame = pd.read_csv(results / "results.csv")
    table, verdict_table = cells(frame), verdicts(frame)
    tune, stage0 = frame[frame.stage == "tune"], frame[frame.stage == "ratio"]
    chosen = choose_lr(tune)
    states = frame.drop_duplicates("run").groupby("stage").state.value_counts().to_dict()
    ratio = frame[(frame.stage == "main") & (frame.kind != "none")].ratio
    ratio = ratio.iloc[0] if len(ratio) else math.nan
    clip = frame[(frame.stage == "main") & (frame.kind == "dp")]
    clip = (clip.ratio * clip.batch / clip.sigma).iloc[0] if len(clip) else math.nan
    lines = [
        f"{frame.run.nunique()} runs ({', '.join(f'{st} {s}: {n}' for (st, s), n in sorted(states.items()))}); "
        f"noise on the averaged gradient r = sigma / B = {_fraction(ratio)} in both noised arms at every B (dp: "
        f"C = {clip:g}, sigma = r B / C); none is plain SGD. Error and loss are the mean over the evals in the "
        f"last {100 * LAST_FRACTION:g}% of a run's steps (last-k), then mean [95% t-interval] over stage-2 seeds "
        f"{SEEDS[0]}-{SEEDS[-1]}; learns: the share of the gap from chance to plain SGD's loss the arm closes; "
        f"drift: last-k error minus that of the window before (settled: |drift| <= {100 * SETTLE_TOLERANCE:g} "
        f"pp). Epsilon: dp only, delta 1e-5 online, 1/N offline.", ""]
    if len(stage0):
        r0 = choose_ratio(stage0)
        shown = pd.DataFrame({
            "r": [_fraction(r) for r in r0.ratio], "none error": r0.none_error,
            "gaussian error (lr)": [f"{e:.3f} ({lr:g})" for e, lr in zip(r0.gaussian_error, r0.gaussian_lr)],
            "dp error (lr)": [f"{e:.3f} ({lr:g})" for e, lr in zip(r0.dp_error, r0.dp_lr)],
            "gaussian above none (pp)": 100 * r0.gaussian_above, "gaussian learns": r0.gaussian_learns,
            "dp learns": r0.dp_learns, "chosen": ["yes" if c else "" for c in r0.chosen]})
        lines += [f"Stage 0, the noise level (B = {int(stage0.batch.min())}, online, tuning seeds "
                  f"{', '.join(map(str, TUNE_SEEDS))}, each arm at its best lr): the smallest r at which Noisy-SGD "
                  f"ends >= {100 * DIFFERS:g} pp above plain SGD while both noised arms learn >= {LEARNS:g} of "
                  f"the gap:", "", markdown_table(shown), ""]
    for kind in KINDS:
        t = table[table.kind == kind]
        if not len(t):
            continue
        shown = pd.DataFrame({
            "regime": t.regime, "B": t.batch, "sigma": t.sigma, "lr": t.lr, "steps": t.steps.astype(int),
            "samples": t.samples.astype(int), "seeds": t.seeds,
            "last-k error [95% CI]": [_ci(*x) for x in zip(t.error, t.error_low, t.error_high)],
            "last-k loss [95% CI]": [_ci(*x) for x in zip(t.loss, t.loss_low, t.loss_high)],
            "learns": t.learns, "drift (pp)": 100 * t.drift, "epsilon": t.epsilon if kind == "dp" else ""})
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
        lines += [f"lr grid (grid of {_span(tune.groupby(['kind', 'regime', 'batch']).lr.nunique())} per cell): "
                  f"{grid_text}. lr chosen (stage 1; * at the edge of its grid, so the best lr may lie outside "
                  "it): " + "; ".join(f"{k}, {r}: {v}" for (k, r), v in picks.items()) + ".", ""]
    lines += [f"Rule (fixed before the runs): per seed, d = last-k error at the largest B minus at the smallest "
              f"(a contrast: the difference of two kinds' d); over the paired seeds a 95% t-interval, the t-test "
              f"p and the TOST p at +-{100 * MARGIN:g} pp, each Holm-adjusted within its reading (fixed steps: "
              f"the headline; fixed samples: a second reading). A kind's claim holds if the adjusted p < "
              f"{ALPHA:g} with d > 0; does not hold if it is < {ALPHA:g} with d < 0 or if the adjusted TOST p < "
              f"{ALPHA:g} (flat); inconclusive at this scale otherwise, or with a run not completed, fewer than "
              f"{MIN_SEEDS} paired seeds, or an arm that learns less than {LEARNS:g} of the gap. The loss gets the "
              f"same paired d as a secondary quantity.", ""]
    for reading in READINGS:
        part = verdict_table[verdict_table.reading == reading]
        if not len(part):
            continue
        lines.append(f"*{reading}* ({len(part)} lines in the family):")
        for v in part.itertuples():
            eps = table[(table.kind == "dp") & (table.regime == v.regime)].epsilon
            extra = f"; epsilon {eps.min():.2g}-{eps.max():.2g}" if v.line == "dp" and eps.notna().any() else ""
            what = "Error" if " - " not in v.line else "Difference of the batch effects on error"
            note = " Loss rises while the error does not: overconfidence, not the claim." if v.overconfident else ""
            note += f" Not tested: {v.why}." if isinstance(v.why, str) and v.why else ""
            note += f" Not settled: {v.unsettled}." if isinstance(v.unsettled, str) and v.unsettled else ""
            lines.append(
                f"- **{v.regime}, {v.line}**: {v.verdict}. {what} B={v.large} minus B={v.small}, paired over "
                f"{v.n} seeds: {_pp(v.error_d, v.error_ci_low, v.error_ci_high)}, Holm p {v.p_holm:.2g}, TOST "
                f"Holm p {v.p_tost_holm:.2g}; loss {v.loss_d:+.3f} [{v.loss_ci_low:+.3f}, {v.loss_ci_high:+.3f}]"
                f"{extra}.{note}")
        lines.append("")
    return "\n".join(lines).rstrip()


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--sweep", help="analyse this stage-2 sweep dir (and its siblings <name>-tune and, if there, "
                                   "<name>-ratio) instead of training")
    args = p.parse_args()
    out = results_dir("noisy_sgd_batch")
    if args.sweep:
        main_dir = Path(args.sweep)
        tune_dir = main_dir.with_name(main_dir.name + "-tune")
        ratio_dir = main_dir.with_name(main_dir.name + "-ratio")
        for d in (main_dir, tune_dir):
            if not (d / "runs.csv").exists():
                raise SystemExit(f"--sweep: {d / 'runs.csv'} not found; give the stage-2 sweep dir (its stage 1 "
                                 "is the sibling <name>-tune), e.g. analysis/runs/noisy-sgd-batch")
        ratio_dir = ratio_dir if (ratio_dir / "runs.csv").exists() else None
    else:
        ratio_dir, tune_dir, main_dir = train(Path(args.work), quick=args.quick, jobs=args.jobs)
    from goldenpath.draw.curves import sweep_curves

    stages = [(ratio_dir, "ratio"), (tune_dir, "tune"), (main_dir, "main")]
    frame = pd.concat([tidy(d, stage=s) for d, s in stages if d is not None], ignore_index=True)
    frame.to_csv(out / "results.csv", index=False)
    if ratio_dir is not None:
        choose_ratio(frame[frame.stage == "ratio"]).to_csv(out / "ratio.csv", index=False)
    cells(frame).to_csv(out / "cells.csv", index=False)
    verdicts(frame).to_csv(out / "verdicts.csv", index=False)
    plot(frame, sweep_curves(main_dir), out)
    print(section(out))
    print(out)


if __name__ == "__main__":
    main()
