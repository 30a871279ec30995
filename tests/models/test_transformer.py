"""The transformer stack: causality, pooling, image path, hybrid stacks, config checks."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnzoo import attention as attention_lib
from attnzoo import nn
from attnzoo.models import ModelConfig, Transformer, patchify
from tests import tolerances

# The readable "xla" path keeps these eager tests fast; implementations are tested
# against each other in tests/attention.
TINY = dict(dim=16, num_layers=2, num_heads=2, mlp_dim=32, knobs=(("implementation", "xla"),))


def _tokens(shape, vocab, seed=0):
  return jax.random.randint(jax.random.key(seed), shape, 0, vocab, jnp.int32)


@pytest.mark.parametrize("position", ["rope", "alibi", "learned"])
def test_causal_lm_cannot_see_the_future(position):
  cfg = ModelConfig(
    task="lm", vocab_size=11, input_len=10, position=position, num_kv_heads=1, **TINY
  )
  model = Transformer(cfg, rngs=nnx.Rngs(0))
  x = _tokens((2, 10), 11)
  t = 4
  y = x.at[:, t + 1 :].set((x[:, t + 1 :] + 3) % 11)  # change only the future of t
  out_x, out_y = model(x), model(y)
  assert out_x.shape == (2, 10, 11)
  np.testing.assert_array_equal(np.asarray(out_x[:, : t + 1]), np.asarray(out_y[:, : t + 1]))
  assert float(jnp.max(jnp.abs(out_x[:, t + 1 :] - out_y[:, t + 1 :]))) > 1e-4


def test_classifier_without_positions_is_permutation_invariant():
  cfg = ModelConfig(
    task="classify", vocab_size=7, input_len=9, num_classes=3, position="none", **TINY
  )
  model = Transformer(cfg, rngs=nnx.Rngs(0))
  x = _tokens((2, 9), 7)
  perm = np.random.default_rng(0).permutation(9)
  out = model(x)
  assert out.shape == (2, 3)
  tolerances.assert_close(model(x[:, perm]), out)


def test_classifier_pools_over_non_pad_tokens_only():
  cfg = ModelConfig(
    task="classify", vocab_size=7, input_len=8, num_classes=3, position="none", pad_id=0, **TINY
  )
  model = Transformer(cfg, rngs=nnx.Rngs(0))
  x = jnp.array([[3, 4, 5, 6, 1, 2, 3, 4]])
  # Appending padding changes attention (pads are keys) but not which tokens are pooled;
  # so compare against a model whose pads are pooled: they must differ.
  padded = x.at[:, 6:].set(0)
  unmasked = Transformer(dataclasses.replace(cfg, pad_id=-1), rngs=nnx.Rngs(0))
  assert float(jnp.max(jnp.abs(model(padded) - unmasked(padded)))) > 1e-5
  tolerances.assert_close(model(x), unmasked(x))  # no pads present: identical


def test_patchify_is_row_major_patches():
  pixels = jnp.arange(2 * 4 * 6).reshape(2, 24)
  patches = patchify(pixels, (4, 6), (2, 3))
  assert patches.shape == (2, 4, 6)
  img = np.arange(24).reshape(4, 6)
  np.testing.assert_array_equal(patches[0, 1], img[0:2, 3:6].ravel())
  np.testing.assert_array_equal(patches[0, 2], img[2:4, 0:3].ravel())


def test_neighborhood_mask_sees_the_2d_token_grid():
  cfg = ModelConfig(
    task="classify",
    vocab_size=17,
    input_len=64,
    num_classes=10,
    spatial_shape=(8, 8),
    patch_size=(2, 2),
    mask="neighborhood",
    mask_kwargs=(("window", 3),),
    position="none",
    **TINY,
  )
  model = Transformer(cfg, rngs=nnx.Rngs(0))
  assert cfg.token_grid == (4, 4)
  mask = model.blocks[0].attn.mask
  assert tuple(mask.shape) == (4, 4)
  # One attention layer: output token 0 (grid corner) depends only on its 3x3 window.
  attn = nn.Attention(
    16,
    num_heads=2,
    num_kv_heads=2,
    head_dim=8,
    mask=mask,
    rngs=nnx.Rngs(0),
    knobs=dict(implementation="xla"),
  )
  x = jax.random.normal(jax.random.key(0), (1, 16, 16))
  grad = jax.grad(lambda x: jnp.sum(attn(x)[0, 0]))(x)
  touched = np.asarray(jnp.any(grad[0] != 0, axis=-1)).reshape(4, 4)
  expected = np.zeros((4, 4), bool)
  expected[:3, :3] = True
  np.testing.assert_array_equal(touched, expected)
  assert model(_tokens((2, 64), 17)).shape == (2, 10)


def test_hybrid_stack_uses_one_family_per_layer(monkeypatch):
  calls = []

  def uniform(q, k, v, *, is_causal=False, **_):
    calls.append("uniform")
    G = q.shape[2] // k.shape[2]
    return jnp.broadcast_to(jnp.repeat(v, G, axis=2).mean(axis=1, keepdims=True), q.shape)

  fam = attention_lib.Family(
    name="uniform", attention=uniform, implementations=("xla",), supports_mask=False
  )
  monkeypatch.setitem(attention_lib.FAMILIES, "uniform", fam)
  cfg = ModelConfig(
    task="classify",
    vocab_size=5,
    input_len=6,
    num_classes=2,
    position="none",
    attention=("uniform", "softmax"),
    **dict(TINY, num_layers=4),
  )
  model = Transformer(cfg, rngs=nnx.Rngs(0))
  assert [b.attn.family.name for b in model.blocks] == ["uniform", "softmax"] * 2
  model(_tokens((1, 6), 5))
  assert calls == ["uniform", "uniform"]


@pytest.mark.parametrize(
  "kwargs, match",
  [
    (dict(task="seq2seq"), "task"),
    (dict(task="classify", num_classes=1), "num_classes"),
    (dict(num_heads=5), "divisible"),
    (dict(num_kv_heads=3), "divisible"),
    (dict(spatial_shape=(4, 4), patch_size=(3, 3), input_len=16), "tile"),
    (dict(mlp="moe"), "mlp"),
  ],
)
def test_model_config_rejects_bad_values(kwargs, match):
  base = dict(task="lm", vocab_size=8, input_len=8, dim=12, num_heads=4)
  with pytest.raises(ValueError, match=match):
    ModelConfig(**{**base, **kwargs})
