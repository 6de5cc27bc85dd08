"""The toys' experiments: tidy tables, one row per (setting, seed), and verdicts by rules stated up front.

- ``dln``: alpha_eff (the alpha whose flow limit is nearest the final solution), its fit residual, whether
  the fit hit the search bound, the l1 norm and the recovery error of the planted sparse truth, and the
  change of log(u v) over the noise phase next to its Ito prediction, against the noise sigma (isotropic
  Noisy-SGD on the weights, or label noise) and the batch size, over seeds.
- ``sign_median``: the median over seeds of per-seed changes some of which are censored (a fit at the
  search bound), with the exact sign test and its distribution-free intervals; "falls" / "rises" only
  beyond zero, "flat" only by an equivalence test (TOST). ``seed_trend``: the same for an uncensored
  metric by per-seed least-squares slopes and t-intervals.
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
# The alpha search range of dln.fit_alpha. A fit at either end is a censored observation: the solution's
# alpha_eff lies at or beyond that end, so its side (and its rank among the seeds) is known, its value not.
FIT_BOUNDS = (1e-3, 10.0)
# alpha_eff is identified at a sigma where the median fit residual over seeds (relative l2 distance of the
# solution to the nearest flow limit) is at most 0.1: halving alpha from 0.5 moves the flow limit by 0.09
# (n = 10) to 0.24 (n = 20, d = 60), so a solution further off the family is as far off it as the move
# the claim is about.
RESIDUAL_LEVEL = 0.1
# Margins of the equivalence ("flat") test, over the whole sigma grid: log alpha_eff changes by less than
# log 1.1 (alpha_eff within 10%), the recovery error by less than 0.05 (the truth's norm is 1.5 to 2).
MARGINS = {"log_alpha_eff": float(np.log(1.1)), "recovery_error": 0.05}
DRIFT_MARGIN = 0.25  # the observed median drift of log(u v) "matches" Ito within 25% of the prediction


def run_dln(**options) -> pd.DataFrame:
    """One row per (sigma, batch, seed): alpha_eff, fit_residual, at_bound, l1, recovery_error,
    interpolation_error, log_uv_drift (mean over coordinates of log|u v| after the noise phase minus the
    noise-free run's) and predicted_drift (its Ito prediction; isotropic full-batch noise only). A run whose
    weights diverged (not finite) has no fit: alpha_eff and fit_residual are nan, at_bound False."""
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
                             "at_bound": bool(np.isfinite(alpha_eff)
                                              and not FIT_BOUNDS[0] * 1.01 < alpha_eff < FIT_BOUNDS[1] / 1.01),
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


def _verdict(ci95: tuple, ci90: tuple, margin: float) -> str:
    """"flat" where the 90% interval lies within the margin (TOST at 5%), else "falls" / "rises" where the
    95% interval lies below / above 0, else "inconclusive"."""
    if -margin < ci90[0] and ci90[1] < margin:
        return "flat"
    return "falls" if ci95[1] < 0 else "rises" if ci95[0] > 0 else "inconclusive"


def seed_trend(frame: pd.DataFrame, metric: str, *, margin: float, log: bool = False) -> dict:
    """The change of an uncensored ``metric`` over the sigma grid: per seed, the least-squares slope on sigma
    times the grid's span; mean over seeds with 95% and 90% t-intervals; verdict by ``_verdict``. A seed with a
    value that is not finite at some sigma (a diverged run) is left out (``seeds`` counts those kept)."""
    span = frame.sigma.max() - frame.sigma.min()
    changes = []
    for _, seed in frame.groupby("seed"):
        y = np.log(seed[metric]) if log else seed[metric]
        if seed.sigma.nunique() >= 2 and np.isfinite(y).all():
            changes.append(np.polyfit(seed.sigma, y, 1)[0] * span)
    k = len(changes)
    out = {"seeds": k, "change": float(np.mean(changes)) if k else np.nan, "margin": margin}
    if k < 3:
        return {**out, "ci95": (np.nan, np.nan), "ci90": (np.nan, np.nan), "verdict": "inconclusive"}
    se = np.std(changes, ddof=1) / np.sqrt(k)
    for name, level in (("ci95", 0.975), ("ci90", 0.95)):
        half = stats.t.ppf(level, k - 1) * se
        out[name] = (out["change"] - half, out["change"] + half)
    return {**out, "verdict": _verdict(out["ci95"], out["ci90"], margin)}


def censored_log_alpha(frame: pd.DataFrame) -> pd.Series:
    """log alpha_eff per row; +inf / -inf where the fit sits at the upper / lower search bound (censored: the
    solution's alpha_eff lies at or beyond that end)."""
    upper = np.where(frame.alpha_eff > np.sqrt(FIT_BOUNDS[0] * FIT_BOUNDS[1]), np.inf, -np.inf)
    return np.log(frame.alpha_eff).where(~frame.at_bound, upper)


def alpha_changes(frame: pd.DataFrame, a: float, b: float) -> np.ndarray:
    """Per seed, log alpha_eff at sigma ``b`` minus at sigma ``a``, censored fits kept: +inf where the fit
    at b is at the upper bound (or the one at a at the lower), -inf the other way round; a seed censored on
    the same side at both sigmas is left out (the sign of its change is unknown)."""
    wide = frame.assign(log_alpha=censored_log_alpha(frame)).pivot(index="seed", columns="sigma", values="log_alpha")
    with np.errstate(invalid="ignore"):
        change = (wide[b] - wide[a]).to_numpy()
    return change[~np.isnan(change)]


def sign_median(changes, *, margin: float) -> dict:
    """The median over seeds of per-seed ``changes``, some censored (+-inf: beyond every value on that side),
    with the exact two-sided sign test (changes of 0 left out) and distribution-free 95% and 90% intervals
    of the median from order statistics: [x_(r), x_(k+1-r)] with r the largest such that
    P(Bin(k, 1/2) < r) <= (1 - level) / 2, the sign test inverted. Censored values only need their rank, so
    both are valid with them kept; the median is finite while fewer than half the seeds are censored on
    either side, an interval's end is infinite where it falls on a censored seed. With fewer than 6 seeds (5 for
    90%) no sign test rejects at that level and the interval is the whole line (``ci95_bounded`` False).
    Verdict by ``_verdict``."""
    x = np.sort(np.asarray(changes, dtype=float))
    k = len(x)
    falls, rises = int((x < 0).sum()), int((x > 0).sum())
    mid = x[[(k - 1) // 2, k // 2]] if k else np.array([np.nan, np.nan])  # a censored and a known one: unknown
    out = {"seeds": k, "falls": falls, "rises": rises, "censored": int(np.isinf(x).sum()), "margin": margin,
           "change": float(mid[0]) if mid[0] == mid[1] else float(mid.mean()) if np.isfinite(mid).all() else np.nan,
           "p": float(stats.binomtest(falls, falls + rises).pvalue) if falls + rises else 1.0}
    for name, level in (("ci95", 0.95), ("ci90", 0.90)):
        r = int((stats.binom.cdf(np.arange(k), k, 0.5) <= (1 - level) / 2).sum())
        out[name] = (float(x[r - 1]), float(x[k - r])) if r else (-np.inf, np.inf)
        out[f"{name}_bounded"] = bool(r)
    return {**out, "verdict": _verdict(out["ci95"], out["ci90"], margin)}


def rising_steps(frame: pd.DataFrame) -> list[tuple[float, float]]:
    """Adjacent sigmas (a, b) where alpha_eff rises: the 95% interval of the median per-seed change
    (``alpha_changes``, censored fits kept; every seed index draws the same noise at every sigma) lies
    above 0."""
    sigmas = sorted(frame.sigma.unique())
    return [(a, b) for a, b in zip(sigmas, sigmas[1:])
            if sign_median(alpha_changes(frame, a, b), margin=0.0)["ci95"][0] > 0]


def _factor(x: float) -> str:
    """A change of log alpha_eff as a factor; an infinite one is censored at the search bound."""
    return f"x{np.exp(x):.3g}" if np.isfinite(x) else "beyond the bound" if np.isinf(x) else "unknown"


def _says(t: dict) -> str:
    """``rises (change over the grid +0.3 [+0.2, +0.4] over 8 seeds; flat within +-0.05)`` (``seed_trend``)."""
    lo, hi = t["ci95"]
    return (f"{t['verdict']} (change over the grid {t['change']:+.3g} [{lo:+.3g}, {hi:+.3g}] over {t['seeds']} "
            f"seeds; flat within +-{t['margin']:g})")


def _says_signs(t: dict) -> str:
    """``falls (12 of 16 seeds fall, 4 rise, 3 censored at the bound; sign test p 0.08; median ...)``."""
    interval = (f"[{_factor(t['ci95'][0])}, {_factor(t['ci95'][1])}]" if t["ci95_bounded"] else
                f"(no 95% interval from {t['seeds']} seeds: a sign test needs 6)")
    return (f"{t['verdict']} ({t['falls']} of {t['seeds']} seeds fall, {t['rises']} rise, {t['censored']} "
            f"censored at the search bound; sign test p {t['p']:.3g}; median change "
            f"{_factor(t['change'])} {interval}; flat within "
            f"x{np.exp(-t['margin']):.3g} to x{np.exp(t['margin']):.3g})")


def dln_verdict(frame: pd.DataFrame) -> str:
    """Per batch: is alpha_eff identified over the sigma grid (the median fit residual at most
    RESIDUAL_LEVEL at every sigma), does it fall from the first sigma to the last (``sign_median``,
    censored fits kept), and does the solution move toward the truth (``seed_trend``)? Where it is not
    identified, the claim is "not identified" whatever the fall says, and the sigmas before the first
    poorly identified one get the same test as a second reading. A sigma at which any seed diverged (no fit,
    alpha_eff nan) is not identified either: its diverged seeds are left out of every change, which would
    bias what is left."""
    lines = []
    for batch, part in frame.groupby("batch"):
        sigmas = sorted(part.sigma.unique())
        residual = part.groupby("sigma").fit_residual.median()
        diverged = part.alpha_eff.isna().groupby(part.sigma).sum()
        poor = [s for s in sigmas if diverged[s] or not residual[s] <= RESIDUAL_LEVEL]
        margin = MARGINS["log_alpha_eff"]
        fall = sign_median(alpha_changes(part, sigmas[0], sigmas[-1]), margin=margin)
        closer = seed_trend(part, "recovery_error", margin=MARGINS["recovery_error"])
        if poor:
            claim = "is NOT IDENTIFIED"
            s = poor[0]
            fit = (f"{diverged[s]} of {int((part.sigma == s).sum())} seeds diverged at sigma {s:g} (a smaller lr "
                   f"keeps them finite)" if diverged[s] else
                   f"median fit residual {residual[s]:.3g} > {RESIDUAL_LEVEL:g} at sigma {s:g} (up to "
                   f"{residual.max():.3g})")
            known = [s for s in sigmas if s < poor[0]]
            within = (f"; over the identified sigmas {known[0]:g} to {known[-1]:g}: alpha_eff "
                      f"{_says_signs(sign_median(alpha_changes(part, known[0], known[-1]), margin=margin))}"
                      if len(known) >= 2 else f"; identified at sigma {known[0]:g} only" if known else "")
        else:
            claim = {"falls": "HOLDS", "flat": "does NOT hold (flat)", "rises": "does NOT hold (it rises)",
                     "inconclusive": "is inconclusive at this scale"}[fall["verdict"]]
            fit = f"identified at every sigma (median fit residual at most {residual.max():.3g} <= {RESIDUAL_LEVEL:g})"
            within = ""
        toward = {"falls": "the solution moves toward the sparse truth",
                  "flat": "the solution does not move toward the sparse truth (flat)",
                  "rises": "the solution moves away from the sparse truth",
                  "inconclusive": "movement toward the sparse truth inconclusive"}[closer["verdict"]]
        rises = rising_steps(part)
        shape = ("; not monotone: it rises significantly from sigma " + ", ".join(f"{a:g} to {b:g}" for a, b in rises)
                 if rises else "; no significant rise between adjacent sigmas")
        lines.append(f"batch {batch}, sigma {sigmas[0]:g} to {sigmas[-1]:g}: the claim that alpha_eff falls "
                     f"{claim}: {fit}; alpha_eff {_says_signs(fall)}{within}{shape}; {toward}: recovery error "
                     f"{_says(closer)}; {int(part.at_bound.sum())} of {len(part)} fits at the search "
                     f"bound, kept as censored" + (f"; {int(diverged.sum())} of {len(part)} runs diverged (no fit, "
                                                  f"left out of the changes)" if diverged.any() else ""))
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


# What each option takes: ("int" | "float" | "ints" | "floats", the smallest value allowed, whether the value is
# strictly above it, whether null is allowed (for a list: as an entry)).
_OPTION_KINDS = {
    "n": ("int", 1, False, False), "d": ("int", 2, False, False), "sparsity": ("int", 1, False, True),
    "alpha": ("float", 0, True, False), "sigmas": ("floats", 0, False, False), "batches": ("ints", 1, False, True),
    "lr": ("float", 0, True, False), "noise_steps": ("int", 1, False, False),
    "converge_steps": ("int", 0, False, False), "seeds": ("int", 2, False, False),
    "problem_seed": ("int", 0, False, False), "seed": ("int", 0, False, False),
    "sigma": ("float", 0, True, False), "batch": ("int", 1, False, True), "steps": ("int", 1, False, False),
    "every": ("int", 1, False, False),
}


def _option_value(key: str, value, kind: str, low: float, strict: bool, nullable: bool):
    """One option's value in its type, or a ConfigError naming it and the fix."""
    from goldenpath.config import ConfigError

    if kind in ("ints", "floats"):
        if not isinstance(value, list) or not value:
            raise ConfigError(f"toys.{key}", f"expected a non-empty list, got {value!r}", "write [a, b, ...]")
        return [_option_value(key, v, kind[:-1], low, strict, nullable) for v in value]
    if value is None and nullable:
        return None
    whole = isinstance(value, float) and value.is_integer()
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind == "int" and not
                                                                         (isinstance(value, int) or whole)):
        what = "a whole number" if kind == "int" else "a number"
        raise ConfigError(f"toys.{key}", f"expected {what}{' or null' if nullable else ''}, got {value!r}",
                          f"write {what}")
    value = int(value) if kind == "int" else float(value)
    if value < low or (strict and value == low):
        raise ConfigError(f"toys.{key}", f"got {value!r}", f"use a value {'above' if strict else 'of at least'} {low}")
    return value


def toy_options(which: str, overrides) -> dict:
    """``key=value`` overrides of a toy's defaults (``which``: dln or lls), checked against them: each value's
    type and range, and the problem they make together (n < d, a truth that fits in d, ...)."""
    from goldenpath.config import ConfigError, parse_override

    defaults = DLN_DEFAULTS if which == "dln" else LLS_DEFAULTS
    options = {}
    for text in overrides:
        keys, value = parse_override(text)
        key = ".".join(keys)
        if key not in defaults:
            raise ConfigError(f"toys.{key}", "unknown option", f"use some of {sorted(defaults)}")
        if key == "noise":
            if value not in ("param", "label"):
                raise ConfigError("toys.noise", f"got {value!r}", "use param (Noisy-SGD) or label")
            options[key] = value
        else:
            options[key] = _option_value(key, value, *_OPTION_KINDS[key])
    o = {**defaults, **options}
    if not o["n"] < o["d"]:
        raise ConfigError("toys.n", f"n={o['n']} is not below d={o['d']}",
                          "use fewer rows than features (the toys are overparameterised)")
    if o.get("sparsity") is not None and o["sparsity"] > o["d"]:
        raise ConfigError("toys.sparsity", f"{o['sparsity']} nonzeros in d={o['d']} features",
                          "use at most d (or null: a dense truth)")
    if which == "dln":
        sizes = [b or o["n"] for b in o["batches"]]
        if len(set(sizes)) < len(sizes):
            raise ConfigError("toys.batches", f"{o['batches']} repeats a batch size (null is the full batch, "
                              f"{o['n']})", "list each batch size once")
        if len(set(o["sigmas"])) < len(o["sigmas"]):
            raise ConfigError("toys.sigmas", f"{o['sigmas']} repeats a sigma", "list each sigma once")
        if len(o["sigmas"]) < 2:
            raise ConfigError("toys.sigmas", f"{o['sigmas']} has no change over sigma to test",
                              "list two sigmas or more, e.g. [0, 0.5]")
    elif o["steps"] < o["every"]:
        raise ConfigError("toys.steps", f"{o['steps']} steps record nothing every {o['every']}",
                          "use steps of at least every")
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

