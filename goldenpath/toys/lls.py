"""Linear least squares, d > n: L(beta) = ||X beta - y||^2 / (2n) (docs/science.md, "Theory toys").

Gradients lie in the row space of X, so the null-space part of beta moves only with the injected noise:
under Noisy-SGD it stays Gaussian with mean P beta_0 and covariance k (lr sigma / B)^2 P after k steps.
"""

from __future__ import annotations

import numpy as np

from goldenpath.toys.problems import Problem, optimise


def flow_limit(X: np.ndarray, y: np.ndarray, beta0: np.ndarray) -> np.ndarray:
    """Where gradient flow from beta0 ends: the interpolator nearest beta0, beta0 + X^+ (y - X beta0)."""
    return beta0 + np.linalg.pinv(X) @ (y - X @ beta0)


def null_projector(X: np.ndarray) -> np.ndarray:
    """P, the orthogonal projector on ker X."""
    return np.eye(X.shape[1]) - np.linalg.pinv(X) @ X


def null_space_moments(X: np.ndarray, beta0: np.ndarray, *, lr: float, sigma: float, batch: int,
                       steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact mean and covariance of P beta_k under Noisy-SGD: (P beta0, k (lr sigma / B)^2 P)."""
    p = null_projector(X)
    return p @ beta0, steps * (lr * sigma / batch) ** 2 * p


def gradient(problem: Problem):
    """grad(beta [S, d], rows [S, B] or None) of L on the full data or on each seed's mini-batch."""
    X, y = problem.X, problem.y
    n = len(y)

    def grad(beta, rows, rng=None):
        if rows is None:
            return (beta @ X.T - y) @ X / n
        xb = X[rows]                                  # [S, B, d]
        r = np.einsum("sbd,sd->sb", xb, beta) - y[rows]
        return np.einsum("sb,sbd->sd", r, xb) / rows.shape[1]

    return grad


def run(problem: Problem, beta0: np.ndarray, **kw):
    """optimise() on this problem (see there for lr, batch, sigma, seeds, dt, steps)."""
    return optimise(gradient(problem), beta0, n=len(problem.y), **kw)
