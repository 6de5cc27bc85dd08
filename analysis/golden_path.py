"""The golden-path test (Vyas et al.): at matched loss, are runs with different SGD noise the same function?

    python analysis/golden_path.py [--quick] [--datasets teacher markov fashion power]
    python analysis/golden_path.py --sweep SWEEP_DIR --dataset NAME   # a sweep run elsewhere (e.g. on a GPU)
    python analysis/golden_path.py --gpu [--datasets teacher power]   # the teacher study sized for one GPU
    python analysis/golden_path.py --cpu-smoke --work DIR --out DIR   # --gpu's path at toy sizes, on a CPU

For each dataset, a learning rate x batch size grid with 10 seeds per setting is trained online (one pass
over a stream, no sample seen twice) and offline (epochs over a fixed subset, the same sample budget).
Seeds are independent: every (setting, replicate) has its own initialisation and stream order. At each
loss target below the dataset's trivial loss (``goldenpath.data.baselines``) every setting is compared with
the reference of its regime (the least-noisy setting) by ``goldenpath compare``: the golden-path ratio, its
spread and location parts, and the family test of all settings of the regime (min-P within a target,
Bonferroni over the targets): the verdict's family.

The test is believed only as far as it has shown power. On the teacher stream, a *power curve*: a planted
difference of graded strength in the online regime, a fraction f of the training labels drawn from a
second, independent teacher (``data.mix``), at the reference setting. Pools of runs per level (independent
seeds; twice as many at f = 0), and ``DRAWS`` draws per level of 10 seeds of the level's pool against 10 of
the f = 0 pool (at f = 0: two disjoint halves of it, the null), each tested as the main study tests one
setting: the permutation p of the ratio against the level a single comparison needs in the main study's
online family (alpha / (settings x targets)). Detection rate per level and target; the null's rejection rate.
The curve is its own part (``--datasets power``, after teacher when both run): its pools stop at their last
target, since only the target checkpoints enter it.

The rules (``RULES``, ``verdicts``), fixed before these runs. Online: the golden path *does not hold* if a
family-adjusted p < alpha; it *holds* (the same functions) only if none does, every online interval lies
within [1 / margin, margin], and the power curve detects a planted level at >= 80% (the verdict states the
smallest such f and its ratio: differences smaller than that are not ruled out); *cannot be decided* where
the seeds cannot reach an adjusted p below alpha; else *inconclusive*. Offline: noise *changes the function*
if a family-adjusted p < alpha. Earlier versions of this script (before independent seeds) shared seeds across
settings, adjusted by Holm within a target and regime, used targets above the trivial loss, and took power
from controls (a narrower network, disjoint subsets); their verdicts are withdrawn (analysis/README.md).

``--gpu`` (``bash bench/science_gpu.sh`` runs it on a GPU machine, each part under its own time limit): the
teacher study with the CNN of configs/teacher-cnn.yaml at width 128, lr x batch 2 x 2 (batches 256 and 1024),
online and offline, 10 seeds per setting, 3,200,000 samples per run, targets down to 1.48 (90% of the way
from chance to the Bayes floor; the quick targets reach 70%), bf16 on the GPU with ``GPU_JOBS`` runs sharing
it, and its power curve (three levels, pools of 10, 20 at f = 0), the teacher stream made on the GPU
(``data.generate=device``). Its width and budget come from full-length CPU runs (width 32 levels off at
about 87% of the gap; width 128 reaches 90% at the least-noisy setting by about 3.1M samples), its size
from CPU counts and an estimate, all in the comment above ``GPU``: about 2.5-4.5 minutes of kernel launches
and FLOPs on one H200 for the grid; not run on a GPU yet. It writes the same tables, plus gap.csv (how much
of the chance-to-floor gap each setting closes) and verdict.md, under analysis/results/golden_path/gpu/
(--out), leaving the quick tables alone.
``--cpu-smoke`` runs that path at toy sizes (tested).

Writes analysis/results/golden_path/: summary.csv, family.csv, trend.csv, runs.csv, power.csv, ratios.png,
power.png, final_loss.png; a run of some datasets (--datasets) replaces only their rows. Runs stay under
--work (analysis/runs by default; a re-run trains only what is missing).
"""

from __future__ import annotations

import math
import shutil
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from common import RESULTS, interval, markdown_table, parser, results_dir, rounded, run_grid

# ----------------------------------------------------------------------------- the rules, fixed before the runs

RULES = {
    "alpha": 0.05,          # family-wise, over every setting of a regime at every non-trivial target
    "margin": 1.2,          # the same: every online interval within [1 / margin, margin]
    "power": 0.8,           # a planted level counts as detected when the curve finds it this often
    "metric": "tv",
}

# ----------------------------------------------------------------------------- the studies

COMMON = {"log.progress": False, "budget.stop_at_last_target": False}
MLP = {"model.name": "mlp", "model.width": 256, "model.depth": 2}
# --gpu, sized for one large GPU (an H200); not run on a GPU yet. Measured on a 2-core CPU, one thread per
# run (configs/teacher-cnn.yaml, one seed each, eval set 1,024): the eval loss at constant lr falls fast,
# then ever more slowly. At width 32 it levels off short of 90% of the gap from chance (2.28) to the Bayes
# floor (1.39), whatever the batch: at lr 0.02, batch 512 and 1024 keep the same pace per sample (means of
# the evals in each 640k samples: 1.557 / 1.578 from 0.64M, 1.539 / 1.534 from 1.92M, 1.519 / 1.519 from
# 3.84M; best eval 1.501 / 1.505 by 5.12M, 87% of the gap; lr 0.05 within 0.005 of lr 0.02). Width 64
# (batch 1024, lr 0.02) gets to 1.482 by 5.12M (89%). Width 128 gets there early: at batch 1024 the eval
# loss first reached 1.48 (90%) at 3.10M samples with lr 0.02 (the grid's least-noisy setting; best eval
# 1.480 by 3.2M, so about half its seeds may stop short) and at 2.24M with lr 0.05 (its evals then averaged
# 1.484 from 2.56M). So the study trains width 128 for 3,200,000 samples (an earlier version trained width
# 32 for 5.12M, on an extrapolation that the full-length runs refuted). The batches are 256 and 1024: the
# same per sample as 128 and 512 and the same tenfold range of lr / batch, in half the steps. Made on the
# CPU, the teacher stream (~56,000 samples/s per thread) would bind the GPU runs, so it is made on the GPU
# (data.generate=device). What binds then is an estimate, not a measurement, with two parts. The launches:
# counted on a CPU (python bench/step_ops.py --device-block), a step dispatches 78 launching operators
# online and 71 offline, of which ~27 are the CPU's per-parameter SGD loop (one fused kernel on a GPU) and ~7
# the stream's index arithmetic (on the host): ~45 kernels a step, ~3-5 us each on a GPU the GPU_JOBS
# processes take turns on. The FLOPs: 74 MFLOP a sample, forward and backward, at width 128 (5.3 at width
# 32; torch.utils.flop_counter), at an assumed 150-300 TFLOP/s in bf16.
# The grid is 0.625M steps and 256M samples (80 runs): 1.4-2.3 minutes of launches and 1-2 of FLOPs,
# 2.5-4.5 if they do not overlap (its limit in bench/science_gpu.sh: 270 s); the power pools (40 runs at
# batch 1024, stopped at the last target) at most 0.125M steps and 128M samples, 1-1.5 minutes (limit
# 200 s). bench/science_gpu.sh sends back progress.csv (each run's samples/s and how far it got) even from a
# part stopped at its limit: the first GPU slot measures the rate, and the sizing follows it; a setting's
# seeds stacked in one process would divide the launches by the seeds.
GPU = {"cpu": False, "precision": "auto", "threads": 1, "data.generate": "device"}  # auto: bf16 on a CUDA GPU
GPU_LR, GPU_BATCH, GPU_SAMPLES, GPU_EPOCHS, GPU_WIDTH = [0.02, 0.05], [256, 1024], 3_200_000, 8, 128
GPU_JOBS = 14  # runs at once on the GPU (goldenpath sweep --jobs: they share it, each its share of its memory)
SEEDS = tuple(range(10))
STUDIES = {
    "teacher": dict(  # the embedded teacher images, 3 x 16 x 16, a 2-layer MLP: chance 2.27, linear model
        # 1.73 (the trivial loss: targets lie below it), Bayes floor 1.40. lr 0.05 at batch 32 (measured)
        # stalls near 2.0, above the trivial loss: the grid stops at lr 0.02
        base="teacher-mlp.yaml",
        quick=dict(fixed={"budget.samples": 81920, "checkpoint.targets": [1.72, 1.70, 1.68, 1.66],
                          "checkpoint.eval_every": 20,
                          "checkpoint.target_eval_every": 20},
                   lr=[0.01, 0.02], batch=[32, 128], offline=[5, 16384]),
        full=dict(fixed={"data.eval_size": 2048, "data.probe_size": 2048, "budget.samples": 327680,
                         "checkpoint.targets": [1.75, 1.7, 1.65, 1.6, 1.55]},
                  lr=[0.005, 0.01, 0.02], batch=[32, 128, 512], offline=[8, 40960]),
        gpu=dict(base="teacher-cnn.yaml",  # --gpu: the CNN on one GPU, sized as said above GPU
                 fixed={**GPU, "model.width": GPU_WIDTH, "budget.samples": GPU_SAMPLES,
                        "checkpoint.targets": [1.70, 1.64, 1.58, 1.52, 1.48],
                        "checkpoint.eval_every": 50, "checkpoint.target_eval_every": 50},
                 lr=GPU_LR, batch=GPU_BATCH, offline=[GPU_EPOCHS, GPU_SAMPLES // GPU_EPOCHS],
                 levels=(0.0, 0.05, 0.2), pool=10),
        cpu_smoke=dict(base="teacher-cnn.yaml",  # --cpu-smoke: --gpu's path end to end at toy sizes on a CPU
                       fixed={"cpu": True, "data.generate": "device", "model.width": 8, "model.depth": 2,
                              "data.eval_size": 256,
                              "data.probe_size": 256, "budget.samples": 1536, "budget.min_progress": None,
                              "checkpoint.targets": [2.26, 2.24], "checkpoint.eval_every": 8,
                              "checkpoint.target_eval_every": 8},
                       lr=[0.05], batch=[16, 64], offline=[3, 512], seeds=(0, 1),
                       levels=(0.0, 0.2), pool=2, per_side=2, draws=20)),
    "markov": dict(  # an order-1 chain over 16 symbols, tiny GPT-2: chance 2.77, unigram 2.67, floor 1.70
        base="markov-gpt2.yaml",
        quick=dict(fixed={"data.order": 1, "data.vocab_size": 16, "data.seq_len": 32, "budget.samples": 4096,
                          "checkpoint.targets": [2.2, 2.0, 1.9, 1.8], "checkpoint.eval_every": 20,
                          "checkpoint.target_eval_every": 20},
                   lr=[0.003, 0.01], batch=[8, 32], offline=[4, 1024]),
        full=dict(fixed={"budget.samples": 40000, "checkpoint.targets": [3.0, 2.7, 2.4]},
                  lr=[0.001, 0.003, 0.01], batch=[8, 16, 64], offline=[10, 4000])),
    "fashion": dict(  # Fashion-MNIST through the idx loader, a 2-layer MLP: chance 2.30, linear model (the
        # trivial loss) 0.52; one pass over the 60,000 training images
        base="fashion-mnist-cnn.yaml",
        quick=dict(fixed={**MLP, "data.eval_size": 1000, "data.probe_size": 1000, "budget.samples": 59904,
                          "checkpoint.targets": [0.50, 0.48, 0.46], "checkpoint.eval_every": 20,
                          "checkpoint.target_eval_every": 20},
                   lr=[0.01, 0.02], batch=[32, 128], offline=[4, 14976]),
        full=dict(fixed={**MLP, "budget.samples": 59904, "checkpoint.targets": [0.50, 0.47, 0.44, 0.41]},
                  lr=[0.005, 0.01, 0.02], batch=[16, 64, 256], offline=[10, 5990])),
}
# The power curve (teacher, online, at the reference setting): labels of a fraction f of the training
# samples from a second teacher; POOL runs per level (2 x POOL at f = 0), DRAWS draws of 10 v 10 per level
LEVELS = (0.0, 0.025, 0.05, 0.1, 0.2)
POOL = 16
DRAWS = 100


def _mode(quick: bool, mode: str | None) -> str:
    return mode or ("quick" if quick else "full")


def _tag(mode: str) -> str:
    """The suffix of a mode's sweep names: none for full, -quick, -gpu, -cpu-smoke."""
    return "" if mode == "full" else f"-{mode.replace('_', '-')}"


def train(name: str, study: dict, work: Path, *, quick: bool = False, mode: str | None = None, seeds=SEEDS,
          jobs: int | None = None) -> Path:
    """Run (or continue) one study's lr x batch x seed grid, online and offline; returns its sweep dir.
    ``mode``: the study's setting (quick, full, gpu, cpu_smoke); by default quick or full by ``quick``."""
    mode = _mode(quick, mode)
    s = study[mode]
    epochs, size = s["offline"]
    return run_grid(f"golden-path-{name}{_tag(mode)}", s.get("base", study["base"]), work,
                    fixed={**COMMON, **s["fixed"]}, seeds=seeds, jobs=jobs,
                    grid={"optim.lr": s["lr"], "optim.batch_size": s["batch"],
                          "data.epochs,data.train_size": [[1, None], [epochs, size]]})


def power_runs(study: dict, work: Path, *, quick: bool = False, mode: str | None = None, levels=LEVELS,
               pool: int = POOL, jobs: int | None = None) -> Path:
    """The power curve's pools at the reference setting (online, least noisy): 2 x ``pool`` runs at f = 0
    and ``pool`` at each other level, as one directory of links that compare reads like a sweep."""
    mode = _mode(quick, mode)
    s = study[mode]
    levels, pool = s.get("levels", levels), s.get("pool", pool)
    fixed = {**COMMON, **s["fixed"], "optim.lr": min(s["lr"]), "optim.batch_size": max(s["batch"]),
             "budget.stop_at_last_target": True}  # only the target checkpoints enter the curve
    tag, base = _tag(mode), s.get("base", study["base"])
    null = run_grid(f"gp-power-null{tag}", base, work, fixed=fixed, grid={"data.mix": [levels[0]]},
                    seeds=range(2 * pool), jobs=jobs)
    planted = run_grid(f"gp-power{tag}", base, work, fixed=fixed, grid={"data.mix": list(levels[1:])},
                       seeds=range(pool), jobs=jobs)
    return _combined(work / f"gp-power-all{tag}", [*_runs(null), *_runs(planted)])


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


# ----------------------------------------------------------------------------- tables


def tables(sweep_dir: Path, dataset: str, study: str = "main",
           metrics=("tv", "js", "top1")) -> dict[str, pd.DataFrame]:
    """Compare the sweep's settings; returns {summary, family, trend, runs} with dataset and study columns."""
    from goldenpath.store.rundir import RunDir
    from goldenpath.comparison.compare import compare
    from goldenpath.config import load_config

    compare(sweep_dir, metrics=metrics)
    out = {name: pd.read_csv(sweep_dir / "compare" / f"{name}.csv") for name in ("summary", "family", "trend")}
    rows = []
    for run_dir in [RunDir(p.parent) for p in sorted(sweep_dir.glob("*/config.yaml"))]:
        c, s = load_config(run_dir.config), run_dir.status()
        rows.append({"run": run_dir.name, "lr": c.optim.lr, "batch": c.optim.batch_size, "regime": c.regime,
                     "replicate": c.replicate, "seed": c.seed, "state": s.get("state"),
                     "final_loss": s.get("eval_loss"), "best_loss": s.get("best_eval_loss"),
                     "final_error": s.get("eval_error"), "chance": s.get("chance_loss"),
                     "floor": s.get("loss_floor"), "samples": s.get("samples")})
    runs = pd.DataFrame(rows)
    runs["noise"] = runs.lr / runs.batch  # SGD's noise temperature
    out["runs"] = runs
    for frame in out.values():
        frame.insert(0, "study", study)
        frame.insert(0, "dataset", dataset)
    return out


def power_table(power_dir: Path, *, level_alpha: float, draws: int = DRAWS, per_side: int = 10,
                seed: int = 0) -> pd.DataFrame:
    """Detection rate of each planted level at each target: ``draws`` draws of ``per_side`` runs of the
    level's pool against ``per_side`` of the f = 0 pool (at f = 0: two disjoint halves of it), each tested by
    the permutation p of the tv ratio (and of the location ratio) against ``level_alpha`` and 0.05."""
    from goldenpath.comparison import stats
    from goldenpath.comparison.design import Design
    from goldenpath.comparison.compare import compare
    from goldenpath.config import load_config

    frame = compare(power_dir, metrics=("tv", "sq"))
    mix, seed_of = {}, {}
    for p in power_dir.glob("*/config.yaml"):
        c = load_config(p)
        mix[p.parent.name], seed_of[p.parent.name] = c.data.mix, c.seed
    rng = np.random.default_rng(seed)
    rows = []
    for target, part in frame.groupby("target", sort=False):
        runs = sorted(set(part.run_a) | set(part.run_b))
        index = {r: i for i, r in enumerate(runs)}
        matrices = {metric: _matrix(part[part.metric == metric], index) for metric in ("tv", "sq")}
        zero = [r for r in runs if mix[r] == 0]
        for level in sorted(set(mix.values())):
            pool = [r for r in runs if mix[r] == level]
            if level != 0 and (len(pool) < per_side or len(zero) < per_side):
                rows.append({"target": target, "level": level, "pool": len(pool), "draws": 0})
                continue
            if level == 0 and len(zero) < 2 * per_side:
                rows.append({"target": target, "level": level, "pool": len(zero), "draws": 0})
                continue
            hits = {"detected": 0, "detected_05": 0, "location_05": 0}
            ratios, locations = [], []
            for _ in range(draws):
                if level == 0:
                    chosen = list(rng.choice(zero, 2 * per_side, replace=False))
                    a, b = chosen[:per_side], chosen[per_side:]
                else:
                    a = list(rng.choice(zero, per_side, replace=False))
                    b = list(rng.choice(pool, per_side, replace=False))
                members = [index[r] for r in a + b]
                sub = {k: v[np.ix_(members, members)] for k, v in matrices.items()}
                design = Design((tuple(range(per_side)), tuple(range(per_side, 2 * per_side))),
                                      tuple(seed_of[r] for r in a + b))
                iu = np.triu_indices(2 * per_side, 1)
                c = stats.compare_settings(sub["tv"][iu][:, None], np.ones(1), design,
                                           sq_sums=sub["sq"][iu][:, None], seed=int(rng.integers(1 << 30)))[0][(0, 1)]
                hits["detected"] += c.p_value < level_alpha
                hits["detected_05"] += c.p_value < RULES["alpha"]
                hits["location_05"] += c.location_p < RULES["alpha"]
                ratios.append(c.ratio)
                locations.append(c.location)
            rows.append({"target": target, "level": level, "pool": len(pool) if level else len(zero), "draws": draws,
                         "level_alpha": level_alpha, **{k: v / draws for k, v in hits.items()},
                         "ratio": float(np.median(ratios)), "location": float(np.median(locations))})
    return pd.DataFrame(rows)


def _matrix(rows: pd.DataFrame, index: dict) -> np.ndarray:
    m = np.zeros((len(index), len(index)))
    for r in rows.itertuples():
        m[index[r.run_a], index[r.run_b]] = m[index[r.run_b], index[r.run_a]] = r.value
    return m


# ----------------------------------------------------------------------------- verdicts


def _tested(rows: pd.DataFrame) -> pd.DataFrame:
    """The verdict's family: settings in it at non-trivial targets, with a ratio."""
    return rows[rows.in_family.astype(bool) & ~rows.trivial.astype(bool) & rows.ratio.notna()]


def differs(rows: pd.DataFrame, alpha: float = RULES["alpha"]) -> pd.Series:
    return rows.p_adjusted < alpha


def equivalent(rows: pd.DataFrame, margin: float = RULES["margin"]) -> pd.Series:
    return (rows.ci_low >= 1 / margin) & (rows.ci_high <= margin)


def detectable(power: pd.DataFrame) -> tuple[float, float] | None:
    """The smallest planted level the curve detects at >= RULES["power"] at every target where it was drawn,
    with its median ratio; None when no level is."""
    if power is None or not len(power):
        return None
    drawn = power[(power.draws > 0) & (power.level > 0)]
    for level, part in drawn.groupby("level"):
        if (part.detected >= RULES["power"]).all():
            return float(level), float(part.ratio.median())
    return None


def _why(rows: pd.DataFrame) -> str:
    """How the settings that differ differ: by location, by spread, or neither alone."""
    loc = rows.location_p_adjusted < RULES["alpha"]
    spread = rows.spread_p_adjusted < RULES["alpha"]
    unequal = int((loc & (rows.n_seeds != rows.n_ref_seeds)).sum())
    caveat = (f"; {unequal} of them with unequal seed counts, where the location test can take a spread difference "
              f"for one in location") if unequal else ""
    return (f"{int(loc.sum())} by their mean function (location{caveat}), {int((spread & ~loc).sum())} by spread "
            f"alone, {int((~loc & ~spread).sum())} by neither alone")


def claim(rows: pd.DataFrame, family: pd.DataFrame, *, power: pd.DataFrame | None = None,
          online: bool = True) -> str:
    """The rules of the module docstring applied to one dataset and regime."""
    rows = _tested(rows)
    fam = family[family.p_adjusted.notna()]
    if not len(rows) or not len(fam):
        return "inconclusive (no family: no setting and reference with two seeds or more at a non-trivial target)"
    reach = float(fam.smallest_adjusted.min())
    if differs(rows).any():
        r = rows[differs(rows)].sort_values(["p_adjusted", "ratio"], ascending=[True, False]).iloc[0]
        return (f"{'does not hold' if online else 'noise changes the function'}: {int(differs(rows).sum())} of "
                f"{len(rows)} comparisons differ ({_why(rows[differs(rows)])}); strongest {r.setting} at "
                f"{r.target:g}: ratio {interval(r.ratio, r.ci_low, r.ci_high)}, spread "
                f"{interval(r.spread, r.spread_low, r.spread_high)}, location "
                f"{interval(r.location, r.location_low, r.location_high)}, adjusted p {r.p_adjusted:.2g}")
    seeds = int(rows.n_seeds.min())
    if reach >= RULES["alpha"]:
        return f"cannot be decided with {seeds} seeds (the smallest adjusted p they allow is {reach:.2g})"
    smallest = f"smallest adjusted p {rows.p_adjusted.min():.2g} of {len(rows)} comparisons"
    if not online:
        return f"no setting differs ({smallest})"
    found = detectable(power)
    if equivalent(rows).all() and found is not None:
        return (f"holds: no setting differs ({smallest}), all intervals within [{1 / RULES['margin']:.2f}, "
                f"{RULES['margin']:.2f}]; the test detects a planted mix of {found[0]:g} (ratio about "
                f"{found[1]:.2f}) at >= {RULES['power']:.0%}: differences of that size are ruled out, smaller "
                "ones are not")
    wide = rows[~equivalent(rows)]
    return ("inconclusive: no setting differs (" + smallest + ")"
            + (f", but {len(wide)} of {len(rows)} intervals reach outside the margin (e.g. {wide.iloc[0].setting} "
               f"at {wide.iloc[0].target:g}: {interval(*wide.iloc[0][['ratio', 'ci_low', 'ci_high']])})"
               if len(wide) else "")
            + ("" if found is not None else "; the power curve detects no planted level at "
               f">= {RULES['power']:.0%}" if power is not None and len(power) else "; power not measured here"))


def verdicts(summary: pd.DataFrame, family: pd.DataFrame, trend: pd.DataFrame, runs: pd.DataFrame,
             power: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per dataset: the rules applied to the main grid, each dataset's online verdict with its own
    power curve (``power``'s rows of that dataset; without one, at best inconclusive)."""
    metric = RULES["metric"]
    rows = []
    for d, part in summary[(summary.metric == metric) & (summary.study == "main")].groupby("dataset", sort=False):
        fam = family[(family.dataset == d) & (family.study == "main") & (family.metric == metric)]
        if not len(fam):  # a dataset analysed by an earlier version of this script (no family table)
            continue
        pw = power[power.dataset == d] if power is not None and "dataset" in power else None
        pw = pw if pw is not None and len(pw) else None
        out = {"dataset": d}
        for regime in ("online", "offline"):
            out[regime] = claim(part[part.regime == regime], fam[fam.regime == regime], power=pw,
                                online=regime == "online")
        t = trend[(trend.dataset == d) & (trend.study == "main") & (trend.metric == metric) &
                  (trend.regime == "online")]
        out["online_trend"] = "; ".join(f"{x.target:g}: {interval(x.slope, x.ci_low, x.ci_high)}"
                                        for x in t.itertuples() if np.isfinite(x.slope)) or "none"
        trivial = sorted(set(fam[fam.trivial.astype(bool)].target), reverse=True)
        out["trivial"] = (", ".join(f"{t:g}" for t in trivial) + f" (trivial loss {fam.trivial_loss.iloc[0]:.3g})"
                          if trivial else f"none (trivial loss {fam.trivial_loss.iloc[0]:.3g})")
        out["final_loss"] = _final_loss(runs[(runs.dataset == d) & (runs.study == "main")])
        out["power"] = _power_line(pw)
        rows.append(out)
    return pd.DataFrame(rows)


def _power_line(power: pd.DataFrame | None) -> str:
    """What the power curve says in words: the smallest level detected at >= RULES["power"] everywhere, and
    the null's rejection rate."""
    if power is None or not len(power):
        return "not measured"
    drawn = power[power.draws > 0]
    null = drawn[drawn.level == 0]
    found = detectable(power)
    return ((f"a planted mix of {found[0]:g} (ratio about {found[1]:.2f}) detected at >= {RULES['power']:.0%} at every "
             "target" if found else f"no planted level detected at >= {RULES['power']:.0%} at every target")
            + f"; the null rejected in {100 * null.detected.mean():.0f}% of draws at the family level, "
              f"{100 * null.detected_05.mean():.0f}% at 0.05 ({len(null)} targets)")


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


def plot(summary: pd.DataFrame, runs: pd.DataFrame, power: pd.DataFrame | None, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = RULES["metric"]
    main = summary[(summary.study == "main") & (summary.metric == metric) & summary.ratio.notna() &
                   (summary.n_seeds >= 2) & (summary.n_ref_seeds >= 2)]
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
                hit = (r.p_adjusted < RULES["alpha"]).to_numpy()
                for j in range(len(r)):
                    ax.errorbar(x[j], r.ratio[j], yerr=[[r.ratio[j] - r.ci_low[j]], [r.ci_high[j] - r.ratio[j]]],
                                fmt="o" if hit[j] else "o", mfc=colour if hit[j] else "white", ms=4, color=colour,
                                elinewidth=0.6, label=regime if (i == 0 and j == 0) else None)
        ax.axhline(1, color="k", linewidth=0.7, linestyle=":")
        ax.axhspan(1 / RULES["margin"], RULES["margin"], color="0.9", zorder=0)
        ax.set_xticks(range(len(targets)), [f"{t:g}" for t in targets])
        ax.set_xlabel("loss target")
        ax.set_ylabel(f"{metric} ratio against the reference, 95%")
        ax.set_title(f"{d} (filled: differs, family-adjusted)", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "ratios.png", dpi=110)
    plt.close(fig)

    if power is not None and len(power):
        drawn = power[power.draws > 0]
        fig, ax = plt.subplots(figsize=(5.6, 3.8))
        for k, (target, part) in enumerate(drawn.groupby("target", sort=False)):
            part = part.sort_values("level")
            ax.plot(part.level, part.detected, "o-", color=f"C{k}", label=f"target {target:g}")
            ax.plot(part.level, part.detected_05, "o:", color=f"C{k}", alpha=0.5)
        ax.axhline(RULES["power"], color="k", linewidth=0.7, linestyle="--")
        ax.axhline(RULES["alpha"], color="0.5", linewidth=0.7, linestyle=":")
        ax.set_xlabel("planted difference: fraction of labels from a second teacher")
        ax.set_ylabel("detection rate (solid: family level; dotted: 0.05)")
        ax.set_title(f"power of one comparison, {int(drawn.draws.max())} draws of 10 v 10 seeds per level", fontsize=9)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "power.png", dpi=110)
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
    """The README block: the comparisons per dataset, target and regime, the power curve, and the verdicts."""
    summary = pd.read_csv(results / "summary.csv")
    family = pd.read_csv(results / "family.csv")
    trend = pd.read_csv(results / "trend.csv")
    runs = pd.read_csv(results / "runs.csv")
    power = pd.read_csv(results / "power.csv") if (results / "power.csv").exists() else None
    metric = RULES["metric"]
    main = summary[(summary.study == "main") & (summary.metric == metric) & summary.ratio.notna() &
                   (summary.n_seeds >= 2) & (summary.n_ref_seeds >= 2)]  # a single seed has no interval
    fam = family[(family.study == "main") & (family.metric == metric)].set_index(["dataset", "target", "regime"])
    g = main.groupby(["dataset", "target", "regime"], sort=False)

    def largest(x):
        r = x.loc[x.ratio.idxmax()]
        return interval(r.ratio, r.ci_low, r.ci_high)

    table = pd.DataFrame({
        "settings": g.ratio.size(),
        "seeds": g.n_seeds.min(),
        "largest ratio [interval]": g.apply(largest, include_groups=False),
        "differ (adjusted p < 0.05)": g.apply(lambda x: f"{int(differs(x).sum())}/{len(x)}", include_groups=False),
        "within the margin": g.apply(lambda x: f"{int(equivalent(x).sum())}/{len(x)}", include_groups=False),
        "spread (median)": g.spread.median(),
        "location (median)": g.location.median(),
    }).reset_index()
    table["family p"] = [fam.p_adjusted.get((r.dataset, r.target, r.regime), math.nan) for r in table.itertuples()]
    table["reachable p"] = [fam.smallest_adjusted.get((r.dataset, r.target, r.regime), math.nan)
                            for r in table.itertuples()]
    table["trivial"] = [bool(fam.trivial.get((r.dataset, r.target, r.regime), False)) for r in table.itertuples()]
    table = table.sort_values(["dataset", "target", "regime"], ascending=[True, False, False], kind="stable")
    states = runs.state.value_counts().to_dict()
    lines = [f"{len(runs)} runs ({', '.join(f'{n} {s}' for s, n in sorted(states.items()))}); {metric} ratios "
             f"against the reference setting of each regime, 95% intervals over seeds; family p: the min-P "
             f"test of every setting of the regime at the target, Bonferroni over the regime's targets; "
             f"reachable p: the smallest the seeds allow; margin {RULES['margin']}.", "",
             markdown_table(table), ""]
    if power is not None and len(power):
        shown = power[power.draws > 0].assign(
            detected=lambda x: x.detected.map(lambda v: f"{100 * v:.0f}%"),
            detected_05=lambda x: x.detected_05.map(lambda v: f"{100 * v:.0f}%"),
            location_05=lambda x: x.location_05.map(lambda v: f"{100 * v:.0f}%"))
        lines += [f"Power curve (teacher, online, the reference setting; {int(power.draws.max())} draws of 10 v 10 "
                  f"seeds per level from pools of {int(power[power.level > 0].pool.max())} runs, "
                  f"{int(power[power.level == 0].pool.max())} at f = 0; detected: p below "
                  f"{power.level_alpha.dropna().iloc[0]:.2g}, the level one comparison needs in the online family):",
                  "", markdown_table(shown[["level", "target", "pool", "detected", "detected_05", "location_05",
                                            "ratio", "location"]]), ""]
    lines += ["Verdicts (rules fixed before the runs: `RULES` and `verdicts` in the script):", ""]
    for r in verdicts(summary, family, trend, runs, power).itertuples():
        lines.append(f"- **{r.dataset}**: power: {r.power}. Online, {r.online}. Offline: {r.offline}. "
                     f"Trivial targets: {r.trivial}. "
                     f"Online trend of log ratio on log(lr/B), by target (not adjusted): {r.online_trend}. "
                     f"Final loss against lr/B: {r.final_loss}.")
    return "\n".join(lines)


def _merged(path: Path, new: pd.DataFrame) -> pd.DataFrame:
    """``new`` in place of the rows of its (dataset, study) pairs in the table at ``path``: a run of some
    datasets keeps every other committed row, datasets in the table's order (then new ones), each dataset's
    kept rows before its new ones. A run that replaces every row writes ``new``."""
    if not path.exists():
        return new
    old = pd.read_csv(path)
    if "dataset" not in old or "study" not in old:
        return new
    replaced = pd.MultiIndex.from_frame(old[["dataset", "study"]]).isin(
        pd.MultiIndex.from_frame(new[["dataset", "study"]]))
    if replaced.all():
        return new
    columns = [*new.columns, *(c for c in old.columns if c not in new.columns)]
    merged = pd.concat([old[~replaced], new], ignore_index=True)[columns]
    order = {d: i for i, d in enumerate(dict.fromkeys([*old.dataset, *new.dataset]))}
    return merged.sort_values("dataset", key=lambda c: c.map(order), kind="stable").reset_index(drop=True)


def _family_size(family: pd.DataFrame, dataset: str) -> int:
    """Settings x targets of a dataset's online family: a single comparison's share of alpha is alpha over it."""
    fam = family[(family.dataset == dataset) & (family.metric == RULES["metric"]) & (family.regime == "online")
                 & family.p_adjusted.notna()]
    if fam.empty:
        raise SystemExit(f"golden_path: no online family of {dataset} in family.csv; run --datasets {dataset} first")
    return int(fam.settings.max()) * int(fam.targets.max())


# ----------------------------------------------------------------------------- --gpu and --cpu-smoke


def gap_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Per regime and setting: how much of the gap from chance to the Bayes floor the seeds close (by the median
    of their best eval loss); ``reference`` marks each regime's least-noisy setting."""
    rows = []
    for (regime, lr, batch), r in runs.groupby(["regime", "lr", "batch"], sort=False):
        chance, floor, best = r.chance.median(), r.floor.median(), r.best_loss.median()
        rows.append({"dataset": r.dataset.iloc[0], "regime": regime, "lr": lr, "batch": batch, "runs": len(r),
                     "completed": int((r.state == "completed").sum()), "best_loss": best,
                     "final_loss": r.final_loss.median(), "chance": chance, "floor": floor,
                     "gap_closed": (chance - best) / (chance - floor)})
    out = pd.DataFrame(rows)
    noise = out.lr / out.batch
    out["reference"] = noise == noise.groupby(out.regime).transform("min")
    return out


def scaled(args, mode: str) -> Path:
    """The teacher study (and its power curve) at ``mode``'s size: ``gpu`` or ``cpu_smoke``. Writes
    summary, family, trend, runs, power, gap (.csv), the figures, and verdict.md (the README block and the gap
    the reference closes) under ``args.out``; returns it."""
    study = STUDIES["teacher"]
    s = study[mode]
    default = RESULTS / "golden_path" / "gpu" if mode == "gpu" else Path(args.work) / f"golden_path_{mode}"
    out = Path(args.out or default)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work)
    names = ("summary", "family", "trend", "runs")
    if "teacher" in args.datasets:
        t = tables(train("teacher", study, work, mode=mode, seeds=s.get("seeds", SEEDS), jobs=args.jobs), "teacher")
        for name in names:
            rounded(t[name]).to_csv(out / f"{name}.csv", index=False)
    summary, family, trend, runs = (pd.read_csv(out / f"{name}.csv") for name in names)
    power = None
    if "power" in args.datasets:
        fam = family[(family.metric == RULES["metric"]) & (family.regime == "online") & family.p_adjusted.notna()]
        size = (int(fam.settings.max()) * int(fam.targets.max()) if len(fam) else  # trivial targets: the grid's
                (len(s["lr"]) * len(s["batch"]) - 1) * len(s["fixed"]["checkpoint.targets"]))
        power = power_table(power_runs(study, work, mode=mode, jobs=args.jobs), level_alpha=RULES["alpha"] / size,
                            draws=s.get("draws", DRAWS), per_side=s.get("per_side", 10))
        power.insert(0, "dataset", "teacher")
        rounded(power).to_csv(out / "power.csv", index=False)
    elif (out / "power.csv").exists():
        power = pd.read_csv(out / "power.csv")
    gap = gap_table(runs)
    rounded(gap).to_csv(out / "gap.csv", index=False)
    plot(summary, runs, power, out)
    ref = gap[gap.reference & (gap.regime == "online")].iloc[0]
    width = s["fixed"].get("model.width")
    text = (f"Mode {mode}: the CNN (configs/teacher-cnn.yaml{f', width {width}' if width else ''}), lr {s['lr']} x "
            f"batch {s['batch']}, online and offline "
            f"({s['offline'][0]} epochs x {s['offline'][1]}), {runs.groupby(['regime', 'lr', 'batch']).size().min()} "
            f"seeds per setting, {int(runs.samples.max())} samples. Gap closed: the least-noisy online setting "
            f"(lr {ref.lr:g}, batch {int(ref.batch)}) reaches a median best loss of {ref.best_loss:.3f}, "
            f"{100 * ref.gap_closed:.0f}% of the way from chance ({ref.chance:.2f}) to the Bayes floor "
            f"({ref.floor:.2f}); the goal is 90%.\n\n" + section(out) + "\n")
    (out / "verdict.md").write_text(text)
    print(text)
    print(out)
    return out


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--datasets", nargs="+", default=[*STUDIES, "power"], choices=[*STUDIES, "power"],
                   help="studies to run; power: the power curve on the teacher stream")
    p.add_argument("--sweep", help="analyse this sweep directory (already trained) instead of training")
    p.add_argument("--dataset", default="sweep", help="the name to give --sweep's dataset")
    p.add_argument("--gpu", action="store_true", help="the teacher study with a CNN sized for one large GPU (its "
                   "sizing is above GPU in the script); tables under results/golden_path/gpu/ (--datasets: teacher, "
                   "power)")
    p.add_argument("--cpu-smoke", action="store_true", help="--gpu's path end to end at toy sizes on a CPU (under a "
                   "minute on 2 cores); tables under <work>/golden_path_cpu_smoke/")
    p.add_argument("--out", help="where --gpu or --cpu-smoke write their tables")
    args = p.parse_args()
    if args.gpu or args.cpu_smoke:
        if args.gpu:
            args.jobs = args.jobs if "--jobs" in sys.argv else GPU_JOBS
        scaled(args, "gpu" if args.gpu else "cpu_smoke")
        return
    out = results_dir("golden_path")
    work = Path(args.work)
    parts = []
    power = None
    if args.sweep:
        parts.append(tables(Path(args.sweep), args.dataset))
    for d in [] if args.sweep else [d for d in args.datasets if d != "power"]:
        parts.append(tables(train(d, STUDIES[d], work, quick=args.quick, jobs=args.jobs), d))
    names = ("summary", "family", "trend", "runs")
    if parts:
        frames = [_merged(out / f"{name}.csv", pd.concat([p[name] for p in parts], ignore_index=True))
                  for name in names]
        for name, frame in zip(names, frames):
            frame.to_csv(out / f"{name}.csv", index=False)
    else:  # the power curve alone: the studies' tables as committed
        frames = [pd.read_csv(out / f"{name}.csv") for name in names]
    if "power" in args.datasets and not args.sweep:
        power = power_table(power_runs(STUDIES["teacher"], work, quick=args.quick, jobs=args.jobs),
                            level_alpha=RULES["alpha"] / _family_size(frames[1], "teacher"))
        power.insert(0, "dataset", "teacher")
    if power is not None:
        power.to_csv(out / "power.csv", index=False)
    elif (out / "power.csv").exists():
        power = pd.read_csv(out / "power.csv")
    summary, family, trend, runs = frames
    plot(summary, runs, power, out)
    print(section(out))
    print(out)


if __name__ == "__main__":
    main()
