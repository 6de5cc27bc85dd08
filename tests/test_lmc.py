"""Linear-mode connectivity against a hand loop, a closed form and known answers (itself, a convex model,
a permuted copy), with and without batch norm."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from goldenpath.comparison import lmc
from goldenpath.config import load_config
from goldenpath.models import build_model

from .conftest import TINY_TEACHER


def setup(extra=(), n=2):
    config = load_config(None, [*TINY_TEACHER, "budget.steps=1", *extra])
    source = config.data.build()
    probe = {k: v.double() if v.is_floating_point() else v for k, v in source.heldout("probe").items()}
    models = [build_model(config.model, source.info, seed=s).double().eval() for s in range(n)]
    return source, probe, models


def chunks(batch, size=24):
    return [{k: v[lo : lo + size] for k, v in batch.items()} for lo in range(0, len(batch["ids"]), size)]


def hand_losses(model_a, model_b, probe, ts, *, reset=None, interpolate_buffers=True):
    """The path by hand: a fresh copy loaded with (1 - t) a + t b, batch-norm statistics recomputed by hand."""
    a, b = model_a.state_dict(), model_b.state_dict()
    out = []
    for t in ts:
        model = copy.deepcopy(model_a)
        model.load_state_dict({k: (1 - t) * a[k] + t * b[k] if a[k].is_floating_point() else a[k] for k in a})
        if reset is not None:
            norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
            for m in norms:
                m.reset_running_stats()
                m.momentum = None
                m.train()
            with torch.no_grad():
                for batch in reset:
                    model(batch["x"])
            for m in norms:
                m.eval()
        with torch.no_grad():
            out.append(float(F.cross_entropy(model(probe["x"]), probe["y"])))
    return torch.tensor(out, dtype=torch.float64)


def test_the_path_and_barrier_equal_a_hand_loop():
    _, probe, (a, b) = setup()
    before = {k: v.clone() for k, v in a.state_dict().items()}
    ts, losses, barrier = lmc.barrier(a, b, chunks(probe), k=7)
    torch.testing.assert_close(ts, torch.linspace(0, 1, 7, dtype=torch.float64))
    want = hand_losses(a, b, probe, ts.tolist())
    torch.testing.assert_close(losses, want, rtol=1e-10, atol=0)
    chord = (1 - ts) * want[0] + ts * want[-1]
    assert barrier == pytest.approx(float((want - chord).max()), rel=1e-9, abs=1e-12)
    assert all(torch.equal(v, before[k]) for k, v in a.state_dict().items())  # the models are left as they were


def trained_norm_stats(model, probe):
    """Give a batch-norm model running statistics of its own (one train-mode pass)."""
    model.train()
    with torch.no_grad():
        model(probe["x"][:32] * (1 + torch.rand(1).item()))
    return model.eval()


def test_batch_norm_statistics_are_recomputed_at_every_point_or_interpolated():
    source, probe, models = setup(["model.norm=batch"])
    a, b = (trained_norm_stats(m, probe) for m in models)
    heldout = {k: v.double() if v.is_floating_point() else v for k, v in source.heldout("eval").items()}
    ts = torch.linspace(0, 1, 5, dtype=torch.float64).tolist()
    _, reset, _ = lmc.barrier(a, b, chunks(probe), k=5, reset_batches=chunks(heldout, 64))
    torch.testing.assert_close(reset, hand_losses(a, b, probe, ts, reset=chunks(heldout, 64)), rtol=1e-10, atol=0)
    _, interpolated, _ = lmc.barrier(a, b, chunks(probe), k=5, buffers="interpolate")
    torch.testing.assert_close(interpolated, hand_losses(a, b, probe, ts), rtol=1e-10, atol=0)
    assert not torch.allclose(reset, interpolated)
    # without batch norm the two are the same path
    _, _, (c, d) = setup()
    assert torch.equal(lmc.barrier(c, d, [probe], k=4)[1], lmc.barrier(c, d, [probe], k=4, buffers="interpolate")[1])


@pytest.mark.parametrize("norm", ["none", "batch"])
def test_a_model_with_itself_has_a_flat_path_and_no_barrier(norm):
    _, probe, (a,) = setup([f"model.norm={norm}"], n=1)
    _, losses, barrier = lmc.barrier(a, copy.deepcopy(a), chunks(probe))
    assert barrier == 0.0 and bool((losses == losses[0]).all())


def test_a_convex_model_never_rises_above_its_chord():
    _, probe, _ = setup()
    gen = torch.Generator().manual_seed(0)
    a, b = (nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 10)).double() for _ in range(2))  # logistic regression
    with torch.no_grad():
        for m in (a, b):
            for p in m.parameters():
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.2)
    ts, losses, barrier = lmc.barrier(a, b, chunks(probe), k=21)
    chord = (1 - ts) * losses[0] + ts * losses[-1]
    assert float((losses - chord)[1:-1].max()) < 0 and barrier <= 1e-12
    # the same network with a ReLU hidden layer is not convex: a permuted copy computes the same function
    # (equal ends, a path symmetric about t = 1/2) but the average of the two does not
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 16), nn.ReLU(), nn.Linear(16, 10)).double()
    perm = torch.arange(16).flip(0)  # an involution: P(theta(1 - t)) = theta(t)
    twin = copy.deepcopy(mlp)
    with torch.no_grad():
        twin[1].weight.copy_(mlp[1].weight[perm]), twin[1].bias.copy_(mlp[1].bias[perm])
        twin[3].weight.copy_(mlp[3].weight[:, perm])
    _, losses, barrier = lmc.barrier(mlp, twin, [probe], k=11)
    torch.testing.assert_close(losses, losses.flip(0), rtol=1e-12, atol=1e-12)


class Scalar(nn.Module):
    def __init__(self, w: float):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(w, dtype=torch.float64))


def test_a_double_well_has_its_closed_form_barrier():
    """loss(w) = (w^2 - 1)^2 from w = -1 to w = 1: L(t) = ((2t - 1)^2 - 1)^2, barrier 1 at t = 1/2."""
    batch = {"y": torch.zeros(4, dtype=torch.long)}
    ts, losses, barrier = lmc.barrier(Scalar(-1.0), Scalar(1.0), [batch, batch], k=11,
                                      loss_fn=lambda m, b: ((m.w**2 - 1) ** 2).expand(len(b["y"])))
    torch.testing.assert_close(losses, ((2 * ts - 1) ** 2 - 1) ** 2, rtol=1e-12, atol=1e-12)
    assert barrier == pytest.approx(1.0, abs=1e-12)


def test_bad_input_is_refused():
    _, probe, (a, _) = setup()
    with pytest.raises(ValueError, match="k >= 2"):
        lmc.barrier(a, a, [probe], k=1)
    _, _, (narrow,) = setup(["model.width=4"], n=1)
    with pytest.raises(ValueError, match="one architecture"):
        lmc.barrier(a, narrow, [probe])
    with pytest.raises(ValueError, match="buffers"):
        lmc.barrier(a, a, [probe], buffers="average")
