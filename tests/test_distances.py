"""Distances against scipy, hand cases and their identities; unit sums and the bootstrap."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.spatial.distance import jensenshannon
from scipy.special import rel_entr, softmax

from goldenpath.comparison.distances import (
    Dist, ON_DISTS, bootstrap, bootstrap_rows, bootstrap_weights, cka_from_moments, js, kl, linear_cka, symmetric_kl,
    top1, tv, unit_sums,
)


def random_logits(*shape, scale=3.0, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale


def test_distances_match_scipy():
    a, b = random_logits(50, 7, seed=1), random_logits(50, 7, seed=2)
    p, q = softmax(a.numpy(), -1), softmax(b.numpy(), -1)
    np.testing.assert_allclose(kl(a, b).numpy(), rel_entr(p, q).sum(-1), rtol=1e-10)
    np.testing.assert_allclose(symmetric_kl(a, b).numpy(), (rel_entr(p, q) + rel_entr(q, p)).sum(-1) / 2, rtol=1e-10)
    np.testing.assert_allclose(js(a, b).numpy(), jensenshannon(p, q, axis=-1) ** 2, rtol=1e-9)
    np.testing.assert_allclose(tv(a, b).numpy(), 0.5 * np.abs(p - q).sum(-1), rtol=1e-10)
    np.testing.assert_array_equal(top1(a, b).numpy(), (p.argmax(-1) != q.argmax(-1)).astype(np.float32))


def test_hand_computed_cases():
    a = torch.log(torch.tensor([[0.5, 0.5], [0.9, 0.1]], dtype=torch.float64))
    b = torch.log(torch.tensor([[1.0 - 1e-12, 1e-12], [0.1, 0.9]], dtype=torch.float64))
    torch.testing.assert_close(tv(a, b), torch.tensor([0.5 - 1e-12, 0.8], dtype=torch.float64))
    assert float(kl(a[1:], b[1:])) == pytest.approx(0.9 * math.log(9) + 0.1 * math.log(1 / 9))
    assert top1(a[1:], b[1:]).tolist() == [1.0]
    # disjoint supports: JS reaches ln 2
    far = torch.tensor([[100.0, -100.0]]), torch.tensor([[-100.0, 100.0]])
    assert float(js(*far)) == pytest.approx(math.log(2), rel=1e-6)


def test_identities_bounds_and_pinsker():
    a, b = random_logits(400, 11, seed=3), random_logits(400, 11, seed=4)
    for f in (tv, kl, js, top1):
        assert float(f(a, a).abs().max()) < 1e-12
    for f in (tv, js, top1, symmetric_kl):
        torch.testing.assert_close(f(a, b), f(b, a))
    assert float(tv(a, b).max()) <= 1 and float(js(a, b).max()) <= math.log(2) + 1e-12
    assert bool((tv(a, b) <= torch.sqrt(kl(a, b) / 2) + 1e-12).all())  # Pinsker
    assert bool((js(a, b) <= tv(a, b) * math.log(2) + 1e-12).all())   # JS <= TV ln 2


def test_extreme_logits_stay_finite_and_low_precision_is_computed_in_float32():
    a = torch.tensor([[1e4, 0.0, -1e4]])
    b = torch.tensor([[-1e4, 1e4, 0.0]])
    for f in (tv, kl, js, top1):
        assert torch.isfinite(f(a, b)).all()
    assert float(kl(a, b)) == pytest.approx(2e4, rel=1e-6)  # log p - log q at class 0: 0 - (-2e4)
    h = random_logits(20, 5, seed=5)
    torch.testing.assert_close(tv(h.bfloat16(), h.flip(0).bfloat16()).double(),
                               tv(h.bfloat16().double(), h.flip(0).bfloat16().double()), rtol=1e-5, atol=1e-6)


def test_unit_sums_mask_padding_and_bootstrap_covers_the_mean():
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[True, True, False], [True, False, False]])
    sums, counts = unit_sums(values, mask)
    assert sums.tolist() == [3.0, 4.0] and counts.tolist() == [2.0, 1.0]
    est, low, high = bootstrap(sums, counts)
    assert est == pytest.approx(7 / 3) and low <= est <= high
    # coverage: the 95% interval of a mean of 200 exponential draws holds the true mean most of the time
    gen = torch.Generator().manual_seed(0)
    hits = 0
    for rep in range(100):
        x = -torch.log(torch.rand(200, generator=gen, dtype=torch.float64))
        _, lo, hi = bootstrap(x, torch.ones(200), n_boot=400, seed=rep)
        hits += lo <= 1.0 <= hi
    assert 85 <= hits <= 100


def test_a_unit_with_an_infinite_kl_makes_the_upper_bound_infinite_not_the_interval_shorter():
    """Every resample that draws the unit has an infinite mean; about 37% do not. The interval's low end is the
    2.5% quantile of all draws (finite), its high end infinite, as the estimate is: dropping the infinite draws
    gave an interval from the resamples without the unit alone, below an infinite estimate."""
    sums = torch.rand(1, 50, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    sums[0, 7] = math.inf
    counts = torch.ones(1, 50, dtype=torch.float64)
    w = bootstrap_weights(50, n_boot=400, seed=1)
    est, low, high = bootstrap_rows(sums, counts, weights=w)
    wn, finite_part = w.numpy(), np.where(np.isinf(sums[0].numpy()), 0.0, sums[0].numpy())
    draws = np.sort(np.where(wn[:, 7] > 0, np.inf, wn @ finite_part / 50))  # a loop's resampled means
    finite = np.isfinite(draws)
    assert 0.25 < finite.mean() < 0.5  # the resamples without unit 7
    h = 0.025 * (len(draws) - 1)
    want_low = draws[int(h)] + (h - int(h)) * (draws[int(h) + 1] - draws[int(h)])
    assert math.isinf(est[0]) and math.isinf(high[0]) and low[0].item() == pytest.approx(want_low, rel=1e-12)


def test_bootstrap_rows_equal_one_bootstrap_per_row_including_an_undefined_draw():
    gen = torch.Generator().manual_seed(1)
    sums = torch.rand(5, 40, generator=gen, dtype=torch.float64)
    counts = torch.randint(1, 4, (5, 40), generator=gen).double()
    counts[4, :35] = 0  # few units with points: some resamples draw none of them (0 / 0)
    sums[4, :35] = 0
    den = (torch.rand(5, 40, generator=gen, dtype=torch.float64) + 0.1, torch.ones(5, 40, dtype=torch.float64))
    w = bootstrap_weights(40, n_boot=300, seed=3)
    shared = counts[1:2].expand(5, -1)  # every row's units have the same points (resampled once)
    for cs, denominator in ((counts, None), (counts, den), (shared, None), (shared, den)):
        est, low, high = bootstrap_rows(sums, cs, weights=w, denominator=denominator)
        for k in range(5):  # numpy, row by row: ratio of resampled sums, undefined draws dropped
            wn = w.numpy()
            with np.errstate(invalid="ignore"):  # 0 / 0 for resamples without points: dropped below
                draws = (wn @ sums[k].numpy()) / (wn @ cs[k].numpy())
            value = sums[k].sum().item() / cs[k].sum().item()
            if denominator is not None:
                draws = draws / ((wn @ den[0][k].numpy()) / (wn @ den[1][k].numpy()))
                value /= den[0][k].sum().item() / den[1][k].sum().item()
            draws = draws[~np.isnan(draws)]
            expected = (value, *np.percentile(draws, [2.5, 97.5]))
            assert (est[k].item(), low[k].item(), high[k].item()) == pytest.approx(expected, rel=1e-12)
    # a row whose units have no points at all: every draw undefined, no interval
    counts[2] = 0
    est, low, high = bootstrap_rows(sums, counts, weights=w)
    assert math.isnan(low[2]) and math.isnan(high[2]) and not math.isnan(low[1])




def masked_logits(n, k, seed):
    """Random logits with -inf at random tokens: ruled out by both, by p only, by q only, by neither."""
    gen = torch.Generator().manual_seed(seed)
    a, b = (torch.randn(n, k, generator=gen, dtype=torch.float64) * 3 for _ in range(2))
    both = torch.rand(n, k, generator=gen) < 0.3
    only_a, only_b = (torch.rand(n, k, generator=gen) < 0.15 for _ in range(2))
    both[:, 0] = False  # every row keeps a token
    a[both | only_a], b[both | only_b] = -math.inf, -math.inf
    a[:, 0], b[:, 0] = 1.0, 1.0
    return a, b


def test_no_points_give_no_values():
    for f in (tv, kl, js, top1):
        assert f(torch.zeros(0, 5), torch.zeros(0, 5)).shape == (0,)


def test_masked_vocabularies_match_scipy():
    a, b = masked_logits(300, 9, seed=6)
    p, q = softmax(a.numpy(), -1), softmax(b.numpy(), -1)
    want_kl = rel_entr(p, q).sum(-1)  # inf where q rules out a token p gives mass
    assert np.isinf(want_kl).any() and np.isfinite(want_kl).any()
    np.testing.assert_allclose(kl(a, b).numpy(), want_kl, rtol=1e-10)
    np.testing.assert_allclose(js(a, b).numpy(), jensenshannon(p, q, axis=-1) ** 2, rtol=1e-9, atol=1e-15)
    np.testing.assert_allclose(tv(a, b).numpy(), 0.5 * np.abs(p - q).sum(-1), rtol=1e-10)
    # tokens both rule out contribute nothing: the same rows with those tokens dropped
    both = torch.isinf(a) & torch.isinf(b)
    row = int(both.sum(1).argmax())
    keep = ~both[row]
    assert both[row].any()
    for f in (kl, js, tv):
        torch.testing.assert_close(f(a[row : row + 1], b[row : row + 1]),
                                   f(a[row : row + 1, keep], b[row : row + 1, keep]), rtol=1e-12, atol=0)


def test_kl_is_infinite_where_q_rules_out_a_token_whose_float32_probability_underflows():
    """p gives a token log-probability -120 (exp underflows to 0 in float32), q rules it out: KL(p || q) is
    infinite, as in float64 and scipy's rel_entr; it was 0 when ruled out was read from the rounded p."""
    p, q = torch.tensor([[0.0, -120.0], [0.0, -1.0]]), torch.tensor([[0.0, -math.inf], [0.0, -math.inf]])
    want = rel_entr(softmax(p.double().numpy(), -1), softmax(q.double().numpy(), -1)).sum(-1)
    assert np.isinf(want).all()
    for dtype in (torch.float32, torch.float64):
        assert torch.isinf(kl(p.to(dtype), q.to(dtype))).all(), dtype
        assert torch.isinf(symmetric_kl(p.to(dtype), q.to(dtype))).all(), dtype
    # the other way round q gives no mass where p has none: finite, and the same as float64's
    torch.testing.assert_close(kl(q, p).double(), kl(q.double(), p.double()), rtol=1e-6, atol=0)


def test_masked_vocabularies_keep_float32_accuracy_on_near_identical_pairs():
    a, _ = masked_logits(200, 50, seed=7)
    b = a + 1e-2 * torch.randn(a.shape, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    # the same distributions with every ruled-out token given a finite logit whose probability is ~1e-26
    low_a, low_b = (x.masked_fill(torch.isinf(x), -60.0) for x in (a, b))
    for m in ("kl", "js", "tv"):
        want = ON_DISTS[m](Dist(a), Dist(b))
        finite = torch.isfinite(want)
        got = ON_DISTS[m](Dist(a.float()), Dist(b.float())).double()
        unmasked = ON_DISTS[m](Dist(low_a.float()), Dist(low_b.float())).double()
        assert float((got - want)[finite].abs().mean() / want[finite].mean()) < 0.01, m  # kl ~ 3e-5, js ~ 8e-6
        torch.testing.assert_close(got[finite], unmasked[finite], rtol=1e-5, atol=1e-12, msg=m)


# ----------------------------------------------------------------------------- linear CKA


def hsic_cka(x: np.ndarray, y: np.ndarray) -> float:
    """The HSIC form (Kornblith et al. 2019, eq. 3 with linear kernels): n x n Gram matrices, H centring."""
    n = len(x)
    h = np.eye(n) - np.ones((n, n)) / n
    k, l = x @ x.T, y @ y.T

    def hsic(a, b):
        return np.trace(a @ h @ b @ h) / (n - 1) ** 2

    return hsic(k, l) / math.sqrt(hsic(k, k) * hsic(l, l))


def features(n, d, seed):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def orthogonal(d, seed):
    q, _ = torch.linalg.qr(features(d, d, seed))
    return q


def test_linear_cka_equals_the_hsic_formula_in_float64():
    x = features(60, 5, 1)
    y = x @ features(5, 8, 2) + 0.7 * features(60, 8, 3)  # related, not equivalent
    got = linear_cka(x, y)
    assert got == pytest.approx(hsic_cka(x.numpy(), y.numpy()), rel=1e-10) and 0.2 < got < 0.99
    assert linear_cka(x.float(), y.float()) == pytest.approx(got, rel=1e-5)  # float32 features, float64 sums
    assert linear_cka(y, x) == pytest.approx(got, rel=1e-12)


def test_linear_cka_invariances_and_a_random_other_matrix():
    x, y = features(200, 6, 4), features(200, 6, 5) + features(200, 6, 4)
    assert linear_cka(x, 3.5 * x @ orthogonal(6, 6)) == pytest.approx(1.0, abs=1e-12)
    assert linear_cka(x, x + 100.0) == pytest.approx(1.0, abs=1e-12)  # centring: a shift changes nothing
    base = linear_cka(x, y)
    assert linear_cka(0.1 * x @ orthogonal(6, 7), 20 * y @ orthogonal(6, 8)) == pytest.approx(base, rel=1e-10)
    # not invariant to scaling the coordinates unequally (CKA is not CCA)
    assert linear_cka(x, x * torch.tensor([1.0, 1, 1, 1, 1, 30])) < 0.9
    # independent features: CKA near 0 (about sqrt(d1 d2) / n = 0.002 here)
    assert linear_cka(features(2000, 4, 9), features(2000, 4, 10)) < 0.02
    assert math.isnan(linear_cka(torch.ones(10, 3), x[:10]))  # no variance: undefined
    with pytest.raises(ValueError, match="same points"):
        linear_cka(x, y[:-1])


def test_cka_from_chunked_moments_equals_linear_cka_even_with_large_means():
    x = features(90, 4, 11) + 1e4  # ReLU-like features far from 0: uncentred sums would cancel
    y = x[:, :3] ** 2 / 1e4 + features(90, 3, 12)
    sx = torch.zeros(4, dtype=torch.float64)
    sy = torch.zeros(3, dtype=torch.float64)
    xx, yy, xy = (torch.zeros(a, b, dtype=torch.float64) for a, b in ((4, 4), (3, 3), (4, 3)))
    shift_x, shift_y = x[:7].mean(0), y[:7].mean(0)
    for lo in range(0, 90, 7):
        a, b = x[lo : lo + 7] - shift_x, y[lo : lo + 7] - shift_y
        sx, sy, xx, yy, xy = sx + a.sum(0), sy + b.sum(0), xx + a.T @ a, yy + b.T @ b, xy + a.T @ b
    got = cka_from_moments(90, sx, sy, xx, yy, xy)
    assert got == pytest.approx(hsic_cka((x - x.mean(0)).numpy(), (y - y.mean(0)).numpy()), rel=1e-9)
    assert got == pytest.approx(linear_cka(x, y), rel=1e-9)


def test_js_in_float32_where_probabilities_underflow_matches_float64():
    """Tokens whose probabilities underflow in float32 (logits 120 below the top) in one model or both: JS is
    finite and within float32 accuracy of the float64 value (log m never meets 0 * inf)."""
    gen = torch.Generator().manual_seed(3)
    a = torch.randn(400, 12, generator=gen, dtype=torch.float64)
    b = a + 0.3 * torch.randn(a.shape, generator=gen, dtype=torch.float64)
    a[:, 5:9] -= 120.0  # p underflows to 0 (or a subnormal) in float32, not in float64
    b[:, 7:11] -= 120.0
    want = js(a, b)
    got = js(a.float(), b.float()).double()
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
