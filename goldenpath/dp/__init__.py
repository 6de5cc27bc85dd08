"""Injected noise and privacy: the Noisy-SGD and DP-SGD mechanisms (``mechanisms``), per-sample clipping
(``per_sample``, ``layer_rules``, ``tape``) and the privacy accountant (``privacy``)."""
