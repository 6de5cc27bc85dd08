"""Data: streams of training samples with ids, held-out eval and probe sets, real and embedded sources.

A source registers its config class with ``@data_source(name)`` when its module is imported; the config
imports a built-in source's module the first time its name is used (``goldenpath.config.sections.FAMILY_MODULES``).
"""

from goldenpath.data.shift import probe_shift  # noqa: F401  (off-distribution probe sets)
from goldenpath.data.streams import (
    Batch, SequentialStream, Source, SourceInfo, Stream, StreamExhausted, build_stream,
)

__all__ = ["Batch", "SequentialStream", "Source", "SourceInfo", "Stream", "StreamExhausted", "build_stream"]
