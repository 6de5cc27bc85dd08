"""Sweeps (a grid of runs over a base config) and forks (a run continued from another's checkpoint).

A sweep config::

    name: lr-batch                 # the sweep directory: <out>/<name>/
    base: ../teacher-cnn.yaml      # relative to this file
    set: {budget.samples: 20000}   # fixed overrides
    grid: {optim.lr: [0.05, 0.1], optim.batch_size: [16, 64]}
    seeds: [0, 1]                  # replicates of every setting
    design: independent            # or paired (below)
    forks:                         # optional: children of grid points, run once their parent is done
      - {at_loss: 1.8, set: {optim.batch_size: x4}, where: {optim.lr: 0.1}}

A grid key may join several keys with commas; its values are then lists varied together, e.g.
``"data.epochs,data.train_size": [[1, null], [8, 2048]]`` (online and offline). Every point is a
separate ``goldenpath train`` process (``accelerate launch`` when ``processes`` > 1) writing
``<out>/<name>/<run>/``. Re-running a sweep skips completed runs, resumes interrupted or failed ones,
and leaves diverged ones unless ``retry_diverged``; a lock per run keeps two sweep processes on the
same directory from running a point twice. ``runs.csv`` holds one row per run.

Seeds: with ``design: independent`` (the default) every (setting, replicate) gets its own seed, a hash of the
setting's grid values and the replicate index (``seeding.setting_seed``), so no two settings share an
initialisation, a stream order or noise draws, and the permutation tests of ``goldenpath compare`` are exact;
runs are named ``..._rep=<replicate>``. With ``design: paired`` replicate s is seed s in every setting ("the
same start, different noise"), runs are named ``..._seed=<s>``, and compare analyses the settings within
seeds. Each run's config records its ``seed``, ``replicate`` and ``design``; a fork keeps its parent's.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from goldenpath.store import rundir as ckpt
from goldenpath.config import load_config, parse_override, read_yaml, require
from goldenpath.config.naming import fork_name, run_name, value_text  # noqa: F401  (run_name: part of the sweep API)
from goldenpath.training.runtime import MEMORY_FRACTION_ENV
from goldenpath.seeding import setting_seed

SWEEP_KEYS = {"name", "base", "set", "grid", "seeds", "design", "forks", "processes", "out", "slurm"}
DESIGNS = ("independent", "paired")
FORK_KEYS = {"at_loss", "at_step", "set", "where"}
SLURM_KEYS = {"partition", "timeout_min", "gpus_per_node", "cpus_per_task", "mem_gb", "account", "qos"}

# ----------------------------------------------------------------------------- the sweep config


@dataclass(frozen=True)
class ForkSpec:
    at_loss: float | None = None
    at_step: int | None = None
    set: dict = field(default_factory=dict)
    where: dict = field(default_factory=dict)  # only parents whose knobs have these values


@dataclass(frozen=True)
class Sweep:
    name: str
    base: Path
    set: dict
    grid: dict              # key (or "k1,k2") -> list of values
    seeds: tuple            # replicate indices (paired: the seeds themselves)
    forks: tuple = ()
    processes: int = 1      # processes per run (accelerate launch when > 1)
    out: str = "runs"
    slurm: dict = field(default_factory=dict)
    design: str = "independent"


@dataclass(frozen=True)
class Point:
    """One run of a sweep: a grid point with a seed, or a fork of one."""

    name: str
    knobs: dict             # dotted key -> value (grid values and seed)
    overrides: tuple        # key=value strings on top of the base config
    parent: str | None = None
    fork: ForkSpec | None = None


def load_sweep(path: str | Path, overrides=()) -> Sweep:
    """Read and check a sweep config (``overrides``: dotted keys of the sweep file itself, e.g. out=...)."""
    path = Path(path)
    raw = read_yaml(path)
    for text in overrides:
        keys, value = parse_override(text)
        require(len(keys) == 1, f"sweep override {text!r}", "only top-level sweep keys can be overridden",
                "e.g. out=runs/mine or seeds=[0,1,2]")
        raw[keys[0]] = value
    unknown = sorted(set(raw) - SWEEP_KEYS)
    require(not unknown, f"sweep.{unknown[0] if unknown else ''}", "unknown sweep key",
            f"use only {sorted(SWEEP_KEYS)}")
    require("base" in raw, "sweep.base", "missing", "name the base run config, relative to the sweep file")
    base = (path.parent / str(raw["base"])).resolve()
    require(base.exists(), "sweep.base", f"{base} not found", "give the base config's path relative to the sweep file")
    grid = raw.get("grid") or {}
    require(isinstance(grid, dict), "sweep.grid", "expected a mapping of dotted keys to lists", "write {key: [v1, v2]}")
    for key, values in grid.items():
        require(isinstance(values, list) and len(values) > 0, f"sweep.grid.{key}", "expected a non-empty list",
                "write [v1, v2, ...]")
        width = len(key.split(","))
        if width > 1:
            require(all(isinstance(v, list) and len(v) == width for v in values), f"sweep.grid.{key}",
                    f"joined keys need lists of {width} values", f"write [[a1, b1], [a2, b2], ...]")
    for key in ("seed", "replicate", "design"):
        require(key not in grid and key not in (raw.get("set") or {}), f"sweep.grid.{key}",
                "a sweep sets each run's seed from seeds and design", "list replicates under seeds:")
    seeds = raw.get("seeds", [0])
    require(isinstance(seeds, list) and seeds and all(isinstance(s, int) and s >= 0 for s in seeds)
            and len(set(seeds)) == len(seeds), "sweep.seeds", f"got {seeds!r}",
            "write a list of distinct integers >= 0, e.g. [0, 1]")
    design = raw.get("design", "independent")
    require(design in DESIGNS, "sweep.design", f"got {design!r}",
            "use independent (each setting its own seeds) or paired (the same seeds in every setting)")
    forks = []
    for i, f in enumerate(raw.get("forks") or []):
        require(isinstance(f, dict) and not set(f) - FORK_KEYS, f"sweep.forks[{i}]",
                f"unknown keys {sorted(set(f) - FORK_KEYS) if isinstance(f, dict) else f}", f"use {sorted(FORK_KEYS)}")
        require(("at_loss" in f) != ("at_step" in f), f"sweep.forks[{i}]", "needs exactly one of at_loss, at_step",
                "e.g. {at_loss: 1.8, set: {optim.batch_size: x4}}")
        forks.append(ForkSpec(f.get("at_loss"), f.get("at_step"), dict(f.get("set") or {}), dict(f.get("where") or {})))
    slurm = dict(raw.get("slurm") or {})
    require(not set(slurm) - SLURM_KEYS, "sweep.slurm", f"unknown keys {sorted(set(slurm) - SLURM_KEYS)}",
            f"use {sorted(SLURM_KEYS)}")
    processes = raw.get("processes", 1)
    require(isinstance(processes, int) and processes >= 1, "sweep.processes", f"got {processes!r}", "use >= 1")
    name = str(raw.get("name", path.stem))
    require(bool(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._=+-]*", name)), "sweep.name", f"{name!r} is not a safe "
            "directory name", "use letters, digits and . _ - = +")
    return Sweep(name=name, base=base, set=dict(raw.get("set") or {}), grid=dict(grid), seeds=tuple(seeds),
                 forks=tuple(forks), processes=processes, out=str(raw.get("out", "runs")), slurm=slurm,
                 design=design)


# ----------------------------------------------------------------------------- points


def expand(sweep: Sweep) -> list[Point]:
    """Every grid point x replicate (in grid order, replicates last), then the forks of the matching points.
    ``Point.knobs`` holds the grid values, ``seed`` and ``replicate``."""
    keys = list(sweep.grid)
    settings = []
    for combo in itertools.product(*(sweep.grid[k] for k in keys)):
        knobs = {}
        for key, value in zip(keys, combo):
            parts = key.split(",")
            knobs.update(zip(parts, value) if len(parts) > 1 else [(key, value)])
        settings.append(knobs)
    seeds = _seeds(sweep, settings)
    fixed = [f"{a}={value_text(b)}" for a, b in sweep.set.items()]
    points = []
    for k, knobs in enumerate(settings):
        for rep in sweep.seeds:
            seed = seeds[(k, rep)]
            named = {**knobs, "seed" if sweep.design == "paired" else "replicate": rep}
            overrides = (*fixed, *(f"{a}={value_text(b)}" for a, b in knobs.items()), f"seed={seed}",
                         f"replicate={rep}", f"design={sweep.design}")
            points.append(Point(run_name(named), {**knobs, "seed": seed, "replicate": rep}, overrides))
    forks = []
    for spec in sweep.forks:
        for p in points:
            if all(p.knobs.get(k) == v for k, v in spec.where.items()):
                forks.append(Point(fork_name(p.name, spec.at_loss, spec.at_step, spec.set),
                                   {**p.knobs, **{f"fork.{k}": v for k, v in spec.set.items()}},
                                   tuple(f"{a}={value_text(b)}" for a, b in spec.set.items()), p.name, spec))
    names = [p.name for p in points + forks]
    dupes = sorted({n for n in names if names.count(n) > 1})
    require(not dupes, "sweep.grid", f"two points share the name {dupes[:1]}", "vary each key once")
    return points + forks


def _seeds(sweep: Sweep, settings: list[dict]) -> dict[tuple[int, int], int]:
    """(setting index, replicate) -> run seed. Paired: the replicate itself. Independent: a hash of the
    setting's grid values and the replicate; where two points collide, the one later in (setting hash,
    replicate) order draws again, so adding a grid value leaves other points' seeds alone (unless it wins a
    collision, about once in 10^4 points, which the run directory's config check then reports)."""
    if sweep.design == "paired":
        return {(k, rep): rep for k in range(len(settings)) for rep in sweep.seeds}
    attempt = {(k, rep): 0 for k in range(len(settings)) for rep in sweep.seeds}
    while True:
        seeds = {key: setting_seed(settings[key[0]], key[1], attempt[key]) for key in attempt}
        owner: dict[int, tuple] = {}
        clash = False
        for key in sorted(attempt, key=lambda key: (setting_seed(settings[key[0]], key[1]), key[1], key[0])):
            if seeds[key] in owner:
                attempt[key] += 1
                clash = True
            else:
                owner[seeds[key]] = key
        if not clash:
            return seeds


# ----------------------------------------------------------------------------- runs.csv


def _state(run_dir: Path) -> str | None:
    return ckpt.RunDir(run_dir).state()


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
        rows.append({"run": p.name, **p.knobs, "parent": p.parent, "state": s.get("state", "pending"),
                     "reason": s.get("reason"), "step": s.get("step"), "samples": s.get("samples"),
                     "tokens": s.get("tokens"), "eval_loss": s.get("eval_loss"), "eval_error": s.get("eval_error"),
                     "best_eval_loss": s.get("best_eval_loss"), "loss_floor": s.get("loss_floor"),
                     "epsilon": s.get("epsilon"),
                     "targets_reached": ";".join(sorted(reached, key=float, reverse=True)),
                     **{f"step_at_{t}": step for t, step in reached.items()}})
    frame = pd.DataFrame(rows)
    path = sweep_dir / "runs.csv"
    ckpt.atomic_write(path, lambda tmp: frame.to_csv(tmp, index=False))
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
        if parent_state not in ("completed", "diverged", "stalled"):
            return "never" if parent_state == "failed" else "wait"
        at = point.fork
        if not ckpt.RunDir(parent_dir).checkpoint(at_loss=at.at_loss, at_step=at.at_step).is_dir():
            return "never"
    return "run"


def _prepare(sweep: Sweep, out: str | None) -> tuple[Path, list[Point]]:
    points = expand(sweep)
    sweep_dir = Path(out or sweep.out) / sweep.name
    for p in points:  # every grid point must be a valid run before anything starts
        if p.fork is None:
            load_config(sweep.base, [*p.overrides, f"out={sweep_dir}", f"name={p.name}"])
    sweep_dir.mkdir(parents=True, exist_ok=True)
    return sweep_dir, points


def run_sweep(path: str | Path, *, out: str | None = None, executor: str = "local", jobs: int | None = None,
              retry_diverged: bool = False, progress: bool = True) -> Path:
    """Run (or continue) a sweep; returns the sweep directory."""
    sweep = load_sweep(path)
    sweep_dir, points = _prepare(sweep, out)
    ckpt.write_text(sweep_dir / "sweep.yaml", Path(path).read_text())
    if executor == "slurm":
        submit_slurm(sweep, sweep_dir, points, jobs=jobs, retry_diverged=retry_diverged)
        return sweep_dir
    if retry_diverged:
        for p in points:
            if _state(sweep_dir / p.name) == "diverged":
                lock = _try_lock(sweep_dir, p.name)
                if lock is not None:
                    shutil.rmtree(sweep_dir / p.name)
                    lock.close()
    stopped = _run_local(sweep, sweep_dir, points, jobs=jobs, progress=progress)
    if stopped is not None:
        raise SweepInterrupted(sweep_dir, stopped)
    return sweep_dir


class SweepInterrupted(Exception):
    """A local sweep stopped early by Ctrl-C or SIGTERM, once its running runs had saved their resume points."""

    def __init__(self, sweep_dir: Path, signum: int):
        super().__init__(f"{sweep_dir}: stopped by signal {signum}")
        self.sweep_dir, self.signum = sweep_dir, signum


def _slots(jobs: int | None, processes: int) -> list[dict]:
    """Environment per parallel job: its GPUs (one group of ``processes`` each), or its CPU threads.

    With more jobs than GPU groups, ``k`` jobs share each GPU: the sweep says so, and each job may allocate
    at most ``1 / k`` of a GPU's memory (``GOLDENPATH_GPU_MEMORY_FRACTION``, applied by
    :func:`goldenpath.training.runtime.gpu_memory_share`), so one run cannot starve the others."""
    import torch

    gpus = torch.cuda.device_count()
    if gpus:
        n = jobs or max(1, gpus // processes)
        share = math.ceil(n * processes / gpus)
        env = {}
        if share > 1:
            env = {MEMORY_FRACTION_ENV: f"{0.95 / share:.4f}"}
            print(f"{n} runs at once on {gpus} GPU{'s' if gpus > 1 else ''}: {share} share each GPU, each may "
                  f"use {0.95 / share:.0%} of its memory", flush=True)
        return [{"CUDA_VISIBLE_DEVICES": ",".join(str((i * processes + j) % gpus) for j in range(processes)), **env}
                for i in range(n)]
    n = jobs or 1
    threads = max(1, (os.cpu_count() or 1) // (n * processes))
    return [{"OMP_NUM_THREADS": str(threads)} for _ in range(n)]


def _run_local(sweep: Sweep, sweep_dir: Path, points: list[Point], *, jobs: int | None, progress: bool) -> int | None:
    """Run the points in parallel slots; returns the signal that stopped the sweep early (Ctrl-C: every
    running child saves its resume point first), else None."""
    from tqdm.auto import tqdm

    from goldenpath.training.runtime import Interrupts

    slots = _slots(jobs, sweep.processes)
    free = list(range(len(slots)))
    running: dict = {}  # Popen -> (point, lock, slot, log file)
    counts = {"done": 0, "stalled": 0, "diverged": 0, "failed": 0, "interrupted": 0, "elsewhere": 0, "skipped": 0}
    pending = list(points)
    skipped: dict[str, str] = {}
    (sweep_dir / "logs").mkdir(exist_ok=True)
    bar = tqdm(total=len(points), desc=sweep.name, unit="run", disable=not progress, dynamic_ncols=True)

    def show() -> None:
        bar.set_postfix(running=len(running), **{k: v for k, v in counts.items() if v})

    def settle(point: Point, outcome: str) -> None:
        counts[outcome] = counts.get(outcome, 0) + 1
        bar.update(1)
        show()

    def stop_children(_signum: int) -> None:  # a Ctrl-C in a terminal reaches them too; SIGTERM is the same ask
        for proc in running:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()

    with Interrupts(on_request=stop_children) as interrupts:
        _schedule(sweep, sweep_dir, points, pending, running, free, slots, skipped, settle, show, interrupts)
    bar.close()
    write_runs_csv(sweep_dir, points, skipped)
    return interrupts.requested


def _schedule(sweep, sweep_dir, points, pending, running, free, slots, skipped, settle, show, interrupts) -> None:
    """The scheduling loop of :func:`_run_local`: start ready points in free slots, settle finished ones."""
    while (pending and interrupts.requested is None) or running:
        for point in list(pending) if interrupts.requested is None else []:
            if not free:
                break
            verdict = _ready(point, sweep_dir, retry_diverged=False)
            if verdict == "wait" and running:  # its parent is still training here
                continue
            pending.remove(point)
            if verdict == "skip":
                settle(point, {"diverged": "diverged", "stalled": "stalled"}.get(_state(sweep_dir / point.name), "done"))
                continue
            if verdict in ("never", "wait"):  # the parent failed, missed the fork point, or runs elsewhere
                skipped[point.name] = {"state": "skipped", "reason": f"parent {point.parent} " + (
                    "did not reach the fork point" if verdict == "never" else "still runs in another sweep process")}
                settle(point, "skipped")
                continue
            lock = _try_lock(sweep_dir, point.name)
            if lock is None:  # another sweep process runs it
                settle(point, "elsewhere")
                continue
            slot = free.pop(0)
            log = open(sweep_dir / "logs" / f"{point.name}.log", "a")
            proc = subprocess.Popen(command(sweep, point, sweep_dir), stdout=log, stderr=subprocess.STDOUT,
                                    env={**os.environ, **slots[slot], "TQDM_DISABLE": "1"})
            running[proc] = (point, lock, slot, log)
            show()
        finished = [p for p in running if p.poll() is not None]
        for proc in finished:
            point, lock, slot, log = running.pop(proc)
            log.close()
            lock.close()
            free.append(slot)
            state = _state(sweep_dir / point.name)
            if state is None:  # it stopped before its run directory existed (bad input)
                skipped[point.name] = {"state": "failed", "reason": f"exit code {proc.returncode} before the run "
                                       f"started; see logs/{point.name}.log"}
            settle(point, {"completed": "done", "diverged": "diverged", "stalled": "stalled",
                           "interrupted": "interrupted"}.get(state, "failed"))
            write_runs_csv(sweep_dir, points, skipped)
        if not finished:
            time.sleep(0.2)


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
