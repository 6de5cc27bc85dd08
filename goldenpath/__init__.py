"""goldenpath: does SGD noise change *what* a network learns in online learning, or only how fast?

Public API: ``load_config``, ``train``, ``fork``, ``compare``, and the modules ``config``, ``data``, ``models``,
``distances``, ``lmc``, ``noise``, ``privacy``, ``gradnoise``, ``toys``. The package's folders are its parts:
``config/`` (what defines a run), ``store/`` (what a run leaves on disk), ``data/``, ``models/``, ``training/``,
``dp/`` (injected noise and DP-SGD), ``comparison/`` (distances and statistics), ``draw/``, ``gradnoise/`` and
``toys/``. Names are imported on first use, so ``import goldenpath`` (and ``goldenpath --help``) does not load
torch.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {"Config": "goldenpath.config", "ConfigError": "goldenpath.config", "load_config": "goldenpath.config",
            "train": "goldenpath.training.trainer", "fork": "goldenpath.training.trainer",
            "compare": "goldenpath.comparison.compare"}
# The public modules that live in a part under another name: ``from goldenpath import noise`` and so on.
_MODULES = {"distances": "goldenpath.comparison.distances", "lmc": "goldenpath.comparison.lmc",
            "noise": "goldenpath.dp.mechanisms", "privacy": "goldenpath.dp.privacy"}

__all__ = ["__version__", *_EXPORTS, *_MODULES]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    if name in _MODULES:
        return importlib.import_module(_MODULES[name])
    raise AttributeError(f"module 'goldenpath' has no attribute {name!r}")
