"""Training: train_and_evaluate, pure steps, sharding, checkpoints, metrics."""

from attnzoo.training.checkpoints import IncompatibleCheckpointError
from attnzoo.training.metrics import read_metrics
from attnzoo.training.train import train_and_evaluate

__all__ = ["IncompatibleCheckpointError", "read_metrics", "train_and_evaluate"]
