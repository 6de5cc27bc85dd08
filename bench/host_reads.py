"""Host reads per step of ``goldenpath train``: every way Python code pulls a tensor's value onto the host
(on a GPU, each one waits for the device), counted per loop iteration with patched ``torch.Tensor`` methods.

    with HostReads() as reads:
        train(config)
    reads.per_step()        # {step: reads of the loop iteration ending at it}

Used by tests/test_host_sync.py (a quiet step must not read) and by bench/gpu.py's ``reads`` part (the same
count on the device, next to CUDA's own count of synchronisations).
"""

from __future__ import annotations

import threading
from collections import Counter

import torch

from goldenpath.training import run as run_mod, step as step_mod

READS = ("item", "tolist", "cpu", "numpy", "__float__", "__int__", "__index__", "__bool__", "__format__", "__repr__")
_UNSET = object()


class HostReads:
    """Counts the host reads of the main thread while a run trains, per loop iteration (the optimizer step,
    then its logging, evaluation and saves), leaving out the stream making the next batch (host data, made
    before the step; a background thread's reads are not counted either). A context manager: the patches
    are undone on exit."""

    def __init__(self):
        self.n, self.depth, self.paused = 0, 0, False
        self.kinds: Counter = Counter()
        self.marks: list[tuple[int, int]] = []  # (the step an iteration ends at, reads before it began)
        self._undo: list[tuple[object, str, object]] = []

    def __enter__(self) -> HostReads:
        main = threading.main_thread()
        for name in READS:
            self._patch(torch.Tensor, name, self._counted(name, getattr(torch.Tensor, name), main))
        real_step, real_stream = step_mod.optimizer_step, run_mod.build_stream

        def step(run, micro_batches, window):
            self.marks.append((run.state.step + 1, self.n))
            return real_step(run, micro_batches, window)

        def stream(*args, **kwargs):
            s = real_stream(*args, **kwargs)
            s.next_step = self._paused(s.next_step)
            return s

        self._patch(step_mod, "optimizer_step", step)
        self._patch(run_mod, "build_stream", stream)
        return self

    def __exit__(self, *exc) -> None:
        while self._undo:
            owner, name, old = self._undo.pop()
            if old is _UNSET:
                delattr(owner, name)
            else:
                setattr(owner, name, old)

    def _patch(self, owner, name, new) -> None:
        self._undo.append((owner, name, owner.__dict__.get(name, _UNSET)))  # _UNSET: inherited
        setattr(owner, name, new)

    def _counted(self, name, real, main):
        def wrapper(tensor, *args, **kwargs):
            if self.depth == 0 and not self.paused and threading.current_thread() is main:
                self.n += 1
                self.kinds[name] += 1
            self.depth += 1  # a read inside a read (repr -> tolist) is one read
            try:
                return real(tensor, *args, **kwargs)
            finally:
                self.depth -= 1
        return wrapper

    def _paused(self, fn):
        def wrapper(*args, **kwargs):
            self.paused = True
            try:
                return fn(*args, **kwargs)
            finally:
                self.paused = False
        return wrapper

    def per_step(self) -> dict[int, int]:
        """{step: host reads of the loop iteration ending at it} (the last one, cut by the run's end, left out)."""
        return {s: nxt - n for (s, n), (_, nxt) in zip(self.marks, self.marks[1:])}
