"""Drawing: loss curves, distance heatmaps, error-vs-loss plots, figures and the report page, all read from the
tables that compare, sweep and the noise verb write."""
