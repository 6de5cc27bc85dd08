"""A run's counters (:class:`RunState`: saved in its resume state) and its step statistics summed on the device
between two logged steps (:class:`Window`: read once per metrics line, so a step never waits for the device).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch


@dataclass
class RunState:
    """Where a run stands; saved with the resume state (``checkpoints/last/state.json``)."""

    step: int = 0
    samples: int = 0
    tokens: int = 0
    target_index: int = 0                             # the next loss target to reach
    evals: list = field(default_factory=list)         # [step, eval loss] of every eval of the target search
    next_eval: int | None = 0                         # the target search's next eval (None: no target left)
    latest: list | None = None                        # [step, eval loss] of the latest eval, logged or searching
    reached: dict = field(default_factory=dict)       # target (as text) -> step of its checkpoint
    seconds: dict = field(default_factory=lambda: {"train": 0.0, "eval": 0.0, "checkpoint": 0.0, "replay": 0.0})
    initial_eval: float | None = None
    eval_error: float | None = None
    train_loss: float | None = None                   # the last logged mean train loss
    best: list | None = None                          # [step, eval loss] of the lowest eval
    fork_start: dict | None = None                    # a fork's step, samples and stream position at its start

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    def load(self, d: dict) -> None:
        """Take the values of a saved state (keys this version does not know are ignored)."""
        for f in dataclasses.fields(self):
            if f.name in d:
                setattr(self, f.name, d[f.name])
        self.seconds = {**RunState().seconds, **self.seconds}

    @property
    def last_eval(self) -> float | None:
        latest = self.latest or (self.evals[-1] if self.evals else None)  # a state saved before `latest` existed
        return latest[1] if latest else None


class Window:
    """Sums since the last logged step, in one float64 tensor on the device (one all-reduce per log).

    The norms are the same on every process; the DP-SGD counts are per process. ``micro_sq`` ..
    ``scale_steps`` feed ``log.noise_scale`` (B_simple from the first micro-batch's and the batch's gradient).
    """

    NAMES = ("loss", "units", "grad_norm", "noise_norm", "norm_steps", "clipped", "sample_norm", "samples",
             "micro_sq", "micro_units", "batch_sq", "scale_steps", "stop", "save")

    def __init__(self, device):
        self.sums = torch.zeros(len(self.NAMES), dtype=torch.float64, device=device)
        self._index = {n: i for i, n in enumerate(self.NAMES)}

    def add(self, name: str, value) -> None:
        self.sums[self._index[name]] += value

    def load(self, sums: list[float] | None) -> None:
        """Take the sums a resume state saved (None: start from zero)."""
        if sums is not None:
            self.sums.copy_(torch.tensor(sums, dtype=torch.float64))

    def collect(self, accelerator, **flags: bool) -> dict[str, float]:
        """The sums over all processes (with ``flags``, e.g. stop=True, summed too), then zero them."""
        for name, value in flags.items():
            self.sums[self._index[name]] = float(value)
        sums = accelerator.reduce(self.sums, "sum") if accelerator.num_processes > 1 else self.sums
        out = dict(zip(self.NAMES, sums.tolist()))
        self.sums.zero_()
        return out
