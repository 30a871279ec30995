"""Rectified SpaAttn's own invariants (arXiv 2511.19835; spec: shared/papers/efficient.md §13).

The conformance suite (generated from the registry) covers shapes, jit, causality, GQA, masked
rows and chunked-vs-xla on its default setting; here: p_remain = 1 is dense attention, a float64
numpy oracle of every equation (IPAR masses, the p_remain / min_blocks / forced-tile selection,
GAPR's gain-vs-error test, the row rescale and the pooled correction), hand-checked selection
and GAPR cases, the ablation ordering plain > +IPAR > +IPAR+GAPR on smooth token fields,
chunked = xla forward and gradients with pooled tiles active, causality and masks by gradient,
bad knobs.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnzoo import masks
from attnzoo.attention import dot_product_attention
from attnzoo.attention.sparse import rectified
from pallas_kernels.block_sparse import FULL, PARTIAL
from tests.tolerances import assert_close

BLK = 8
_STATIC = ("mask", "is_causal", "block_q", "block_k", "p_remain", "min_blocks", "ipar", "gapr")
_attention = jax.jit(rectified.attention, static_argnames=(*_STATIC, "implementation"))
_plan = jax.jit(
  rectified.plan,
  static_argnames=("mask", "is_causal", "block_q", "block_k", "p_remain", "min_blocks", "gapr"),
)


def run(q, k, v, **kw):
  """The family, jitted, on BLK x BLK tiles."""
  return _attention(q, k, v, **{"block_q": BLK, "block_k": BLK, **kw})


def smooth_field(seed, shape, amp, noise=0.1, freqs=3):
  """[B, L, M, D]: amp · (a few low-frequency cosines along L) + white noise, zero-mean along L:
  neighbouring tokens are alike, so tile means summarise tiles well (the paper's video tokens)."""
  B, L, M, D = shape
  rng = np.random.default_rng(seed)
  t = (np.arange(L) / L).reshape(1, L, 1, 1)
  x = sum(
    rng.normal(size=(B, 1, M, D))
    * np.cos(2 * np.pi * f * t + rng.uniform(0, 2 * np.pi, (B, 1, M, D)))
    / f
    for f in range(1, freqs + 1)
  )
  return jnp.asarray(amp * x + noise * rng.normal(size=shape), jnp.float32)


def smooth_qkv(seed, B=2, T=96, N=4, K=2, H=16, amp=2.0):
  q = smooth_field(3 * seed, (B, T, N, H), amp)
  k = smooth_field(3 * seed + 1, (B, T, K, H), amp)
  v = smooth_field(3 * seed + 2, (B, T, K, H), 1.0)
  return q, k, v


def relative_error(out, want):
  return float(jnp.linalg.norm(out - want) / jnp.linalg.norm(want))


# ------------------------------------------------------------------ p_remain = 1 is dense


@pytest.mark.parametrize(
  "is_causal, implementation",
  [(False, "xla"), (True, "chunked"), pytest.param(False, "chunked", marks=pytest.mark.slow)],
)
def test_p_remain_one_keeps_every_tile_and_is_dense_attention(is_causal, implementation):
  q, k, v = smooth_qkv(0, T=44)  # ragged last tile (44 = 5·8 + 4)
  out, aux = run(q, k, v, p_remain=1.0, is_causal=is_causal, implementation=implementation)
  assert_close(out, dot_product_attention(q, k, v, is_causal=is_causal, implementation="xla"))
  m = {name: float(x) for name, x in aux.metrics.items()}
  assert m == {
    "rectified_density": 1.0,  # every allowed tile critical: R = 1, no correction
    "rectified_pooled": 0.0,
    "rectified_kept_mass": 1.0,
    "rectified_rescale": 1.0,
  }


# ------------------------------------------------------------------ the equations, in numpy


def numpy_rectified(q, k, v, *, is_causal, scale, bq, bk, p_remain, min_blocks, ipar, gapr):
  """float64 oracle of the module docstring's equations for B = 1, N = K = 1 (no masks but
  causality), written from the equations, not from the implementation."""
  q, k, v = (np.asarray(x, np.float64)[0, :, 0] for x in (q, k, v))
  T, S = q.shape[0], k.shape[0]
  qb, kb = -(-T // bq), -(-S // bk)
  rows = [slice(i * bq, min(T, (i + 1) * bq)) for i in range(qb)]
  cols = [slice(j * bk, min(S, (j + 1) * bk)) for j in range(kb)]
  keep = np.tril(np.ones((T, S), bool)) if is_causal else np.ones((T, S), bool)
  q_bar = np.stack([q[r].mean(0) for r in rows])
  k_bar = np.stack([k[c].mean(0) for c in cols])
  v_bar = np.stack([v[c].mean(0) for c in cols])
  n = np.array([k[c].shape[0] for c in cols], np.float64)
  full = np.array([[keep[r, c].all() for c in cols] for r in rows])
  empty = np.array([[not keep[r, c].any() for c in cols] for r in rows])
  raw = q_bar @ k_bar.T
  out = np.zeros((T, v.shape[-1]))
  for i, r in enumerate(rows):
    allowed = ~empty[i]
    w = np.where(allowed, n * np.exp(scale * raw[i]), 0.0)
    p_hat = w / w.sum()
    order = np.argsort(-p_hat, kind="stable")
    critical = np.zeros(kb, bool)
    mass = 0.0
    for rank, j in enumerate(order):
      if allowed[j] and (mass < p_remain or rank < min_blocks or p_remain >= 1):
        critical[j] = True
      mass += p_hat[j]
    centre = min((i * bq + bq // 2) * S // T // bk, kb - 1)
    critical[centre] |= allowed[centre]
    critical |= allowed & ~full[i]  # PARTIAL tiles
    pooled = full[i] & ~critical
    dq = np.abs(q[r] - q_bar[i]).mean(0)
    dk = np.stack([np.abs(k[c] - k_bar[j]).mean(0) for j, c in enumerate(cols)])
    error = np.abs(k_bar @ dq) + np.abs(dk @ q_bar[i])
    rect = pooled & (np.abs(raw[i]) > error) if gapr else np.zeros(kb, bool)
    for t in range(r.start, r.stop):
      sel = keep[t] & np.repeat(critical, bk)[:S]
      s = scale * (k @ q[t])
      e = np.where(sel, np.exp(s - s[sel].max()), 0.0)
      o_t = e @ v / e.sum()
      lam = s[sel].max() + np.log(e.sum())
      e_pool = np.where(pooled, n * np.exp(scale * (k_bar @ q[t])), 0.0)
      z = np.exp(lam) + e_pool.sum()
      if not ipar:
        out[t] = o_t
        continue
      folded = e_pool[pooled & ~rect].sum() if gapr else 0.0
      out[t] = (np.exp(lam) + folded) / z * o_t + (np.where(rect, e_pool, 0.0) / z) @ v_bar
  return out


@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("ipar, gapr", [(False, False), (True, False), (True, True)])
def test_matches_a_numpy_oracle_of_the_equations(is_causal, ipar, gapr):
  q, k, v = smooth_qkv(1, B=1, T=30, N=1, K=1, H=4, amp=1.5)  # 30 = 7·4 + 2: ragged
  kw = dict(is_causal=is_causal, p_remain=0.6, min_blocks=2, ipar=ipar, gapr=gapr)
  out, aux = run(q, k, v, block_q=4, block_k=4, implementation="xla", **kw)
  want = numpy_rectified(q, k, v, scale=0.5, bq=4, bk=4, **kw)
  assert_close(out[0, :, 0], want)
  # The case exercises every kind of tile: skipped, folded and rectified ones.
  assert 0 < float(aux.metrics["rectified_density"]) < 0.8
  if gapr:
    assert float(aux.metrics["rectified_pooled"]) > 0
    assert float(aux.metrics["rectified_rescale"]) > float(aux.metrics["rectified_kept_mass"])


# ------------------------------------------------------------------ hand-checked decisions


def _hand_case():
  """One q tile (4 rows, q = 1, H = 1), four kv tiles of 4 keys whose means are log p̂ for
  p̂ = (0.1, 0.6, 0.25, 0.05) (scale 1: IPAR's masses are exactly p̂). Keys deviate from their
  tile mean by ±1 in tile 0 (GAPR error 1 < gain |log 0.1| = 2.3: rectified) and by ±4 in tile 3
  (error 4 > gain |log 0.05| = 3.0: folded)."""
  p = np.array([0.1, 0.6, 0.25, 0.05])
  dev = np.array([1.0, 0.0, 0.0, 4.0])
  sign = np.array([1.0, -1.0, 1.0, -1.0])
  k = (np.log(p)[:, None] + dev[:, None] * sign[None, :]).reshape(1, 16, 1, 1)
  return jnp.ones((1, 4, 1, 1)), jnp.asarray(k, jnp.float32)


@pytest.mark.parametrize(
  "p_remain, min_blocks, critical",
  [
    (0.5, 1, [1, 2]),  # 0.6 >= 0.5 after tile 1; tile 2 is the forced diagonal tile
    (0.7, 1, [1, 2]),  # 0.6 + 0.25 >= 0.7
    (0.9, 1, [0, 1, 2]),  # 0.95 >= 0.9
    (0.5, 3, [0, 1, 2]),  # at least three tiles by mass
    (1.0, 1, [0, 1, 2, 3]),
  ],
)
def test_selection_keeps_the_smallest_prefix_reaching_p_remain(p_remain, min_blocks, critical):
  q, k = _hand_case()
  tiles = _plan(q, k, scale=1.0, block_q=4, block_k=4, p_remain=p_remain, min_blocks=min_blocks)
  np.testing.assert_array_equal(np.flatnonzero(np.asarray(tiles.critical[0, 0, 0])), critical)
  pooled = sorted(set(range(4)) - set(critical))
  np.testing.assert_array_equal(np.flatnonzero(np.asarray(tiles.pooled[0, 0, 0])), pooled)
  # GAPR: rectified where gain > error (tile 0), folded otherwise (tile 3).
  np.testing.assert_array_equal(
    np.flatnonzero(np.asarray(tiles.rectified[0, 0, 0])), [j for j in pooled if j == 0]
  )
  off = _plan(q, k, scale=1.0, block_q=4, block_k=4, p_remain=p_remain, gapr=False)
  assert not np.asarray(off.rectified).any()


def test_masked_tiles_are_never_chosen_and_partial_tiles_always_are():
  q, k = _hand_case()
  keep = np.ones((4, 16), bool)
  keep[:, 4:8] = False  # tile 1 (the best) is EMPTY: the mass renormalises over the others
  keep[0, 12] = False  # tile 3 is PARTIAL: always critical, never pooled
  tiles = _plan(q, k, mask=masks.DenseMask(keep), scale=1.0, block_q=4, block_k=4, p_remain=0.3)
  # p̂ over tiles (0, 2, 3) = (0.25, 0.625, 0.125): tile 2 alone reaches 0.3.
  np.testing.assert_array_equal(np.asarray(tiles.allowed[0, 0, 0]), [True, False, True, True])
  np.testing.assert_array_equal(np.asarray(tiles.critical[0, 0, 0]), [False, False, True, True])
  np.testing.assert_array_equal(np.asarray(tiles.pooled[0, 0, 0]), [True, False, False, False])
  # The same mask as a bool array is classified the same way.
  as_array = jax.jit(
    lambda q, k, m: rectified.plan(q, k, mask=m, scale=1.0, block_q=4, block_k=4, p_remain=0.3)
  )(q, k, jnp.asarray(keep))
  for got, want in zip(as_array, tiles, strict=True):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


# ------------------------------------------------------------------ the paper's thesis


@pytest.mark.parametrize("is_causal, amp", [(False, 2.0), (True, 1.0)])
def test_ablations_reduce_the_error_in_order_on_the_same_selection(is_causal, amp):
  # On block-structured inputs the error vs dense attention drops from plain block-sparse to
  # +IPAR (the critical over-weighting removed) to +IPAR+GAPR (pooled values put back). The
  # middle step needs the dropped tiles' output to be small next to the critical one
  # (zero-mean values far away: smooth fields); measured over 6 seeds each step gains >= 10 %.
  q, k, v = smooth_qkv(2, amp=amp)
  dense = dot_product_attention(q, k, v, is_causal=is_causal, implementation="xla")
  errors, plans = [], []
  for ipar, gapr in ((False, False), (True, False), (True, True)):
    out, aux = run(q, k, v, is_causal=is_causal, ipar=ipar, gapr=gapr, implementation="xla")
    errors.append(relative_error(out, dense))
    plans.append(float(aux.metrics["rectified_density"]))
  assert errors[1] < 0.95 * errors[0] and errors[2] < 0.95 * errors[1], errors
  assert plans[0] == plans[1] == plans[2] < 0.6  # the same (sparse) critical tiles throughout
  assert float(aux.metrics["rectified_pooled"]) > 0.2


# ------------------------------------------------------------------ chunked = xla


@pytest.mark.parametrize(
  "is_causal, with_bias",
  # The generated conformance classes compare the implementations on random inputs too.
  [
    pytest.param(False, False, marks=pytest.mark.slow),
    (True, False),
    pytest.param(True, True, marks=pytest.mark.slow),
  ],
)
def test_chunked_matches_xla_forward_and_gradients(is_causal, with_bias):
  q, k, v = smooth_qkv(3, T=60, amp=1.5)
  bias = 0.1 * jax.random.normal(jax.random.key(4), (1, 4, 60, 60)) if with_bias else None

  def loss(implementation, q, k, v, bias):
    out, aux = run(q, k, v, bias=bias, is_causal=is_causal, implementation=implementation)
    return jnp.sum(out * jnp.cos(out)), (out, aux)

  def value_and_grads(implementation):
    fn = jax.value_and_grad(functools.partial(loss, implementation), (0, 1, 2, 3), True)
    return jax.jit(fn)(q, k, v, bias)

  (_, (want, aux)), want_grads = value_and_grads("xla")
  (_, (got, _)), got_grads = value_and_grads("chunked")
  assert_close(got, want)
  for name, g, w in zip("qkvb", got_grads, want_grads, strict=True):
    if g is not None:
      assert_close(g, w, grad=True, err_msg=f"d{name}")
  # Pooled tiles and skipped tiles are both present, so every term is compared.
  assert float(aux.metrics["rectified_density"]) < 0.8
  assert float(aux.metrics["rectified_pooled"]) > 0


def test_bias_enters_the_pooled_terms_and_p_remain_one_is_dense_with_bias():
  q, k, v = smooth_qkv(5, T=40, amp=1.5)
  bias = jax.random.normal(jax.random.key(6), (2, 4, 40, 40))
  dense = dot_product_attention(q, k, v, bias=bias, is_causal=True, implementation="xla")
  out, _ = run(q, k, v, bias=bias, is_causal=True, p_remain=1.0, implementation="xla")
  assert_close(out, dense)
  with_bias, _ = run(q, k, v, bias=bias, is_causal=True, implementation="xla")
  without, _ = run(q, k, v, bias=jnp.zeros_like(bias), is_causal=True, implementation="xla")
  assert not np.allclose(np.asarray(with_bias), np.asarray(without), atol=1e-3)


# ------------------------------------------------------------------ causality and masks


@pytest.mark.parametrize("is_causal", [pytest.param(False, marks=pytest.mark.slow), True])
def test_a_row_reads_its_own_query_and_no_future_key_by_gradient(is_causal):
  q, k, v = smooth_qkv(7, B=1, T=64, amp=1.0)
  t = 53  # in q tile 6: earlier FULL tiles are pooled there
  tiles = _plan(q, k, is_causal=is_causal, block_q=BLK, block_k=BLK)
  rect = np.flatnonzero(np.asarray(tiles.rectified[0, 0, t // BLK]))
  assert rect.size, "the row must have pooled-and-rectified tiles for the test to bite"

  def row(q, k, v):
    out, _ = run(q, k, v, is_causal=is_causal, implementation="chunked")
    return jnp.sum(out[:, t] ** 2)

  dq, dk, dv = (np.asarray(g) for g in jax.jit(jax.grad(row, argnums=(0, 1, 2)))(q, k, v))
  # The pooled terms use q_t itself (not the tile mean); the selection carries no gradient.
  np.testing.assert_array_equal(np.delete(dq, t, axis=1), 0.0)
  assert np.abs(dq[:, t]).sum() > 0
  # Keys of a rectified tile reach the row through their pooled mean.
  j = rect[0]
  assert np.abs(dv[:, j * BLK : (j + 1) * BLK]).sum() > 0
  if is_causal:
    np.testing.assert_array_equal(dk[:, t + 1 :], 0.0)
    np.testing.assert_array_equal(dv[:, t + 1 :], 0.0)


def test_keys_a_mask_hides_have_no_influence():
  # A sliding window's edge tiles are PARTIAL (always critical, attended exactly); interior
  # tiles are FULL (pooled when not critical); keys outside a row's window never reach it.
  q, k, v = smooth_qkv(8, B=1, T=72, amp=1.0)
  window = masks.SlidingWindow(left=30, right=0)
  tiles = _plan(q, k, mask=window, block_q=BLK, block_k=BLK)
  classes = np.asarray(rectified.tile_classes(window, False, (1, 4, 72, 72), BLK, BLK))
  assert not (np.asarray(tiles.pooled) & (classes != FULL)).any()
  assert ((classes == PARTIAL) <= np.asarray(tiles.critical)).all()
  assert np.asarray(tiles.rectified).any()
  keep = window.dense(72, 72)

  def row(k, v, t):
    out, _ = run(q, k, v, mask=window, implementation="chunked")
    return jnp.sum(out[:, t] ** 2)

  row_grads = jax.jit(jax.grad(row, argnums=(0, 1)))
  for t in (40, 71):
    dk, dv = (np.asarray(g)[0, :, 0] for g in row_grads(k, v, t))
    np.testing.assert_array_equal(dk[~keep[t]], 0.0)
    np.testing.assert_array_equal(dv[~keep[t]], 0.0)
    assert np.abs(dv[keep[t]]).sum() > 0


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize("p_remain", [0.0, -0.5, 1.5, True, "0.5"])
def test_bad_p_remain_raises_naming_the_value(p_remain):
  q, k, v = smooth_qkv(0, B=1, T=8, N=1, K=1, H=4)
  with pytest.raises(ValueError, match=rf"p_remain={p_remain!r} must be a number in \(0, 1\]"):
    rectified.attention(q, k, v, p_remain=p_remain)


@pytest.mark.parametrize("knob", ["block_q", "block_k", "min_blocks"])
@pytest.mark.parametrize("value", [0, -8, 2.5, True])
def test_bad_sizes_raise_naming_the_knob(knob, value):
  q, k, v = smooth_qkv(0, B=1, T=8, N=1, K=1, H=4)
  with pytest.raises(ValueError, match=rf"{knob}={value!r} must be a positive int"):
    rectified.attention(q, k, v, **{knob: value})


def test_gapr_without_ipar_and_non_bool_flags_raise():
  q, k, v = smooth_qkv(0, B=1, T=8, N=1, K=1, H=4)
  with pytest.raises(ValueError, match=r"gapr=True needs ipar=True"):
    rectified.attention(q, k, v, ipar=False, gapr=True)
  with pytest.raises(ValueError, match=r"ipar='yes' must be a bool"):
    rectified.attention(q, k, v, ipar="yes")
