"""Sigma DiffQKV's own invariants (arXiv 2501.13629; spec: shared/papers/architecture.md §4).

The conformance suite runs the function (softmax); separate K/V head maps of every
implementation: tests/attention/dense/test_diff_kv_heads.py. Here, at the layer: Kk = Kv is GQA,
Kk != Kv is the Eq. 3 dense reference, AugQ's formula and parameter count, half-width keys and
the absorption identity that lets a cache hold them, and bad input.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnzoo import nn
from attnzoo.attention import dot_product_attention as dpa
from attnzoo.attention.heads import diffqkv
from tests.tolerances import assert_close

D, N, K, HD = 32, 8, 4, 4  # model width, query heads, model kv heads, head dim
X = jax.random.normal(jax.random.key(1), (2, 9, D))


def layer(family="diffqkv", seed=0, position="none", **knobs):
  return nn.Attention(
    D,
    num_heads=N,
    num_kv_heads=K,
    head_dim=HD,
    family=family,
    knobs={"implementation": "xla", **knobs},
    position=position,
    is_causal=True,
    rngs=nnx.Rngs(seed),
  )


def count(att) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(att, nnx.Param)))


def proj(x, kernel):
  return jnp.einsum("btd,dkh->btkh", x, kernel[...])


def eq3(x_BSKH, n):
  K_ = x_BSKH.shape[2]
  return x_BSKH[:, :, np.array([i * K_ // n for i in range(n)])]


def dense_causal(q, k_BSNH, v_BSNV, scale):
  logits = jnp.einsum("btnh,bsnh->bnts", q, k_BSNH) * scale
  T, S = q.shape[1], k_BSNH.shape[1]
  logits = jnp.where(np.tril(np.ones((T, S), bool)), logits, -jnp.inf)
  return jnp.einsum("bnts,bsnv->btnv", jax.nn.softmax(logits, -1), v_BSNV)


def test_equal_k_and_v_heads_are_gqa():
  sigma, gqa = layer(), layer("softmax")
  # The switched-off AugQ and half-K arrays are not created: exactly GQA's parameters.
  assert count(sigma) == count(gqa)
  assert set(sigma.projection_params) == {"w_k"}
  for name in ("query", "value", "out"):
    getattr(sigma, name).kernel[...] = getattr(gqa, name).kernel[...]
  sigma.projection_params["w_k"][...] = gqa.key.kernel[...]
  assert_close(sigma(X), gqa(X))


def test_fewer_k_than_v_heads_equal_the_eq3_dense_reference():
  att = layer(num_k_heads=2, num_v_heads=8)
  w_k = att.projection_params["w_k"]
  assert w_k[...].shape == (D, 2, HD) and att.value.kernel[...].shape == (D, 8, HD)
  q = proj(X, att.query.kernel)
  k, v = proj(X, w_k), proj(X, att.value.kernel)
  heads = dense_causal(q, eq3(k, N), eq3(v, N), 1 / np.sqrt(HD))
  want = jnp.einsum("btnv,nvd->btd", heads, att.out.kernel[...])
  assert_close(att(X), want)


def test_augmented_query_formula_and_parameter_count():
  d_hq = 24
  att = layer(aug_q=d_hq)
  p = {k_: att.projection_params[k_][...] for k_ in ("w_k", "q_gate", "q_up", "q_down")}
  assert sum(p[k_].size for k_ in ("q_gate", "q_up", "q_down")) == 3 * (N * HD) * d_hq
  assert count(att) - count(layer()) == 3 * (N * HD) * d_hq
  q0 = proj(X, att.query.kernel)
  q, _, _ = diffqkv.project(p, X, q0, None, None, att.dims)
  flat = q0.reshape(2, 9, N * HD)
  want = (jax.nn.silu(flat @ p["q_gate"]) * (flat @ p["q_up"])) @ p["q_down"]
  assert_close(q, want.reshape(q0.shape))
  assert not np.allclose(np.asarray(q), np.asarray(q0))  # not an identity at init


def test_half_k_absorption_identity():
  kq, kk, kv, ku = jax.random.split(jax.random.key(3), 4)
  q = jax.random.normal(kq, (2, 7, 4, 8))
  k_s = jax.random.normal(kk, (2, 7, 2, 4))  # the small cached keys, H/2 = 4
  v = jax.random.normal(kv, (2, 7, 1, 8))  # Kv = 1 != Kk = 2
  k_up = jax.random.normal(ku, (4, 8))
  attend = jax.jit(functools.partial(dpa, scale=1 / np.sqrt(8), is_causal=True))
  full = attend(q, jnp.einsum("bskc,ch->bskh", k_s, k_up), v)
  small = attend(diffqkv.absorb_k_up(q, k_up), k_s, v)
  assert_close(small, full)


def test_half_k_layer_equals_attention_over_the_small_cached_keys():
  att = layer(half_k=True, num_k_heads=2)
  w_k, k_up = att.projection_params["w_k"][...], att.projection_params["k_up"][...]
  assert w_k.shape == (D, 2, HD // 2) and k_up.shape == (HD // 2, HD)
  q = proj(X, att.query.kernel)
  k_s, v = proj(X, w_k), proj(X, att.value.kernel)
  heads = dpa(diffqkv.absorb_k_up(q, k_up), k_s, v, scale=1 / np.sqrt(HD), is_causal=True)
  want = jnp.einsum("btnv,nvd->btd", heads, att.out.kernel[...])
  assert_close(att(X), want)
  # Half the key parameters, plus the map H/2·H.
  assert count(att) - count(layer(num_k_heads=2)) == -D * 2 * HD // 2 + HD // 2 * HD


def test_full_sigma_layer_trains_a_step_with_finite_gradients():
  att = layer(num_k_heads=1, num_v_heads=4, aug_q=16, half_k=True, position="rope")

  def loss(model):
    return jnp.mean(model(X) ** 2)

  grads = nnx.jit(nnx.grad(loss))(att)
  leaves = jax.tree.leaves(grads)
  assert all(np.isfinite(np.asarray(g)).all() for g in leaves)
  assert float(np.abs(np.asarray(grads.projection_params["q_gate"][...])).sum()) > 0


@pytest.mark.parametrize(
  "knobs, head_dim, match",
  [
    (dict(num_v_heads=3), HD, "multiple of 3 value heads"),
    (dict(num_k_heads=3), HD, "multiple of 3 key heads"),
    (dict(aug_q=-1), HD, "aug_q=-1"),
    (dict(half_k=True), 5, "H=5 is odd"),
  ],
)
def test_bad_layouts_raise(knobs, head_dim, match):
  with pytest.raises(ValueError, match=match):
    nn.Attention(
      D,
      num_heads=N,
      num_kv_heads=K,
      head_dim=head_dim,
      family="diffqkv",
      knobs=knobs,
      rngs=nnx.Rngs(0),
    )
