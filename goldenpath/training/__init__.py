"""Training: building a run (``run``), the step loop (``trainer``: ``train``, ``fork``), loss-matched
targets (``targets``), the learning-rate and eval schedules, forks, sweeps, and the process runtime."""
