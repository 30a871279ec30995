"""The layer inputs "train" and "rng": the attention layer and the model hand a family the
training flag and a per-layer, per-step key drawn from the dropout stream, only when it lists
them, and a family that does not list "rng" leaves the stream as it was."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnzoo import attention, nn
from attnzoo.attention import dot_product_attention, knobs, registry
from attnzoo.models import ModelConfig, Transformer

D, N, H, B, T = 16, 2, 8, 2, 6
SEEN: list[tuple[bool, np.ndarray | None]] = []


def _probe(q, k, v, *, mask=None, is_causal=False, train=False, rng=None, implementation=None):
  """Softmax attention that records the layer inputs it was given (eager calls only)."""
  SEEN.append((train, None if rng is None else np.asarray(jax.random.key_data(rng))))
  return dot_product_attention(q, k, v, mask=mask, is_causal=is_causal, implementation="xla")


PROBE = registry.Family(
  name="probe", attention=_probe, implementations=("xla",), layer_inputs=("train", "rng")
)


@pytest.fixture(autouse=True)
def probe_registered(monkeypatch):
  monkeypatch.setitem(attention.FAMILIES, "probe", PROBE)
  SEEN.clear()


def _layer(family="probe"):
  return nn.Attention(
    D, num_heads=N, num_kv_heads=N, head_dim=H, family=family, is_causal=True, rngs=nnx.Rngs(0)
  )


def _x():
  return jax.random.normal(jax.random.key(0), (B, T, D), jnp.float32)


def _data(key):
  return np.asarray(jax.random.key_data(key))


def test_train_and_rng_are_layer_inputs_not_knobs():
  assert {"train", "rng"} <= set(registry.LAYER_INPUTS)
  assert not {"train", "rng"} & set(knobs.family_knobs("probe"))


def test_layer_passes_the_flag_and_draws_a_key_only_in_training():
  layer, x = _layer(), _x()
  layer(x)
  layer(x, train=True)  # training without rngs: no key
  rngs = nnx.Rngs(dropout=jax.random.key(7))
  layer(x, train=False, rngs=rngs)  # eval: no key, and the stream is not advanced
  layer(x, train=True, rngs=rngs)
  layer(x, train=True, rngs=rngs)
  first, second = (_data(k) for k in (lambda r: (r.dropout(), r.dropout()))(nnx.Rngs(dropout=7)))
  assert [t for t, _ in SEEN] == [False, True, False, True, True]
  assert [r is None for _, r in SEEN] == [True, True, True, False, False]
  np.testing.assert_array_equal(SEEN[3][1], first)  # the stream's first draw: eval took none
  np.testing.assert_array_equal(SEEN[4][1], second)  # each call draws a fresh key


def test_a_family_that_does_not_read_rng_leaves_the_stream_alone():
  rngs = nnx.Rngs(dropout=jax.random.key(3))
  _layer("softmax")(_x(), train=True, rngs=rngs)
  np.testing.assert_array_equal(_data(rngs.dropout()), _data(nnx.Rngs(dropout=3).dropout()))


def test_bad_train_flag_and_missing_stream_raise():
  layer, x = _layer(), _x()
  with pytest.raises(TypeError, match="Python bool"):
    layer(x, train=jnp.array(True))
  with pytest.raises(ValueError, match="dropout"):
    layer(x, train=True, rngs=nnx.Rngs(params=0))


def test_model_gives_each_layer_its_own_key_as_a_function_of_seed_and_step():
  cfg = ModelConfig(
    task="lm", vocab_size=11, input_len=T, dim=D, num_layers=2, num_heads=N, mlp_dim=32,
    attention=("probe",), dropout=0.1,
  )  # fmt: skip
  model = Transformer(cfg, rngs=nnx.Rngs(0))
  tokens = jax.random.randint(jax.random.key(1), (B, T), 0, 11, jnp.int32)

  def keys(step):  # the trainer's rngs for `step` (attnzoo.training.steps.train_step)
    SEEN.clear()
    model(
      tokens,
      deterministic=False,
      rngs=nnx.Rngs(dropout=jax.random.fold_in(jax.random.key(0), step)),
    )
    assert [t for t, _ in SEEN] == [True, True]
    return [r for _, r in SEEN]

  step3, again, step4 = keys(3), keys(3), keys(4)
  assert not np.array_equal(step3[0], step3[1])  # one key per layer
  for a, b in zip(step3, again, strict=True):
    np.testing.assert_array_equal(a, b)  # reproducible: a function of (seed, step)
  for a, b in zip(step3, step4, strict=True):
    assert not np.array_equal(a, b)
  SEEN.clear()
  model(tokens)  # eval
  assert SEEN == [(False, None), (False, None)]
