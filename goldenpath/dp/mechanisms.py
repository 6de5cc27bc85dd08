"""Gradient transforms for one optimizer step: SGD, Noisy-SGD and DP-SGD (see docs/training.md, "Noise").

    gaussian: g = mean gradient + (sigma / B) xi
    dp:       g = (sum_i clip_C(g_i) + sigma C xi) / B,   clip_C(v) = v min(1, C / ||v||)

Each kind is one small class (:data:`MECHANISMS`) saying what it does per micro-batch and once per optimizer
step; the training loop calls them and never branches on the kind. ``sum_i clip_C(g_i)`` comes from
:mod:`goldenpath.dp.per_sample` (``per_sample_clip``, ``clipped_grad_sum``).
"""

from __future__ import annotations

import torch

from goldenpath.seeding import Purpose, stream_key
from goldenpath.dp.per_sample import ClipResult, clip_factors, clipped_grad_sum, per_sample_clip

__all__ = ["ClipResult", "DPSGD", "NoisySGD", "SGD", "add_noise", "clip_factors", "clipped_grad_sum", "mechanism",
           "per_sample_clip"]


# ----------------------------------------------------------------------------- noise


def add_noise(grads: list[torch.Tensor], std: float, *, seed: int, step: int) -> torch.Tensor | float:
    """``grads += std * xi`` with xi ~ N(0, I); returns ``||std * xi||`` (a tensor on the gradients' device,
    so that the step loop never waits for the device).

    xi comes from a generator seeded by (seed, step) on the gradients' device: the same on every
    process, drawn once per optimizer step, and reproduced exactly on resume without saved state. Each
    gradient's noise is one draw of its shape, in order. Consecutive small gradients draw into one buffer
    (:data:`_PACK` values at most; a larger gradient has its own), added by one foreach call and squared in one
    pass: a ResNet-18's 62 tensors cost a few calls instead of some 300 small ones.
    """
    if std == 0 or not grads:
        return 0.0
    gen = torch.Generator(device=grads[0].device).manual_seed(stream_key(seed, Purpose.NOISE, step) & (2**63 - 1))
    squares = []
    for pack in _packs(grads):  # one buffer at a time: no second copy of the model's gradients
        buf = torch.empty(sum(g.numel() for g in pack), device=pack[0].device, dtype=pack[0].dtype)
        xis, lo = [], 0
        for g in pack:
            xis.append(buf[lo : lo + g.numel()].view(g.shape).normal_(generator=gen))  # as torch.randn(g.shape)
            lo += g.numel()
        torch._foreach_add_(pack, xis, alpha=std)
        squares.append(_square_sum(buf))
    return torch.stack(squares).sum().sqrt() * std


_PACK = 1 << 20  # noise values drawn into one buffer at most (4 MB in float32)


def _packs(grads: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """``grads`` in order, cut into runs of one device and dtype of at most _PACK values (or one larger tensor)."""
    out: list[list[torch.Tensor]] = []
    size = 0
    for g in grads:
        last = out[-1][-1] if out else None
        if last is None or (g.device, g.dtype) != (last.device, last.dtype) or size + g.numel() > _PACK:
            out.append([])
            size = 0
        out[-1].append(g)
        size += g.numel()
    return out


def _square_sum(x: torch.Tensor) -> torch.Tensor:
    """sum x^2 as a float64 scalar tensor: rows of _ROW entries dotted in x's dtype, their sum in float64
    (relative error ~1e-9 at millions of entries; one float32 dot over all of them drifted 3e-6 on one thread,
    and the float64 norm this replaces took 5x as long, a quarter of a CPU GPT-2 step's noise)."""
    flat = x.reshape(-1)
    if x.dtype not in (torch.float32, torch.float64):
        return torch.linalg.vector_norm(flat, dtype=torch.float64).square()
    n = flat.numel() - flat.numel() % _ROW
    rows = flat[:n].view(-1, _ROW)
    return torch.linalg.vecdot(rows, rows).sum(dtype=torch.float64) + torch.dot(flat[n:], flat[n:]).double()


_ROW = 1024


# ----------------------------------------------------------------------------- the mechanisms


def _norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """||grads|| over all tensors, in float64 (a tensor: no host sync)."""
    return torch.stack(torch._foreach_norm(grads)).double().norm()


class SGD:
    """``noise.kind: none``. Per micro-batch: the gradient of its summed losses; per step: nothing added.

    ``micro_batch`` returns the micro-batch's statistics (sums, as tensors): ``loss`` and, under DP-SGD,
    ``clipped``, ``sample_norm`` and ``samples``. ``step`` ends the logical batch's gradient in place and
    returns (its norm before noise or None, the noise's norm).
    """

    per_sample = False  # needs the bare module (its per-sample gradients), not the DDP wrapper
    injects = False  # adds noise of its own once per step (its norm is logged)

    def __init__(self, noise, *, batch_size: int, seed: int):
        self.noise, self.batch_size, self.seed = noise, batch_size, seed

    def loss_scale(self, total_units: float, world: int, positions: int) -> float:
        """The factor on the summed per-sample losses of a micro-batch: the batch mean over loss units
        (images or tokens), times ``world`` because DDP averages gradients over processes. ``positions``:
        the loss units of one whole sample (1 for an image, a sequence's label positions)."""
        return world / total_units

    def micro_batch(self, model, batch: dict, scale: float, backward) -> dict:
        from goldenpath.models import sample_losses

        losses = sample_losses(model, batch)
        backward(losses.sum() * scale)
        return {"loss": losses.detach().sum()}

    def step(self, grads: list[torch.Tensor], *, step: int, all_reduce=None, measure: bool = False):
        return (_norm(grads) if measure else None), 0.0


class NoisySGD(SGD):
    """``noise.kind: gaussian``: the mean gradient plus (sigma / B) xi, once per step."""

    injects = True

    def step(self, grads, *, step, all_reduce=None, measure=False):
        norm = _norm(grads)
        return norm, add_noise(grads, self.noise.sigma / self.batch_size, seed=self.seed, step=step)


class DPSGD(SGD):
    """``noise.kind: dp``: per micro-batch sum_i clip_C(g_i) (per_sample_clip); per step the sum over
    micro-batches and processes, plus sigma C xi, divided by B."""

    per_sample = True
    injects = True

    def loss_scale(self, total_units: float, world: int, positions: int) -> float:
        """1 / positions, whatever the batch holds: then (1/B) sum_i g_i is the mean loss over the B whole
        samples' positions, the mean over loss units when no position is padded. A sample's factor must not
        depend on the other samples: with the mean over the batch's predicted tokens, one sequence's padding
        would rescale every other sequence's gradient before clipping, and the clipped sum could move by more
        than C when one sample changes."""
        return 1.0 / positions

    def micro_batch(self, model, batch, scale, backward):
        from goldenpath.models import sample_losses

        noise = self.noise
        clipped = per_sample_clip(model, lambda m, b: sample_losses(m, b) * scale, batch, noise.clip,
                                  method=noise.method, chunk=noise.vmap_chunk)
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.grad = clipped.grads[n] if p.grad is None else p.grad.add_(clipped.grads[n])
        return {"loss": clipped.losses.double().sum() / scale, "clipped": (clipped.norms > noise.clip).sum(),
                "sample_norm": clipped.norms.sum(), "samples": len(clipped.norms)}

    def step(self, grads, *, step, all_reduce=None, measure=False):
        b = self.batch_size
        if all_reduce is not None:
            all_reduce(grads)
        norm = _norm(grads) / b
        noise = add_noise(grads, self.noise.sigma * self.noise.clip, seed=self.seed, step=step) / b
        torch._foreach_div_(grads, b)
        return norm, noise


MECHANISMS = {"none": SGD, "gaussian": NoisySGD, "dp": DPSGD}


def mechanism(noise, *, batch_size: int, seed: int) -> SGD:
    """The mechanism of ``noise.kind`` (a NoiseConfig) for logical batches of ``batch_size``."""
    return MECHANISMS[noise.kind](noise, batch_size=batch_size, seed=seed)
