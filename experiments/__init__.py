"""attnzoo's absl entry points: train, benchmark, reproduce (run with `python -m experiments.X`)."""
