"""Forks: a run continued from another run's checkpoint with changed knobs (``goldenpath fork``).

    goldenpath fork runs/s/lr=0.02_bs=16_seed=0 --at-loss 2.1 optim.batch_size=x4 optim.lr=/4

The child starts from the parent's weights (and optimizer state) at a loss-target or step checkpoint,
reads the parent's stream from where the parent *stopped* (no sample is used twice), draws its own noise,
and counts steps, samples and budgets on from the fork point. Its config records ``fork.parent``, the fork
point and the changed keys; ``key=x4`` and ``key=/4`` are relative to the parent's value.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from goldenpath.store import rundir as ckpt
from goldenpath.store.files import read_json
from goldenpath.config import Config, ConfigError, load_config, parse_override, require, to_dict
from goldenpath.config.identity import identity_key
from goldenpath.config.naming import fork_name, value_text


def _relative(value, parent_value):
    """``x4`` multiplies and ``/4`` divides the parent's numeric value; anything else is taken as is."""
    if isinstance(value, str) and isinstance(parent_value, (int, float)) and not isinstance(parent_value, bool):
        m = re.fullmatch(r"\s*([x/])\s*([0-9.eE+-]+)\s*", value)
        if m:
            factor = float(m.group(2))
            out = parent_value * factor if m.group(1) == "x" else parent_value / factor
            return int(out) if isinstance(parent_value, int) and float(out).is_integer() else out
    return value


def child_changes(parent: Config, overrides) -> tuple[dict, list[str]]:
    """A fork's ``overrides`` of its parent's config: ({key: value}, ["key=value"]) with ``x4`` and ``/4``
    resolved against the parent's values; a key a fork may not change is refused."""
    parent_dict = to_dict(parent)
    changes, resolved = {}, []
    for text in overrides:
        keys, value = parse_override(text)
        key = ".".join(keys)
        require(keys[0] not in ("seed", "data", "fork", "out") and key != "name", key,
                "a fork keeps its parent's data, seed and place", "change optim.*, noise.*, budget.*, checkpoint.*")
        node = parent_dict
        for k in keys:
            node = node.get(k) if isinstance(node, dict) else None
        value = _relative(value, node)
        changes[key] = value
        resolved.append(f"{key}={value_text(value)}")
    return changes, resolved


def fork_config(run_dir: str | Path, at_loss: float | None = None, at_step: int | None = None,
                overrides=(), name: str | None = None) -> Config:
    """The child's config: the parent's, with ``overrides`` (``key=x4`` / ``key=/4`` relative to the parent)."""
    run_dir = Path(run_dir).resolve()
    require((at_loss is None) != (at_step is None), "fork", "needs exactly one of --at-loss and --at-step",
            "give --at-loss L (a loss target the parent reached) or --at-step S")
    require(ckpt.RunDir(run_dir).exists(), "fork", f"{run_dir} is not a run directory",
            "give the directory of a run (it holds config.yaml)")
    parent = load_config(ckpt.RunDir(run_dir).config)
    changes, resolved = child_changes(parent, overrides)
    child = name or fork_name(parent.name, at_loss, at_step, changes)
    at = [f"fork.at_loss={at_loss}"] if at_loss is not None else [f"fork.at_step={at_step}"]
    config = load_config(ckpt.RunDir(run_dir).config, [
        *resolved, f"name={child}", f"out={run_dir.parent}", f"fork.parent={run_dir}",
        "fork.at_loss=null", "fork.at_step=null", *at, f"fork.changed={json.dumps(sorted(changes))}"])
    _refuse_duplicate(config, run_dir.parent)
    return config


def _refuse_duplicate(config: Config, out: Path) -> None:
    """A fork that another run directory beside it already computes (the same parent, fork point and
    changes, written ``x4`` there and ``64`` here) would enter every comparison twice: refuse, naming it."""
    key = identity_key(config)
    for other in sorted(out.glob("*/config.yaml")):
        if other.parent.name != config.name and identity_key(load_config(other)) == key:
            raise ConfigError("fork", f"{other.parent} already is this fork (same parent, fork point and changes)",
                              "use that run (compare reads it already), or fork with other changes")


def ancestry(config: Config) -> list[tuple[Config, int]]:
    """What a fork's starting weights were trained under, oldest first: (each ancestor's config, the optimizer
    steps taken under it before the next fork point); [] for a run that is not a fork. Its privacy accounting
    counts them (:func:`goldenpath.dp.privacy.privacy_spent`)."""
    chain = []
    while config.fork.parent is not None:
        parent = ckpt.RunDir(config.fork.parent)
        parent_config = load_config(parent.config)
        at = ckpt.read_meta(parent.checkpoint(at_loss=config.fork.at_loss, at_step=config.fork.at_step))["step"]
        chain.append((parent_config, int(at)))
        config = parent_config
    out, start = [], 0
    for parent_config, at in reversed(chain):
        out.append((parent_config, at - start))
        start = at
    return out


def fork_start(config: Config, rank: int) -> dict | None:
    """Where a fork begins: the parent's checkpoint, its meta, the parent's final stream position."""
    fork = config.fork
    if fork.parent is None:
        return None
    parent = ckpt.RunDir(fork.parent)
    src = parent.checkpoint(at_loss=fork.at_loss, at_step=fork.at_step)
    field = "fork.at_loss" if fork.at_loss is not None else "fork.at_step"
    if not ckpt.has_weights(src):
        raise ConfigError(field, f"{parent.path} has no checkpoint {src.name}",
                          "fork at a loss target the parent reached (status.json targets_reached) or a step "
                          "listed in its checkpoint.steps")
    parent_status = parent.status()
    if parent_status.get("state") not in ckpt.FINISHED:  # running, interrupted or failed: it can still go on
        raise ConfigError("fork.parent", f"{parent.path} is {parent_status.get('state') or 'not started'}, not "
                          f"one of {', '.join(ckpt.FINISHED)}: resumed later it would train on the samples the fork "
                          "reads", "finish the parent first (goldenpath train with its config resumes it), then "
                          "fork")
    world = parent_status.get("processes", 1)
    state = parent.final_stream(min(rank, world - 1))
    n, b, into = config.data.train_size, config.optim.batch_size, state["position"] % (config.data.train_size or 1)
    if config.noise.kind == "dp" and config.data.epochs > 1 and into % b:
        raise ConfigError("optim.batch_size", f"the parent stopped {into} samples into an epoch of {n}, not a "
                          f"multiple of {b}: under dp a batch across two epochs could hold a sample twice",
                          f"fork with a batch size that divides {into} (the parent's does)")
    meta = ckpt.read_meta(src)
    return {"dir": src, "meta": meta, "stream": state, "parent_processes": world,
            "start": {"step": meta["step"], "samples": meta["samples"], "position": state["position"]},
            "initial_eval": _initial_eval(parent)}


def _initial_eval(parent: ckpt.RunDir) -> float:
    """The held-out loss the parent's lineage started from (its resume state keeps it, a fork's its root's): the
    stalled and divergence checks compare with it. A run directory without one: its first logged eval (a fork's
    first line is its fork point, so only for a run that is not a fork)."""
    saved = parent.last / "state.json"
    if saved.exists():
        value = read_json(saved)["train"].get("initial_eval")
        if value is not None:
            return value
    return next(r for r in ckpt.read_metrics(parent) if "eval_loss" in r)["eval_loss"]
