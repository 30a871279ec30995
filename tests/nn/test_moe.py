"""MoE FFN (top-k, not renormalised) and its aux losses (BAM arXiv 2408.08274 §3; Switch
Transformer arXiv 2101.03961; ST-MoE arXiv 2202.08906; spec: architecture.md §12.1, §12.3)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnzoo import nn
from attnzoo.nn import moe
from tests.tolerances import assert_close

B, T, D, F, E = 2, 5, 8, 12, 3


def layer(top_k=1, num_experts=E, seed=0, **kw):
  return nn.MoEFFN(D, F, num_experts, top_k=top_k, rngs=nnx.Rngs(seed), **kw)


def dense_mlp(m: nn.MoEFFN, e: int) -> nn.MLP:
  """Expert e of `m` as a dense gated MLP."""
  mlp = nn.MLP(D, F, gated=True, activation="silu", rngs=nnx.Rngs(0))
  mlp.up.kernel[...] = m.up[...][e]
  mlp.gate.kernel[...] = m.gate[...][e]
  mlp.down.kernel[...] = m.down[...][e]
  return mlp


def x_input(seed=1):
  return jax.random.normal(jax.random.key(seed), (B, T, D))


def test_top1_with_identical_experts_outputs_p_max_times_ffn():
  """The pitfall: top-1 is NOT renormalised, so E copies of one FFN give p_max·FFN(x)."""
  m = layer()
  for name in ("up", "gate", "down"):
    arr = getattr(m, name)[...]
    getattr(m, name)[...] = jnp.broadcast_to(arr[:1], arr.shape)
  m.router[...] = jax.random.normal(jax.random.key(5), (D, E))
  x = x_input()
  p_BTE = jax.nn.softmax(x @ m.router[...], axis=-1)
  p_max = jnp.max(p_BTE, -1, keepdims=True)
  assert float(jnp.max(p_max)) < 0.999  # p_max < 1, so p_max·FFN differs from FFN
  ffn = dense_mlp(m, 0)(x)
  out = m(x)
  assert_close(out, p_max * ffn)
  assert np.abs(np.asarray(out - ffn)).max() > 1e-3


@pytest.mark.parametrize("top_k", [1, 2])
def test_output_is_the_sum_over_the_top_k_of_p_times_expert(top_k):
  m = layer(top_k)
  m.router[...] = jax.random.normal(jax.random.key(6), (D, E))
  x = x_input(2)
  p_BTE = jax.nn.softmax(x @ m.router[...], axis=-1)
  kth = jnp.sort(p_BTE, axis=-1)[..., -top_k, None]
  ys = jnp.stack([dense_mlp(m, e)(x) for e in range(E)], axis=2)  # [B,T,E,D]
  want = jnp.sum(jnp.where(p_BTE >= kth, p_BTE, 0.0)[..., None] * ys, axis=2)
  assert_close(m(x), want)


def test_aux_losses_match_their_formulas_over_valid_tokens():
  m = layer(top_k=1)
  m.router[...] = jax.random.normal(jax.random.key(7), (D, E))
  x = x_input(3)
  valid = jnp.array([[True] * T, [True, True, False, False, False]])
  out, aux = nn.run_with_aux(m, x, valid)
  logits = (x @ m.router[...])[np.asarray(valid)]  # [n_valid, E]
  p = jax.nn.softmax(logits, -1)
  f = np.bincount(np.argmax(logits, -1), minlength=E) / logits.shape[0]
  balance = E * np.sum(f * np.mean(p, 0))
  z = np.mean(jax.nn.logsumexp(logits, -1) ** 2)
  np.testing.assert_allclose(aux.metrics["aux/moe_balance"], balance, rtol=1e-5)
  np.testing.assert_allclose(aux.metrics["aux/router_z"], z, rtol=1e-5)
  np.testing.assert_allclose(aux.loss, 0.01 * balance + 0.001 * z, rtol=1e-5)
  assert out.shape == x.shape


def test_balance_is_one_when_uniform_and_weights_are_configurable():
  m = layer(top_k=1, aux_weights={"moe_balance": 0.5, "router_z": 0.0, "attn_router_z": 9.0})
  m.router[...] = jnp.zeros((D, E))
  _, aux = nn.run_with_aux(m, x_input())
  # Zero router: p = 1/E everywhere and (ties -> expert 0) f = e_0, so L_LB = E·(1·1/E) = 1.
  np.testing.assert_allclose(aux.metrics["aux/moe_balance"], 1.0, rtol=1e-6)
  np.testing.assert_allclose(aux.metrics["aux/router_z"], np.log(E) ** 2, rtol=1e-6)
  np.testing.assert_allclose(aux.loss, 0.5, rtol=1e-6)
  np.testing.assert_allclose(aux.metrics["moe_max_load"], E, rtol=1e-6)  # collapsed on expert 0


def test_gradients_reach_router_and_experts():
  m = layer(top_k=1)
  x = x_input(4)

  def loss(m):
    out, aux = nn.run_with_aux(m, x)
    return jnp.sum(out**2) + aux.loss

  grads = nnx.grad(loss)(m)
  assert float(jnp.abs(grads.router[...]).sum()) > 0
  assert float(jnp.abs(grads.down[...]).sum()) > 0


def test_bad_arguments_name_the_value():
  with pytest.raises(ValueError, match="top_k=4 must be in"):
    layer(top_k=4)
  with pytest.raises(ValueError, match="num_experts=0"):
    layer(num_experts=0)
  assert set(moe.AUX_LOSSES) == {"moe_balance", "router_z"}
