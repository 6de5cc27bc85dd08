"""Prefetch: a stream's next optimizer steps made ahead by a background thread, so the device never waits.

    stream = Prefetched(build_stream(...), steps=2)      # build_stream does this when data.prefetch > 0

The thread calls the stream's own ``next_step`` in a loop and records ``state_dict()`` after each step, and
hands both over through a queue of ``steps`` slots; the trainer's ``next_step`` takes the oldest. So the
batches are the synchronous stream's, call for call, and the state a resume saves is the one the
synchronous stream had after the same step. ``load_state_dict`` (resume, fork, the target search's replay)
stops the thread, drops the steps made ahead and moves the stream itself; the next call starts a new
thread there. An exception in the thread (``StreamExhausted`` included) reaches the trainer at the step it
belongs to, after every step made before it.

A thread and a ``queue.Queue`` rather than ``DataLoader`` worker processes: the producer works on the one
stream object, so positions, the iterator state of a ``datasets`` stream and the read-ahead blocks stay
exactly where the synchronous stream keeps them, with nothing pickled or shipped back from a worker; the
heavy parts (torch kernels, memory-mapped reads, batched fast-tokenizer calls) run without the GIL.

Pinned memory: for a CUDA device the thread copies each batch into page-locked host memory, so the
trainer's ``.to(device, non_blocking=True)`` is an asynchronous copy that overlaps the step before it.
"""

from __future__ import annotations

import copy
import os
import queue
import threading
import weakref

import torch

_PUT_WAIT_S = 0.05  # how often a producer with a full queue looks for a stop


class _Failed:
    """An exception raised by the stream in the producer, carried to the trainer."""

    def __init__(self, error: BaseException):
        self.error = error


class _Producer:
    """One background thread filling one bounded queue from a stream; ``stop`` ends it."""

    def __init__(self, stream, steps: int, pin_device: torch.device | None):
        self.pid = os.getpid()
        self.queue: queue.Queue = queue.Queue(maxsize=steps)
        self.halt = threading.Event()
        self.thread = threading.Thread(target=_produce, args=(stream, self.queue, self.halt, pin_device),
                                       name="goldenpath-prefetch", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        """End the thread and drop what it made ahead (called by the owner or when the owner is collected)."""
        if self.pid != os.getpid():
            return  # a forked process has the queue but not the thread
        self.halt.set()
        self._drain()
        if threading.current_thread() is not self.thread:
            self.thread.join()
        self._drain()

    def _drain(self) -> None:
        while True:
            try:
                self.queue.get_nowait()
            except queue.Empty:
                return


def _produce(stream, out: queue.Queue, halt: threading.Event, pin_device: torch.device | None) -> None:
    if pin_device is not None and pin_device.index is not None:
        torch.cuda.set_device(pin_device)  # the current device is per thread: pin in the run's device context
    while not halt.is_set():
        try:
            batches = stream.next_step()
            if pin_device is not None:
                batches = [{k: v.pin_memory() if v.device.type == "cpu" else v for k, v in b.items()}
                           for b in batches]  # a batch made on the device (data.generate=device) stays there
            item = (batches, stream.state_dict())
        except BaseException as e:  # noqa: BLE001 - every failure reaches the trainer, none hangs it
            item = _Failed(e)
        while not halt.is_set():
            try:
                out.put(item, timeout=_PUT_WAIT_S)
                break
            except queue.Full:
                continue
        if isinstance(item, _Failed):
            return


class Prefetched:
    """A stream whose next ``steps`` optimizer steps are made ahead in a background thread.

    Args:
        stream: a :class:`~goldenpath.data.streams.Stream` or ``SequentialStream``; after wrapping, only
            this object calls its ``next_step`` and ``load_state_dict``.
        steps: optimizer steps made ahead (the queue's size), >= 1.
        pin_device: the run's CUDA device: batches come in pinned host memory; None: as the stream makes them.
    """

    def __init__(self, stream, *, steps: int, pin_device: torch.device | None = None):
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        self.stream, self.steps, self.pin_device = stream, steps, pin_device
        self._state = stream.state_dict()  # the synchronous stream's state after the last step handed out
        self._producer: _Producer | None = None
        self._stop: weakref.finalize | None = None  # stops the producer once: by close(), or when collected
        self._moved = False                # the stream is past ``_state`` (a producer ran ahead of it)

    # ------------------------------------------------------------------ the stream interface

    def next_step(self) -> list[dict[str, torch.Tensor]]:
        """This process's micro-batches for the next optimizer step (made ahead); advances the position."""
        item = self._running().queue.get()
        if isinstance(item, _Failed):
            self.close()  # the thread ended at the failure, after every step before it was handed out,
            self._moved = False  # so the stream stands where the synchronous one would
            raise item.error
        batches, self._state = item
        return batches

    def state_dict(self) -> dict:
        return copy.deepcopy(self._state)

    def load_state_dict(self, state: dict) -> None:
        self.close()
        self.stream.load_state_dict(state)
        self._state, self._moved = self.stream.state_dict(), False

    @property
    def position(self) -> int:
        return self._state["position"]

    def __getattr__(self, name: str):
        """Everything else (``limit``, ``batch_size``, ``source``, ...) is the stream's."""
        if name.startswith("__") or name == "stream":
            raise AttributeError(name)
        return getattr(self.stream, name)

    # ------------------------------------------------------------------ the thread

    def _running(self) -> _Producer:
        if self._producer is not None and self._producer.pid == os.getpid():
            return self._producer
        if self._moved:  # after close(), in a copy or a forked process: the stream ran ahead of the trainer
            self.stream.load_state_dict(self._state)
        self._producer, self._moved = _Producer(self.stream, self.steps, self.pin_device), True
        self._stop = weakref.finalize(self, self._producer.stop)  # dropped without close(): the thread ends too
        return self._producer

    def close(self) -> None:
        """Stop the thread and drop the steps made ahead (the position stays the last one handed out)."""
        if self._stop is not None:
            self._stop()
        self._producer = self._stop = None

    def __enter__(self) -> Prefetched:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_producer": None, "_stop": None}  # a copy starts its own thread from its own position
