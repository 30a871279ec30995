"""Training: train_and_evaluate, restore_model, pure steps, sharding, checkpoints, metrics."""

from attnzoo.training.checkpoints import IncompatibleCheckpointError
from attnzoo.training.metrics import read_metrics
from attnzoo.training.train import restore_model, train_and_evaluate

__all__ = ["IncompatibleCheckpointError", "read_metrics", "restore_model", "train_and_evaluate"]
