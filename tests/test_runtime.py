"""The process around the work: thread defaults, the allocator, signals."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from goldenpath.training import runtime


def test_threads_follow_the_config_then_the_environment_then_half_the_cores(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert runtime.cpu_threads(5) == 5 and runtime.cpu_threads() == 3
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setattr(os, "sched_getaffinity", lambda _: set(range(2)))
    assert runtime.cpu_threads() == 1
    monkeypatch.setattr(os, "sched_getaffinity", lambda _: set(range(64)))
    assert runtime.cpu_threads() == runtime.MAX_DEFAULT_THREADS


def test_a_first_signal_asks_and_a_second_ctrl_c_stops_at_once():
    before = signal.getsignal(signal.SIGINT)  # SIG_IGN in a background job, else Python's default_int_handler
    asked = []
    with runtime.Interrupts(on_request=asked.append) as interrupts:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)  # let the handler run
        assert interrupts.requested == signal.SIGTERM and asked == [signal.SIGTERM]
        os.kill(os.getpid(), signal.SIGTERM)  # a repeated SIGTERM only asks again
        time.sleep(0.01)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.01)
    assert signal.getsignal(signal.SIGINT) is before  # restored, whatever it was


def test_signals_are_handled_and_restored_when_sigint_comes_in_ignored_as_in_a_background_job():
    """A shell starts a background job (``pytest &``) with SIGINT ignored; the test above then runs as well."""
    import pathlib

    test = f"{pathlib.Path(__file__).resolve()}::test_a_first_signal_asks_and_a_second_ctrl_c_stops_at_once"
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test], capture_output=True,
                         text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN), timeout=300)
    assert run.returncode == 0, run.stdout[-2000:]



MALLOC_PROBE = """
import ctypes, sys
class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
libc.malloc.restype = ctypes.c_void_p
applied = False
if sys.argv[1] == "tuned":  # imported only here: what an import frees could move glibc's default threshold
    from goldenpath.training.runtime import tune_malloc
    applied = tune_malloc()
before = libc.mallinfo2().hblkhd
block = libc.malloc(16 << 20)  # an activation-sized buffer
print(applied, libc.mallinfo2().hblkhd - before)
"""


def _glibc_with_mallinfo2() -> bool:
    import platform

    lib, version = platform.libc_ver()
    return lib == "glibc" and tuple(int(x) for x in version.split(".")[:2]) >= (2, 33)


@pytest.mark.skipif(not _glibc_with_mallinfo2(), reason="glibc's allocator options (mallinfo2: glibc >= 2.33)")
@pytest.mark.parametrize("mode", ["tuned", "system", "user", "tunable"])
def test_cli_keeps_activation_sized_buffers_in_the_heap_unless_the_user_set_malloc(mode):
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    env.update({"user": {"MALLOC_TOP_PAD_": "65536"},
                "tunable": {"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=131072"}}.get(mode, {}))
    out = subprocess.run([sys.executable, "-c", MALLOC_PROBE, "system" if mode == "system" else "tuned"],
                         capture_output=True, text=True, check=True, env=env).stdout.split()
    applied, mapped = out[0] == "True", int(out[1])
    assert applied == (mode == "tuned")
    assert (mapped == 0) == (mode == "tuned")  # glibc maps such blocks by default: page faults on every reuse
