"""Orbax checkpoints with a compatibility check and a fallback past corrupt steps.

Each step directory holds two items: `state` (the nnx state of model + optimizer) and
`meta` (JSON: the model hyper-parameters, the shape of every state array, the step).
Restoring:
  1. newest step first; if its array shapes differ from the current model's, stop
     (IncompatibleCheckpointError, listing the differing hyper-parameters and arrays) and
     touch nothing; same shapes but other hyper-parameters (an implementation knob,
     dropout) resume with a warning;
  2. if a step cannot be read (truncated / corrupt files), warn loudly, move it to
     `<workdir>/corrupt_checkpoints/<step>` (kept for inspection, never deleted) and try
     the previous step.
"""

from __future__ import annotations

import os
import shutil
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging


class IncompatibleCheckpointError(ValueError):
  """The workdir holds a checkpoint of a different model."""


def _diff(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
  keys = sorted(set(saved) | set(current))
  return [
    f"{k}: checkpoint={saved.get(k, '<absent>')!r} config={current.get(k, '<absent>')!r}"
    for k in keys
    if saved.get(k, "<absent>") != current.get(k, "<absent>")
  ]


class Checkpointer:
  """`ocp.CheckpointManager` (keep-N, async) plus the restore policy above."""

  def __init__(self, workdir: str, *, max_to_keep: int, async_save: bool = True):
    self.workdir = workdir
    self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    self._options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep, create=True, enable_async_checkpointing=async_save
    )
    self.manager = ocp.CheckpointManager(self.directory, options=self._options)

  def restore(self, abstract_state, meta: dict[str, Any]) -> tuple[Any, int] | None:
    """(state, step) of the newest good compatible checkpoint, or None if there is none.

    `abstract_state` holds jax.ShapeDtypeStruct leaves with their target shardings.
    """
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        saved = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        saved_model = dict(saved["meta"]["model"])
      except Exception as e:  # noqa: BLE001 (any read failure means this step is unusable)
        self._set_aside(step, e)
        continue
      differences = _diff(saved_model, meta["model"])
      shape_differences = _diff(dict(saved["meta"].get("shapes", {})), meta["shapes"])
      if shape_differences:
        raise IncompatibleCheckpointError(
          f"{self.directory} holds a checkpoint (step {step}) of a different model:\n  "
          + "\n  ".join(differences + shape_differences[:10])
          + "\nNothing was changed. Use a fresh --workdir, or move that one away yourself."
        )
      if differences:
        logging.warning(
          "resuming step %d with changed hyper-parameters (same shapes):\n  %s",
          step,
          "\n  ".join(differences),
        )
      try:
        restored = self.manager.restore(
          step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))
        )
      except Exception as e:  # noqa: BLE001
        self._set_aside(step, e)
        continue
      logging.info("restored checkpoint of step %d from %s", step, self.directory)
      return restored["state"], step
    return None

  def _set_aside(self, step: int, error: Exception) -> None:
    """Moves an unreadable step out of the manager's directory (never deletes it).

    Multi-host: every process reads the step, process 0 alone moves it once all have
    finished reading (a second mover would find it gone and crash).
    """
    src = os.path.join(self.directory, str(step))
    dst_dir = os.path.join(self.workdir, "corrupt_checkpoints")
    os.makedirs(dst_dir, exist_ok=True)
    dst = os.path.join(dst_dir, str(step))
    suffix = 0
    while os.path.exists(dst):
      suffix += 1
      dst = os.path.join(dst_dir, f"{step}.{suffix}")
    logging.warning(
      "CHECKPOINT OF STEP %d IS UNREADABLE (%s: %s); moved it to %s and falling back to the "
      "previous checkpoint",
      step,
      type(error).__name__,
      str(error).splitlines()[0][:300],
      dst,
    )
    _sync(f"attnzoo_set_aside_{step}_read")
    if jax.process_index() == 0:
      shutil.move(src, dst)
    _sync(f"attnzoo_set_aside_{step}_moved")
    self.manager.reload()

  def save(self, step: int, state, meta: dict[str, Any]) -> bool:
    """Saves now (asynchronously); the trainer decides when (every N steps and at the end)."""
    return self.manager.save(
      step,
      args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
      force=True,
    )

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def _sync(name: str) -> None:
  """Barrier across the processes of a multi-host run (nothing on one process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # noqa: PLC0415

    multihost_utils.sync_global_devices(name)


def state_shapes(state) -> dict[str, list[int]]:
  """{"0/blocks/0/attn/query/kernel": [D, N, H], ...} for the compatibility check."""
  out = {}
  jax.tree_util.tree_map_with_path(
    lambda path, x: out.__setitem__(_path(path), list(x.shape)), state
  )
  return out


def _path(path) -> str:
  return "/".join(
    str(getattr(k, "key", getattr(k, "idx", "")))
    for k in path
    if isinstance(k, (jax.tree_util.DictKey, jax.tree_util.SequenceKey))
  )


def abstract_with_shardings(state, shardings):
  """ShapeDtypeStruct leaves carrying the target shardings (orbax restores onto them)."""
  return jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings
  )
