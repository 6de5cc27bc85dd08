"""Pointwise functional distances between two models' outputs (MISSION.md, "Pointwise functional distance").

Every function takes logits (last dim = classes or vocabulary) of the same shape and returns one value
per point (the leading dims), computed from log-softmax in float32 or better, never from rounded
probabilities. A distance between two models is the mean over probe points (every predicted token
position for a language model), with a percentile bootstrap interval over probe units (sequences).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

METRICS = ("tv", "kl", "js", "top1")


def log_probs(logits: torch.Tensor) -> torch.Tensor:
    """log-softmax in float32 or better."""
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    return F.log_softmax(logits, dim=-1)


def tv(logits_p: torch.Tensor, logits_q: torch.Tensor) -> torch.Tensor:
    """Total variation 1/2 sum_k |p_k - q_k|, in [0, 1]."""
    return 0.5 * (log_probs(logits_p).exp() - log_probs(logits_q).exp()).abs().sum(-1)


def kl(logits_p: torch.Tensor, logits_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) = sum_k p_k (log p_k - log q_k), natural log, >= 0."""
    lp, lq = log_probs(logits_p), log_probs(logits_q)
    return (lp.exp() * (lp - lq)).sum(-1).clamp_min(0.0)


def js(logits_p: torch.Tensor, logits_q: torch.Tensor) -> torch.Tensor:
    """Jensen-Shannon 1/2 KL(p || m) + 1/2 KL(q || m), m = (p + q) / 2, natural log, in [0, ln 2]."""
    lp, lq = log_probs(logits_p), log_probs(logits_q)
    lm = torch.logaddexp(lp, lq) - math.log(2.0)
    value = 0.5 * (lp.exp() * (lp - lm)).sum(-1) + 0.5 * (lq.exp() * (lq - lm)).sum(-1)
    return value.clamp(0.0, math.log(2.0))


def top1(logits_p: torch.Tensor, logits_q: torch.Tensor) -> torch.Tensor:
    """Top-1 disagreement 1[argmax p != argmax q] (as floats)."""
    return (logits_p.argmax(-1) != logits_q.argmax(-1)).to(torch.float32)


FUNCTIONS = {"tv": tv, "kl": kl, "js": js, "top1": top1}


def unit_sums(values: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per probe unit (leading dim): the sum of its points' values and how many points it has.

    Images are units of one point; a sequence's points are its predicted positions (``mask`` True).
    """
    values = values.double()
    if values.dim() == 1:
        return values, torch.ones_like(values)
    mask = torch.ones_like(values, dtype=torch.bool) if mask is None else mask
    values = torch.where(mask, values, torch.zeros((), dtype=values.dtype))
    return values.flatten(1).sum(1), mask.flatten(1).sum(1).double()


def bootstrap(sums: torch.Tensor, counts: torch.Tensor, *, denominator: tuple | None = None, n_boot: int = 1000,
              level: float = 0.95, seed: int = 0) -> tuple[float, float, float]:
    """(estimate, low, high): the mean over points, with a percentile bootstrap over units.

    ``sums``/``counts`` are per unit; ``denominator`` = (sums, counts) of a second mean over the same
    units turns the statistic into a ratio of means, resampled jointly (the golden-path ratio).
    """
    def stat(idx):
        num = sums[idx].sum(-1) / counts[idx].sum(-1)
        if denominator is None:
            return num
        return num / (denominator[0][idx].sum(-1) / denominator[1][idx].sum(-1))

    n = len(sums)
    estimate = float(stat(torch.arange(n)))
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, n, (n_boot, n), generator=gen)
    draws = stat(idx)
    draws = draws[torch.isfinite(draws)]
    if len(draws) == 0:
        return estimate, math.nan, math.nan
    alpha = (1 - level) / 2
    low, high = torch.quantile(draws, torch.tensor([alpha, 1 - alpha], dtype=draws.dtype)).tolist()
    return estimate, low, high
