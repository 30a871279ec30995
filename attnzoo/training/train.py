"""`train_and_evaluate(config, workdir)`: the trainer, top to bottom.

Rerunning the same command on the same workdir resumes from the newest good checkpoint
with the same data order and the same loss curve: batches are a pure function of
(seed, step), dropout keys of (seed, step), and the checkpoint holds the full
model + optimizer state.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import nnx

from attnzoo.models import Transformer
from attnzoo.training import builders, checkpoints, sharding, steps
from attnzoo.training.metrics import MetricsWriter, Progress


def build_state(config, model_cfg, mesh):
  """(graphdef, abstract state, shardings, init_fn): model + optimizer, laid out on `mesh`."""
  tx = builders.optimizer(config.train)
  constrain = sharding.activation_constraint(mesh)

  def create():
    model = Transformer(model_cfg, rngs=nnx.Rngs(params=config.seed), constrain=constrain)
    return model, nnx.Optimizer(model, tx, wrt=nnx.Param)

  graphdef, abstract = nnx.split(nnx.eval_shape(create))
  shardings = sharding.state_shardings(abstract, mesh)
  init = jax.jit(lambda: nnx.split(create())[1], out_shardings=shardings)
  return graphdef, abstract, shardings, init


def restore_model(
  config: ml_collections.ConfigDict, workdir: str, **overrides
) -> tuple[Transformer, int]:
  """(model, step): the model of the newest good checkpoint in `workdir`, trained from
  `config`, for analysis. `overrides` replace `ModelConfig` fields of the returned model (e.g.
  `input_len=2048` to run a RoPE language model on longer inputs than it was trained on);
  they must leave every parameter shape unchanged. Raises FileNotFoundError if there is no
  readable checkpoint."""
  ds = builders.dataset(config)
  model_cfg = builders.model_config(config, ds)
  mesh = sharding.make_mesh(config.mesh.to_dict())
  with jax.set_mesh(mesh):
    graphdef, abstract, shardings, _ = build_state(config, model_cfg, mesh)
    meta = dict(model=builders.model_meta(model_cfg), shapes=checkpoints.state_shapes(abstract))
    ckpt = checkpoints.Checkpointer(workdir, max_to_keep=config.checkpoint.max_to_keep)
    try:
      restored = ckpt.restore(checkpoints.abstract_with_shardings(abstract, shardings), meta)
    finally:
      ckpt.close()
  if restored is None:
    raise FileNotFoundError(
      f"no readable checkpoint in {os.path.join(os.path.abspath(workdir), 'checkpoints')}; "
      "train first (python -m experiments.train --config ... --workdir ...)"
    )
  state, step = restored
  model, _ = nnx.merge(graphdef, state)
  if overrides:
    cfg = dataclasses.replace(model_cfg, **overrides)
    target = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(params=0)))
    want, got = (
      checkpoints.state_shapes(nnx.state(target)),
      checkpoints.state_shapes(nnx.state(model)),
    )
    if want != got:
      raise ValueError(
        f"overrides {overrides} change parameter shapes; only shape-preserving fields "
        "(lengths of a RoPE/ALiBi model, knobs) can be overridden"
      )
    graph, _ = nnx.split(target)
    model = nnx.merge(graph, nnx.state(model))
  return model, step


def train_and_evaluate(
  config: ml_collections.ConfigDict, workdir: str, *, stop_at: int | None = None
) -> dict[str, float]:
  """Trains `config` in `workdir` (resuming if it holds checkpoints); returns final eval metrics.

  `stop_at` ends the run after that step without a final checkpoint, as a kill would
  (used by the resume test). The mesh is JAX's current mesh while the run traces
  (`jax.set_mesh`): implementations that need devices (ring attention over the "sequence"
  axis) read it from there, so the model and the trainer never name them.
  """
  os.makedirs(workdir, exist_ok=True)
  mesh = sharding.make_mesh(config.mesh.to_dict())
  logging.info("mesh %s over %d devices (%s)", dict(mesh.shape), mesh.size, jax.default_backend())
  with jax.set_mesh(mesh):
    return _train_and_evaluate(config, workdir, mesh, stop_at)


def _train_and_evaluate(config, workdir, mesh, stop_at):
  # ------------------------------------------------------------------ data
  ds = builders.dataset(config)
  bytes_per_token = ds.bytes_per_token
  for name, value in ds.baselines().items():
    logging.info("baseline %s: %.4f (test split)", name, value)

  # ------------------------------------------------------------------ model & optimizer
  model_cfg = builders.model_config(config, ds)
  graphdef, abstract, shardings, init = build_state(config, model_cfg, mesh)
  meta = dict(model=builders.model_meta(model_cfg), shapes=checkpoints.state_shapes(abstract))
  num_params = sum(
    int(np.prod(x.shape))
    for x in jax.tree.leaves(nnx.state(nnx.merge(graphdef, abstract)[0], nnx.Param))
  )
  logging.info("model: %s parameters, %s", f"{num_params:,}", model_cfg)

  # ------------------------------------------------------------------ checkpoint / resume
  ckpt = checkpoints.Checkpointer(
    workdir, max_to_keep=config.checkpoint.max_to_keep, async_save=config.checkpoint.async_save
  )
  restored = ckpt.restore(checkpoints.abstract_with_shardings(abstract, shardings), meta)
  if restored is None:
    state, start = init(), 0
  else:
    state, start = restored
  total = config.train.steps

  # ------------------------------------------------------------------ steps
  train_fn = jax.jit(
    functools.partial(steps.train_step, graphdef, seed=config.seed),
    out_shardings=(shardings, None),
    donate_argnums=(0,),
  )
  eval_fn = jax.jit(functools.partial(steps.eval_step, graphdef))
  example = ds.batch(0, config.train.batch_size, "train")
  batch_sh = sharding.batch_shardings(example, mesh)

  def device_batch(step, batch_size, split):
    # Every process computes the same global batch (a function of seed and step) and puts
    # only its own devices' shards (`jax.device_put` of a host array onto a multi-process
    # mesh would first compare the array across processes, a collective per call).
    b = ds.batch(step, batch_size, split)
    return {
      k: jax.make_array_from_callback(b[k].shape, batch_sh[k], lambda index, x=b[k]: x[index])
      for k in ("inputs", "targets", "weights")
    }

  def evaluate():
    sums = None
    for i in range(config.eval.batches):
      out = eval_fn(state, device_batch(i, config.eval.batch_size, "test"))
      sums = out if sums is None else jax.tree.map(jnp.add, sums, out)
    return steps.summarize(jax.device_get(sums), bytes_per_token=bytes_per_token)

  # ------------------------------------------------------------------ train loop
  writer = MetricsWriter(workdir, resume_step=start)
  progress = Progress(start, total)
  if start:
    logging.info("resuming at step %d of %d", start, total)
  eval_metrics: dict[str, float] = {} if start < total else evaluate()
  try:
    for step in range(start, total):
      state, m = train_fn(
        state, device_batch(step, config.train.batch_size, "train"), jnp.asarray(step, jnp.int32)
      )
      m = {k: float(v) for k, v in jax.device_get(m).items()}
      if not (np.isfinite(m["loss"]) and np.isfinite(m["grad_norm"])):
        raise FloatingPointError(
          f"non-finite training metrics at step {step + 1} (loss={m['loss']}, "
          f"grad_norm={m['grad_norm']}); the run stops here and no checkpoint of this state "
          f"is written (latest good one: step {ckpt.latest_step()}). Lower the learning "
          "rate or raise warm-up, then rerun"
        )
      if bytes_per_token:
        m["bits_per_byte"] = m["loss"] / steps.LN2
      done = step + 1
      if step == start:  # steps/s and ETA exclude the first step's compilation
        progress = Progress(done, total)
      writer.write(done, "train", m)
      if done % config.log_every == 0 or done == total:
        logging.info("%s", progress.line(done, m))
      if done % config.eval.every == 0 or done == total:
        eval_metrics = evaluate()
        writer.write(done, "eval", eval_metrics)
        logging.info("eval at step %d: %s", done, eval_metrics)
      if stop_at is not None and done >= stop_at:
        logging.info("stopping at step %d (stop_at)", done)
        break
      if done % config.checkpoint.every == 0 or done == total:
        ckpt.save(done, state, dict(meta, step=done))
  finally:
    writer.close()
    ckpt.close()
  return eval_metrics
