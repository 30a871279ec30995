"""Pure train and eval steps. The trainer jits them with shardings and donation.

State is the nnx state of the pair (model, optimizer); `graphdef` is static. Dropout
keys are `fold_in(key(seed), step)`: the step's randomness is a pure function of the
seed and the step, which is what makes an interrupted run resume exactly.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from attnzoo import nn

LN2 = math.log(2.0)


def metric_sums(logits, batch) -> dict[str, jax.Array]:
  """Weighted sums of cross-entropy (nats) and correct predictions, and the weight total.

  LM: logits [B, L, V], targets [B, L]; classifier: logits [B, C], targets [B].
  """
  targets, weights = batch["targets"], batch["weights"].astype(jnp.float32)
  xent = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
  correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
  return dict(
    loss_sum=jnp.sum(xent * weights),
    correct_sum=jnp.sum(correct * weights),
    weight_sum=jnp.sum(weights),
  )


def train_step(graphdef, state, batch, step, *, seed: int):
  """One AdamW step on `batch`. Returns the new state and this step's metrics: loss (the task's
  cross-entropy) and accuracy before the update, the global gradient norm, and, for families
  with aux outputs, `aux_loss` (weighted sum added to the objective) and every aux metric.

  Carried family state (EMA centroids, usage counters) is written after the optimizer step."""
  model, optimizer = nnx.merge(graphdef, state)
  dropout_key = jax.random.fold_in(jax.random.key(seed), step)

  def loss_fn(model):
    logits, aux = nn.run_with_aux(
      model, batch["inputs"], deterministic=False, rngs=nnx.Rngs(dropout=dropout_key)
    )
    sums = metric_sums(logits, batch)
    loss = sums["loss_sum"] / jnp.maximum(sums["weight_sum"], 1.0)
    return loss + aux.loss, (loss, sums, aux)

  (_, (loss, sums, aux)), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
  optimizer.update(model, grads)
  nn.apply_state_updates(model, aux.state)
  metrics = dict(
    loss=loss,
    accuracy=sums["correct_sum"] / jnp.maximum(sums["weight_sum"], 1.0),
    grad_norm=optax.tree.norm(grads),
  )
  if aux.metrics:
    metrics.update(aux_loss=aux.loss, **aux.metrics)
  return nnx.state((model, optimizer)), metrics


def eval_step(graphdef, state, batch):
  """Metric sums of the model on `batch` (no dropout); the caller adds them up. Aux outputs
  are computed and dropped, and carried state is left as it is."""
  model, _ = nnx.merge(graphdef, state)
  logits, _ = nn.run_with_aux(model, batch["inputs"], deterministic=True)
  return metric_sums(logits, batch)


def summarize(sums: dict[str, float], *, bytes_per_token: float | None) -> dict[str, float]:
  """loss (nats/token), accuracy, and bits per byte where tokens are bytes."""
  w = max(float(sums["weight_sum"]), 1.0)
  out = dict(loss=float(sums["loss_sum"]) / w, accuracy=float(sums["correct_sum"]) / w)
  if bytes_per_token:
    out["bits_per_byte"] = out["loss"] / LN2 / bytes_per_token
  return out
