"""Exact loss matching: a target's checkpoint at the first optimizer step whose eval loss reaches it.

Evaluating after every step would cost more than training, so a run's *target search* evaluates now and then
(more often as the loss nears the next target; ``goldenpath.training.schedule.next_eval_gap``) and keeps a
:class:`Snapshot` of itself at its last eval. When an eval finds one or more targets crossed since that
snapshot, :func:`replay` restores it (weights, optimizer state, stream position, every RNG, the loop's
counters), runs the same optimizer steps again with an eval after each, and saves each target's checkpoint
at the first step whose eval loss is at or below it. The replayed steps read the same samples in the same
order with the same noise (drawn from the step number), so on a CPU they recompute the trajectory bit for
bit and no sample is trained on twice; the run then goes on from where it was.

What a checkpoint's step depends on, exactly: it is the first step at or below the target among the steps
the search evaluated: its scheduled evals, and every step between two of them when the later one finds a
target crossed. The scheduled evals are a function of the training trajectory (everything that changes
training, the budget included), the eval set, the targets, ``checkpoint.target_eval_every`` and
``checkpoint.eval_min_every`` alone: not of ``checkpoint.eval_every`` (logged evals never look for targets),
``checkpoint.steps``, ``log.*``, when resume states are saved, or a stop and resume. A loss that dips below
the target and comes back up between two scheduled evals that both lie above it is not seen, so an earlier
step may reach the target (``checkpoint.target_eval_every=1`` evaluates every step: the true first crossing,
at the cost of an eval per step).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch

from goldenpath.store import rundir as ckpt


@dataclass
class Snapshot:
    """A run's whole state at one step, in memory (a copy of the weights and optimizer on their device)."""

    step: int
    model: dict
    optimizer: dict
    stream: dict
    rng: tuple
    state: dict
    window: torch.Tensor  # the log window's sums (what the next metrics line averages)

    @classmethod
    def take(cls, run) -> Snapshot:
        with torch.no_grad():
            weights = {k: v.detach().clone() for k, v in run.model.state_dict().items()}
        return cls(run.state.step, weights, copy.deepcopy(run.optimizer.state_dict()),
                   copy.deepcopy(run.stream.state_dict()), ckpt.rng_state(), copy.deepcopy(run.state.as_dict()),
                   run.window.sums.clone())

    def restore(self, run) -> None:
        """Put the run back to this snapshot (the snapshot's tensors are handed over: restore once)."""
        run.model.load_state_dict(self.model)
        run.optimizer.load_state_dict(self.optimizer)
        run.stream.load_state_dict(self.stream)
        ckpt.set_rng_state(*self.rng)
        run.state.load(self.state)
        run.window.sums.copy_(self.window)


class Crossing(NamedTuple):
    target: float
    step: int
    loss: float
    error: float


def replay(run, previous: Snapshot, targets: list[float], *, step: Callable, evaluate: Callable,
           save: Callable) -> list[Crossing]:
    """Locate the targets crossed since ``previous`` at their first steps.

    ``targets``: the run's remaining targets (decreasing); the first of them is crossed at the run's current
    step. ``step(run)`` runs one optimizer step; ``evaluate(run) -> (loss, error)``; ``save(run, crossing)``
    writes a target's checkpoint from the run's current weights. The steps after ``previous`` are replayed up
    to the one before the current step, each evaluated, so a deeper target the loss dipped below in between
    is found too. Targets not crossed by then are the caller's to check at the current step. Returns the
    crossings the replay located, in order.
    """
    pending = list(targets)
    here = run.state.step
    if here - previous.step <= 1 or not pending:
        return []
    now = Snapshot.take(run)
    previous.restore(run)
    found = []
    while run.state.step < here - 1:
        step(run)
        loss, error = evaluate(run)
        while pending and loss <= pending[0]:
            crossing = Crossing(pending.pop(0), run.state.step, loss, error)
            save(run, crossing)
            found.append(crossing)
    now.restore(run)
    return found
