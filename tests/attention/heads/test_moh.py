"""MoH's own invariants (arXiv 2410.11842; spec: shared/papers/architecture.md §1.3).

The conformance suite (generated from the registry) covers shapes, jit, causality, GQA, masked
rows and chunked-vs-xla; here: the gate algebra of both conventions, the load-balance loss and
its valid-token statistics, the qnorm router, and bad input.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnzoo.attention import dot_product_attention, registry
from attnzoo.attention.heads import moh
from tests.tolerances import assert_close

B, T, S, N, K, H, V = 2, 9, 11, 8, 4, 8, 8
D = 16


def inputs(seed=0, n=N, t=T, s=S):
  kq, kk, kv, kx = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(kq, (B, t, n, H))
  k = jax.random.normal(kk, (B, s, K, H))
  v = jax.random.normal(kv, (B, s, K, V))
  x = jax.random.normal(kx, (B, t, D))
  return q, k, v, x


def router(seed=1, n=N, scale=1.0):
  """Router weights large enough that routing differs between tokens."""
  kr, km = jax.random.split(jax.random.key(seed))
  return scale * jax.random.normal(kr, (D, n)), scale * jax.random.normal(km, (D, 2))


def gates_of(x, w_router, w_mix, *, num_shared, top_k, gates="code", q=None):
  q = jnp.zeros(x.shape[:2] + (w_router.shape[1], H)) if q is None else q
  return moh.head_gates(q, x, w_router, w_mix, num_shared=num_shared, top_k=top_k, gates=gates)


# ------------------------------------------------------------------ equivalence with MHA


@pytest.mark.parametrize("num_shared", [0, 1, 4])
@pytest.mark.parametrize("implementation", ["xla", "chunked"])
def test_zero_router_with_all_routed_heads_active_is_plain_mha(num_shared, implementation):
  q, k, v, x = inputs()
  out, _ = moh.attention(
    q,
    k,
    v,
    x=x,
    w_router=jnp.zeros((D, N)),
    w_mix=jnp.zeros((D, 2)),
    num_shared=num_shared,
    top_k=N - num_shared,
    implementation=implementation,
  )
  mha = dot_product_attention(q, k, v, implementation=implementation)
  # Head counts are powers of two, so every gate is exactly 1 (h·(1/h), 2·½) and so is out.
  np.testing.assert_array_equal(np.asarray(out), np.asarray(mha))


def test_paper_gates_are_code_gates_without_the_count_factors():
  _, _, _, x = inputs(seed=2)
  w_router, w_mix = router()
  h_s = 3
  code, *_ = gates_of(x, w_router, w_mix, num_shared=h_s, top_k=N - h_s, gates="code")
  paper, *_ = gates_of(x, w_router, w_mix, num_shared=h_s, top_k=N - h_s, gates="paper")
  # With every routed head active the top-K renormaliser is Σp = 1: the conventions differ by
  # the code's factors 2·h_s (shared) and 2·K (routed) only.
  factor = jnp.array([2.0 * h_s] * h_s + [2.0 * (N - h_s)] * (N - h_s))
  assert_close(code, paper * factor[None, None, :])
  assert_close(jnp.sum(paper, -1), jnp.ones((B, T)))


# ------------------------------------------------------------------ gate structure


@pytest.mark.parametrize("gates", ["code", "paper"])
@pytest.mark.parametrize("num_shared,top_k", [(2, 1), (2, 3), (4, 2), (0, 5)])
def test_exactly_top_k_routed_gates_are_nonzero_and_shared_gates_positive(gates, num_shared, top_k):
  _, _, _, x = inputs(seed=3)
  w_router, w_mix = router()
  g, p, mask, _ = gates_of(x, w_router, w_mix, num_shared=num_shared, top_k=top_k, gates=gates)
  routed = np.asarray(g[..., num_shared:])
  np.testing.assert_array_equal((routed != 0).sum(-1), top_k)
  assert (np.asarray(g[..., :num_shared]) > 0).all()
  # The non-zero routed gates are the top_k most probable routed heads.
  kth = np.sort(np.asarray(p), -1)[..., -top_k, None]
  np.testing.assert_array_equal(routed != 0, np.asarray(p) >= kth)
  np.testing.assert_array_equal(np.asarray(mask), routed != 0)


@pytest.mark.parametrize("num_shared,top_k", [(2, 1), (4, 3), (1, 7)])
def test_code_gates_sum_to_shared_plus_top_k_at_equal_mix(num_shared, top_k):
  _, _, _, x = inputs(seed=4)
  w_router, _ = router()
  # W_h = 0 gives α1 = α2 = ½ (2·softmax = 1): Σ g = h_s + K, whatever W_s and W_r.
  g, *_ = gates_of(x, w_router, jnp.zeros((D, 2)), num_shared=num_shared, top_k=top_k)
  assert_close(jnp.sum(g, -1), jnp.full((B, T), float(num_shared + top_k)))


def test_two_stage_mix_moves_weight_between_shared_and_routed_heads():
  _, _, _, x = inputs(seed=5)
  w_router, w_mix = router()
  g, _, _, alpha = gates_of(x, w_router, w_mix, num_shared=3, top_k=2)
  assert_close(jnp.sum(alpha, -1), jnp.full((B, T), 2.0))  # 2·softmax
  assert_close(jnp.sum(g[..., :3], -1), 3 * alpha[..., 0])
  assert_close(jnp.sum(g[..., 3:], -1), 2 * alpha[..., 1])


def test_without_two_stage_the_mix_is_fixed_as_a_zero_w_h_gives():
  """Table 6's "+shared heads" row: α fixed at ½ (×2) whatever W_h holds; W_h gets no gradient."""
  q, k, v, x = inputs()
  w_router, w_mix = router()
  run = lambda w_mix, two_stage: moh.attention(
    q, k, v, x=x, w_router=w_router, w_mix=w_mix, num_shared=2, top_k=2, two_stage=two_stage
  )[0]
  fixed = run(w_mix, False)
  np.testing.assert_array_equal(fixed, run(jnp.zeros_like(w_mix), True))
  assert not np.allclose(fixed, run(w_mix, True))
  grad = jax.grad(lambda w: jnp.sum(run(w, False) ** 2))(w_mix)
  np.testing.assert_array_equal(grad, jnp.zeros_like(w_mix))


def test_out_is_each_head_of_mha_times_its_gate():
  q, k, v, x = inputs(seed=6)
  w_router, w_mix = router()
  out, _ = moh.attention(q, k, v, x=x, w_router=w_router, w_mix=w_mix, is_causal=False)
  g, *_ = gates_of(x, w_router, w_mix, num_shared=N // 2, top_k=N // 4)
  mha = dot_product_attention(q, k, v, implementation="xla")
  assert_close(out, mha * g[..., None])


def test_router_gradients_reach_selected_heads_only():
  _, _, _, x = inputs(seed=7)
  w_router, w_mix = router()
  h_s, top_k = 2, 2

  def routed_gate_sum(w, sel):
    g, *_ = gates_of(x, w, w_mix, num_shared=h_s, top_k=top_k)
    return jnp.sum(g[..., h_s:] * sel)

  _, _, mask, _ = gates_of(x, w_router, w_mix, num_shared=h_s, top_k=top_k)
  # A cotangent on unselected gates only: those gates are 0 and non-differentiable (top-K).
  grad = jax.grad(routed_gate_sum)(w_router, 1.0 - mask)
  np.testing.assert_array_equal(np.asarray(grad), 0.0)
  # A random cotangent on the selected gates reaches W_r (the renormalised values move).
  cot = jax.random.normal(jax.random.key(8), mask.shape) * mask
  grad = jax.grad(routed_gate_sum)(w_router, cot)
  assert np.abs(np.asarray(grad[:, h_s:])).sum() > 0


# ------------------------------------------------------------------ load balance


def test_balance_loss_at_uniform_routing_is_top_k():
  h_r, top_k = 6, 2
  p = jnp.full((B, 6, h_r), 1.0 / h_r)
  # Each token selects a different pair, so every head is selected by K/h_r of the tokens.
  idx = np.arange(B * 6).reshape(B, 6) % 3
  mask = jnp.asarray(np.eye(3)[idx].repeat(2, axis=-1))
  loss, f = moh.balance_loss(p, mask, jnp.ones((B, 6), bool))
  assert_close(f, jnp.full((h_r,), top_k / h_r))
  assert_close(loss, jnp.asarray(float(top_k)))


def test_balance_loss_at_collapse_is_h_r_and_matches_the_code_formula():
  h_r = 4
  p = jnp.zeros((B, T, h_r)).at[..., 0].set(1.0)
  mask = jnp.zeros((B, T, h_r)).at[..., 0].set(1.0)
  loss, _ = moh.balance_loss(p, mask, jnp.ones((B, T), bool))
  assert_close(loss, jnp.asarray(float(h_r)))
  # Random routing: the code's `mean(me·ce)·E²` on the flattened tokens.
  _, _, _, x = inputs(seed=9)
  w_router, w_mix = router()
  _, p, mask, _ = gates_of(x, w_router, w_mix, num_shared=2, top_k=3)
  loss, _ = moh.balance_loss(p, mask, jnp.ones((B, T), bool))
  me, ce = p.reshape(-1, 6).mean(0), mask.reshape(-1, 6).mean(0)
  assert_close(loss, jnp.mean(me * ce) * 6 * 6)


def test_padding_tokens_are_excluded_from_routing_statistics():
  q, k, v, x = inputs(seed=10)
  w_router, w_mix = router()
  valid = jnp.ones((B, T), bool).at[0, 5:].set(False).at[1, 2].set(False)
  call = functools.partial(moh.attention, q, k, v, w_router=w_router, w_mix=w_mix, valid=valid)
  _, aux = call(x=x)
  x_changed = jnp.where(valid[..., None], x, 100.0 * jax.random.normal(jax.random.key(11), x.shape))
  _, aux_changed = call(x=x_changed)
  for name in ("moh_balance",):
    np.testing.assert_array_equal(np.asarray(aux.losses[name]), aux_changed.losses[name])
  for name in aux.metrics:
    np.testing.assert_array_equal(np.asarray(aux.metrics[name]), aux_changed.metrics[name])
  # ...and they equal the statistics of the valid tokens alone.
  _, p, mask, _ = gates_of(x, w_router, w_mix, num_shared=N // 2, top_k=N // 4)
  keep = np.asarray(valid)
  me, ce = np.asarray(p)[keep].mean(0), np.asarray(mask)[keep].mean(0)
  assert_close(aux.losses["moh_balance"], np.mean(me * ce) * 4 * 4)
  # Changing a valid token does change them (the test above can fail).
  _, aux_valid = call(x=x.at[0, 0].set(-x[0, 0]))
  assert aux_valid.losses["moh_balance"] != aux.losses["moh_balance"]


def test_balance_loss_gradient_pushes_probability_off_the_busiest_head():
  _, _, _, x = inputs(seed=12)
  w_router, w_mix = router()

  _, _, mask, _ = gates_of(x, w_router, w_mix, num_shared=2, top_k=2)

  def loss(w):  # at fixed routing decisions: f has no gradient (top-K), P does
    _, p, _, _ = gates_of(x, w, w_mix, num_shared=2, top_k=2)
    return moh.balance_loss(p, mask, jnp.ones((B, T), bool))[0]

  grad = jax.grad(loss)(w_router)
  assert np.isfinite(np.asarray(grad)).all()
  np.testing.assert_array_equal(np.asarray(grad[:, :2]), 0.0)  # shared router: no L_b term
  stepped = loss(w_router - 0.01 * grad)
  assert stepped < loss(w_router)


def test_registered_family_declares_the_paper_overhead_and_weight():
  dims = registry.Dims(D=D, N=N, K=K, H=H, V=V)
  arrays = moh.FAMILY.init_arrays(jax.random.key(0), dims)
  # Router overhead per layer is D·(h + 2) (W_s, W_r, W_h), as the paper's parameter counts.
  assert sum(a.size for a in arrays.values()) == D * (N + 2)
  assert moh.FAMILY.aux_losses == {"moh_balance": 0.01}
  assert 0 < float(jnp.std(arrays["w_router"])) < 0.05


# ------------------------------------------------------------------ parameter-free router


def test_qnorm_router_keeps_shared_heads_and_the_top_k_largest_query_norms():
  q, k, v, x = inputs(seed=13)
  w_router, w_mix = router()
  h_s, top_k = 4, 2
  out, aux = moh.attention(
    q, k, v, x=x, w_router=w_router, w_mix=w_mix, num_shared=h_s, top_k=top_k, router="qnorm"
  )
  norms = np.linalg.norm(np.asarray(q[:, :, h_s:]), axis=-1)
  kth = np.sort(norms, -1)[..., -top_k, None]
  g = np.concatenate([np.ones((B, T, h_s)), (norms >= kth).astype(np.float32)], -1)
  mha = dot_product_attention(q, k, v, implementation="xla")
  assert_close(out, mha * g[..., None])
  # Parameter-free: the router weights do not matter, and the balance value has no gradient.
  out_other, _ = moh.attention(
    q, k, v, x=x, w_router=0 * w_router, w_mix=w_mix, num_shared=h_s, top_k=top_k, router="qnorm"
  )
  np.testing.assert_array_equal(np.asarray(out), np.asarray(out_other))

  def balance(q):
    _, aux = moh.attention(q, k, v, x=x, w_router=w_router, w_mix=w_mix, router="qnorm")
    return aux.losses["moh_balance"]

  np.testing.assert_array_equal(np.asarray(jax.grad(balance)(q)), 0.0)
  assert np.isfinite(float(aux.losses["moh_balance"]))


# ------------------------------------------------------------------ defaults and bad input


@pytest.mark.parametrize(
  "n,want", [(1, (0, 1)), (2, (1, 1)), (4, (2, 1)), (8, (4, 2)), (6, (3, 1))]
)
def test_defaults_are_valid_for_every_head_count(n, want):
  assert moh.resolve_heads(n, None, None) == want


@pytest.mark.parametrize(
  "kw,match",
  [
    (dict(num_shared=8), "num_shared=8"),
    (dict(num_shared=-1), "num_shared=-1"),
    (dict(num_shared=6, top_k=3), "top_k=3"),
    (dict(top_k=0), "top_k=0"),
    (dict(top_k=-2), "top_k=-2"),
    (dict(gates="softmax"), "gates='softmax'"),
    (dict(router="mlp"), "router='mlp'"),
    (dict(router="qnorm", gates="paper"), "gates='paper'"),
    (dict(w_router=jnp.zeros((D, N - 1))), r"w_router has shape \(16, 7\)"),
    (dict(w_mix=jnp.zeros((D, 3))), r"w_mix has shape \(16, 3\)"),
    (dict(x=jnp.zeros((B, T + 1, D))), r"x \(the layer input\) has shape"),
    (dict(valid=jnp.ones((B, T - 1), bool)), "valid has shape"),
  ],
)
def test_bad_input_raises_naming_the_value(kw, match):
  q, k, v, x = inputs()
  args = {"x": x, "w_router": jnp.zeros((D, N)), "w_mix": jnp.zeros((D, 2)), **kw}
  with pytest.raises(ValueError, match=match):
    moh.attention(q, k, v, **args)
