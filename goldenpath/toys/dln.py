"""Diagonal linear networks: beta = u*u - v*v, u_0 = v_0 = alpha (Woodworth et al. 2020).

Gradient flow on L(beta) = ||X beta - y||^2 / (2n) ends at argmin Q_alpha(beta) subject to X beta = y,
Q_alpha(beta) = sum_i alpha^2 q(beta_i / alpha^2), q(z) = 2 - sqrt(4 + z^2) + z arcsinh(z / 2).
Since q'(z) = arcsinh(z / 2), the solution is beta = 2 alpha^2 sinh(X^T lam) with lam minimising the
smooth convex dual D(lam) = 2 alpha^2 sum_i cosh((X^T lam)_i) - lam . y, solved by Newton's method
with a line search (robust for small alpha, where the solution nears the minimum-l1 interpolator).
"""

from __future__ import annotations

import math

import numpy as np
from scipy import optimize

from goldenpath.toys.problems import Problem, optimise  # noqa: F401  (dln.optimise for callers)


def q_alpha(beta: np.ndarray, alpha: float) -> float:
    z = np.asarray(beta, dtype=np.float64) / alpha**2
    return float(alpha**2 * np.sum(2 - np.sqrt(4 + z**2) + z * np.arcsinh(z / 2)))


def _dual_newton(X: np.ndarray, y: np.ndarray, alpha: float, lam: np.ndarray, *, tol: float,
                 max_iter: int) -> np.ndarray:
    c = 2 * alpha**2

    def dual(l):
        with np.errstate(over="ignore"):  # an overlong trial step gives inf, which the line search rejects
            return c * np.cosh(X.T @ l).sum() - l @ y

    for _ in range(max_iter):
        s = X.T @ lam
        grad = X @ (c * np.sinh(s)) - y
        if np.abs(grad).max() <= tol * max(1.0, np.abs(y).max()):
            break
        hess = (X * (c * np.cosh(s))) @ X.T
        step = np.linalg.solve(hess + 1e-13 * np.trace(hess) / len(y) * np.eye(len(y)), grad)
        t, d0 = 1.0, dual(lam)
        # Armijo backtracking; near the optimum the full Newton step's change of the dual is below its
        # rounding (about 1e-13 of its size), where Armijo cannot tell a decrease: take that step
        floor = 1e-13 * max(1.0, abs(d0))
        while (trial := dual(lam - t * step)) > d0 - 0.25 * t * (grad @ step) and t > 1e-12:
            if t == 1.0 and abs(trial - d0) <= floor:
                break
            t /= 2
        lam = lam - t * step
    return lam


def flow_limit(X: np.ndarray, y: np.ndarray, alpha: float, *, tol: float = 1e-12, max_iter: int = 200,
               lam: np.ndarray | None = None) -> np.ndarray:
    """argmin Q_alpha(beta) s.t. X beta = y, by Newton on the dual; below alpha = 0.1 by continuation in
    alpha (each solve starts from the last, ten times larger alpha's), which keeps tiny alphas robust.
    ``lam``: a dual start (e.g. a nearby alpha's solution, from ``dual_solution``), used instead of the
    continuation; the dual is strictly convex, so the start changes the work, not the answer."""
    return 2 * alpha**2 * np.sinh(X.T @ dual_solution(X, y, alpha, tol=tol, max_iter=max_iter, lam=lam))


def dual_solution(X: np.ndarray, y: np.ndarray, alpha: float, *, tol: float = 1e-12, max_iter: int = 200,
                  lam: np.ndarray | None = None) -> np.ndarray:
    """The dual minimiser lam of ``flow_limit`` (beta = 2 alpha^2 sinh(X^T lam))."""
    if lam is not None:
        return _dual_newton(X, y, alpha, lam, tol=tol, max_iter=max_iter)
    a = max(alpha, 0.1)
    lam = _dual_newton(X, y, a, np.zeros(X.shape[0]), tol=tol, max_iter=max_iter)
    while a > alpha:
        a = max(alpha, a / 10)
        lam = _dual_newton(X, y, a, lam, tol=tol, max_iter=max_iter)
    return lam


class AlphaGrid:
    """The flow limits of one problem on the coarse log-alpha grid of ``fit_alpha`` (25 points over
    ``bounds``), with their dual solutions: they do not depend on the beta being fitted, so many fits on
    one problem share them, and each refinement step starts Newton from the nearest grid point's dual."""

    def __init__(self, X: np.ndarray, y: np.ndarray, bounds=(1e-3, 10.0), points: int = 25):
        self.X, self.y, self.bounds = X, y, tuple(bounds)
        self.log_alpha = np.linspace(math.log(bounds[0]), math.log(bounds[1]), points)
        self.lams = [dual_solution(X, y, math.exp(g)) for g in self.log_alpha]
        self.limits = np.array([2 * math.exp(g) ** 2 * np.sinh(X.T @ lam)
                                for g, lam in zip(self.log_alpha, self.lams)])

    def limit(self, log_alpha: float) -> np.ndarray:
        lam = self.lams[int(np.argmin(np.abs(self.log_alpha - log_alpha)))]
        return flow_limit(self.X, self.y, math.exp(log_alpha), lam=lam)


def fit_alpha(X: np.ndarray, y: np.ndarray, beta: np.ndarray, *, bounds=(1e-3, 10.0),
              grid: AlphaGrid | None = None) -> tuple[float, float]:
    """(alpha, residual): the alpha whose flow limit is nearest ``beta`` (relative l2), and that distance.
    The best of 25 log-spaced alphas over ``bounds``, refined by a bounded scalar search between its
    neighbours. ``grid``: the problem's ``AlphaGrid`` (built here if not given; pass it for many fits).
    (nan, nan) for a ``beta`` that is not finite (a run that diverged): no alpha describes it."""
    beta = np.asarray(beta, dtype=np.float64)
    if not np.isfinite(beta).all():
        return math.nan, math.nan
    if grid is None or grid.X is not X or grid.y is not y or grid.bounds != tuple(bounds):
        grid = AlphaGrid(X, y, bounds)
    scale = max(np.linalg.norm(beta), 1e-300)

    def gap(log_alpha):
        return np.linalg.norm(grid.limit(log_alpha) - beta) / scale

    g = grid.log_alpha
    best = g[int(np.argmin(np.linalg.norm(grid.limits - beta, axis=1) / scale))]
    step = g[1] - g[0]
    lo, hi = max(best - step, g[0]), min(best + step, g[-1])
    res = optimize.minimize_scalar(gap, bounds=(lo, hi), method="bounded", options={"xatol": 1e-6})
    return math.exp(res.x), float(res.fun)  # at a bound: the solution sits at (or beyond) that end


def min_l1(X: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The minimum-l1 interpolator, by a linear program (beta = p - m, p, m >= 0)."""
    d = X.shape[1]
    res = optimize.linprog(np.ones(2 * d), A_eq=np.hstack([X, -X]), b_eq=y, bounds=(0, None), method="highs")
    return res.x[:d] - res.x[d:]


def gradient(problem: Problem, *, label_noise: float = 0.0):
    """grad over (u, v) concatenated [S, 2d], from the least-squares gradient in beta (full or mini-batch).

    ``label_noise``: each step sees labels y_i + label_noise * eps_i (SGD with label noise, Pesme et al.
    2021), a gradient noise proportional to the weights, unlike Noisy-SGD's isotropic noise.
    """
    X, y = problem.X, problem.y
    n, d = X.shape

    def grad(theta, rows, rng=None):
        u, v = theta[:, :d], theta[:, d:]
        beta = u * u - v * v
        if rows is None:
            r = beta @ X.T - y
            if label_noise:
                r = r - label_noise * rng.standard_normal(r.shape)
            g = r @ X / n
        else:
            xb = X[rows]
            r = np.einsum("sbd,sd->sb", xb, beta) - y[rows]
            if label_noise:
                r = r - label_noise * rng.standard_normal(r.shape)
            g = np.einsum("sb,sbd->sd", r, xb) / rows.shape[1]
        return np.concatenate([2 * u * g, -2 * v * g], axis=1)

    return grad


def beta_of(theta: np.ndarray) -> np.ndarray:
    d = theta.shape[-1] // 2
    return theta[..., :d] ** 2 - theta[..., d:] ** 2


def run(problem: Problem, alpha: float, **kw):
    """optimise() from u = v = alpha; returns (final beta [S, d], records)."""
    d = problem.X.shape[1]
    theta, records = optimise(gradient(problem), np.full(2 * d, alpha), n=len(problem.y), **kw)
    return beta_of(theta), records


def log_uv(theta: np.ndarray) -> np.ndarray:
    """log|u_i v_i| of parameters ``[..., 2d]``: the quantity gradient flow conserves (u v = alpha^2)."""
    d = theta.shape[-1] // 2
    with np.errstate(divide="ignore"):
        return np.log(np.abs(theta[..., :d] * theta[..., d:]))


def predicted_log_uv_drift(problem: Problem, alpha: float, *, lr: float, sigma: float, steps: int,
                           batch: int | None = None) -> np.ndarray:
    """The mean change of log(u_i v_i) [d] that Noisy-SGD's isotropic noise adds after ``steps`` steps.

    The gradient terms cancel in d(u v) = v du + u dv, so u v is a martingale under the noise; Ito's
    lemma then gives log(u v) the drift -(s^2 / 2) (1/u^2 + 1/v^2) per unit time. In steps of size lr the
    noise on each weight has variance tau^2 = (lr sigma / B)^2 per step, so to first order in tau^2 (along
    the noise-free full-batch GD path u_k, v_k from u = v = alpha) the shift is
    -(tau^2 / 2) sum_k (1/u_k^2 + 1/v_k^2). With no gradient (u = v = alpha throughout) that is
    -steps tau^2 / alpha^2. The GD discretisation's own change of u v is not included: compare with a
    noise-free run. The median falls by less: with no gradient, log(alpha + t Z) keeps its median, and the
    median of log(u v) falls by half the mean's (only the part of (du/u - dv/v)^2 independent of the sum
    shifts it), to first order in tau^2.
    """
    X, y = problem.X, problem.y
    n, d = X.shape
    tau2 = (lr * sigma / (batch or n)) ** 2
    u, v = np.full(d, float(alpha)), np.full(d, float(alpha))
    total = np.zeros(d)
    for _ in range(steps):
        total += 1 / u**2 + 1 / v**2
        g = (X.T @ (X @ (u * u - v * v) - y)) / n
        u, v = u - lr * 2 * u * g, v + lr * 2 * v * g
    return -0.5 * tau2 * total
