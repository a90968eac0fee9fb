"""A run's folder: file names, checkpoints and stop signals."""
