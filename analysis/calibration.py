"""Calibration of goldenpath's statistics by simulation with a known truth: rejection rates and coverage.

    python analysis/calibration.py [--quick]

Each *world* is a population of simulated functions (goldenpath.comparison.calibration: a classifier's predicted
distributions on a fixed probe set of 200 points, 10 classes; seeds scatter around their setting's mean
function, some further than others). A sweep draws n seeds per setting; every statistic of
``goldenpath.comparison.stats`` is computed as ``goldenpath compare`` computes it, ``reps`` times per world:

- the rejection rate of each test at 0.05 (the ratio, the location and the spread tests against one
  other setting; the family test of three settings against a reference);
- the coverage of each 95% interval of the true value (the same statistic over 2,000 seeds).

Worlds: the null (the same distribution of functions; seeds of equal or of very unequal reach), a
location shift (the mean function moves), a spread-only change (the seeds scatter 1.5x or 2x as widely
around the same mean function), correlated seeds in a paired design (the same seed in both settings,
analysed within seeds), and the referee's case: the same seeds in both settings analysed as if each run
had its own. Writes analysis/results/calibration/calibration.csv (--quick: 400 sweeps per world; else 1,500).
"""

from __future__ import annotations

import time

import pandas as pd

from common import markdown_table, parser, results_dir

from goldenpath.comparison import calibration as cal

WORLDS = {
    "no difference": cal.World(shifts=(0, 0), scales=(0.5, 0.5), hetero=0.3),
    "no difference, unequal seeds": cal.World(shifts=(0, 0), scales=(0.5, 0.5), hetero=0.6),
    "location 0.15": cal.World(shifts=(0, 0.15), scales=(0.5, 0.5), hetero=0.3),
    "location 0.3": cal.World(shifts=(0, 0.3), scales=(0.5, 0.5), hetero=0.3),
    "spread 1.5x": cal.World(shifts=(0, 0), scales=(0.4, 0.6), hetero=0.3),
    "spread 2x": cal.World(shifts=(0, 0), scales=(0.3, 0.6), hetero=0.3),
    "paired, no difference (rho 0.3)": cal.World(shifts=(0, 0), scales=(0.5, 0.5), hetero=0.3, rho=0.3,
                                                 paired=True),
    "paired spread 1.5x": cal.World(shifts=(0, 0), scales=(0.4, 0.6), hetero=0.3, rho=0.3, paired=True),
    "shared seeds analysed as independent": cal.World(shifts=(0, 0), scales=(0.5, 0.5), hetero=0.3, rho=0.3,
                                                      shared=True),
    "no difference, 4 settings (family)": cal.World(shifts=(0, 0, 0, 0), scales=(0.5, 0.5, 0.5, 0.5), hetero=0.3),
}
SEEDS = (5, 10)
COLUMNS = ["world", "n_seeds", "reps", "true_ratio", "true_spread", "true_location", "ratio_p", "location_p",
           "spread_p", "family_p", "ratio_covers", "location_covers", "spread_covers"]


def section(results) -> str:
    t = pd.read_csv(results / "calibration.csv")
    shown = t.assign(**{c: t[c].map(lambda v: f"{v:.3f}") for c in COLUMNS[3:6]},
                     **{c: t[c].map(lambda v: "" if v != v else f"{100 * v:.1f}%") for c in COLUMNS[6:]})
    return ("Rejection rates at 0.05 and coverage of the 95% intervals, over "
            f"{int(t.reps.iloc[0])} simulated sweeps per world (true values from 2,000 seeds):\n\n"
            + markdown_table(shown[COLUMNS].drop(columns="reps")))


def main() -> None:
    p = parser(__doc__)
    args = p.parse_args()
    reps = 400 if args.quick else 1500
    rows = []
    for name, world in WORLDS.items():
        for n in SEEDS:
            t0 = time.perf_counter()
            r = cal.calibrate(world, n, reps=reps, seed=n, n_perm=199, truth_seeds=2000)
            rows.append({"world": name, "n_seeds": n, "reps": reps, **r})
            print(f"{name} n={n}: {time.perf_counter() - t0:.0f} s", flush=True)
    out = results_dir("calibration")
    pd.DataFrame(rows)[COLUMNS].to_csv(out / "calibration.csv", index=False, float_format="%.4g")
    print(section(out))


if __name__ == "__main__":
    main()
