"""Sparsifiner's own invariants (arXiv 2303.13755; spec: shared/papers/architecture.md §16.3).

The conformance suite (generated from the registry) covers shapes, jit, causality, GQA, masked
rows and chunked-vs-xla on its default setting; here: ρ = 1 is dense attention, the top-ρ
selection on hand-checked cases, chunked = xla forward and backward on a sparse selection, the
coarsened block map, the distillation loss and where its gradient goes, metrics, bad input.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnzoo import masks
from attnzoo.attention import dot_product_attention, registry
from attnzoo.attention.dense.softmax import selected_elements
from attnzoo.attention.sparse import sparsifiner
from pallas_kernels.block_sparse import EMPTY, num_blocks
from tests.attention.conformance import random_qkv
from tests.tolerances import assert_close

B, T, N, K, H, R, BLK = 2, 44, 4, 2, 8, 4, 8  # ragged last tile (44 = 5·8 + 4)


def predictor(seed=1, h=H, r=R, scale=1.0):
  kq, kk = jax.random.split(jax.random.key(seed))
  return scale * jax.random.normal(kq, (h, r)), scale * jax.random.normal(kk, (h, r))


_STATIC = ("mask", "is_causal", "keep_rate", "rank", "block_q", "block_k", "distill")
_attention = jax.jit(sparsifiner.attention, static_argnames=(*_STATIC, "implementation"))


def run(q, k, v, w, **kw):
  """The family, jitted (one compile instead of op-by-op dispatch), on BLK x BLK tiles."""
  kw = {"block_q": BLK, "block_k": BLK, **kw}
  return _attention(q, k, v, w_cq=w[0], w_ck=w[1], **kw)


def numpy_softmax_rows(logits, keep):
  """Softmax of each row over its kept entries (all-zero rows stay zero), float64."""
  logits = np.where(keep, logits, -np.inf)
  m = np.max(logits, axis=-1, keepdims=True)
  p = np.where(keep, np.exp(logits - np.where(np.isfinite(m), m, 0.0)), 0.0)
  s = p.sum(-1, keepdims=True)
  return p / np.where(s > 0, s, 1.0)


# ------------------------------------------------------------------ ρ = 1 is dense attention


@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("implementation", ["xla", "chunked"])
def test_keep_rate_one_is_dense_attention(is_causal, implementation):
  q, k, v = random_qkv(0, B, T, T, N, K, H)
  out, aux = run(
    q, k, v, predictor(), keep_rate=1.0, is_causal=is_causal, implementation=implementation
  )
  dense = dot_product_attention(q, k, v, is_causal=is_causal, implementation="xla")
  assert_close(out, dense)
  np.testing.assert_allclose(float(aux.metrics["sparsifiner_density"]), 1.0)
  np.testing.assert_allclose(float(aux.metrics["sparsifiner_mass_recall"]), 1.0, rtol=1e-6)


# ------------------------------------------------------------------ the top-ρ selection


def _hand_case():
  """H = 2, r = 1, W_cq = W_ck = e_0, q[..., 0] = 1: the predictor's score of key s is k[s, 0]
  for every row (the softmax keeps the order)."""
  k0 = np.array([0.5, 3.0, -1.0, 2.0, 1.0], np.float32)
  S = k0.size
  q = jnp.asarray(np.stack([np.ones(S), np.linspace(-1, 1, S)], -1)[None, :, None], jnp.float32)
  k = jnp.asarray(np.stack([k0, np.cos(np.arange(S))], -1)[None, :, None], jnp.float32)
  v = jnp.asarray(np.arange(2 * S, dtype=np.float32).reshape(1, S, 1, 2))
  e0 = jnp.asarray([[1.0], [0.0]])
  return q, k, v, (e0, e0)


@pytest.mark.parametrize("implementation", ["xla", "chunked"])
def test_exactly_the_top_rho_keys_per_row_hand_checked(implementation):
  q, k, v, w = _hand_case()
  # Non-causal: ⌈0.4 · 5⌉ = 2 keys per row, the two largest k[s, 0] = 3 and 2: keys 1 and 3.
  want_full = np.zeros((5, 5), bool)
  want_full[:, [1, 3]] = True
  # Causal: row t keeps ⌈0.4 (t + 1)⌉ of keys 0..t (1, 1, 2, 2, 2) by k[:, 0] = .5, 3, -1, 2, 1.
  want_causal = np.zeros((5, 5), bool)
  for t, keys in enumerate([[0], [1], [0, 1], [1, 3], [1, 3]]):
    want_causal[t, keys] = True
  for is_causal, want in ((False, want_full), (True, want_causal)):
    allowed = sparsifiner.allowed_keys(None, is_causal, (1, 1, 5, 5))
    approx = sparsifiner.predicted_connectivity(q, k, *w, allowed)
    keep = sparsifiner.top_rho_mask(approx, allowed, 0.4)
    np.testing.assert_array_equal(np.asarray(keep[0, 0]), want, err_msg=f"{is_causal=}")
    # The attention itself uses exactly that mask.
    out, aux = run(
      q,
      k,
      v,
      w,
      keep_rate=0.4,
      is_causal=is_causal,
      block_q=2,
      block_k=2,
      implementation=implementation,
    )
    logits = np.einsum("th,sh->ts", np.asarray(q[0, :, 0]), np.asarray(k[0, :, 0])) / np.sqrt(2)
    expect = numpy_softmax_rows(logits, want) @ np.asarray(v[0, :, 0])
    assert_close(out[0, :, 0], expect)
    density = want.sum() / (15 if is_causal else 25)
    np.testing.assert_allclose(float(aux.metrics["sparsifiner_density"]), density, rtol=1e-6)


def test_ties_keep_the_lower_index_and_rho_rounds_exactly():
  # Constant scores: every row keeps its first ⌈ρ·n⌉ allowed keys, never more.
  allowed = jnp.ones((1, 1, 3, 30), bool)
  keep = sparsifiner.top_rho_mask(jnp.zeros((1, 1, 3, 30)), allowed, 0.1)
  want = np.zeros((3, 30), bool)
  want[:, :3] = True  # 0.1 · 30 = 3 exactly (not ⌈3.0000000000000004⌉ = 4)
  np.testing.assert_array_equal(np.asarray(keep[0, 0]), want)
  # A tiny ρ still keeps one key per non-empty row; an empty row keeps none.
  allowed = jnp.asarray(np.array([[True] * 30, [False] * 30, [True] + [False] * 29]))[None, None]
  keep = sparsifiner.top_rho_mask(jnp.zeros((1, 1, 3, 30)), allowed, 1e-6)
  np.testing.assert_array_equal(np.asarray(keep[0, 0].sum(-1)), [1, 0, 1])


# ------------------------------------------------------------------ chunked = xla, sparse


@pytest.mark.parametrize("is_causal", [False, True])
def test_chunked_matches_xla_forward_and_gradients_on_a_sparse_selection(is_causal):
  q, k, v = random_qkv(2, B, T, T, N, K, H)
  w = predictor(3)

  def loss(implementation, q, k, v, w_cq, w_ck):
    out, aux = run(
      q, k, v, (w_cq, w_ck), keep_rate=0.15, is_causal=is_causal, implementation=implementation
    )
    return jnp.sum(out * jnp.cos(out)) + aux.losses["sparsifiner_distill"], (out, aux)

  def value_and_grads(implementation):
    fn = jax.value_and_grad(functools.partial(loss, implementation), (0, 1, 2, 3, 4), True)
    return jax.jit(fn)(q, k, v, *w)

  (_, (want, aux)), want_grads = value_and_grads("xla")
  (_, (got, got_aux)), got_grads = value_and_grads("chunked")
  assert_close(got, want)
  for name, g, wg in zip(("q", "k", "v", "w_cq", "w_ck"), got_grads, want_grads, strict=True):
    assert_close(g, wg, grad=True, err_msg=f"d{name}")
  # Really sparse: few elements kept, output unlike dense attention. (Unstructured top-ρ rows
  # touch nearly every 8-row tile when not causal: 99 % of tiles here; skipping is tested on
  # the block map below.)
  assert float(aux.metrics["sparsifiner_density"]) < 0.3
  np.testing.assert_array_equal(
    np.asarray(got_aux.metrics["sparsifiner_density"]),
    np.asarray(aux.metrics["sparsifiner_density"]),
  )
  dense = dot_product_attention(q, k, v, is_causal=is_causal, implementation="xla")
  assert not np.allclose(np.asarray(got), np.asarray(dense), atol=1e-3)


def test_a_static_mask_bounds_the_selection():
  q, k, v = random_qkv(4, 1, 20, 20, 2, 1, H)
  window = masks.SlidingWindow(left=5, right=0)
  allowed = sparsifiner.allowed_keys(window, False, (1, 2, 20, 20))
  np.testing.assert_array_equal(np.asarray(allowed[0, 0]), window.dense(20, 20))
  w = predictor(5)
  approx = sparsifiner.predicted_connectivity(q, k, *w, allowed)
  keep = np.asarray(sparsifiner.top_rho_mask(approx, allowed, 0.5))
  assert not (keep & ~np.asarray(allowed)).any()
  np.testing.assert_array_equal(keep.sum(-1), np.ceil(0.5 * np.asarray(allowed).sum(-1)))
  out_x, _ = run(q, k, v, w, mask=window, keep_rate=0.5, implementation="xla")
  out_c, _ = run(q, k, v, w, mask=window, keep_rate=0.5, implementation="chunked")
  assert_close(out_c, out_x)


# ------------------------------------------------------------------ the coarsened block map


def test_block_map_covers_every_kept_element_and_skips_empty_tiles():
  q, k, _ = random_qkv(6, B, T, 37, N, K, H)
  allowed = sparsifiner.allowed_keys(None, False, (B, N, T, 37))
  keep = sparsifiner.top_rho_mask(
    sparsifiner.predicted_connectivity(q, k, *predictor(7), allowed), allowed, 0.05
  )
  bmap = sparsifiner.block_map_of(keep, BLK, BLK)
  keep = np.asarray(keep)
  selected = np.asarray(selected_elements(bmap))
  assert not (keep & ~selected).any()  # every kept element lies in a visited tile
  tiles = np.asarray(bmap.to_block_mask())
  qb, kb = num_blocks(T, BLK), num_blocks(37, BLK)
  for i in range(qb):
    for j in range(kb):
      has = keep[:, :, i * BLK : (i + 1) * BLK, j * BLK : (j + 1) * BLK].any(axis=(2, 3))
      np.testing.assert_array_equal(tiles[:, :, i, j] != EMPTY, has, err_msg=f"tile {(i, j)}")
  assert (tiles == EMPTY).any()  # 5 % of 37 keys = 2 per row: some tiles are never visited


# ------------------------------------------------------------------ the distillation loss


def test_distillation_loss_on_a_hand_computed_case():
  # B = N = K = 1, T = S = 2, H = 2, r = 1, predictor = the first coordinate.
  q = jnp.asarray([[1.0, 0.0], [2.0, -1.0]])[None, :, None]
  k = jnp.asarray([[1.0, 1.0], [0.0, 2.0]])[None, :, None]
  v = jnp.ones((1, 2, 1, 2))
  e0 = jnp.asarray([[1.0], [0.0]])
  _, aux = sparsifiner.attention(q, k, v, w_cq=e0, w_ck=e0, keep_rate=1.0, block_q=2, block_k=2)
  # Â row t = softmax(q[t,0] · k[:,0] / √1): row 0 softmax([1, 0]), row 1 softmax([2, 0]).
  sig = lambda x: 1.0 / (1.0 + np.exp(-x))
  approx = np.array([[sig(1.0), sig(-1.0)], [sig(2.0), sig(-2.0)]])
  # A row t = softmax(q[t] · k / √2): row 0 [1, 0] / √2, row 1 [1, -2] / √2.
  teacher = np.array(
    [[sig(1 / np.sqrt(2)), sig(-1 / np.sqrt(2))], [sig(3 / np.sqrt(2)), sig(-3 / np.sqrt(2))]]
  )
  want = np.sum((approx - teacher) ** 2) / 2  # mean over the two rows of Σ_s (Â - A)²
  np.testing.assert_allclose(float(aux.losses["sparsifiner_distill"]), want, rtol=1e-6)


def test_distillation_gradient_reaches_the_predictor_not_the_teacher():
  q, k, v = random_qkv(8, 1, 12, 12, 2, 2, H)
  w = predictor(9)
  bias = jax.random.normal(jax.random.key(10), (1, 2, 12, 12))

  def distill(q, k, v, w_cq, w_ck, bias):
    _, aux = run(q, k, v, (w_cq, w_ck), bias=bias, keep_rate=0.5, is_causal=True)
    return aux.losses["sparsifiner_distill"]

  grads = jax.jit(jax.grad(distill, argnums=(0, 1, 2, 3, 4, 5)))(q, k, v, *w, bias)
  dq, dk, dv, dw_cq, dw_ck, dbias = (np.asarray(g) for g in grads)
  assert np.abs(dw_cq).sum() > 0 and np.abs(dw_ck).sum() > 0
  # The bias enters only the teacher A and the attention output: a detached teacher gives it
  # no gradient from the loss; v enters neither Â nor A.
  np.testing.assert_array_equal(dbias, 0.0)
  np.testing.assert_array_equal(dv, 0.0)
  # dq equals the gradient with the teacher frozen as a constant (only Â is differentiated).
  allowed = sparsifiner.allowed_keys(None, True, (1, 2, 12, 12))
  logits = jnp.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(H) + bias
  teacher = jax.nn.softmax(jnp.where(allowed, logits, -jnp.inf), axis=-1)

  def frozen(q):
    approx = sparsifiner.predicted_connectivity(q, k, *w, allowed)
    return jnp.mean(jnp.sum((approx - teacher) ** 2, axis=-1))

  assert_close(dq, jax.jit(jax.grad(frozen))(q), grad=True)


def test_loss_is_zero_when_the_predictor_equals_the_dense_attention():
  # r = H and W_cq = W_ck = I: Â = softmax(q kᵀ / √H), exactly the teacher A.
  q, k, v = random_qkv(11, 1, 9, 9, 2, 1, H)
  eye = jnp.eye(H)
  _, aux = run(q, k, v, (eye, eye), rank=H, keep_rate=0.5)
  assert float(aux.losses["sparsifiner_distill"]) < 1e-12


def test_padding_rows_leave_the_loss_and_metrics():
  q, k, v = random_qkv(12, 1, 9, 9, 2, 1, H)
  w = predictor(13)
  none = jnp.zeros((1, 9), bool)
  _, aux = run(q, k, v, w, valid=none)
  assert float(aux.losses["sparsifiner_distill"]) == 0.0
  _, off = run(q, k, v, w, distill=False)
  assert float(off.losses["sparsifiner_distill"]) == 0.0
  assert "sparsifiner_mass_recall" not in off.metrics


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize("keep_rate", [0.0, -0.25, 1.5, True, "0.5"])
def test_bad_keep_rate_raises_naming_the_value(keep_rate):
  q, k, v = random_qkv(0, 1, 4, 4, 1, 1, H)
  with pytest.raises(ValueError, match=rf"keep_rate={keep_rate!r} must be .*\(0, 1\]"):
    run(q, k, v, predictor(), keep_rate=keep_rate)


@pytest.mark.parametrize("rank", [0, -2, 2.5])
def test_bad_rank_raises_naming_the_value_and_the_fix(rank):
  with pytest.raises(ValueError, match=rf"rank={rank!r} must be a positive int.*None for H // 2"):
    sparsifiner.FAMILY.params["w_cq"].shape(
      registry.Dims(D=16, N=2, K=2, H=H, V=H, knobs={"rank": rank})
    )
  q, k, v = random_qkv(0, 1, 4, 4, 1, 1, H)
  with pytest.raises(ValueError, match=rf"rank={rank!r}"):
    run(q, k, v, predictor(), rank=rank)


def test_predictor_of_the_wrong_rank_raises():
  q, k, v = random_qkv(0, 1, 4, 4, 1, 1, H)
  with pytest.raises(ValueError, match=r"w_cq has shape \(8, 4\), expected \(H, r\) = \(8, 2\)"):
    run(q, k, v, predictor(), rank=2)
