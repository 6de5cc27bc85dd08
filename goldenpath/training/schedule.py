"""The two schedules of a run: the learning rate per optimizer step, and when the target search evaluates next.

Pure functions of the step and the search's own evals so far (never the logged ones, ``checkpoint.eval_every``),
so a resumed or replayed run, or one that logs more often, follows the same schedule.
"""

from __future__ import annotations

import math

from goldenpath.config import OptimConfig


def get_lr(step: int, optim: OptimConfig, total_steps: int | None) -> float:
    """Learning rate for optimizer step ``step`` (0-based)."""
    # 1) linear warmup from 0
    if step < optim.warmup:
        return optim.lr * (step + 1) / optim.warmup
    # 2) constant
    if optim.schedule == "constant":
        return optim.lr
    # 3) cosine from lr down to lr * min_lr_ratio at the last step
    progress = (step - optim.warmup) / max(1, total_steps - optim.warmup)
    return optim.lr * (optim.min_lr_ratio + (1 - optim.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def next_eval_gap(evals: list, target: float | None, *, max_gap: int, min_gap: int) -> int:
    """Steps until the target search's next eval: log-spaced early, then ``max_gap``, shrinking to ``min_gap``
    near a target (``evals``: [step, loss] of the search's evals; ``checkpoint.target_eval_every`` and
    ``checkpoint.eval_min_every`` in a run).

    Near a target the gap is half the steps the last two evals predict are needed to reach it, so that
    the replay that locates the crossing (goldenpath.training.targets) stays short. Within three times the eval
    loss's recent jitter of the target (:func:`_jitter`), every ``min_gap`` steps: a noisy loss hovering
    above a target can dip below it between two evals that both lie above.
    """
    step = evals[-1][0]
    gap = min(max_gap, max(min_gap, step))
    if target is not None and len(evals) >= 2:
        s1, l1 = evals[-1]
        if l1 - target < 3 * _jitter(evals[-6:]):
            return min_gap
        # The fastest recent descent (against any of the last few evals) is robust to a noisy last pair.
        rate = max((l0 - l1) / (s1 - s0) for s0, l0 in evals[-4:-1])
        if rate > 0:
            gap = min(gap, int((l1 - target) / rate / 2))
        else:  # flat or rising near a target: widen the gap gradually, not back to max_gap at once
            gap = min(gap, 2 * (s1 - evals[-2][0]))
    return max(min_gap, gap)


def _jitter(evals: list) -> float:
    """The eval loss's fluctuation about its trend: the largest distance of an eval from the straight line
    through its two neighbours (0 on a loss that falls or rises steadily)."""
    out = 0.0
    for (s0, l0), (s1, l1), (s2, l2) in zip(evals, evals[1:], evals[2:]):
        out = max(out, abs(l1 - (l0 + (l2 - l0) * (s1 - s0) / (s2 - s0))))
    return out
