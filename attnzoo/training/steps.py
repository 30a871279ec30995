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
  """One AdamW step on `batch`. Returns the new state and this step's metrics
  (loss and accuracy before the update, and the global gradient norm)."""
  model, optimizer = nnx.merge(graphdef, state)
  dropout_key = jax.random.fold_in(jax.random.key(seed), step)

  def loss_fn(model):
    logits = model(batch["inputs"], deterministic=False, rngs=nnx.Rngs(dropout=dropout_key))
    sums = metric_sums(logits, batch)
    return sums["loss_sum"] / jnp.maximum(sums["weight_sum"], 1.0), sums

  (loss, sums), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
  optimizer.update(model, grads)
  metrics = dict(
    loss=loss,
    accuracy=sums["correct_sum"] / jnp.maximum(sums["weight_sum"], 1.0),
    grad_norm=optax.tree.norm(grads),
  )
  return nnx.state((model, optimizer)), metrics


def eval_step(graphdef, state, batch):
  """Metric sums of the model on `batch` (no dropout); the caller adds them up."""
  model, _ = nnx.merge(graphdef, state)
  return metric_sums(model(batch["inputs"], deterministic=True), batch)


def summarize(sums: dict[str, float], *, bytes_per_token: float | None) -> dict[str, float]:
  """loss (nats/token), accuracy, and bits per byte where tokens are bytes."""
  w = max(float(sums["weight_sum"]), 1.0)
  out = dict(loss=float(sums["loss_sum"]) / w, accuracy=float(sums["correct_sum"]) / w)
  if bytes_per_token:
    out["bits_per_byte"] = out["loss"] / LN2 / bytes_per_token
  return out
