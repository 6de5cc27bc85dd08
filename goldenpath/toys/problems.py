"""Seeded overparameterised regression problems (n < d) with a planted sparse or dense truth, and the
optimisers that run on them: GD, SGD with batch B, Noisy-SGD (sigma) and Euler-Maruyama for the SDE,
each vectorised over many seeds at once (leading dim = seeds).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np


@dataclass(frozen=True)
class Problem:
    X: np.ndarray          # [n, d] Gaussian features
    y: np.ndarray          # [n] = X @ truth (no label noise)
    truth: np.ndarray      # [d] planted solution


def make_problem(n: int = 10, d: int = 30, *, sparsity: int | None = 3, seed: int = 0) -> Problem:
    """n < d rows of N(0, 1) features; truth with ``sparsity`` nonzeros of size ~1 (None: dense N(0, 1/d))."""
    if not 0 < n < d:
        raise ValueError(f"need 0 < n < d (overparameterised), got n={n}, d={d}")
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, d))
    truth = np.zeros(d)
    if sparsity is None:
        truth = rng.standard_normal(d) / math.sqrt(d)
    else:
        support = rng.choice(d, sparsity, replace=False)
        truth[support] = rng.choice([-1.0, 1.0], sparsity) * (0.5 + rng.random(sparsity))
    return Problem(X, X @ truth, truth)


# (params [S, p], rows [S, B] or None, rng) -> grads [S, p]; rng for gradients with their own noise (labels)
Grad = Callable[[np.ndarray, np.ndarray | None, np.random.Generator], np.ndarray]


def optimise(grad: Grad, theta0: np.ndarray, *, n: int, steps: int, lr: float, batch: int | None = None,
             sigma: float = 0.0, seeds: int = 1, seed: int = 0, dt: float | None = None, record_every: int = 0,
             observe: Callable[[np.ndarray], np.ndarray] | None = None):
    """Run ``steps`` updates on ``seeds`` independent copies; returns (final params [S, p], records).

    - GD: ``batch=None, sigma=0`` (with a small ``lr``, gradient flow);
    - SGD: ``batch=B`` rows drawn with replacement, per step and seed;
    - Noisy-SGD: theta <- theta - lr (g + (sigma / B) xi), B the batch (n for full batch), xi ~ N(0, I);
    - the SDE d theta = -g dt + sqrt(lr) (sigma / B) dW, whose step-lr discretisation is Noisy-SGD, by
      Euler-Maruyama with a step ``dt`` < lr (``steps`` then counts steps of dt; time = steps x dt).
    ``records``: ``observe(theta)`` every ``record_every`` steps.

    The rows come from a stream of ``seed`` of their own, the noise (and a gradient's own noise, e.g. label
    noise) from another: a seed draws the same rows and the same noise at every sigma, sigma 0 included
    (common random numbers, which pair a seed's runs across the sigma grid).
    """
    rng = np.random.default_rng(seed)  # the noise's stream: the same as before the rows had their own
    row_rng = np.random.default_rng(np.random.SeedSequence(seed).spawn(1)[0])
    theta = np.broadcast_to(theta0, (seeds, *np.shape(theta0)[-1:])).astype(np.float64).copy()
    b, h = batch or n, dt or lr
    noise_std = math.sqrt(lr * h) * sigma / b  # = lr sigma / B when h = lr (Noisy-SGD)
    records = []
    for k in range(steps):
        rows = None if batch is None else row_rng.integers(0, n, (seeds, batch))
        theta -= h * grad(theta, rows, rng)
        if sigma:
            theta -= noise_std * rng.standard_normal(theta.shape)
        if record_every and observe is not None and (k + 1) % record_every == 0:
            records.append(observe(theta))
    return theta, records
