"""What a sweep is: its config (a grid of runs over a base config, seeds, forks) and the points it expands to.

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
``"data.epochs,data.train_size": [[1, null], [8, 2048]]`` (online and offline).

Seeds: with ``design: independent`` (the default) every (setting, replicate) gets its own seed, a hash of the
setting's grid values and the replicate index (``seeding.setting_seed``), so no two settings share an
initialisation, a stream order or noise draws, and the permutation tests of ``goldenpath compare`` are exact;
runs are named ``..._rep=<replicate>``. With ``design: paired`` replicate s is seed s in every setting ("the
same start, different noise"), runs are named ``..._seed=<s>``, and compare analyses the settings within
seeds. Each run's config records its ``seed``, ``replicate`` and ``design``; a fork keeps its parent's.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path

from goldenpath.config import parse_override, read_yaml, require
from goldenpath.config.naming import fork_name, run_name, value_text
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
    for section in ("set", "slurm"):
        require(isinstance(raw.get(section) or {}, dict), f"sweep.{section}", f"expected a mapping, got "
                f"{raw.get(section)!r}", "write key: value lines")
    varied: dict[str, str] = {}
    for key in grid:
        for part in key.split(","):
            require(part not in varied, f"sweep.grid.{key}", f"{part} is varied here and in {varied.get(part)!r}, "
                    "so one of them would override the other's values", "vary each key in one grid entry")
            varied[part] = key
    for key, values in grid.items():
        require(isinstance(values, list) and len(values) > 0, f"sweep.grid.{key}", "expected a non-empty list",
                "write [v1, v2, ...]")
        width = len(key.split(","))
        if width > 1:
            require(all(isinstance(v, list) and len(v) == width for v in values), f"sweep.grid.{key}",
                    f"joined keys need lists of {width} values", "write [[a1, b1], [a2, b2], ...]")
    for key in ("seed", "replicate", "design"):
        require(key not in varied and key not in (raw.get("set") or {}), f"sweep.grid.{varied.get(key, key)}",
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
        at = f.get("at_loss", f.get("at_step"))
        require(isinstance(at, (int, float)) and not isinstance(at, bool) and ("at_step" not in f or
                                                                              isinstance(at, int)),
                f"sweep.forks[{i}].{'at_loss' if 'at_loss' in f else 'at_step'}", f"got {at!r}",
                "give a loss target (a number) or a step (an integer)")
        for part in ("set", "where"):
            require(isinstance(f.get(part) or {}, dict), f"sweep.forks[{i}].{part}", f"expected a mapping, got "
                    f"{f.get(part)!r}", "write {dotted.key: value}")
        unknown = sorted(set(f.get("where") or {}) - set(varied) - {"seed", "replicate"})
        require(not unknown, f"sweep.forks[{i}].where", f"{unknown} are not keys the grid varies, so no run matches",
                f"use some of {sorted(varied) + ['replicate']}")
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
    for i, spec in enumerate(sweep.forks):
        matched = [p for p in points if all(p.knobs.get(k) == v for k, v in spec.where.items())]
        seed_hint = "seed" in spec.where and sweep.design != "paired"
        require(bool(matched), f"sweep.forks[{i}].where", f"{spec.where} matches no run of the grid" +
                (" (each run's seed is drawn for its point unless design: paired)" if seed_hint else ""),
                "select runs by replicate" if seed_hint else "use values the grid takes")
        for p in matched:
            forks.append(Point(fork_name(p.name, spec.at_loss, spec.at_step, spec.set),
                               {**p.knobs, **{f"fork.{k}": v for k, v in spec.set.items()}},
                               tuple(f"{a}={value_text(b)}" for a, b in spec.set.items()), p.name, spec))
    names = [p.name for p in points + forks]
    dupes = sorted({n for n in names if names.count(n) > 1})
    require(not dupes, "sweep.grid", f"two points share the name {dupes[:1]}",
            "vary each key once, with values that differ in their first 6 significant digits")
    long = max(names, key=lambda n: len(n.encode()))
    require(len(long.encode()) <= MAX_NAME_BYTES, "sweep.grid", f"the run name {long[:48]}... has "
            f"{len(long.encode())} bytes, more than a file name takes with its lock's suffix ({MAX_NAME_BYTES})",
            "sweep fewer keys, or shorter values (a list of many steps: fewer steps)")
    return points + forks


MAX_NAME_BYTES = 200  # a run's name, so that <name>.train.lock and its other files stay within 255 bytes


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
