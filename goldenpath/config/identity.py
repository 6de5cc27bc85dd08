"""What defines a run, in one place: the keys that do not change what a run computes, a run's identity, the
knobs that make its setting, how noisy it is and where it sorts.

Four groups of keys stand apart from what a run computes (dotted keys of the resolved config):

- ``PLACE``: where a run is written and how many CPU threads it uses. Two runs that differ only here are one
  run under two names (compare refuses them as two seeds; a fork finds its sibling by them).
- ``PACE``: how a run shows progress and how far ahead its batches are made. A run resumes with other values.
- ``SEEDS``: what sets the seeds of one setting apart (the seed, the replicate, the sweep's seed design).
- ``RECORD``: where the run ran and what it records beside training (the device, the metrics cadence, the
  trackers, the sample-id audit). A run with other values is a new run, but the same *setting*: its seeds
  are seeds of one setting in compare.

So a run's *identity* is its config less ``PLACE`` and ``PACE``; its *knobs* (its setting) are its identity
less ``SEEDS`` and ``RECORD``, a fork's parent counted by its own setting (forks of seed siblings are siblings).
"""

from __future__ import annotations

import json
import re

from goldenpath.config import to_dict

PLACE = ("name", "out", "goldenpath", "threads")
PACE = ("log.progress", "data.prefetch")
SEEDS = ("seed", "replicate", "design")
RECORD = ("cpu", "log.every", "log.trackers", "log.sample_ids")

RESUMABLE = ("threads", *PACE)          # a run may be resumed with other values of these
NOT_NAMED = (*PLACE, *PACE, "design")   # overrides that do not enter a run's default name


def _drop(d: dict, keys) -> dict:
    """``d`` (a nested config dict) without the dotted ``keys``."""
    for key in keys:
        *parents, last = key.split(".")
        part = d
        for p in parents:
            part = part.get(p, {})
        part.pop(last, None)
    return d


def identity(config) -> dict:
    """What a run computes: its resolved config without the keys that only place or pace it."""
    return _drop(to_dict(config), (*PLACE, *PACE))


def identity_key(config) -> str:
    """:func:`identity` as one string: two runs with one key are one run under two names."""
    return json.dumps(identity(config), sort_keys=True)


def setting_dict(config) -> dict:
    """A run's setting: its identity without its seeds and what it records; a fork's parent stands in by the
    parent's own setting (:func:`parent_setting`), so that forks of seed siblings are siblings while forks of
    two settings stay two, even where the fork sets the knob that told their parents apart (sigma = 0 forked
    from sigma 0.5 and from sigma 2)."""
    d = _drop(identity(config), (*SEEDS, *RECORD))
    fork = d.get("fork", {})
    if fork.get("parent") is not None:
        fork["parent"] = parent_setting(fork["parent"])
    return d


def parent_setting(parent: str) -> dict | str:
    """The setting of the run at ``parent`` (its ``config.yaml``; a fork's, its own parent's in turn), or, where
    that file cannot be read (a sweep directory moved since), the parent's name without its replicate or seed."""
    from pathlib import Path

    from goldenpath.config import ConfigError, load_config

    try:
        return setting_dict(load_config(Path(parent) / "config.yaml"))
    except (OSError, ConfigError):
        return setting_label(Path(parent).name)


def knobs(config) -> str:
    """:func:`setting_dict` as one string: runs with equal knobs are seeds of one setting."""
    return json.dumps(setting_dict(config), sort_keys=True)


def setting_columns(config) -> dict:
    """A run's setting as {dotted key: value}, a fork's parent kept: the columns that tell settings apart."""
    return flat(_drop(identity(config), (*SEEDS, *RECORD)))


def _json_lists(value):
    return json.dumps(value) if isinstance(value, list) else value


def flat(d: dict, prefix: str = "", *, leaf=_json_lists) -> dict:
    """A nested config dict as {dotted key: leaf(value)} (by default lists as JSON text)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flat(v, f"{prefix}{k}.", leaf=leaf))
        else:
            out[prefix + k] = leaf(v)
    return out


def noise_level(config) -> float:
    """How noisy a run's steps are, as the trend with noise reads it: lr / B, times sigma with injected noise."""
    lr_b = config.optim.lr / config.optim.batch_size
    return lr_b * config.injected_sigma if config.injected_sigma > 0 else lr_b


def order_key(config) -> tuple:
    """Sorts settings from least to most noisy: online before offline, grid settings before forks, then the
    injected noise, lr / B and lr."""
    return (config.regime == "offline", config.fork.parent is not None, config.injected_sigma,
            config.optim.lr / config.optim.batch_size, config.optim.lr)


def run_order_key(config, name: str) -> tuple:
    """Sorts runs: by their setting's :func:`order_key`, a fork after its parent, then replicate (or seed)."""
    return (*order_key(config), config.fork.parent or "", config.seed if config.replicate is None else
            config.replicate, name)


def setting_label(run: str) -> str:
    """A run's name without its replicate or seed, the last part of a grid point's name (before a fork's ``+``):
    ``lr=0.02_bs=32_rep=1`` -> ``lr=0.02_bs=32``; a swept ``data.seed`` (``seed=1_lr=0.02_rep=0``) stays."""
    return re.sub(r"(^|_)(seed|rep)=\d+(?=\+|$)", "", run).strip("_") or "default"


NOISE_KNOBS = ("lr", "batch", "sigma")  # what sets a run's noise, in the order plots colour and dash by them


def curve_knobs(config) -> dict:
    """The knobs a learning-curve table carries per run (what its plots colour and group by)."""
    return {"lr": config.optim.lr, "batch": config.optim.batch_size, "seed": config.seed,
            "sigma": config.injected_sigma, "regime": config.regime, "fork": config.fork.parent is not None}
