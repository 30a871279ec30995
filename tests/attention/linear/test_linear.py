"""Tests of the linear-attention family (attnzoo.attention.linear) and the TNL pieces."""

from __future__ import annotations

import time

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnzoo.attention import registry
from attnzoo.attention.linear import linear, tnl
from tests import tolerances

REFERENCES = ("xla", "recurrent", "chunked")
FAST = ("chunked", "pallas")


def _inputs(seed, b=1, t=37, n=4, kh=2, h=16, vd=8, s=None, dtype=jnp.float32):
  # numpy RNG: eager jax.random would compile once per shape, which dominates small tests.
  rng = np.random.default_rng(seed)
  s = t if s is None else s
  q = jnp.asarray(rng.normal(size=(b, t, n, h)) * 0.3, dtype)
  k = jnp.asarray(rng.normal(size=(b, s, kh, h)) * 0.3, dtype)
  # Small inputs as in the official repo's tests: without a softmax (or the TNL output norm) the
  # outputs grow with Σ_s λ^{t-s} q·k; small inputs keep them O(1), as a normaliser would.
  v = jnp.asarray(rng.normal(size=(b, s, kh, vd)) * 0.1, dtype)
  state0 = jnp.asarray(rng.normal(size=(b, n, h, vd)) * 0.1, jnp.float32)
  return q, k, v, state0


DECAY4 = jnp.log(jnp.asarray([0.99, 0.9, 0.5, 0.05], jnp.float32))


def _run(implementation, q, k, v, state0=None, **kw):
  kw.setdefault("block_size", 16)
  return linear.attention(
    q, k, v, initial_state=state0, return_final_state=True, implementation=implementation, **kw
  )


def _loss_grads(implementation, q, k, v, state0, decay, **kw):
  """Gradients of a generic scalar of (out, final state) w.r.t. q, k, v, decay, state0."""
  rng = np.random.default_rng(7)
  w_out = jnp.asarray(rng.normal(size=q.shape[:3] + v.shape[3:]), jnp.float32)
  w_state = jnp.asarray(rng.normal(size=state0.shape), jnp.float32)

  def loss(q, k, v, decay, state0):
    out, state = _run(implementation, q, k, v, state0, decay=decay, **kw)
    return jnp.sum(out.astype(jnp.float32) * w_out) + jnp.sum(state * w_state)

  return jax.grad(loss, argnums=(0, 1, 2, 3, 4))(q, k, v, decay, state0)


# ------------------------------------------------------------------------------------------------
# The three references (and the kernel) agree: forward, final state, gradients.
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("feature_map", [None, "elu1", "silu"])
@pytest.mark.parametrize("implementation", ["recurrent", "chunked", "pallas"])
def test_matches_quadratic_reference(implementation, feature_map):
  q, k, v, state0 = _inputs(0)  # T=37 is not a multiple of block_size=16; GQA N=4, K=2
  # scale=1/4: elu1(x) ≈ 1 + x makes φ(q)·φ(k) ≈ H; the scale keeps outputs O(1), as a norm would.
  kw = dict(decay=DECAY4, feature_map=feature_map, scale=0.25)
  out_ref, state_ref = _run("xla", q, k, v, state0, **kw)
  out, state = _run(implementation, q, k, v, state0, **kw)
  tolerances.assert_close(out, out_ref, err_msg="out")
  tolerances.assert_close(state, state_ref, err_msg="final state")


@pytest.mark.parametrize("implementation", ["recurrent", "chunked", "pallas"])
def test_gradients_match_quadratic_reference(implementation):
  q, k, v, state0 = _inputs(1)
  kw = dict(feature_map="elu1", scale=0.25)  # scale: see test_matches_quadratic_reference
  grads_ref = _loss_grads("xla", q, k, v, state0, DECAY4, **kw)
  grads = _loss_grads(implementation, q, k, v, state0, DECAY4, **kw)
  # d decay is an O(T)-weighted sum over all tokens, ~T·|dq|: assert_close measures each gradient
  # against its own magnitude.
  for name, g, g_ref in zip(("dq", "dk", "dv", "ddecay", "dstate0"), grads, grads_ref, strict=True):
    tolerances.assert_close(g, g_ref, grad=True, err_msg=name)


@pytest.mark.slow
@hypothesis.settings(max_examples=8, deadline=None)
@hypothesis.given(
  t=st.integers(1, 70),
  block=st.sampled_from([8, 16, 32]),
  groups=st.sampled_from([1, 2, 4]),
  with_decay=st.booleans(),
  with_state=st.booleans(),
)
def test_chunked_matches_reference_property(t, block, groups, with_decay, with_state):
  q, k, v, state0 = _inputs(t, t=t, n=4, kh=4 // groups, h=8, vd=8)
  state0 = state0 if with_state else None
  decay = DECAY4 if with_decay else None
  out_ref, st_ref = _run("xla", q, k, v, state0, decay=decay)
  out, st_ = _run("chunked", q, k, v, state0, decay=decay, block_size=block)
  tolerances.assert_close(out, out_ref)
  tolerances.assert_close(st_, st_ref)


@pytest.mark.parametrize("implementation", ["xla", "recurrent", "chunked", "pallas"])
def test_state_carry_equals_one_pass(implementation):
  q, k, v, state0 = _inputs(2, t=45)
  out_full, state_full = _run(implementation, q, k, v, state0, decay=DECAY4)
  cut = 21  # neither part a multiple of the block
  out_a, state_a = _run(implementation, q[:, :cut], k[:, :cut], v[:, :cut], state0, decay=DECAY4)
  out_b, state_b = _run(implementation, q[:, cut:], k[:, cut:], v[:, cut:], state_a, decay=DECAY4)
  tolerances.assert_close(jnp.concatenate([out_a, out_b], 1), out_full)
  tolerances.assert_close(state_b, state_full)


def test_decode_steps_equal_attention():
  q, k, v, _ = _inputs(3, t=12)
  state = linear.init_state(1, 4, 16, 8)
  outs = []
  for i in range(q.shape[1]):
    out_t, state = linear.decode_step(
      state, q[:, i], k[:, i], v[:, i], decay=DECAY4, feature_map="elu1"
    )
    outs.append(out_t)
  out_ref, state_ref = _run("xla", q, k, v, decay=DECAY4, feature_map="elu1")
  tolerances.assert_close(jnp.stack(outs, 1), out_ref)
  tolerances.assert_close(state, state_ref)


# The shared conformance suite runs from the registry (tests/attention/test_conformance.py:
# settings "decay" and "elu1" of `linear.FAMILY.conformance`, every implementation).


@pytest.mark.parametrize("implementation", linear.FAMILY.implementations)
def test_non_causal(implementation):
  q, k, v, state0 = _inputs(8, t=11, s=29)  # T != S is allowed without causality
  out, state = _run(implementation, q, k, v, state0, is_causal=False, feature_map="elu1")
  phi = linear.elu1
  kv = jnp.einsum("bskh,bskv->bkhv", phi(k), v)
  expected_state = state0 + jnp.repeat(kv, 2, axis=1)
  tolerances.assert_close(state, expected_state)
  tolerances.assert_close(out, jnp.einsum("btnh,bnhv->btnv", phi(q), expected_state))


def test_default_implementation_on_cpu_is_chunked():
  assert registry.resolve_implementation(None, linear._CAUSAL, family="linear") == "chunked"
  assert linear.FAMILY.name == "linear" and not linear.FAMILY.supports_mask
  assert linear.FAMILY.decode_step is linear.decode_step


# ------------------------------------------------------------------------------------------------
# Bad input.
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwarg", ["mask", "bias", "segment_ids", "logits_soft_cap"])
def test_rejects_softmax_only_kwargs(kwarg):
  q, k, v, _ = _inputs(9, t=8)
  with pytest.raises(TypeError, match="linear attention does not take"):
    linear.attention(q, k, v, **{kwarg: jnp.ones((8, 8), bool)})


@pytest.mark.parametrize(
  "kwargs, match",
  [
    (dict(decay=jnp.asarray([0.1, -0.1, -0.1, -0.1])), "<= 0"),
    (dict(decay=jnp.asarray([-jnp.inf, -0.1, -0.1, -0.1])), "finite"),
    (dict(decay=jnp.zeros((3,))), r"expected \(4,\)"),
    (dict(feature_map="relu2"), "feature_map"),
    (dict(implementation="flash"), "implementation"),
    (dict(block_size=12), "block_size"),
    (dict(is_causal=False, decay=DECAY4), "only defined for causal"),
    (dict(initial_state=jnp.zeros((1, 4, 16, 9))), "initial_state"),
  ],
)
def test_rejects_bad_arguments(kwargs, match):
  q, k, v, _ = _inputs(10, t=8)
  with pytest.raises(ValueError, match=match):
    linear.attention(q, k, v, **kwargs)


# The layout errors come from attnzoo.attention._validate, as for every family: one message each.
@pytest.mark.parametrize(
  "shapes, match",
  [
    (((1, 8, 4, 16), (1, 8, 2, 16), (8, 2, 8)), "v must have rank 4"),
    (((1, 8, 3, 16), (1, 8, 2, 16), (1, 8, 2, 8)), "N=3 must be a multiple of kv heads K=2"),
    (((1, 8, 4, 16), (1, 8, 2, 12), (1, 8, 2, 8)), "head dim H=16 differs from k head dim 12"),
    (((1, 8, 4, 16), (2, 8, 2, 16), (2, 8, 2, 8)), "batch sizes differ: q 1, k 2, v 2"),
    (((1, 8, 4, 16), (1, 8, 2, 16), (1, 9, 2, 8)), "k has S=8 positions but v has 9"),
    (((1, 8, 4, 16), (1, 8, 2, 16), (1, 8, 1, 8)), "k has K=2 heads but v has 1"),
    (((1, 8, 4, 16), (1, 9, 2, 16), (1, 9, 2, 8)), "causal linear attention needs S == T"),
  ],
)
@pytest.mark.parametrize("implementation", linear.FAMILY.implementations)
def test_rejects_bad_shapes(shapes, match, implementation):
  q, k, v = (jnp.zeros(shape) for shape in shapes)
  with pytest.raises(ValueError, match=match):
    linear.attention(q, k, v, implementation=implementation)


def test_rejects_integer_inputs():
  q, k, v, _ = _inputs(11, t=8)
  with pytest.raises(TypeError, match="k must be a floating-point array"):
    linear.attention(q, k.astype(jnp.int32), v)


def test_shape_errors_match_the_softmax_family():
  from attnzoo.attention.dense.softmax import dot_product_attention  # noqa: PLC0415

  q, k, v = jnp.zeros((1, 8, 3, 16)), jnp.zeros((1, 8, 2, 16)), jnp.zeros((1, 8, 2, 8))
  messages = []
  for attend in (linear.attention, dot_product_attention):
    with pytest.raises(ValueError) as info:
      attend(q, k, v)
    messages.append(str(info.value))
  assert messages[0] == messages[1]


def test_decode_step_rejects_bad_heads_like_attention():
  state = jnp.zeros((1, 3, 16, 8))
  with pytest.raises(ValueError, match="N=3 must be a multiple of kv heads K=2"):
    linear.decode_step(state, jnp.zeros((1, 3, 16)), jnp.zeros((1, 2, 16)), jnp.zeros((1, 2, 8)))


# ------------------------------------------------------------------------------------------------
# Numerical robustness.
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
  "implementation, log_lambda", [("chunked", -30.0), ("chunked", -1e4), ("pallas", -1e4)]
)
def test_strong_decay_is_finite_and_local(implementation, log_lambda):
  """λ -> 0: o_t -> (q_t·k_t) v_t; no 0·inf anywhere, forward or backward."""
  q, k, v, state0 = _inputs(12, t=40)
  decay = jnp.full((4,), log_lambda)
  out, state = _run(implementation, q, k, v, state0, decay=decay)
  out_rec, state_rec = _run("recurrent", q, k, v, state0, decay=decay)
  tolerances.assert_close(out, out_rec)
  tolerances.assert_close(state, state_rec)
  local = jnp.einsum("btnh,btnh,btnv->btnv", q, jnp.repeat(k, 2, 2), jnp.repeat(v, 2, 2))
  tolerances.assert_close(out, local)
  grads = _loss_grads(implementation, q, k, v, state0, decay)
  assert all(np.isfinite(np.asarray(g)).all() for g in grads)


@pytest.mark.parametrize("implementation", ["chunked", "pallas"])
def test_no_decay_matches_cumulative_sum(implementation):
  q, k, v, _ = _inputs(13, t=33)
  out = _run(implementation, q, k, v, decay=jnp.zeros((4,)))[0]
  out_none = _run(implementation, q, k, v)[0]
  kv_t = jnp.cumsum(jnp.einsum("btkh,btkv->btkhv", k, v), axis=1)
  expected = jnp.einsum("btnh,btnhv->btnv", q, jnp.repeat(kv_t, 2, axis=2))
  tolerances.assert_close(out, expected)
  tolerances.assert_close(out_none, expected)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_long_sequence_chunked_matches_recurrence(dtype):
  """T = 64k with TNL decays: finite, and equal to the token recurrence on the same inputs."""
  t = 65536
  q, k, v, _ = _inputs(14, t=t, n=4, kh=2, h=16, vd=16, dtype=dtype)
  decay = tnl.tnl_slopes(4, 0, 2)
  start = time.perf_counter()
  out, state = _run("chunked", q, k, v, decay=decay, block_size=64)
  out_rec, state_rec = _run("recurrent", q, k, v, decay=decay)
  assert np.isfinite(np.asarray(out, np.float32)).all() and np.isfinite(np.asarray(state)).all()
  tolerances.assert_close(out, out_rec, dtype)
  tolerances.assert_close(state, state_rec)
  assert time.perf_counter() - start < 120


# ------------------------------------------------------------------------------------------------
# TransNormerLLM pieces and feature maps.
# ------------------------------------------------------------------------------------------------


def test_tnl_slopes_follow_official_code():
  # H = 8: ALiBi slopes 2^{-(h+1)}; first layer factor 1 + 1e-5, last layer 1e-5.
  np.testing.assert_allclose(
    tnl.tnl_slopes(8, 0, 4), -(2.0 ** -np.arange(1, 9)) * (1 + 1e-5), rtol=1e-6
  )
  np.testing.assert_allclose(tnl.tnl_slopes(8, 3, 4), -(2.0 ** -np.arange(1, 9)) * 1e-5, rtol=1e-5)
  # H = 6 (not a power of two): 4 slopes of H=4, then every other slope of H=8.
  np.testing.assert_allclose(tnl.alibi_slopes(6), [2**-2, 2**-4, 2**-6, 2**-8, 2**-1, 2**-3])
  with pytest.raises(ValueError, match="layer_idx"):
    tnl.tnl_slopes(8, 4, 4)


def test_srms_norm_and_norm_attention_output():
  x = jax.random.normal(jax.random.key(0), (2, 5, 4, 8)) * 3.0
  y = tnl.norm_attention_output(x)
  assert y.shape == (2, 5, 32)
  np.testing.assert_allclose(np.sqrt(np.mean(np.asarray(y) ** 2, -1)), 1.0, rtol=1e-5)
  gate = jax.nn.sigmoid(jax.random.normal(jax.random.key(1), (2, 5, 32)))
  tolerances.assert_close(tnl.norm_attention_output(x, gate), y * gate)
  np.testing.assert_array_equal(np.asarray(tnl.srms_norm(jnp.zeros((3, 8)))), 0.0)


def test_elu1_equals_elu_plus_one():
  x = jnp.linspace(-20.0, 5.0, 101)
  tolerances.assert_close(linear.elu1(x), jax.nn.elu(x) + 1.0)
