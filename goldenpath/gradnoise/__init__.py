"""Gradient noise: the estimators (``estimators``: tail index, Gaussianity, noise scale; pure functions) and
the analysis of a trained checkpoint that the ``goldenpath noise`` verb runs (``collect``)."""

from goldenpath.gradnoise.collect import analyse, summary_line, write_analysis  # noqa: F401
from goldenpath.gradnoise.estimators import (  # noqa: F401
    aggregate, aggregation_series, atom_fraction, default_k1, gaussianity, noise_scale, noise_scale_per_sample,
    per_coordinate_tail_index, pooled_sample, qq_data, tail_index, tail_index_ci)
