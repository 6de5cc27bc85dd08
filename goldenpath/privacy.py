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

import math


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
        from opacus.accountants import RDPAccountant

        accountant = RDPAccountant()
        accountant.history = [(sigma, sample_rate, steps)]
        return float(accountant.get_epsilon(delta))
    from scipy.optimize import brentq

    mu = math.sqrt(steps) / sigma
    if gaussian_delta(0.0, mu) <= delta:
        return 0.0
    hi = 1.0
    while gaussian_delta(hi, mu) > delta:
        hi *= 2
    return float(brentq(lambda e: gaussian_delta(e, mu) - delta, 0.0, hi, xtol=1e-12, rtol=1e-12))


def privacy_spent(config, steps: int) -> dict:
    """epsilon, delta and the accountant of a DP-SGD run (a goldenpath Config) after ``steps`` optimizer
    steps; {} without DP-SGD."""
    noise, data = config.noise, config.data
    if noise.kind != "dp":
        return {}
    offline = data.epochs > 1
    delta = noise.delta if noise.delta is not None else (1 / data.train_size if offline else 1e-5)
    if offline:  # a sample enters one noised sum per epoch: subsampled Gaussian, RDP
        eps = epsilon(noise.sigma, delta, steps=steps, sample_rate=config.optim.batch_size / data.train_size)
        accountant = "rdp (opacus; assumes Poisson sampling, batches are shuffled)"
    else:  # every sample enters exactly one noised sum: one Gaussian mechanism
        eps = epsilon(noise.sigma, delta) if steps else 0.0
        accountant = "analytic gaussian (each sample in one step)"
    return {"epsilon": eps, "delta": delta, "accountant": accountant}
