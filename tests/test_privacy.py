"""Privacy accounting against independent computations."""

from __future__ import annotations

import math

import pytest
from scipy import integrate, optimize, stats

from goldenpath.dp.privacy import epsilon


def profile_by_quadrature(eps: float, sigma: float) -> float:
    """delta(eps) = int max(0, p(x) - e^eps q(x)) dx for N(0, sigma^2) against N(1, sigma^2), by quadrature."""
    p, q = stats.norm(0, sigma), stats.norm(1, sigma)
    cross = 0.5 - eps * sigma**2  # p(x) > e^eps q(x) exactly when x < cross
    value, _ = integrate.quad(lambda x: p.pdf(x) - math.exp(eps) * q.pdf(x), -math.inf, cross,
                              epsabs=1e-14, epsrel=1e-12, limit=200)
    return value


@pytest.mark.parametrize("sigma, delta", [(0.5, 1e-5), (1.0, 1e-5), (2.0, 1e-6), (5.0, 1e-3), (0.8, 0.01)])
def test_analytic_gaussian_matches_the_inverted_privacy_profile(sigma, delta):
    want = optimize.brentq(lambda e: profile_by_quadrature(e, sigma) - delta, 1e-9, 100, xtol=1e-12)
    assert epsilon(sigma, delta) == pytest.approx(want, rel=1e-6, abs=1e-9)


def test_analytic_gaussian_beats_the_classical_bound():
    # Dwork & Roth: sigma = sqrt(2 ln(1.25/delta)) / eps gives (eps, delta)-DP for eps < 1.
    for eps in (0.2, 0.5, 0.9):
        sigma = math.sqrt(2 * math.log(1.25 / 1e-5)) / eps
        assert epsilon(sigma, 1e-5) < eps


def test_full_batch_steps_compose_as_one_gaussian_with_sigma_over_root_k():
    assert epsilon(3.0, 1e-5, steps=9) == pytest.approx(epsilon(1.0, 1e-5), rel=1e-9)
    assert epsilon(0.0, 1e-5) == math.inf and epsilon(1.0, 1e-5, steps=0) == 0.0


def test_subsampled_rdp_matches_the_library_example():
    # opacus' own accountant test: sigma 1.5, q 0.04, 90 epochs, delta 1e-5 -> epsilon 7.32911117143.
    assert epsilon(1.5, 1e-5, steps=int(90 / 0.04), sample_rate=0.04) == pytest.approx(7.32911117143, rel=1e-9)
    # and less privacy is spent with a smaller sampling rate or fewer steps
    assert epsilon(1.5, 1e-5, steps=100, sample_rate=0.01) < epsilon(1.5, 1e-5, steps=100, sample_rate=0.04)


def test_subsampled_rdp_searches_orders_above_the_default_range():
    import warnings

    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

    sigma, q, delta = 4.0, 1 / 16, 1 / 8192  # one step: the best Renyi order lies far above opacus' 63
    orders = list(range(2, 400))
    brute, order = get_privacy_spent(orders=orders, rdp=compute_rdp(q=q, noise_multiplier=sigma, steps=1,
                                                                       orders=orders), delta=delta)
    default = RDPAccountant()
    default.history = [(sigma, q, 1)]
    with pytest.warns(UserWarning, match="largest alpha"):  # opacus' default orders: a loose bound
        loose = default.get_epsilon(delta)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # goldenpath searches past them: no warning
        ours = epsilon(sigma, delta, steps=1, sample_rate=q)
    assert order > 63 and ours == pytest.approx(brute, rel=1e-12) and ours <= loose * 0.9
