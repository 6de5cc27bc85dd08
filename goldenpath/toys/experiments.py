"""The toys' experiments: tidy tables, one row per (setting, seed), and verdicts by rules stated up front.

- ``dln``: alpha_eff (the alpha whose flow limit is nearest the final solution), its fit residual, whether
  the fit hit the search bound, the l1 norm and the recovery error of the planted sparse truth, and the
  change of log(u v) over the noise phase next to its Ito prediction, against the noise sigma (isotropic
  Noisy-SGD on the weights, or label noise) and the batch size, over seeds.
- ``seed_trend``: the change of a metric over the whole sigma grid, one least-squares slope per seed, with
  t-intervals over seeds; "falls" / "rises" only beyond zero, "flat" only by an equivalence test (TOST).
- ``lls``: the spread of the null-space part of beta under Noisy-SGD against steps, with the exact law.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats

from goldenpath.toys import dln, lls
from goldenpath.toys.problems import make_problem

DLN_DEFAULTS = {"n": 10, "d": 30, "sparsity": 3, "alpha": 0.5, "sigmas": [0.0, 0.1, 0.2, 0.3, 0.5, 1.0],
                "batches": [None], "noise": "param", "lr": 0.01, "noise_steps": 20_000,
                "converge_steps": 40_000, "seeds": 8, "problem_seed": 0, "seed": 1}
LLS_DEFAULTS = {"n": 10, "d": 30, "lr": 0.05, "sigma": 1.0, "batch": None, "steps": 400, "every": 40,
                "seeds": 2000, "problem_seed": 0, "seed": 1}
FIT_BOUNDS = (1e-3, 10.0)  # the alpha search range of dln.fit_alpha; a fit at either end is left out
# Margins of the equivalence ("flat") test, over the whole sigma grid: log alpha_eff changes by less than
# log 1.1 (alpha_eff within 10%), the recovery error by less than 0.05 (the truth's norm is 1.5 to 2).
MARGINS = {"log_alpha_eff": float(np.log(1.1)), "recovery_error": 0.05}
DRIFT_MARGIN = 0.25  # the observed median drift of log(u v) "matches" Ito within 25% of the prediction


def run_dln(**options) -> pd.DataFrame:
    """One row per (sigma, batch, seed): alpha_eff, fit_residual, at_bound, l1, recovery_error,
    interpolation_error, log_uv_drift (mean over coordinates of log|u v| after the noise phase minus the
    noise-free run's) and predicted_drift (its Ito prediction; isotropic full-batch noise only)."""
    o = {**DLN_DEFAULTS, **options}
    p = make_problem(o["n"], o["d"], sparsity=o["sparsity"], seed=o["problem_seed"])
    start = np.full(2 * o["d"], o["alpha"])
    clean, _ = dln.optimise(dln.gradient(p), start, n=o["n"], steps=o["noise_steps"], lr=o["lr"])
    unit = None  # the Ito prediction at sigma = 1 (it scales with sigma^2)
    if o["noise"] == "param" and o["batches"] == [None]:
        unit = dln.predicted_log_uv_drift(p, o["alpha"], lr=o["lr"], sigma=1.0, steps=o["noise_steps"]).mean()
    grid = dln.AlphaGrid(p.X, p.y, FIT_BOUNDS)  # the flow limits every fit on this problem compares with
    rows = []
    for batch in o["batches"]:
        for sigma in o["sigmas"]:
            label = sigma if o["noise"] == "label" else 0.0
            theta, _ = dln.optimise(dln.gradient(p, label_noise=label), start, n=o["n"], steps=o["noise_steps"],
                                    lr=o["lr"], batch=batch, sigma=sigma if o["noise"] == "param" else 0.0,
                                    seeds=o["seeds"], seed=o["seed"])
            change = dln.log_uv(theta) - dln.log_uv(clean)  # [seeds, d]
            drift, median = change.mean(1), median_drift(change, seed=o["seed"])
            if unit is not None and sigma:  # averaged with its antithetic partner (the same draws negated),
                # which cancels the martingale part of order sigma and leaves the Ito drift of order sigma^2
                mirror, _ = dln.optimise(dln.gradient(p), start, n=o["n"], steps=o["noise_steps"], lr=o["lr"],
                                         sigma=-sigma, seeds=o["seeds"], seed=o["seed"])
                drift = (drift + (dln.log_uv(mirror) - dln.log_uv(clean)).mean(1)) / 2
            theta, _ = dln.optimise(dln.gradient(p), theta, n=o["n"], steps=o["converge_steps"], lr=o["lr"],
                                    seeds=o["seeds"])
            for s, beta in enumerate(dln.beta_of(theta)):
                alpha_eff, residual = dln.fit_alpha(p.X, p.y, beta, bounds=FIT_BOUNDS, grid=grid)
                rows.append({"noise": o["noise"], "sigma": sigma, "batch": batch or o["n"], "seed": s,
                             "alpha_eff": alpha_eff, "fit_residual": residual,
                             "at_bound": not FIT_BOUNDS[0] * 1.01 < alpha_eff < FIT_BOUNDS[1] / 1.01,
                             "l1": float(np.abs(beta).sum()),
                             "recovery_error": float(np.linalg.norm(beta - p.truth)),
                             "interpolation_error": float(np.abs(p.X @ beta - p.y).max()),
                             "log_uv_drift": float(drift[s]), "median_drift": median[0],
                             "median_low": median[1], "median_high": median[2],
                             "predicted_drift": np.nan if unit is None else float(unit * sigma**2)})
    frame = pd.DataFrame(rows)
    frame.attrs.update({k: v for k, v in o.items() if not isinstance(v, list)})
    return frame


def median_drift(change: np.ndarray, *, seed: int = 0, n_boot: int = 200) -> tuple[float, float, float]:
    """(estimate, low, high): the per-coordinate median over seeds of ``change [seeds, d]``, averaged over
    coordinates, with a 95% bootstrap interval over seeds."""
    rng = np.random.default_rng(seed)
    k = len(change)
    draws = [np.median(change[rng.integers(0, k, k)], axis=0).mean() for _ in range(n_boot)]
    return float(np.median(change, axis=0).mean()), *map(float, np.quantile(draws, [0.025, 0.975]))


def seed_trend(frame: pd.DataFrame, metric: str, *, margin: float, log: bool = False) -> dict:
    """The change of ``metric`` over the sigma grid: per seed, the least-squares slope on sigma times the
    grid's span (rows at the fit bound left out; a seed needs 3 sigmas); mean over seeds with 95% and 90%
    t-intervals. Verdict: "falls" / "rises" where the 95% interval excludes 0 and the 90% interval is not
    inside [-margin, margin]; "flat" where it is (TOST at 5%); else "inconclusive"."""
    part = frame[~frame.at_bound] if "at_bound" in frame else frame
    span = frame.sigma.max() - frame.sigma.min()
    changes = []
    for _, seed in part.groupby("seed"):
        if seed.sigma.nunique() >= 3:
            y = np.log(seed[metric]) if log else seed[metric]
            changes.append(np.polyfit(seed.sigma, y, 1)[0] * span)
    k = len(changes)
    out = {"seeds": k, "change": float(np.mean(changes)) if k else np.nan, "margin": margin}
    if k < 3:
        return {**out, "ci95": (np.nan, np.nan), "ci90": (np.nan, np.nan), "verdict": "inconclusive"}
    se = np.std(changes, ddof=1) / np.sqrt(k)
    for name, level in (("ci95", 0.975), ("ci90", 0.95)):
        half = stats.t.ppf(level, k - 1) * se
        out[name] = (out["change"] - half, out["change"] + half)
    if -margin < out["ci90"][0] and out["ci90"][1] < margin:
        verdict = "flat"
    elif out["ci95"][1] < 0:
        verdict = "falls"
    elif out["ci95"][0] > 0:
        verdict = "rises"
    else:
        verdict = "inconclusive"
    return {**out, "verdict": verdict}


def rising_steps(frame: pd.DataFrame, metric: str = "alpha_eff") -> list[tuple[float, float]]:
    """Adjacent sigmas (a, b) where log ``metric`` rises: the 95% t-interval over seeds of the paired
    per-seed difference (every seed index draws the same noise at every sigma) lies above 0."""
    part = frame[~frame.at_bound] if "at_bound" in frame else frame
    wide = np.log(part.pivot_table(index="seed", columns="sigma", values=metric))
    out = []
    sigmas = sorted(wide.columns)
    for a, b in zip(sigmas, sigmas[1:]):
        d = (wide[b] - wide[a]).dropna().to_numpy()
        if len(d) >= 3 and d.std(ddof=1) > 0:
            low = d.mean() - stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d))
            out += [(a, b)] if low > 0 else []
        elif len(d) >= 3 and d.mean() > 0:
            out.append((a, b))
    return out


def _says(t: dict, *, log: bool) -> str:
    """``falls (change over the grid x0.8 [x0.7, x0.9] over 8 seeds; flat within ...)``."""
    lo, hi = t["ci95"]
    if log:
        fmt = lambda x: f"x{np.exp(x):.3g}"  # noqa: E731
        flat = f"x{np.exp(-t['margin']):.3g} to x{np.exp(t['margin']):.3g}"
    else:
        fmt = lambda x: f"{x:+.3g}"  # noqa: E731
        flat = f"+-{t['margin']:g}"
    return (f"{t['verdict']} (change over the grid {fmt(t['change'])} [{fmt(lo)}, {fmt(hi)}] over "
            f"{t['seeds']} seeds; flat within {flat})")


def dln_verdict(frame: pd.DataFrame) -> str:
    """Per batch: does alpha_eff fall over the sigma grid, and does the solution move toward the truth?"""
    lines = []
    for batch, part in frame.groupby("batch"):
        fall = seed_trend(part, "alpha_eff", margin=MARGINS["log_alpha_eff"], log=True)
        closer = seed_trend(part, "recovery_error", margin=MARGINS["recovery_error"])
        claim = {"falls": "HOLDS", "flat": "does NOT hold (flat)", "rises": "does NOT hold (it rises)",
                 "inconclusive": "is inconclusive at this scale"}[fall["verdict"]]
        toward = {"falls": "the solution moves toward the sparse truth",
                  "flat": "the solution does not move toward the sparse truth (flat)",
                  "rises": "the solution moves away from the sparse truth",
                  "inconclusive": "movement toward the sparse truth inconclusive"}[closer["verdict"]]
        hits = int(part.at_bound.sum()) if "at_bound" in part else 0
        rises = rising_steps(part)
        shape = ("; not monotone: it rises significantly from sigma " + ", ".join(f"{a:g} to {b:g}" for a, b in rises)
                 if rises else "; no significant rise between adjacent sigmas")
        lines.append(f"batch {batch}, sigma {part.sigma.min():g} to {part.sigma.max():g}: the claim that alpha_eff "
                     f"falls {claim}: alpha_eff {_says(fall, log=True)}{shape}; {toward}: recovery error "
                     f"{_says(closer, log=False)}; {hits} of {len(part)} fits at the search bound left out")
    return "\n".join(lines)


def drift_table(frame: pd.DataFrame) -> pd.DataFrame:
    """Per sigma > 0, the change of log(u v) over the noise phase against Ito: the mean over seeds (each
    seed's mean over coordinates, averaged with its antithetic partner; 95% t-interval) against the
    prediction, and the per-coordinate median (95% bootstrap interval over seeds) against half of it (its
    no-gradient value). ``matches`` where the interval lies within DRIFT_MARGIN of the prediction,
    ``differs`` where it lies outside, else inconclusive."""
    rows = []
    for sigma, part in frame[frame.sigma > 0].groupby("sigma"):
        x = part.log_uv_drift.to_numpy()
        half = stats.t.ppf(0.975, len(x) - 1) * x.std(ddof=1) / np.sqrt(len(x))
        pred = float(part.predicted_drift.iloc[0])
        first = part.iloc[0]
        for quantity, value, lo, hi, target in (
                ("mean", x.mean(), x.mean() - half, x.mean() + half, pred),
                ("median", first.median_drift, first.median_low, first.median_high, pred / 2)):
            band = sorted((target * (1 - DRIFT_MARGIN), target * (1 + DRIFT_MARGIN)))
            verdict = ("matches" if band[0] <= lo and hi <= band[1] else
                       "differs" if hi < band[0] or lo > band[1] else "inconclusive")
            rows.append({"sigma": sigma, "quantity": quantity, "seeds": len(x), "observed": float(value),
                         "ci_low": float(lo), "ci_high": float(hi), "predicted": target, "verdict": verdict})
    return pd.DataFrame(rows)


def run_lls(**options) -> pd.DataFrame:
    """The null-space spread tr Cov(P beta_k) over seeds against k, next to the exact k (lr sigma / B)^2 (d - n)."""
    o = {**LLS_DEFAULTS, **options}
    p = make_problem(o["n"], o["d"], sparsity=None, seed=o["problem_seed"])
    beta0 = np.zeros(o["d"])
    proj = lls.null_projector(p.X)
    b = o["batch"] or o["n"]
    _, records = lls.run(p, beta0, steps=o["steps"], lr=o["lr"], batch=o["batch"], sigma=o["sigma"],
                         seeds=o["seeds"], seed=o["seed"], record_every=o["every"],
                         observe=lambda theta: np.trace(np.cov((theta @ proj).T)))
    steps = np.arange(1, len(records) + 1) * o["every"]
    exact = [np.trace(lls.null_space_moments(p.X, beta0, lr=o["lr"], sigma=o["sigma"], batch=b, steps=int(k))[1])
             for k in steps]
    return pd.DataFrame({"step": steps, "spread": records, "exact": exact})


# ----------------------------------------------------------------------------- goldenpath toys


def toy_options(which: str, overrides) -> dict:
    """``key=value`` overrides of a toy's defaults (``which``: dln or lls), checked against them."""
    from goldenpath.config import ConfigError, parse_override

    defaults = DLN_DEFAULTS if which == "dln" else LLS_DEFAULTS
    options = {}
    for text in overrides:
        keys, value = parse_override(text)
        key = ".".join(keys)
        if key not in defaults:
            raise ConfigError(f"toys.{key}", "unknown option", f"use some of {sorted(defaults)}")
        want = defaults[key]
        if isinstance(want, list) and not isinstance(value, list):
            raise ConfigError(f"toys.{key}", f"expected a list, got {value!r}", "write [a, b, ...]")
        if isinstance(want, (int, float)) and not isinstance(want, bool) and not isinstance(value, (int, float)):
            raise ConfigError(f"toys.{key}", f"expected a number, got {value!r}", "write a number")
        options[key] = value
    if options.get("noise", "param") not in ("param", "label"):
        raise ConfigError("toys.noise", f"got {options['noise']!r}", "use param (Noisy-SGD) or label")
    return options


def run_toy(which: str, options: dict) -> tuple[pd.DataFrame, str]:
    """Run toy ``which`` (dln or lls); returns its table and one line: the dln verdict, or how far the
    lls null-space spread lies from the exact law."""
    if which == "dln":
        frame = run_dln(**options)
        return frame, dln_verdict(frame)
    frame = run_lls(**options)
    worst = float((frame.spread / frame.exact - 1).abs().max())
    return frame, f"null-space spread against the exact law: largest relative gap {worst:.3f}"

