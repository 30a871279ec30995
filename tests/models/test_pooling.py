"""The classifier's pooling seam: `ModelConfig.pool` picks an entry of
`attnzoo.attention.pooling.POOLINGS`; "mean" is the previous behaviour, "lama" trains and adds
exactly its parameters plus the widened head."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from attnzoo import data
from attnzoo.models import ModelConfig, Transformer
from attnzoo.training import builders
from configs import listops, lm_bytes

TINY = dict(
  dim=16, num_layers=1, num_heads=2, mlp_dim=32, knobs=(("softmax", (("implementation", "xla"),)),)
)
CLASSES = 3


def _cfg(**kwargs):
  return ModelConfig(
    task="classify", vocab_size=9, input_len=10, num_classes=CLASSES, pad_id=0, **TINY, **kwargs
  )


def _count(cfg) -> int:
  model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def _batch():
  x = jax.random.randint(jax.random.key(0), (8, 10), 1, 9, jnp.int32)
  x = x.at[:4, 7:].set(0)  # padding
  return x, jnp.arange(8) % CLASSES


def test_mean_pool_is_the_previous_masked_mean_bit_for_bit():
  model = Transformer(_cfg(), rngs=nnx.Rngs(0))
  seen = {}
  entry = model.pool.entry

  def spy(x_BTD, valid_BT, **kwargs):
    seen.update(x=x_BTD, valid=valid_BT)
    return entry.pool(x_BTD, valid_BT, **kwargs)

  model.pool.entry = dataclasses.replace(entry, pool=spy)
  x, _ = _batch()
  logits = model(x)
  # The classifier head as it was before the pooling registry (transformer.py, mean pool).
  keep = seen["valid"][..., None].astype(jnp.float32)
  h = seen["x"]
  pooled = jnp.sum(h.astype(jnp.float32) * keep, axis=1) / jnp.maximum(jnp.sum(keep, axis=1), 1.0)
  expected = model.head(pooled.astype(h.dtype)).astype(jnp.float32)
  np.testing.assert_array_equal(np.asarray(logits), np.asarray(expected))
  np.testing.assert_array_equal(np.asarray(seen["valid"]), np.asarray(x != 0))
  assert model.head.kernel.shape == (16, CLASSES)
  assert jax.tree.leaves(nnx.state(model.pool, nnx.Param)) == []


def test_lama_parameter_count_is_base_plus_factors_plus_the_widened_head():
  D, k, m = 16, 6, 3
  base = _count(_cfg())
  counted = _count(_cfg(pool="lama", pool_knobs=(("num_heads", m), ("rank", k))))
  assert counted - base == D * k + D * k + k * m + (m - 1) * D * CLASSES
  # Defaults: M = 4, k = D // 2.
  assert _count(_cfg(pool="lama")) - base == 2 * D * 8 + 8 * 4 + 3 * D * CLASSES


def test_lama_classifier_trains():
  model = Transformer(_cfg(pool="lama", pool_knobs=(("num_heads", 2),)), rngs=nnx.Rngs(0))
  x, y = _batch()
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  tx = optax.adam(1e-2)
  opt = tx.init(params)

  def loss_fn(params):
    logits = nnx.merge(graphdef, params, rest)(x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  @jax.jit
  def step(params, opt):
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt = tx.update(grads, opt)
    return optax.apply_updates(params, updates), opt, loss, grads

  losses = []
  for i in range(8):
    params, opt, loss, grads = step(params, opt)
    losses.append(float(loss))
    if i == 1:  # after one update P is non-zero, so U and V receive gradient too
      for name in ("w_u", "w_v", "w_p"):
        assert float(jnp.max(jnp.abs(grads["pool"]["params"][name][...]))) > 0
  assert losses[-1] < 0.7 * losses[0], losses


def test_pool_config_errors_name_the_value_and_the_fix():
  with pytest.raises(ValueError, match=r"pool='nope' is not a registered pooling; valid: \['lama'"):
    _cfg(pool="nope")
  with pytest.raises(ValueError, match="task='classify' only"):
    ModelConfig(task="lm", vocab_size=9, input_len=10, pool="lama")
  with pytest.raises(ValueError, match=r"no knobs \['heads'\]"):
    _cfg(pool="lama", pool_knobs=(("heads", 2),))
  with pytest.raises(ValueError, match="rank=0 must be >= 1"):
    _cfg(pool="lama", pool_knobs=(("rank", 0),))


def test_config_plumbs_pool_and_its_knobs():
  ds = data.get_dataset("listops", seq_len=32, max_length=33, min_length=8, max_depth=3)
  config = listops.get_config("smoke")
  assert builders.model_config(config, ds).pool == "mean"  # the default is unchanged
  config = listops.get_config("smoke,pool=lama")
  config.model.pool_knobs.num_heads = 2
  cfg = builders.model_config(config, ds)
  assert (cfg.pool, cfg.pool_knobs) == ("lama", (("num_heads", 2),))
  with pytest.raises(AttributeError):
    config.model.pool_knobs.heads = 2
  lm = lm_bytes.get_config("smoke")
  lm.model.pool = "lama"
  with pytest.raises(ValueError, match="task='classify' only"):
    builders.model_config(lm, data.get_dataset("stdlib", seq_len=32))
