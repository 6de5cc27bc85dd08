"""The runs a comparison reads: every loss-target checkpoint of a sweep's runs, the runs grouped into settings
(the same knobs, any seed: :mod:`goldenpath.config.identity`), and what changed in them since compare last
wrote a tables directory (``inputs.json``: the options and every run's checkpoints the tables come from).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from goldenpath.comparison import verdicts
from goldenpath.config import Config, ConfigError, identity, load_config
from goldenpath.data.shift import parse_shift
from goldenpath.store import files, rundir as ckpt
from goldenpath.store.tables import COMPARE, INPUTS

@dataclass(frozen=True)
class Checkpoint:
    run: str
    path: Path
    target: float
    eval_loss: float
    step: int
    samples: int
    fingerprint: str

    @property
    def overshoot(self) -> float:
        return self.target - self.eval_loss


@dataclass(frozen=True)
class RunInfo:
    name: str
    config: Config
    state: str | None
    setting: verdicts.Setting


def collect(sweep_dir: Path) -> tuple[dict[float, list[Checkpoint]], dict[str, RunInfo]]:
    """Every loss-target checkpoint of the sweep's runs, by target; and each run's config, state and setting."""
    by_target: dict[float, list[Checkpoint]] = {}
    configs, states = {}, {}
    for run_dir in sorted(p.parent for p in sweep_dir.glob("*/config.yaml")):
        run = ckpt.RunDir(run_dir)
        config = load_config(run.config)
        configs[run.name] = config
        states[run.name] = run.state()
        for target_dir in run.target_dirs():
            meta = ckpt.read_meta(target_dir)
            stat = (target_dir / ckpt.WEIGHTS).stat()
            by_target.setdefault(float(meta["target"]), []).append(Checkpoint(
                run_dir.name, target_dir, float(meta["target"]), float(meta["eval_loss"]), int(meta["step"]),
                int(meta["samples"]), f"{stat.st_size}-{stat.st_mtime_ns}"))
    _refuse_duplicates(configs, sweep_dir)
    designs = sorted({c.design for c in configs.values() if c.design is not None})
    if len(designs) > 1:
        raise ConfigError("compare", f"the runs of {sweep_dir} come from sweeps with different seed designs "
                          f"({', '.join(designs)})", "compare the runs of one design (move one sweep's runs out)")
    return by_target, settings_of(configs, states)


def _refuse_duplicates(configs: dict[str, Config], sweep_dir: Path) -> None:
    """Two run directories that compute one run (same resolved config, seed and replicate) would enter the
    statistics as two seeds at distance 0: refuse, naming both."""
    seen: dict[str, str] = {}
    for name, config in configs.items():
        first = seen.setdefault(identity.identity_key(config), name)
        if first != name:
            raise ConfigError("compare", f"{sweep_dir / name} is {first} again under another name (same config, "
                              "seed and replicate)", f"remove one of them (rm -r {sweep_dir / name})")


def settings_of(configs: dict[str, Config], states: dict) -> dict[str, RunInfo]:
    """Group runs by knobs; label each setting by its runs' names without the seed; keep the varying knobs."""
    flat = {n: identity.setting_columns(c) for n, c in configs.items()}
    keys = sorted({k for f in flat.values() for k in f})
    varying = [k for k in keys if len({json.dumps(f.get(k)) for f in flat.values()}) > 1]
    by_knobs: dict[tuple, list[str]] = {}
    for n, c in configs.items():
        by_knobs.setdefault((identity.knobs(c),), []).append(n)
    out, used = {}, set()
    for knobs, names in by_knobs.items():
        label = identity.setting_label(sorted(names)[0])
        while label in used:
            label += "'"
        used.add(label)
        c = configs[names[0]]
        setting = verdicts.Setting(label, knobs, c.regime, identity.noise_level(c), (*identity.order_key(c), label),
                                 {k: flat[names[0]].get(k) for k in varying}, fork=c.fork.parent is not None)
        for n in names:
            out[n] = RunInfo(n, configs[n], states[n], setting)
    return out


def tables_dir(sweep_dir: str | Path, probe_shift: str | None = None) -> Path:
    """``compare/``, or ``compare-<shift>/`` for a shifted probe set (e.g. ``compare-noise-0.5``)."""
    return Path(sweep_dir) / (COMPARE if probe_shift is None else f"{COMPARE}-{parse_shift(probe_shift).slug}")


def inputs(runs: dict[str, RunInfo], by_target: dict[float, list[Checkpoint]]) -> dict[str, dict]:
    """What a comparison depends on in each run: whether it stalled, and its checkpoints' fingerprints by target."""
    out = {name: {"stalled": info.state == "stalled", "checkpoints": {}} for name, info in runs.items()}
    for target, cks in by_target.items():
        for c in cks:
            out[c.run]["checkpoints"][f"{target:g}"] = c.fingerprint
    return out


def changes(sweep_dir: str | Path, probe_shift: str | None = None, *,
            collected: tuple | None = None) -> list[str] | None:
    """What changed in the sweep's runs since compare wrote ``compare/`` (``compare-<shift>/``), one phrase per
    kind (``"new runs: a, b"``); [] when nothing did, None when the tables record no inputs (written by an
    older goldenpath). ``collected``: :func:`collect` of the sweep, when the caller has it."""
    path = tables_dir(sweep_dir, probe_shift) / INPUTS
    if not path.exists():
        return None
    old = files.read_json(path)["runs"]
    by_target, runs = collected or collect(Path(sweep_dir))
    now = inputs(runs, by_target)
    found = {"new runs": sorted(now.keys() - old.keys()), "removed runs": sorted(old.keys() - now.keys()),
             "new checkpoints": [], "changed checkpoints": [], "removed checkpoints": [], "stalled or no longer": []}
    for run in sorted(old.keys() & now.keys()):
        before, after = old[run]["checkpoints"], now[run]["checkpoints"]
        for target in sorted(before.keys() | after.keys(), key=float, reverse=True):
            kind = ("new" if target not in before else "removed" if target not in after else
                    "changed" if before[target] != after[target] else None)
            if kind:
                found[f"{kind} checkpoints"].append(f"{run} at {target}")
        if old[run]["stalled"] != now[run]["stalled"]:
            found["stalled or no longer"].append(run)
    return [f"{what}: {', '.join(names[:6])}" + (f" and {len(names) - 6} more" if len(names) > 6 else "")
            for what, names in found.items() if names]


def last_options(sweep_dir: str | Path, probe_shift: str | None = None) -> dict:
    """The keyword arguments compare last wrote ``compare/`` (``compare-<shift>/``) with (from ``inputs.json``)."""
    return files.read_json(tables_dir(sweep_dir, probe_shift) / INPUTS)["options"]
