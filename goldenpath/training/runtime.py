"""The process around the work: CPU threads, the memory allocator, and stopping cleanly on Ctrl-C.

- :func:`cpu_threads` picks the CPU threads a run uses: ``threads`` from its config, else ``$OMP_NUM_THREADS``,
  else half the cores this process may use, 1 to 4. (On 2 cores the teacher CNN trains as fast on one thread
  as on two, 33-37 s either way, while two threads on a busy machine took 47 s against 10 s.)
- :func:`tune_malloc` keeps freed tensor buffers in glibc's heap (what the ``goldenpath`` command runs with).
- :func:`gpu_memory_share` bounds the GPU memory of a run that shares its GPU with other runs of a sweep.
- :func:`free_memory_bytes`: what this process may still allocate on a device (sizes DP's and compare's chunks).
- :func:`strict_float32`: float32 matmuls and convolutions without TF32 on a GPU for a block (what measures and
  checks compute in), whatever the process set before.
- :class:`Interrupts`: the first Ctrl-C (SIGINT) or SIGTERM asks the work to stop at its next safe point
  (a run saves its resume state there); a second Ctrl-C stops at once.
"""

from __future__ import annotations

import os
import signal
import sys
from contextlib import contextmanager
from typing import Callable

MAX_DEFAULT_THREADS = 4
MEMORY_FRACTION_ENV = "GOLDENPATH_GPU_MEMORY_FRACTION"  # set by a sweep that puts several runs on one GPU
EXIT_CTRL_C = 128 + signal.SIGINT  # 130, as a shell reports a Ctrl-C


def cpu_threads(requested: int | None = None) -> int:
    """Threads for CPU math: ``requested``, else $OMP_NUM_THREADS, else half the usable cores, 1 to 4."""
    if requested:
        return requested
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(MAX_DEFAULT_THREADS, cores // 2))


_MALLOC_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")


def tune_malloc() -> bool:
    """Keep freed tensor buffers in the process's heap (glibc only; what ``goldenpath`` runs with).

    PyTorch's CPU tensors come from malloc. By default glibc maps every buffer above its mmap threshold
    afresh and unmaps it when freed, and returns the heap's freed top to the system, so each training step
    page-faults its activations again: on a 2-core CPU that is about a third of a small CNN's step
    (bench/dp_step.py). Buffers up to 32 MB (glibc's largest threshold) now come from the heap, which keeps
    256 MB of freed top (so a process keeps up to 256 MB it no longer uses). Left alone when the user set
    any of the MALLOC_*_ variables or a glibc.malloc tunable, or off glibc. Returns whether it applied.
    """
    user = any(k in os.environ for k in _MALLOC_ENV) or "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", "")
    if user or not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # musl and other C libraries
        return False
    m_top_pad, m_mmap_threshold = -2, -3
    return bool(mallopt(m_mmap_threshold, 32 << 20)) and bool(mallopt(m_top_pad, 256 << 20))


def gpu_memory_share() -> float | None:
    """Cap this process's share of each visible GPU's memory at ``$GOLDENPATH_GPU_MEMORY_FRACTION`` (set by
    ``goldenpath sweep --jobs N`` when N runs share the GPUs): past it the caching allocator raises out of
    memory in this run instead of taking memory its neighbours hold. Returns the share applied, or None
    (not set, or no GPU)."""
    text = os.environ.get(MEMORY_FRACTION_ENV, "")
    if not text:
        return None
    try:
        share = float(text)
    except ValueError:
        share = -1.0
    if not 0 < share <= 1:
        from goldenpath.config.sections import ConfigError

        raise ConfigError(MEMORY_FRACTION_ENV, f"got {text!r}", "use a fraction in (0, 1], or unset it")
    import torch

    if not torch.cuda.is_available():
        return None
    for device in range(torch.cuda.device_count()):
        torch.cuda.set_per_process_memory_fraction(share, device)
    return share


def free_memory_bytes(device) -> int:
    """Bytes this process may still take on ``device``. CUDA: the device's free memory and what this process's
    allocator holds unused, or less where the process is capped (``torch.cuda.set_per_process_memory_fraction``,
    as each run of a sweep sharing a GPU is): the cap less what its tensors hold. CPU: MemAvailable (1 GiB where
    /proc/meminfo cannot be read)."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":  # "cuda" alone is the current device (the cap's getter wants an index)
        index = torch.cuda.current_device() if device.index is None else device.index
        free, total = torch.cuda.mem_get_info(index)
        # one read of the allocator's statistics, unflattened (memory_allocated and memory_reserved each flatten
        # and sort all of them: ~0.1 ms of host time apiece, called per layer in a DP step on a GPU)
        stats = torch.cuda.memory_stats_as_nested_dict(index)
        allocated, reserved = (stats.get(k, {}).get("all", {}).get("current", 0)
                               for k in ("allocated_bytes", "reserved_bytes"))
        capped = torch.cuda.get_per_process_memory_fraction(index) * total - allocated
        return int(max(0, min(free + reserved - allocated, capped)))
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return 2**30


@contextmanager
def strict_float32():
    """float32 matmuls and convolutions in float32 on a CUDA GPU (no TF32, which rounds their inputs to 10-bit
    mantissas), whatever a run before in this process set, and cuDNN's own default (TF32 on) included; the
    switches are restored after. Compare's forwards and DP's route check run in it."""
    import torch

    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def signal_name(signum: int | None) -> str:
    return "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name if signum else ""


class Interrupts:
    """While active: the first SIGINT or SIGTERM sets ``requested`` (the signal number) and calls
    ``on_request(signum)``; the work polls ``requested`` at safe points. A second SIGINT raises
    KeyboardInterrupt at once. Outside the main thread (where signals cannot be caught) it does nothing.
    """

    def __init__(self, on_request: Callable[[int], None] | None = None):
        self.requested: int | None = None
        self._on_request = on_request
        self._old: dict = {}

    def __enter__(self) -> Interrupts:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not in the main thread
                break
        return self

    def _handle(self, signum, _frame) -> None:
        if self.requested is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C: stop now
        if self.requested is None:
            self.requested = signum
        if self._on_request is not None:
            self._on_request(signum)

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
