"""Data: streams of training samples with ids, held-out eval and probe sets, real and embedded sources."""

from goldenpath.data import hub, sources, synthetic, text  # noqa: F401  (registers the data sources)
from goldenpath.data.shift import probe_shift  # noqa: F401  (off-distribution probe sets)
from goldenpath.data.streams import (
    Batch, SequentialStream, Source, SourceInfo, Stream, StreamExhausted, build_stream,
)

__all__ = ["Batch", "SequentialStream", "Source", "SourceInfo", "Stream", "StreamExhausted", "build_stream"]
