"""Run names: readable, stable and filesystem-safe, made from the knobs that set a run apart.

    lr=0.05_bs=16_rep=0                       a sweep point (goldenpath sweep): replicate 0 of its setting
    lr=0.05_bs=16_seed=0                      a sweep point of a paired design: seed 0 in every setting
    lr=0.05_bs=16_rep=0+fork-loss=2.2-bs=x4   its fork at loss target 2.2 with batch x 4
    teacher-cnn_lr=0.05                       goldenpath train configs/teacher-cnn.yaml optim.lr=0.05
"""

from __future__ import annotations

import json
import re

from goldenpath.config import parse_override
from goldenpath.config.identity import NOT_NAMED

# short names of common knobs in run names
ALIASES = {"optim.lr": "lr", "optim.batch_size": "bs", "noise.sigma": "sigma", "noise.clip": "clip",
           "noise.kind": "noise", "data.epochs": "epochs", "data.train_size": "n", "optim.momentum": "mom",
           "model.width": "width", "model.depth": "depth", "optim.name": "opt",
           "replicate": "rep"}


def value_text(value) -> str:
    """A value as an override writes it (YAML flow)."""
    return value if isinstance(value, str) else json.dumps(value)


def _name_text(value) -> str:
    if isinstance(value, bool):
        value = str(value).lower()
    elif isinstance(value, float):
        value = f"{value:g}"
    elif value is None:
        value = "none"
    text = re.sub(r"^/", "div", str(value))  # a fork's relative "/4" reads "div4", not "4"
    return re.sub(r"[^A-Za-z0-9.+-]+", "-", text).strip("-") or "x"


def run_name(knobs: dict) -> str:
    """Readable, stable, filesystem-safe: ``lr=0.05_bs=16_seed=0`` (last key part where no alias)."""
    labels = {k: ALIASES.get(k, k.rsplit(".", 1)[-1]) for k in knobs}
    clashes = {lab for lab in labels.values() if list(labels.values()).count(lab) > 1}
    return "_".join(f"{labels[k] if labels[k] not in clashes else k.replace('.', '-')}={_name_text(v)}"
                    for k, v in knobs.items())


def fork_name(parent: str, at_loss: float | None, at_step: int | None, changes: dict) -> str:
    at = f"loss={at_loss:g}" if at_loss is not None else f"step={at_step}"
    return f"{parent}+fork-{at}" + (f"-{run_name(changes)}" if changes else "")


def default_run_name(config_name: str, overrides) -> str:
    """``<config name>_<overrides>`` (``teacher-cnn_lr=0.05_bs=128``), as a sweep names its runs; the config's
    own name when no override changes what the run computes."""
    knobs = {}
    for text in overrides:
        keys, value = parse_override(text)
        key = ".".join(keys)
        if key not in NOT_NAMED:
            knobs[key] = value
    return f"{config_name}_{run_name(knobs)}" if knobs else config_name
