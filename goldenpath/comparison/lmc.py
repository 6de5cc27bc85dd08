"""Linear-mode connectivity: the loss along the straight line between two models' weights, and its barrier.

For weights a and b and t in [0, 1], theta(t) = (1 - t) a + t b, and L(t) is the mean loss of theta(t) on
fixed batches (every image, or every predicted token, weighs the same). The barrier is

    B = max_t [L(t) - ((1 - t) L(0) + t L(1))]

over a grid of k points that includes both ends (Frankle et al. 2020), so B >= 0, and B = 0 when the path
nowhere rises above the chord between its ends (a convex loss, or a model with itself).

Buffers. Batch-norm running statistics of theta(t) are not the interpolation of the ends' statistics: the
interpolated network's activations have smaller variance than either end's, and interpolated statistics
make the path look far worse than it is (Jordan et al. 2023, "REPAIR"). By default (``buffers="reset"``)
they are recomputed at every t, the two ends included, as the plain average over ``reset_batches``
(default: ``batches``), running the batch-norm layers alone in train mode; so L(0) and L(1) are the ends'
losses with recomputed statistics, and the path is measured against its own ends. ``buffers="interpolate"``
interpolates them as weights. Other floating-point buffers are interpolated; integer ones (counters) are
taken from ``model_a``. A model without batch norm is the same under both.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Sequence
from typing import Literal

import torch
from torch import nn

from goldenpath.data.streams import Batch
from goldenpath.models import count, logits, sample_losses

LossFn = Callable[[nn.Module, Batch], torch.Tensor]  # (model, batch) -> per-sample summed losses [B]


def barrier(model_a: nn.Module, model_b: nn.Module, batches: Iterable[Batch], k: int = 11, *,
            buffers: Literal["reset", "interpolate"] = "reset", reset_batches: Iterable[Batch] | None = None,
            loss_fn: LossFn = sample_losses) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The loss at k evenly spaced points of the segment from ``model_a``'s weights to ``model_b``'s.

    Args:
        model_a, model_b: the same architecture (their state-dict names and shapes must agree); neither is
            changed (the path is evaluated on a copy of ``model_a``).
        batches: the data the loss is measured on (iterated k times).
        k: points, both ends included (>= 2).
        buffers: ``reset`` or ``interpolate`` batch-norm statistics (module docstring).
        reset_batches: the data batch-norm statistics are recomputed from (default: ``batches``).
        loss_fn: per-sample summed losses; the mean divides by ``goldenpath.models.count`` of each batch.

    Returns:
        (ts [k] float64, losses [k] float64, barrier).
    """
    if k < 2:
        raise ValueError(f"k={k}: the path needs both ends, use k >= 2")
    if buffers not in ("reset", "interpolate"):
        raise ValueError(f"buffers={buffers!r}: use 'reset' or 'interpolate'")
    batches = list(batches)
    reset = None
    if buffers == "reset" and norm_layers(model_a):
        reset = batches if reset_batches is None else list(reset_batches)
    work = copy.deepcopy(model_a).eval()
    tensors, a, b = state_lists(work, model_a, model_b)
    ts = torch.linspace(0.0, 1.0, k, dtype=torch.float64)
    losses = torch.tensor(path_losses(work, tensors, a, b, ts.tolist(), batches, reset_batches=reset,
                                      loss_fn=loss_fn), dtype=torch.float64)
    return ts, losses, barrier_of(ts, losses)


def barrier_of(ts: torch.Tensor, losses: torch.Tensor) -> float:
    """max_t [L(t) - ((1 - t) L(0) + t L(1))]: 0 at both ends, so never below 0 (nan where a loss is nan)."""
    ts, losses = ts.double(), losses.double()
    chord = (1 - ts) * losses[0] + ts * losses[-1]
    excess = losses - chord
    return float("nan") if bool(torch.isnan(excess).any()) else float(excess.max())


def state_lists(work: nn.Module, model_a: nn.Module, model_b: nn.Module):
    """``work``'s state tensors (a tied tensor once) and the matching tensors of ``model_a`` and ``model_b``."""
    state_a, state_b = model_a.state_dict(), model_b.state_dict()
    seen, tensors, a, b = set(), [], [], []
    for name, t in work.state_dict(keep_vars=True).items():
        if id(t) in seen:
            continue
        seen.add(id(t))
        if name not in state_b or state_b[name].shape != t.shape:
            got = tuple(state_b[name].shape) if name in state_b else "nothing"
            raise ValueError(f"model_b has {got} at {name}, model_a {tuple(t.shape)}: interpolate models of "
                             f"one architecture")
        tensors.append(t)
        a.append(state_a[name].to(t.device))
        b.append(state_b[name].to(t.device))
    return tensors, a, b


def path_losses(module: nn.Module, tensors: Sequence[torch.Tensor], a: Sequence[torch.Tensor],
                b: Sequence[torch.Tensor], ts: Sequence[float], batches: Sequence[Batch], *,
                reset_batches: Sequence[Batch] | None = None, loss_fn: LossFn = sample_losses) -> list[float]:
    """Mean loss of ``module`` (in eval mode) with its state ``tensors`` set to lerp(a, b, t), for each t.

    ``tensors``, ``a`` and ``b`` are aligned lists (the module's state, e.g. from :func:`state_lists`);
    ``reset_batches``: recompute batch-norm statistics from these at every t (None: keep what ``tensors``
    were set to). ``module``'s state is left at the last t.
    """
    out = []
    with torch.no_grad():
        for t in ts:
            for x, wa, wb in zip(tensors, a, b):
                # lerp is exact at both ends (t = 0 gives a, t = 1 gives b) and where a == b
                x.copy_(torch.lerp(wa, wb, float(t)) if x.is_floating_point() else wa)
            if reset_batches is not None:
                recompute_norm_stats(module, reset_batches)
            out.append(mean_loss(module, batches, loss_fn=loss_fn))
    return out


def mean_loss(model: nn.Module, batches: Iterable[Batch], *, loss_fn: LossFn = sample_losses) -> float:
    """sum of per-sample losses / images or predicted tokens, over all batches, accumulated in float64."""
    total, n = 0.0, 0
    with torch.no_grad():
        for batch in batches:
            total += float(loss_fn(model, batch).double().sum())
            n += count(batch)
    return total / n


def norm_layers(model: nn.Module) -> list[nn.Module]:
    """The batch-norm layers that keep running statistics."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


def recompute_norm_stats(model: nn.Module, batches: Iterable[Batch]) -> None:
    """Replace every batch-norm layer's running statistics by their plain average over ``batches`` (one
    forward each, the batch-norm layers alone in train mode; the rest of the model keeps its mode)."""
    layers = norm_layers(model)
    if not layers:
        return
    saved = [(m, m.momentum, m.training) for m in layers]
    try:
        for m in layers:
            m.reset_running_stats()
            m.momentum = None  # cumulative average
            m.train()
        with torch.no_grad():
            for batch in batches:
                logits(model, batch)
    finally:
        for m, momentum, training in saved:
            m.momentum = momentum
            m.train(training)
