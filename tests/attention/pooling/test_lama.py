"""LAMA pooling (arXiv 1912.00835) and the pooling registry: the paper's invariants, a
hand-computed bilinear form, padding, fully-padded rows, bad input."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnzoo.attention import pooling
from attnzoo.attention.pooling import lama
from tests import tolerances

B, T, D = 3, 7, 8


def _arrays(D=D, num_heads=3, rank=5, seed=0, scale=1.0):
  """Random U, V, P (P random, not the zero init, so heads and tokens differ)."""
  ku, kv, kp = jax.random.split(jax.random.key(seed), 3)
  return dict(
    w_u=scale * jax.random.normal(ku, (D, rank)) / np.sqrt(D),
    w_v=scale * jax.random.normal(kv, (D, rank)) / np.sqrt(D),
    w_p=scale * jax.random.normal(kp, (rank, num_heads)),
  ), dict(num_heads=num_heads, rank=rank)


def _inputs(seed=1):
  x = jax.random.normal(jax.random.key(seed), (B, T, D))
  valid = np.ones((B, T), bool)
  valid[0, 4:] = False  # trailing padding
  valid[1, [0, 3]] = False  # padding anywhere
  return x, jnp.asarray(valid)


def _reference_scores(x, valid, w_u, w_v, w_p):
  """s_{t,j} = Σ_i tanh(Σ_d U_di h_td) P_ij tanh(Σ_e V_ei c_e), c = mean of valid h: loops."""
  x, valid = np.asarray(x, np.float64), np.asarray(valid)
  w_u, w_v, w_p = (np.asarray(w, np.float64) for w in (w_u, w_v, w_p))
  b_, t_, _ = x.shape
  k_, m_ = w_p.shape
  out = np.zeros((b_, m_, t_))
  for b in range(b_):
    c = x[b][valid[b]].mean(axis=0)
    ctx = [np.tanh(sum(w_v[e, i] * c[e] for e in range(len(c)))) for i in range(k_)]
    for t, j in itertools.product(range(t_), range(m_)):
      tok = [np.tanh(sum(w_u[d, i] * x[b, t, d] for d in range(x.shape[2]))) for i in range(k_)]
      out[b, j, t] = sum(tok[i] * w_p[i, j] * ctx[i] for i in range(k_))
  return out


def _reference_pool(x, valid, *, w_u, w_v, w_p):
  """The same math written plainly with jax.nn.softmax (for rows with a valid token)."""
  h = x.astype(jnp.float32)
  keep = valid[..., None].astype(jnp.float32)
  c = jnp.sum(h * keep, axis=1) / jnp.sum(keep, axis=1)
  s = jnp.einsum("bti,bi,ij->bjt", jnp.tanh(h @ w_u), jnp.tanh(c @ w_v), w_p)
  alpha = jax.nn.softmax(jnp.where(valid[:, None, :], s, -jnp.inf), axis=-1)
  return jnp.einsum("bjt,btd->bjd", alpha, h).reshape(x.shape[0], -1), alpha


def test_weights_are_distributions_over_valid_tokens_and_zero_at_padding():
  x, valid = _inputs()
  arrays, knobs = _arrays()
  pooled, alpha = lama.lama_pool(x, valid, **arrays, **knobs)
  assert pooled.shape == (B, 3 * D) and alpha.shape == (B, 3, T) and alpha.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(alpha)[~np.broadcast_to(valid[:, None], alpha.shape)], 0)
  tolerances.assert_close(jnp.sum(alpha, axis=-1), jnp.ones((B, 3)))
  # The heads differ (random P): not all distributions are the same.
  assert float(jnp.max(jnp.abs(alpha[:, 0] - alpha[:, 1]))) > 1e-3


def test_pooled_rows_are_the_weighted_token_sums():
  x, valid = _inputs()
  arrays, knobs = _arrays()
  pooled, alpha = lama.lama_pool(x, valid, **arrays, **knobs)
  expected = np.einsum("bjt,btd->bjd", np.asarray(alpha), np.asarray(x)).reshape(B, -1)
  tolerances.assert_close(pooled, expected)


def test_scores_equal_the_hand_computed_low_rank_bilinear_form():
  x, valid = _inputs()
  arrays, _ = _arrays()
  tolerances.assert_close(
    lama.lama_scores(x, valid, **arrays), _reference_scores(x, valid, **arrays)
  )


def test_full_rank_identity_factors_give_the_diagonal_bilinear_form():
  """k = D, U = V = I, P = I (M = k): s_{t,j} = tanh(h_tj)·tanh(c_j), i.e. h̃_tᵀ diag(e_j) c̃."""
  x, valid = _inputs()
  eye = jnp.eye(D)
  pooled, alpha = lama.lama_pool(x, valid, w_u=eye, w_v=eye, w_p=eye, num_heads=D, rank=D)
  h = np.asarray(x, np.float64)
  v = np.asarray(valid)
  c = np.stack([h[b][v[b]].mean(axis=0) for b in range(B)])
  scores = np.einsum("btj,bj->bjt", np.tanh(h), np.tanh(c))
  tolerances.assert_close(lama.lama_scores(x, valid, w_u=eye, w_v=eye, w_p=eye), scores)
  masked = np.where(v[:, None, :], scores, -np.inf)
  expected = np.exp(masked - masked.max(-1, keepdims=True))
  expected /= expected.sum(-1, keepdims=True)
  tolerances.assert_close(alpha, expected)


def test_forward_and_gradients_match_a_plain_softmax_reference():
  x, valid = _inputs()
  arrays, knobs = _arrays()
  got, alpha = lama.lama_pool(x, valid, **arrays, **knobs)
  want, want_alpha = _reference_pool(x, valid, **arrays)
  tolerances.assert_close(got, want)
  tolerances.assert_close(alpha, want_alpha)
  cot = jax.random.normal(jax.random.key(9), got.shape)
  loss = lambda f: lambda x, a: jnp.sum(f(x, valid, **a)[0] * cot)
  g_got = jax.grad(loss(lambda *a, **k: lama.lama_pool(*a, **k, **knobs)), argnums=(0, 1))(
    x, arrays
  )
  g_want = jax.grad(loss(_reference_pool), argnums=(0, 1))(x, arrays)
  for a, b in zip(jax.tree.leaves(g_got), jax.tree.leaves(g_want), strict=True):
    tolerances.assert_close(a, b, grad=True)


def test_weights_are_permutation_equivariant_and_the_pool_invariant():
  x, valid = _inputs()
  arrays, knobs = _arrays()
  perm = np.random.default_rng(0).permutation(T)
  pooled, alpha = lama.lama_pool(x, valid, **arrays, **knobs)
  pooled_p, alpha_p = lama.lama_pool(x[:, perm], valid[:, perm], **arrays, **knobs)
  tolerances.assert_close(alpha_p, alpha[:, :, perm])
  tolerances.assert_close(pooled_p, pooled)


def test_padding_content_does_not_matter():
  x, valid = _inputs()
  arrays, knobs = _arrays()
  noise = jax.random.normal(jax.random.key(5), x.shape) * 100.0
  x2 = jnp.where(valid[..., None], x, noise)
  got = lama.lama_pool(x2, valid, **arrays, **knobs)
  for a, b in zip(got, lama.lama_pool(x, valid, **arrays, **knobs), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_an_example_with_no_valid_token_pools_to_zeros_with_finite_gradients():
  x, valid = _inputs()
  valid = valid.at[2].set(False)
  arrays, knobs = _arrays(scale=30.0)  # large scores: an unguarded exp would overflow

  def loss(x, a):
    pooled, alpha = lama.lama_pool(x, valid, **a, **knobs)
    return jnp.sum(pooled**2) + jnp.sum(alpha**2)

  pooled, alpha = lama.lama_pool(x, valid, **arrays, **knobs)
  np.testing.assert_array_equal(np.asarray(pooled[2]), 0)
  np.testing.assert_array_equal(np.asarray(alpha[2]), 0)
  grads = jax.grad(loss, argnums=(0, 1))(x, arrays)
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
  np.testing.assert_array_equal(np.asarray(grads[0][2]), 0)


def test_bfloat16_input_keeps_its_dtype_and_fp32_weights():
  x, valid = _inputs()
  arrays, knobs = _arrays()
  pooled, alpha = lama.lama_pool(x.astype(jnp.bfloat16), valid, **arrays, **knobs)
  assert pooled.dtype == jnp.bfloat16 and alpha.dtype == jnp.float32
  ref, _ = lama.lama_pool(x.astype(jnp.bfloat16).astype(jnp.float32), valid, **arrays, **knobs)
  tolerances.assert_close(pooled, ref, dtype=jnp.bfloat16)


def test_fresh_arrays_from_the_registry_pool_like_the_mean_in_every_head():
  """P starts at zero: uniform weights over the valid tokens, every head = mean pooling."""
  entry = pooling.get_pooling("lama")
  dims = entry.dims(D, {"num_heads": 2})
  arrays = {n: s.create(jax.random.key(i), dims) for i, (n, s) in enumerate(entry.params.items())}
  assert {n: a.shape for n, a in arrays.items()} == {
    "w_u": (D, D // 2),
    "w_v": (D, D // 2),
    "w_p": (D // 2, 2),
  }
  x, valid = _inputs()
  pooled, _ = entry.pool(x, valid, **arrays, **dims.knobs)
  mean, weights = pooling.get_pooling("mean").pool(x, valid)
  assert weights is None and entry.out_dim(dims) == 2 * D
  tolerances.assert_close(pooled, jnp.concatenate([mean, mean], axis=-1))


def test_mean_pool_is_the_masked_mean():
  x, valid = _inputs()
  valid = valid.at[2].set(False)
  mean, _ = pooling.get_pooling("mean").pool(x, valid)
  h, v = np.asarray(x), np.asarray(valid)
  expected = np.stack([h[b][v[b]].mean(0) if v[b].any() else np.zeros(D) for b in range(B)])
  tolerances.assert_close(mean, expected)


def test_parameter_count_is_the_papers_formula():
  entry = pooling.get_pooling("lama")
  for d, k, m in [(8, 4, 2), (600, 150, 30), (256, 128, 8)]:
    assert entry.num_params(d, {"rank": k, "num_heads": m}) == d * k + d * k + k * m


def test_bad_input_raises_naming_the_value_and_the_fix():
  x, valid = _inputs()
  arrays, knobs = _arrays()
  with pytest.raises(ValueError, match=r"w_p has shape \(5, 3\); expected \(5, 2\)"):
    lama.lama_pool(x, valid, **arrays, num_heads=2, rank=5)
  with pytest.raises(ValueError, match="num_heads=0 must be >= 1"):
    lama.lama_pool(x, valid, **arrays, num_heads=0, rank=5)
  with pytest.raises(ValueError, match=r"valid has shape \(3, 6\)"):
    lama.lama_pool(x, valid[:, :6], **arrays, **knobs)
  with pytest.raises(ValueError, match=r"pass token states \[B, T, D\]"):
    lama.lama_pool(x[0], valid, **arrays, **knobs)
  with pytest.raises(ValueError, match=r"has no knobs \['heads'\]; its knobs: \['num_heads'"):
    pooling.get_pooling("lama").knob_values({"heads": 2})
  with pytest.raises(KeyError, match=r"valid names: \['lama', 'mean'\]"):
    pooling.get_pooling("nope")


def test_config_knobs_cover_every_pooling():
  knobs = pooling.all_knobs()
  for entry in pooling.POOLINGS.values():
    assert set(entry.knobs()) <= set(knobs)
  assert knobs["num_heads"] == (None, "int") and set(pooling.get_pooling("mean").knobs()) == set()
