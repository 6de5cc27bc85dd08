"""Exact loss matching: a target's checkpoint at the first optimizer step whose eval loss reaches it.

Evaluating after every step would cost more than training, so a run's *target search* evaluates now and then
(more often as the loss nears the next target; ``goldenpath.training.schedule.next_eval_gap``) and keeps a
:class:`Snapshot` of itself at its last eval. When an eval finds one or more targets crossed since that
snapshot, :meth:`Targets.search` restores it (weights, optimizer state, stream position, every RNG, the loop's
counters), runs the same optimizer steps again with an eval after each, and saves each target's checkpoint
at the first step whose eval loss is at or below it. The replayed steps read the same samples in the same
order with the same noise (drawn from the step number), so on a CPU they recompute the trajectory bit for
bit and no sample is trained on twice; the run then goes on from where it was. A stream that cannot be put
back cheaply (a streaming dataset: its shuffle buffer is read again from the source) is not moved: the
snapshot keeps the steps' micro-batches since it was taken, and the replay reads those.

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
import time
from dataclasses import dataclass
from typing import NamedTuple

import torch

from goldenpath.store import rundir as ckpt
from goldenpath.training import step
from goldenpath.training.state import Window
from goldenpath.training.schedule import next_eval_gap


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
    # where the stream cannot be put back cheaply (a streaming dataset): the micro-batches of every step since,
    # which the training loop appends and a replay reads instead of the stream
    batches: list | None = None

    @classmethod
    def take(cls, run) -> Snapshot:
        with torch.no_grad():
            weights = {k: v.detach().clone() for k, v in run.model.state_dict().items()}
        return cls(run.state.step, weights, copy.deepcopy(run.optimizer.state_dict()),
                   copy.deepcopy(run.stream.state_dict()), ckpt.rng_state(), copy.deepcopy(run.state.as_dict()),
                   run.window.sums.clone(), None if getattr(run.stream, "rewinds", True) else [])

    def restore(self, run, *, stream: bool = True) -> None:
        """Put the run back to this snapshot (the snapshot's tensors are handed over: restore once); ``stream``:
        the stream's position too."""
        run.model.load_state_dict(self.model)
        run.optimizer.load_state_dict(self.optimizer)
        if stream:
            run.stream.load_state_dict(self.stream)
        ckpt.set_rng_state(*self.rng)
        run.state.load(self.state)
        run.window.sums.copy_(self.window)


class Crossing(NamedTuple):
    target: float
    step: int
    loss: float
    error: float


class Targets:
    """A run's loss targets and how far it got: the one place that reads and changes them.

    The list is the config's (decreasing). The next target's index, each reached target's step and the
    search's evals and next eval live in the run's state, so they resume with it.
    """

    def __init__(self, run):
        self.run = run
        self.values = run.config.checkpoint.targets

    @property
    def remaining(self) -> list[float]:
        return list(self.values[self.run.state.target_index:])

    @property
    def left(self) -> bool:
        """Whether a target remains."""
        return self.run.state.target_index < len(self.values)

    def crossed(self, loss: float) -> list[float]:
        """The remaining targets at or above ``loss``: a prefix, as the targets decrease."""
        return [t for t in self.remaining if loss <= t]

    def snapshot(self) -> Snapshot | None:
        """The state at the search's eval now, which a later replay starts from (None once none remains)."""
        return Snapshot.take(self.run) if self.left else None

    def search(self, previous: Snapshot | None, loss: float, error: float) -> None:
        """An eval of the target search found ``loss``: save every target crossed since the search's previous
        eval at its first step (replayed from ``previous``, the state at that eval), then plan the next eval."""
        st, cp = self.run.state, self.run.config.checkpoint
        before = st.evals[-1] if st.evals else None  # [step, loss] of the search's previous eval
        st.evals.append([st.step, loss])
        crossed = self.crossed(loss)
        if crossed and previous is not None:  # replay: these, and deeper ones the loss dipped below meanwhile
            found, history = self._replay(previous, before)
            crossed = crossed[len(found):]
            before = [st.step - 1, history[st.step - 1]] if st.step - 1 in history else before
        for target in crossed:
            self._save(Crossing(target, st.step, loss, error), before, replayed=False)
            self._mark(Crossing(target, st.step, loss, error))
        st.next_eval = None if not self.left else st.step + next_eval_gap(
            st.evals, self.values[st.target_index], max_gap=cp.target_eval_every, min_gap=cp.eval_min_every)

    def _replay(self, previous: Snapshot, before) -> tuple[list[Crossing], dict[int, float | None]]:
        """Locate the targets crossed since ``previous`` at their first steps: restore it, redo the steps up to
        the one before now with an eval after each, save each target at the first step at or below it, and
        put the run back. The first remaining target is crossed now; targets not crossed by the step before
        are the caller's to check now. Returns the crossings found (in order) and every step's eval loss."""
        run, st = self.run, self.run.state
        history = {previous.step: before[1] if before else None}
        here, pending, found = st.step, self.remaining, []
        if here - previous.step <= 1:
            return found, history
        t0 = time.perf_counter()
        now = Snapshot.take(run)
        kept = previous.batches  # None: the stream goes back and reads the steps again
        previous.restore(run, stream=kept is None)
        while st.step < here - 1:
            batches = run.stream.next_step() if kept is None else kept[st.step - previous.step]
            step.optimizer_step(run, batches, Window(run.accelerator.device))
            loss, error = step.eval_run(run)
            history[st.step] = loss
            while pending and loss <= pending[0]:
                crossing = Crossing(pending.pop(0), st.step, loss, error)
                self._save(crossing, [st.step - 1, history.get(st.step - 1)], replayed=True)
                found.append(crossing)
        now.restore(run, stream=kept is None)
        for crossing in found:  # the replay's counters were put back: keep what it found
            self._mark(crossing)
        st.seconds["replay"] += time.perf_counter() - t0
        return found, history

    def _save(self, crossing: Crossing, previous, *, replayed: bool) -> None:
        """A target's checkpoint from the run's current weights (``previous``: [step, loss] of the eval before;
        ``replayed``: located by a replay)."""
        run = self.run
        if run.main:
            keep = run.optimizer if run.config.checkpoint.optimizer else None
            meta = {"target": crossing.target, "loss_minus_target": crossing.loss - crossing.target,
                    **step.checkpoint_meta(run, crossing.loss, crossing.error, previous), "replayed": replayed}
            ckpt.save_checkpoint(run.files.checkpoint(at_loss=crossing.target), run.model, meta, keep)

    def _mark(self, crossing: Crossing) -> None:
        self.run.state.reached[f"{crossing.target:g}"] = crossing.step
        self.run.state.target_index += 1
