"""Comparing trained runs: functional distances (``distances``, ``pairs``, ``lmc``), the compare driver
(``compare``), the statistics (``stats``, ``calibration``), settings and verdicts (``verdicts``) and power
planning (``plan``)."""
