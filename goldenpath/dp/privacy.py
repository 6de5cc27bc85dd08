"""Privacy accounting for DP-SGD: epsilon at a given delta (docs/science.md, "Noise knobs").

- Online (every sample in exactly one noised sum, ``sample_rate=1``): the Gaussian mechanism with
  sensitivity C and noise sigma C, composed ``steps`` times if a sample is used in several full-batch
  steps; k compositions of it are one Gaussian mechanism with sigma / sqrt(k), so epsilon is exact:
  the analytic Gaussian mechanism (Balle & Wang 2018, Theorem 8), solved for epsilon.
- Offline (``sample_rate = B / N < 1`` over ``steps`` steps): the RDP accountant of opacus for the
  subsampled Gaussian mechanism. It assumes Poisson sampling; goldenpath's offline batches are shuffled
  fixed-size batches, the usual approximation in DP-SGD practice (the status file says so).
"""

from __future__ import annotations

import functools
import math

MAX_ORDER = 256  # the largest Renyi order the RDP accountant tries (needed only for epsilon below ~0.02)


def gaussian_delta(epsilon: float, mu: float) -> float:
    """delta(epsilon) of the Gaussian mechanism with sensitivity / noise std = ``mu`` (Balle & Wang 2018)."""
    from scipy.special import log_ndtr, ndtr  # here: every training run imports this module

    a, b = mu / 2 - epsilon / mu, -mu / 2 - epsilon / mu
    return float(ndtr(a) - math.exp(epsilon + log_ndtr(b)))


def epsilon(sigma: float, delta: float, steps: int = 1, sample_rate: float = 1.0) -> float:
    """The smallest epsilon for which DP-SGD with noise multiplier ``sigma`` is (epsilon, delta)-DP."""
    if not 0 < delta < 1:
        raise ValueError(f"delta must lie in (0, 1), got {delta}")
    if not 0 < sample_rate <= 1:
        raise ValueError(f"sample_rate must lie in (0, 1], got {sample_rate}")
    if steps < 1:
        return 0.0
    if sigma <= 0:
        return math.inf
    if sample_rate < 1:
        return _rdp_epsilon(sigma, delta, steps, sample_rate)
    from scipy.optimize import brentq

    mu = math.sqrt(steps) / sigma
    if gaussian_delta(0.0, mu) <= delta:
        return 0.0
    hi = 1.0
    while gaussian_delta(hi, mu) > delta:
        hi *= 2
    return float(brentq(lambda e: gaussian_delta(e, mu) - delta, 0.0, hi, xtol=1e-12, rtol=1e-12))


def _rdp_epsilon(sigma: float, delta: float, steps: int, sample_rate: float) -> float:
    """The RDP bound of opacus' accountant for ``steps`` steps of one subsampled Gaussian mechanism."""
    return _rdp_composed([(sigma, sample_rate, steps)], delta)


def _rdp_composed(parts: list[tuple[float, float, int]], delta: float) -> float:
    """The RDP bound of opacus' accountant for (sigma, sample_rate, steps) parts run one after the other (RDP
    composes by adding), over its default orders, or, where the best of those is the largest (63: few steps
    or a small sampling rate), over every integer order up to MAX_ORDER too, since the default range gives
    a loose bound there (and opacus warns). A part's per-step curve is computed once."""
    import warnings

    from opacus.accountants.analysis.rdp import get_privacy_spent

    for wide in (False, True):
        orders = _rdp_per_step(*parts[0][:2], wide)[0]
        rdp = sum(_rdp_per_step(sigma, q, wide)[1] * steps for sigma, q, steps in parts)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Optimal order is the largest alpha")
            eps, best = get_privacy_spent(orders=orders, rdp=rdp, delta=delta)
        if best < orders[-1]:
            break
    return float(eps)


@functools.lru_cache(maxsize=32)
def _rdp_per_step(sigma: float, sample_rate: float, wide: bool) -> tuple[list, object]:
    """(orders, RDP of one step at each): opacus' default orders, and with ``wide`` every integer order
    above them up to MAX_ORDER (the bound's minimum over orders is sharp: a coarser grid misses it)."""
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis.rdp import compute_rdp

    orders = list(RDPAccountant.DEFAULT_ALPHAS)
    if wide:
        orders += range(int(orders[-1]) + 1, MAX_ORDER + 1)
    return orders, compute_rdp(q=sample_rate, noise_multiplier=sigma, steps=1, orders=orders)


def privacy_spent(config, steps: int, before: list | tuple = ()) -> dict:
    """epsilon, delta and the accountant of a DP-SGD run (a goldenpath Config) after ``steps`` optimizer
    steps; {} without DP-SGD.

    ``before``: a fork's history, oldest first (:func:`goldenpath.training.fork.ancestry`): (an ancestor's
    config, the optimizer steps of it that the fork's starting weights took). ``steps`` counts them too. Every
    part counts with its own noise and batch size: online, a sample enters one noised sum, so epsilon is the
    largest part's; offline the parts' RDP adds up. A part trained without DP-SGD leaves no guarantee: epsilon
    is infinite.
    """
    noise, data = config.noise, config.data
    if noise.kind != "dp":
        return {}
    offline = data.epochs > 1
    delta = noise.delta if noise.delta is not None else (1 / data.train_size if offline else 1e-5)
    parts = [(c, k) for c, k in before if k > 0]
    parts.append((config, steps - sum(k for _, k in before)))
    fork = " over the fork's parts" if len(parts) > 1 else ""
    open_ = [(c, k) for c, k in parts if c.noise.kind != "dp"]
    if open_:
        c, k = open_[0]
        return {"epsilon": math.inf, "delta": delta,
                "accountant": f"none: {k} steps of {c.name} (noise.kind={c.noise.kind}) were not private"}
    if offline:  # a sample enters one noised sum per epoch: subsampled Gaussian, RDP
        parts = [(c.noise.sigma, c.optim.batch_size / data.train_size, k) for c, k in parts if k > 0]
        eps = _rdp_composed(parts, delta) if parts else 0.0
        accountant = f"rdp (opacus; assumes Poisson sampling, batches are shuffled){fork}"
    else:  # every sample enters exactly one noised sum: one Gaussian mechanism, the least noisy part's
        eps = max((epsilon(c.noise.sigma, delta) for c, k in parts if k > 0), default=0.0)
        accountant = f"analytic gaussian (each sample in one step){fork}"
    return {"epsilon": eps, "delta": delta, "accountant": accountant}
