"""Running a sweep: every point of its grid (:mod:`goldenpath.config.grid`) as a separate ``goldenpath train``
process (``accelerate launch`` when ``processes`` > 1) writing ``<out>/<name>/<run>/``, in parallel slots on
this machine or as Slurm job arrays (submitit). Re-running a sweep skips completed runs, resumes interrupted or
failed ones, and leaves diverged ones unless ``retry_diverged``; a lock per run keeps two sweep processes on
the same directory from running a point twice. ``runs.csv`` holds one row per run.
"""

from __future__ import annotations

import contextlib
import fcntl
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

from goldenpath.config import load_config
from goldenpath.store import files, rundir as ckpt
from goldenpath.config.grid import Point, Sweep, expand, load_sweep
from goldenpath.training.fork import child_changes
from goldenpath.training.runtime import MEMORY_FRACTION_ENV


# ----------------------------------------------------------------------------- runs.csv


def _state(run_dir: Path) -> str | None:
    return ckpt.RunDir(run_dir).state()


def _trained_knobs(sweep_dir: Path, point: Point) -> dict:
    """A point's knob columns as it trains them: a fork's grid knobs that its changes set are the values it
    resolved (its config.yaml; before it starts, an absolute change itself and a relative one empty), not its
    parent's. The ``fork.<key>`` columns keep the changes as written (``/4``)."""
    knobs = dict(point.knobs)
    if point.parent is None:
        return knobs
    from goldenpath.config.identity import flat
    from goldenpath.config import to_dict

    path = sweep_dir / point.name / "config.yaml"
    resolved = flat(to_dict(load_config(path)), leaf=lambda v: v) if path.exists() else {}
    for key, value in point.fork.set.items():
        if key in knobs:
            knobs[key] = resolved.get(key, None if isinstance(value, str) and value[:1] in "x/" else value)
    return knobs


def write_runs_csv(sweep_dir: Path, points: list[Point], skipped: dict | None = None) -> Path:
    """One row per run: knobs, state, steps, samples, last eval loss and error, best eval loss, the loss floor,
    epsilon, targets reached.

    ``skipped``: run name -> why it was not started (a fork whose parent never reached the fork point).
    """
    import pandas as pd

    rows = []
    for p in points:
        s = ckpt.RunDir(sweep_dir / p.name).status()
        if not s and p.name in (skipped or {}):
            s = skipped[p.name]
        reached = s.get("targets_reached") or {}
        rows.append({"run": p.name, **_trained_knobs(sweep_dir, p), "parent": p.parent,
                     "state": s.get("state", "pending"),
                     "reason": s.get("reason"), "step": s.get("step"), "samples": s.get("samples"),
                     "tokens": s.get("tokens"), "eval_loss": s.get("eval_loss"), "eval_error": s.get("eval_error"),
                     "best_eval_loss": s.get("best_eval_loss"), "loss_floor": s.get("loss_floor"),
                     "epsilon": s.get("epsilon"),
                     "targets_reached": ";".join(sorted(reached, key=float, reverse=True)),
                     **{f"step_at_{t}": step for t, step in reached.items()}})
    frame = pd.DataFrame(rows)
    path = sweep_dir / "runs.csv"
    files.atomic_write(path, lambda tmp: frame.to_csv(tmp, index=False))
    return path


# ----------------------------------------------------------------------------- executors


def command(sweep: Sweep, point: Point, sweep_dir: Path, port: int | None = None) -> list[str]:
    """The command line that runs one point."""
    if point.fork is not None:
        at = ["--at-loss", f"{point.fork.at_loss}"] if point.fork.at_loss is not None else \
            ["--at-step", f"{point.fork.at_step}"]
        tail = ["fork", str(sweep_dir / point.parent), *at, f"--name={point.name}", *point.overrides]
    else:
        tail = ["train", str(sweep.base), *point.overrides, f"out={sweep_dir}", f"name={point.name}"]
    if sweep.processes == 1:
        return [sys.executable, "-m", "goldenpath", *tail]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(sweep.processes),
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--multi_gpu"]
    return [*launch, "--main_process_port", str(port or _free_port()), "-m", "goldenpath", *tail]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _try_lock(sweep_dir: Path, name: str):
    """An exclusive lock on one run (released when the file closes or the process dies), or None."""
    path = sweep_dir / ".locks" / f"{name}.lock"
    path.parent.mkdir(exist_ok=True)
    f = open(path, "w")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        return None
    return f


def _ready(point: Point, sweep_dir: Path, retry_diverged: bool) -> str:
    """'skip' (done), 'wait' (its parent is not done), 'never' (its parent cannot give it), or 'run'."""
    state = _state(sweep_dir / point.name)
    if state in ("completed", "stalled") or (state == "diverged" and not retry_diverged):
        return "skip"
    if point.parent is not None:
        parent_dir = sweep_dir / point.parent
        parent_state = _state(parent_dir)
        if parent_state not in ckpt.FINISHED:
            return "never" if parent_state == "failed" else "wait"
        at = point.fork
        if not ckpt.RunDir(parent_dir).checkpoint(at_loss=at.at_loss, at_step=at.at_step).is_dir():
            return "never"
    return "run"


def check_points(sweep: Sweep, out: str | None = None) -> tuple[Path, list[Point]]:
    """The sweep's directory and points, every point checked to be a valid run, a fork's changes included
    (a bad fork would otherwise fail only once its parent has trained): raises ConfigError naming the field."""
    points = expand(sweep)
    sweep_dir = Path(out or sweep.out) / sweep.name
    by_name = {p.name: p for p in points}
    for p in points:
        parent = p if p.fork is None else by_name[p.parent]
        config = load_config(sweep.base, [*parent.overrides, f"out={sweep_dir}", f"name={parent.name}"])
        if p.fork is not None:
            load_config(sweep.base, [*parent.overrides, *child_changes(config, p.overrides)[1], f"out={sweep_dir}",
                                     f"name={p.name}"])
    return sweep_dir, points


def _prepare(sweep: Sweep, out: str | None) -> tuple[Path, list[Point]]:
    sweep_dir, points = check_points(sweep, out)  # before anything starts
    sweep_dir.mkdir(parents=True, exist_ok=True)
    return sweep_dir, points


def run_sweep(path: str | Path, *, out: str | None = None, executor: str = "local", jobs: int | None = None,
              retry_diverged: bool = False, progress: bool = True) -> Path:
    """Run (or continue) a sweep; returns the sweep directory."""
    sweep = load_sweep(path)
    sweep_dir, points = _prepare(sweep, out)
    files.write_text(sweep_dir / "sweep.yaml", Path(path).read_text())
    if retry_diverged:  # trained again from scratch, locally or by Slurm (whose jobs would find them done)
        for p in points:
            if _state(sweep_dir / p.name) == "diverged":
                lock = _try_lock(sweep_dir, p.name)
                if lock is not None:
                    shutil.rmtree(sweep_dir / p.name)
                    lock.close()
    if executor == "slurm":
        submit_slurm(sweep, sweep_dir, points, jobs=jobs, retry_diverged=retry_diverged)
        return sweep_dir
    stopped = _Local(sweep, sweep_dir, points, jobs=jobs, progress=progress).run()
    if stopped is not None:
        raise SweepInterrupted(sweep_dir, stopped)
    return sweep_dir


class SweepInterrupted(Exception):
    """A local sweep stopped early by Ctrl-C or SIGTERM, once its running runs had saved their resume points."""

    def __init__(self, sweep_dir: Path, signum: int):
        super().__init__(f"{sweep_dir}: stopped by signal {signum}")
        self.sweep_dir, self.signum = sweep_dir, signum


def _slots(jobs: int | None, processes: int) -> list[dict]:
    """Environment per parallel job: its GPUs (one group of ``processes`` each) and its CPU threads (the cores
    shared out; a GPU run's host work is launching kernels, 14 runs of 16 threads each would contend).

    With more jobs than GPU groups, ``k`` jobs share each GPU: the sweep says so, and each job may allocate
    at most ``1 / k`` of a GPU's memory (``GOLDENPATH_GPU_MEMORY_FRACTION``, applied by
    :func:`goldenpath.training.runtime.gpu_memory_share`), so one run cannot starve the others."""
    import torch

    gpus = torch.cuda.device_count()
    n = jobs or (max(1, gpus // processes) if gpus else 1)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1  # this
    threads = {"OMP_NUM_THREADS": str(max(1, cpus // (n * processes)))}  # process's CPUs, not the host's
    if not gpus:
        return [dict(threads) for _ in range(n)]
    share = math.ceil(n * processes / gpus)
    env = {}
    if share > 1:
        env = {MEMORY_FRACTION_ENV: f"{0.95 / share:.4f}"}
        print(f"{n} runs at once on {gpus} GPU{'s' if gpus > 1 else ''}: {share} share each GPU, each may "
              f"use {0.95 / share:.0%} of its memory", flush=True)
    ids = _visible_gpus(gpus)
    return [{"CUDA_VISIBLE_DEVICES": ",".join(ids[(i * processes + j) % gpus] for j in range(processes)), **env,
             **threads} for i in range(n)]


def _visible_gpus(count: int) -> list[str]:
    """The names of this process's ``count`` GPUs as a child's CUDA_VISIBLE_DEVICES takes them: this process's own
    list where it has one (indices, GPU-/MIG- UUIDs: a child's index 0 is the first of them), else 0..count-1."""
    visible = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    return visible[:count] if len(visible) >= count else [str(k) for k in range(count)]


class _Local:
    """The points of a sweep run in parallel slots on this machine: start ready points in free slots, settle the
    finished ones, until none is pending (or a signal asked to stop) and none runs."""

    def __init__(self, sweep: Sweep, sweep_dir: Path, points: list[Point], *, jobs: int | None, progress: bool):
        from tqdm.auto import tqdm

        self.sweep, self.sweep_dir, self.points = sweep, sweep_dir, points
        self.slots = _slots(jobs, sweep.processes)
        self.free = list(range(len(self.slots)))
        self.running: dict = {}  # Popen -> (point, lock, slot, log file)
        self.counts = {"done": 0, "stalled": 0, "diverged": 0, "failed": 0, "interrupted": 0, "elsewhere": 0,
                       "skipped": 0}
        self.pending = list(points)
        self.skipped: dict[str, dict] = {}  # run name -> why it was not started (its runs.csv row)
        self.bar = tqdm(total=len(points), desc=sweep.name, unit="run", disable=not progress, dynamic_ncols=True)

    def run(self) -> int | None:
        """Returns the signal that stopped the sweep early (Ctrl-C: every running child saves its resume point
        first), else None."""
        from goldenpath.training.runtime import Interrupts

        (self.sweep_dir / "logs").mkdir(exist_ok=True)
        with Interrupts(on_request=self._stop_children) as interrupts:
            while (self.pending and interrupts.requested is None) or self.running:
                if interrupts.requested is None:
                    self._start_ready()
                if not self._settle_finished():
                    time.sleep(0.2)
        self.bar.close()
        write_runs_csv(self.sweep_dir, self.points, self.skipped)
        return interrupts.requested

    def _show(self) -> None:
        self.bar.set_postfix(running=len(self.running), **{k: v for k, v in self.counts.items() if v})

    def _settle(self, outcome: str) -> None:
        self.counts[outcome] = self.counts.get(outcome, 0) + 1
        self.bar.update(1)
        self._show()

    def _stop_children(self, _signum: int) -> None:  # a Ctrl-C in a terminal reaches them too; SIGTERM the same
        for proc in self.running:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()

    def _start_ready(self) -> None:
        sweep_dir = self.sweep_dir
        for point in list(self.pending):
            if not self.free:
                break
            verdict = _ready(point, sweep_dir, retry_diverged=False)
            if verdict == "wait" and self.running:  # its parent is still training here
                continue
            self.pending.remove(point)
            if verdict == "skip":
                self._settle({"diverged": "diverged", "stalled": "stalled"}.get(_state(sweep_dir / point.name), "done"))
                continue
            if verdict in ("never", "wait"):  # the parent failed, missed the fork point, or runs elsewhere
                self.skipped[point.name] = {"state": "skipped", "reason": f"parent {point.parent} " + (
                    "did not reach the fork point" if verdict == "never" else "still runs in another sweep process")}
                self._settle("skipped")
                continue
            lock = _try_lock(sweep_dir, point.name)
            if lock is None:  # another sweep process runs it
                self._settle("elsewhere")
                continue
            slot = self.free.pop(0)
            log = open(sweep_dir / "logs" / f"{point.name}.log", "a")
            proc = subprocess.Popen(command(self.sweep, point, sweep_dir), stdout=log, stderr=subprocess.STDOUT,
                                    env={**os.environ, **self.slots[slot], "TQDM_DISABLE": "1"})
            self.running[proc] = (point, lock, slot, log)
            self._show()

    def _settle_finished(self) -> bool:
        """Settle the runs that ended; returns whether any did."""
        finished = [p for p in self.running if p.poll() is not None]
        for proc in finished:
            point, lock, slot, log = self.running.pop(proc)
            log.close()
            lock.close()
            self.free.append(slot)
            state = _state(self.sweep_dir / point.name)
            if state is None:  # it stopped before its run directory existed (bad input)
                self.skipped[point.name] = {"state": "failed", "reason": f"exit code {proc.returncode} before the "
                                            f"run started; see logs/{point.name}.log"}
            outcome = {"completed": "done", "diverged": "diverged", "stalled": "stalled",
                       "interrupted": "interrupted"}.get(state, "failed")
            if outcome == "failed":  # failed, killed (left "running") or never started: why, where it is watched
                self.bar.write(f"{point.name} failed (exit code {proc.returncode}): "
                               f"{_why_failed(self.sweep_dir, point.name)}", file=sys.stderr)
            self._settle(outcome)
            write_runs_csv(self.sweep_dir, self.points, self.skipped)
        return bool(finished)


def _why_failed(sweep_dir: Path, name: str) -> str:
    """Why a run failed, in one line: the reason its status.json gives (the trainer's "Type: message"), else
    the last error line of its log (a traceback's last lines may be hints, as CUDA's are), else its last line."""
    status = ckpt.RunDir(sweep_dir / name).status()
    if status.get("state") == "failed" and status.get("reason"):
        return str(status["reason"]).splitlines()[0][:300]
    try:
        with open(sweep_dir / "logs" / f"{name}.log", "rb") as f:
            f.seek(max(0, f.seek(0, 2) - 65536))  # the tail is enough
            lines = [line.strip() for line in f.read().decode(errors="replace").splitlines() if line.strip()]
    except OSError:
        return "(no log)"
    errors = [line for line in lines if re.match(r"^[\w.]*(Error|Exception|Interrupt)\b.*:", line)]
    return ((errors or lines or ["(empty log)"])[-1])[:300] + f" (logs/{name}.log)"


def slurm_arrays(sweep: Sweep, sweep_dir: Path, points: list[Point], *, retry_diverged: bool) -> list[list]:
    """The commands of the job arrays: the grid points that need running, then the forks (after them)."""
    def needed(p: Point) -> bool:
        state = _state(sweep_dir / p.name)
        return state not in ("completed", "stalled") and (state != "diverged" or retry_diverged)

    base = [p for p in points if p.fork is None and needed(p)]
    forks = [p for p in points if p.fork is not None and needed(p)]
    return [[command(sweep, p, sweep_dir, port=29500 + i % 1000) for i, p in enumerate(group)]
            for group in (base, forks) if group]


def submit_slurm(sweep: Sweep, sweep_dir: Path, points: list[Point], *, jobs: int | None,
                 retry_diverged: bool, cluster: str | None = None):
    """Submit the sweep as Slurm job arrays through submitit; the forks' array waits for the first."""
    import submitit

    executor = submitit.AutoExecutor(folder=sweep_dir / "slurm" / "%j", cluster=cluster)
    params = {"timeout_min": 24 * 60, "gpus_per_node": sweep.processes, "tasks_per_node": 1,
              **{k: v for k, v in sweep.slurm.items() if k not in ("partition", "account", "qos")}}
    extra = {k: sweep.slurm[k] for k in ("partition", "account", "qos") if k in sweep.slurm}
    executor.update_parameters(name=f"goldenpath-{sweep.name}", slurm_array_parallelism=jobs or 64, **params,
                               **({"slurm_" + k: v for k, v in extra.items()}))
    submitted = []
    for commands in slurm_arrays(sweep, sweep_dir, points, retry_diverged=retry_diverged):
        if submitted:  # forks start once every grid point has ended
            executor.update_parameters(
                slurm_additional_parameters={"dependency": f"afterany:{submitted[-1].job_id.split('_')[0]}"})
        submitted += executor.map_array(_run_command, commands)
    return submitted


def _run_command(cmd: list[str]) -> int:
    """A job's body: run the command; the run's status.json records its outcome."""
    return subprocess.run(cmd, check=False).returncode
