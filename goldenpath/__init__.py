"""goldenpath: does SGD noise change *what* a network learns in online learning, or only how fast?

Public API: ``load_config``, ``train``, ``fork``, ``compare`` (and the modules ``config``, ``data``,
``models``, ``distances``, ``lmc``, ``noise``, ``privacy``, ``gradnoise``, ``toys``). Names are imported on
first use, so ``import goldenpath`` (and ``goldenpath --help``) does not load torch.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {"Config": "goldenpath.config", "ConfigError": "goldenpath.config", "load_config": "goldenpath.config",
            "train": "goldenpath.train", "fork": "goldenpath.train", "compare": "goldenpath.compare"}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'goldenpath' has no attribute {name!r}")
