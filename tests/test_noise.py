"""The noise of Noisy-SGD and DP-SGD: its law and its reproducibility."""

from __future__ import annotations

import torch

from goldenpath.dp.mechanisms import add_noise


def test_noise_has_the_stated_mean_and_covariance_and_is_reproducible():
    shapes = [(3, 4), (5,)]
    steps, std = 4000, 0.37
    draws = []
    for step in range(steps):
        grads = [torch.zeros(s) for s in shapes]  # zero gradient: what is left is the noise
        norm = add_noise(grads, std, seed=11, step=step)
        flat = torch.cat([g.flatten() for g in grads]).double()
        assert abs(norm - float(flat.norm())) < 1e-5 * norm
        draws.append(flat)
    x = torch.stack(draws)
    d = x.shape[1]
    assert x.mean(0).abs().max() < 5 * std / steps**0.5
    cov = torch.cov(x.T)
    assert (cov.diagonal() / std**2 - 1).abs().max() < 5 * (2 / steps) ** 0.5
    assert (cov - torch.diag(cov.diagonal())).abs().max() < 5 * std**2 / steps**0.5
    again = [torch.zeros(s) for s in shapes]
    add_noise(again, std, seed=11, step=123)
    assert torch.equal(torch.cat([g.flatten() for g in again]).double(), x[123])
    assert d == 17


def test_noise_norm_is_accurate_over_millions_of_entries():
    """The returned ||std xi|| against float64 over a GPT-2-sized layer (one float32 reduction over it drifts by
    3e-6 to 3e-5)."""
    grads = [torch.zeros(2048, 1024), torch.zeros(3)]
    norm = float(add_noise(grads, 0.5, seed=3, step=7))
    want = float(torch.cat([g.flatten() for g in grads]).double().norm())
    assert abs(norm - want) < 1e-8 * want


def test_the_noise_is_one_draw_of_each_gradients_shape_in_order_small_ones_packed_or_not(monkeypatch):
    """Packing small gradients into one buffer leaves the stream as it was: gradient k's noise is the k-th
    ``torch.randn`` of its shape from the step's generator (sizes below and above the vectorised fill's 16,
    a float64 gradient between float32 ones, one larger than a pack)."""
    from goldenpath.dp import mechanisms
    from goldenpath.seeding import Purpose, stream_key

    monkeypatch.setattr(mechanisms, "_PACK", 64)
    shapes = [(3,), (5, 4), (17,), (2, 3, 3), (100,), (7,), (40,), (30,)]
    grads = [torch.zeros(s, dtype=torch.float64 if k == 5 else torch.float32) for k, s in enumerate(shapes)]
    assert [len(p) for p in mechanisms._packs(grads)] == [4, 1, 1, 1, 1]  # 3+20+17+18, 100, the float64, 40, 30
    norm = float(add_noise(grads, 0.25, seed=5, step=9))
    gen = torch.Generator().manual_seed(stream_key(5, Purpose.NOISE, 9) & (2**63 - 1))
    want = [0.25 * torch.randn(g.shape, generator=gen, dtype=g.dtype) for g in grads]
    for g, w in zip(grads, want):
        assert torch.equal(g, w)
    assert abs(norm - float(torch.cat([w.double().flatten() for w in want]).norm())) < 1e-6 * norm
