"""Trains one config: `python -m experiments.train --config FILE:ARG --workdir DIR`.

    python -m experiments.train --config configs/lm_bytes.py:attention=softmax,smoke \
        --workdir /tmp/attnzoo/smoke --config.train.steps=20

Rerunning the same command resumes from the workdir's newest good checkpoint. This
file is intentionally short: the logic lives in `attnzoo.training` (importable, tested).
"""

import logging as std_logging

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from attnzoo import training
from attnzoo.training import sharding

_CONFIG = config_flags.DEFINE_config_file("config", None, "get_config(arg) file[:arg]")
_WORKDIR = flags.DEFINE_string("workdir", None, "checkpoints and metrics.jsonl go here")
# Multi-host: the same command on every host (one process per host) with --multihost; the
# mesh spans all processes' devices; --workdir must be one directory every host sees.
_MULTIHOST = flags.DEFINE_bool(
  "multihost",
  False,
  "call jax.distributed.initialize() first (CPU collectives via gloo); pass the three "
  "flags below unless JAX detects the cluster itself (TPU pods, SLURM, GKE)",
)
_COORDINATOR = flags.DEFINE_string(
  "coordinator_address", None, "host:port of process 0, the same on every process"
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "processes in the job")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "this process's index, 0..num_processes-1")
flags.mark_flags_as_required(["config", "workdir"])


def _quiet_orbax(record) -> bool:
  """Keeps orbax's warnings and errors, drops its per-save INFO chatter."""
  return "orbax" not in record.pathname or record.levelno >= std_logging.WARNING


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.get_absl_handler().python_handler.addFilter(_quiet_orbax)
  sharding.maybe_initialize_distributed(
    enabled=_MULTIHOST.value,
    coordinator_address=_COORDINATOR.value,
    num_processes=_NUM_PROCESSES.value,
    process_id=_PROCESS_ID.value,
  )
  if jax.process_index() != 0:  # one progress log per job; the others report problems only
    logging.set_verbosity(logging.WARNING)
  logging.info("config:\n%s", _CONFIG.value)
  training.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
