"""What a run leaves on disk: atomic file writes and the cache (``files``), the run directory with its
checkpoints, metrics, status and resume state (``rundir``)."""
