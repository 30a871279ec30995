"""SHRP's own invariants (arXiv 2512.20635; spec: shared/papers/architecture.md §2, inferred
beyond the abstract).

The conformance suite covers shapes, jit, causality, GQA, masked rows and chunked-vs-xla; here:
top-1 gates (exactly one, exactly 1.0), the straight-through router gradient, the usage
counters over valid tokens (also through the layer's state channel), the Switch/MoH balance
loss, the declared head axes and bad input.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnzoo import nn
from attnzoo.attention import dot_product_attention, registry
from attnzoo.attention.heads import shrp
from tests.tolerances import assert_close

B, T, S, N, K, H = 2, 9, 11, 6, 3, 8
D = 16


def inputs(seed=0):
  kq, kk, kv, kx, kr = jax.random.split(jax.random.key(seed), 5)
  q = jax.random.normal(kq, (B, T, N, H))
  k = jax.random.normal(kk, (B, S, K, H))
  v = jax.random.normal(kv, (B, S, K, H))
  x = jax.random.normal(kx, (B, T, D))
  w_router = jax.random.normal(kr, (D, N))  # large enough that tokens pick different heads
  return q, k, v, x, w_router


route = jax.jit(shrp.route)  # jitted: eager dispatch of the routing ops is slower on CPU


@functools.partial(jax.jit, static_argnames="is_causal")
def call(q, k, v, x, w_router, *, usage=None, valid=None, is_causal=False):
  usage = jnp.zeros((N,)) if usage is None else usage
  return shrp.attention(
    q,
    k,
    v,
    x=x,
    w_router=w_router,
    usage=usage,
    valid=valid,
    is_causal=is_causal,
    implementation="xla",
  )


def test_exactly_one_gate_per_token_is_nonzero_and_it_is_exactly_one():
  _, _, _, x, w_router = inputs()
  gates, p, mask = route(x, w_router)
  g = np.asarray(gates)
  np.testing.assert_array_equal((g != 0).sum(-1), 1)
  np.testing.assert_array_equal(g[g != 0], 1.0)
  # The selected head is the router's argmax (np.argmax: first index among ties).
  logits = np.asarray(x) @ np.asarray(w_router)
  np.testing.assert_array_equal(g.argmax(-1), logits.argmax(-1))
  np.testing.assert_array_equal(np.asarray(mask), g)
  assert_close(jnp.sum(p, -1), jnp.ones((B, T)))
  assert len(np.unique(g.argmax(-1))) > 1  # the router does route tokens differently


def test_ties_go_to_the_lower_head_index():
  _, _, _, x, w_router = inputs(seed=1)
  w_router = w_router.at[:, 4].set(w_router[:, 1]).at[:, 5].set(w_router[:, 1])
  gates, _, _ = route(x, w_router)
  g = np.asarray(gates)
  np.testing.assert_array_equal(g[..., 4:], 0.0)
  assert g[..., 1].sum() > 0


@pytest.mark.parametrize("implementation", ["xla", "chunked"])
def test_out_is_the_selected_heads_attention_output_and_zero_elsewhere(implementation):
  q, k, v, x, w_router = inputs(seed=2)
  out, _ = shrp.attention(
    q,
    k,
    v,
    x=x,
    w_router=w_router,
    usage=jnp.zeros((N,)),
    is_causal=True,
    implementation=implementation,
  )
  heads = dot_product_attention(q, k, v, is_causal=True, implementation=implementation)
  onehot = np.asarray(route(x, w_router)[0])[..., None]
  want = np.asarray(heads) * onehot
  if implementation == "xla":  # gates are exactly 0/1: the same numbers, not just close
    np.testing.assert_array_equal(np.asarray(out), want)
  else:
    assert_close(out, want)


def test_task_gradient_reaches_the_router_through_the_straight_through_gate():
  q, k, v, x, w_router = inputs(seed=3)
  cot = jax.random.normal(jax.random.key(4), (B, T, N, H))

  def task(w):
    out, _ = call(q, k, v, x, w)
    return jnp.sum(out * cot)

  grad = jax.grad(task)(w_router)
  # d gate / d W_r = d log p_sel / d W_r (the gate's value stays exactly 1).
  heads = dot_product_attention(q, k, v, implementation="xla")
  _, _, mask = route(x, w_router)
  signal_BT = jnp.sum(jnp.sum(heads * cot, -1) * mask, -1)

  def surrogate(w):
    logp = jax.nn.log_softmax(x @ w, axis=-1)
    return jnp.sum(signal_BT * jnp.sum(logp * mask, -1))

  assert np.abs(np.asarray(grad)).max() > 0
  assert_close(grad, jax.grad(surrogate)(w_router), grad=True)


def test_usage_counts_valid_tokens_per_selected_head_and_accumulates():
  q, k, v, x, w_router = inputs(seed=5)
  valid = jnp.ones((B, T), bool).at[0, 6:].set(False).at[1, 0].set(False)
  start = jnp.arange(N, dtype=jnp.float32)
  _, aux = call(q, k, v, x, w_router, valid=valid, usage=start)
  _, _, mask = route(x, w_router)
  counts = (np.asarray(mask) * np.asarray(valid)[..., None]).sum((0, 1))
  np.testing.assert_array_equal(np.asarray(aux.state["usage"]), np.asarray(start) + counts)
  assert counts.sum() == int(valid.sum())
  assert aux.state["usage"].dtype == jnp.float32
  # Padding tokens change neither the counts nor the balance loss.
  x_pad = jnp.where(valid[..., None], x, 50.0 * jax.random.normal(jax.random.key(6), x.shape))
  _, aux_pad = call(q, k, v, x_pad, w_router, valid=valid, usage=start)
  np.testing.assert_array_equal(np.asarray(aux_pad.state["usage"]), aux.state["usage"])
  np.testing.assert_array_equal(
    np.asarray(aux_pad.losses["shrp_balance"]), aux.losses["shrp_balance"]
  )


def test_balance_loss_is_the_switch_transformer_loss_over_valid_tokens():
  q, k, v, x, w_router = inputs(seed=7)
  valid = jnp.ones((B, T), bool).at[1, 3:].set(False)
  _, aux = call(q, k, v, x, w_router, valid=valid)
  _, p, mask = route(x, w_router)
  keep = np.asarray(valid)
  f = np.asarray(mask)[keep].mean(0)
  P = np.asarray(p)[keep].mean(0)
  assert_close(aux.losses["shrp_balance"], N * np.sum(f * P))
  assert_close(aux.metrics["shrp_max_load"], N * f.max())
  assert_close(aux.metrics["shrp_idle_heads"], np.mean(f == 0))
  # Collapse onto one head: L_b = N (a router whose every logit favours head 2).
  collapsed = jnp.zeros((D, N)).at[:, 2].set(100.0 * jnp.sign(x[0, 0]))
  ones = jnp.ones((B, T, D)) * jnp.sign(x[0, 0])[None, None, :]
  _, aux = call(q, k, v, ones, collapsed)
  assert_close(aux.losses["shrp_balance"], jnp.asarray(float(N)))


def test_layer_writes_usage_through_the_state_channel():
  attn = nn.Attention(
    D,
    num_heads=N,
    num_kv_heads=N,
    head_dim=H,
    family="shrp",
    knobs={"implementation": "xla"},
    is_causal=True,
    rngs=nnx.Rngs(0),
  )
  x = jax.random.normal(jax.random.key(8), (B, T, D))
  for step in (1, 2):
    _, totals = nn.run_with_aux(attn, x)
    nn.apply_state_updates(attn, totals.state)
    usage = np.asarray(attn.family_state["usage"][...])
    assert usage.sum() == step * B * T
  assert totals.loss > 0 and "shrp_max_load" in totals.metrics


def test_registered_family_declares_head_axes_and_weight():
  assert shrp.FAMILY.params["w_router"].head_axis == 1
  assert shrp.FAMILY.state["usage"].head_axis == 0
  assert shrp.FAMILY.aux_losses == {"shrp_balance": 0.01}
  arrays = shrp.FAMILY.init_arrays(jax.random.key(0), registry.Dims(D=D, N=N, K=K, H=H, V=H))
  np.testing.assert_array_equal(np.asarray(arrays["usage"]), 0.0)
  assert 0 < float(jnp.std(arrays["w_router"])) < 0.05


@pytest.mark.parametrize(
  "kw,match",
  [
    (dict(w_router=jnp.zeros((D, N - 1))), r"w_router has shape \(16, 5\)"),
    (dict(usage=jnp.zeros((N + 1,))), r"usage has shape \(7,\)"),
    (dict(x=jnp.zeros((B, T + 1, D))), "x \\(the layer input\\) has shape"),
    (dict(valid=jnp.ones((B, T - 1), bool)), "valid must be bool"),
    (dict(valid=jnp.ones((B, T), jnp.int32)), "valid must be bool"),
  ],
)
def test_bad_input_raises_naming_the_value(kw, match):
  q, k, v, x, w_router = inputs()
  args = {"x": x, "w_router": w_router, "usage": jnp.zeros((N,)), **kw}
  with pytest.raises(ValueError, match=match):
    shrp.attention(q, k, v, **args)
