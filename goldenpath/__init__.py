"""goldenpath: does SGD noise change *what* a network learns in online learning, or only how fast?

Public API (DESIGN.md): ``load_config``, ``train``; modules ``config``, ``data``, ``models``, ``checkpoints``.
"""

__version__ = "0.1.0"

from goldenpath.config import Config, ConfigError, load_config  # noqa: E402
from goldenpath.train import train  # noqa: E402

__all__ = ["Config", "ConfigError", "__version__", "load_config", "train"]
