"""BiFormer bi-level routing attention: paper invariants and the engine paths.

With top_k = all regions BRA is dense attention plus LePE; the region-major permutation is an
exact round trip; routing is detached and matches a hand-computed top-k; the chunked path
(and the Pallas kernel, slow) equals the dense reference forward and backward on sparse maps;
causality holds by gradient on a 2-D grid; masks act on original positions."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from attnzoo import masks
from attnzoo.attention import dot_product_attention
from attnzoo.attention.sparse import biformer
from pallas_kernels.block_sparse import EMPTY, FULL, BlockMap
from tests.attention.conformance import random_qkv
from tests.tolerances import assert_close

B, N, K, H, HV, C = 2, 4, 2, 8, 8, 5


def _lepe_arrays(seed=0, n=N, hv=HV, c=C):
  kk, kb = jax.random.split(jax.random.key(seed))
  return dict(
    lepe_kernel=0.3 * jax.random.normal(kk, (c, c, n, hv)),
    lepe_bias=0.3 * jax.random.normal(kb, (n, hv)),
  )


def _lepe_reference(v, kernel, bias, grid):
  """LePE by XLA's grouped convolution (NCHW, 'SAME'), independent of `biformer.lepe`."""
  Bv, S, Kv, Hv = v.shape
  n = kernel.shape[2]
  x = jnp.repeat(v, n // Kv, axis=2).reshape(Bv, *grid, n * Hv).transpose(0, 3, 1, 2)
  w = kernel.reshape(C, C, n * Hv).transpose(2, 0, 1)[:, None]  # [O, 1, C, C]
  y = lax.conv_general_dilated(
    x, w, (1, 1), "SAME", feature_group_count=n * Hv, precision=lax.Precision.HIGHEST
  )
  return y.transpose(0, 2, 3, 1).reshape(Bv, S, n, Hv) + bias[None, None]


def _bra(implementation, **kw):
  """Jitted BRA (one compilation instead of many eager ops: the suite stays fast)."""
  return jax.jit(functools.partial(biformer.attention, implementation=implementation, **kw))


def _inputs(T, seed=0, scale=2.0):
  return random_qkv(seed, B, T, T, N, K, H, HV, scale=scale)


@pytest.mark.parametrize(
  "implementation, grid, regions", [("xla", (6, 6), 3), ("chunked", (5, 7), 2)]
)
def test_all_regions_routed_is_dense_attention_plus_lepe(implementation, grid, regions):
  T = grid[0] * grid[1]
  q, k, v = _inputs(T)
  arrays = _lepe_arrays()
  got = _bra(implementation, grid=grid, regions_per_side=regions, top_k=regions * regions)(
    q, k, v, **arrays
  )
  dense = jax.jit(functools.partial(dot_product_attention, implementation="xla"))
  lepe = jax.jit(functools.partial(_lepe_reference, grid=grid))
  want = dense(q, k, v) + lepe(v, arrays["lepe_kernel"], arrays["lepe_bias"])
  assert_close(got, want)


def test_region_major_permutation_round_trip_is_exact():
  grid, regions = (5, 7), (2, 2)  # regions of 3 x 4 cells, cut by the grid's edges
  layout = biformer.RegionLayout.build(grid, regions)
  assert layout.tile == 12 and not layout.is_identity
  x = jnp.arange(35, dtype=jnp.float32).reshape(1, 35, 1, 1) + 1.0
  permuted = layout.to_regions(x)
  np.testing.assert_array_equal(np.asarray(layout.from_regions(permuted)), np.asarray(x))
  slots = np.asarray(permuted)[0, :, 0, 0]
  for a in range(2):
    for b in range(2):
      r = a * 2 + b
      tile = slots[r * 12 : (r + 1) * 12]
      cells = {
        h * 7 + w + 1.0
        for h in range(3 * a, min(3 * a + 3, 5))
        for w in range(4 * b, 4 * b + 4)
        if w < 7
      }
      assert set(tile[tile > 0].tolist()) == cells, f"region {r}"
      assert np.count_nonzero(tile == 0) == len(tile) - len(cells)  # padding slots are zeros
  assert layout.length == 3 * 12 + 7  # the last region's trailing padding is dropped
  # 1-row grids are already region-major: no gather is materialised.
  row = biformer.RegionLayout.build((1, 37), (1, 4))
  assert row.is_identity and row.tile == 10 and row.length == 37


def test_routing_is_detached():
  q, k, v = _inputs(36, seed=1)
  layout = biformer.RegionLayout.build((6, 6), (3, 3))
  grads = jax.jit(jax.grad(lambda q: jnp.sum(biformer._region_means(q, layout) ** 2)))(q)
  np.testing.assert_array_equal(np.asarray(grads), 0.0)

  # The layer's gradients equal those of attention under the same selection held constant.
  kw = dict(grid=(1, 36), regions_per_side=4, top_k=2, lepe_kernel_size=0)
  chosen = biformer.route_regions(q, k, grid=(1, 36), regions_per_side=4, top_k=2)
  classes = np.where(np.asarray(chosen), FULL, EMPTY)[:, None]
  fixed = BlockMap.from_block_mask(classes, block_q=9, block_k=9, seq_q=36, seq_k=36)

  def loss(fn, q, k, v):
    return jnp.sum(jnp.sin(fn(q, k, v)))

  bra = lambda q, k, v: biformer.attention(q, k, v, implementation="xla", **kw)
  const = lambda q, k, v: dot_product_attention(q, k, v, implementation="xla", block_map=fixed)
  got = jax.jit(jax.grad(functools.partial(loss, bra), argnums=(0, 1, 2)))(q, k, v)
  want = jax.jit(jax.grad(functools.partial(loss, const), argnums=(0, 1, 2)))(q, k, v)
  for g, w in zip(got, want, strict=True):
    assert_close(g, w, grad=True)


def test_region_selection_matches_hand_computed_top_k():
  q, k, _ = _inputs(16, seed=2, scale=3.0)
  top_k = 2
  route = functools.partial(biformer.route_regions, grid=(4, 4), regions_per_side=2, top_k=top_k)
  got = np.asarray(jax.jit(route)(q, k))
  qn, kn = np.asarray(q, np.float64), np.asarray(k, np.float64)

  def region_means(x):  # [B, 16, heads, H] -> [B, 4 regions (row-major), heads·H]
    x = x.reshape(B, 4, 4, -1)
    return np.stack(
      [x[:, 2 * a : 2 * a + 2, 2 * b : 2 * b + 2].mean((1, 2)) for a in range(2) for b in range(2)],
      axis=1,
    )

  q_r = region_means(qn)
  k_r = region_means(np.repeat(kn, N // K, axis=2))  # query head n reads kv head n // G
  adjacency = np.einsum("bic,bjc->bij", q_r, k_r)
  want = np.zeros((B, 4, 4), bool)
  for b in range(B):
    for i in range(4):
      want[b, i, np.argsort(-adjacency[b, i])[:top_k]] = True
  np.testing.assert_array_equal(got, want)
  assert got.sum(-1).tolist() == [[top_k] * 4] * B


def test_causal_routing_keeps_the_own_region_and_never_the_future():
  q, k, _ = _inputs(36, seed=3)
  chosen = np.asarray(
    biformer.route_regions(q, k, grid=(1, 36), regions_per_side=6, top_k=3, is_causal=True)
  )
  np.testing.assert_array_equal(chosen[:, np.arange(6), np.arange(6)], True)
  np.testing.assert_array_equal(np.triu(np.ones((6, 6), bool), 1) & chosen, False)
  np.testing.assert_array_equal(
    chosen.sum(-1), np.broadcast_to(np.minimum(np.arange(6) + 1, 3), (B, 6))
  )


_SPARSE_CASES = {
  "2d-causal": dict(T=36, grid=(6, 6), regions_per_side=3, top_k=3, is_causal=True),
  "2d-padded": dict(T=35, grid=(5, 7), regions_per_side=2, top_k=2, is_causal=False),
}


@pytest.mark.parametrize("case", sorted(_SPARSE_CASES))
def test_chunked_equals_reference_forward_and_gradients(case):
  opts = dict(_SPARSE_CASES[case])
  T = opts.pop("T")
  q, k, v = _inputs(T, seed=4)
  arrays = _lepe_arrays(seed=5)
  cot = jax.random.normal(jax.random.key(6), q.shape[:3] + (HV,))

  def loss(implementation, q, k, v, lepe_kernel, lepe_bias):
    out = biformer.attention(
      q,
      k,
      v,
      implementation=implementation,
      lepe_kernel=lepe_kernel,
      lepe_bias=lepe_bias,
      **opts,
    )
    return jnp.sum(out * cot), out

  args = (q, k, v, arrays["lepe_kernel"], arrays["lepe_bias"])
  grad = lambda impl: jax.value_and_grad(
    functools.partial(loss, impl), argnums=(0, 1, 2, 3, 4), has_aux=True
  )
  (_, want), want_grads = jax.jit(grad("xla"))(*args)
  (_, got), got_grads = jax.jit(grad("chunked"))(*args)
  assert_close(got, want)
  for name, g, w in zip(
    ["q", "k", "v", "lepe_kernel", "lepe_bias"], got_grads, want_grads, strict=True
  ):
    assert_close(g, w, grad=True, err_msg=f"d{name}")
  # The routing really drops regions: dense attention (+ the same LePE) differs.
  full = _bra("xla", **{**opts, "top_k": 9 if T == 36 else 4})(q, k, v, **arrays)
  assert not np.allclose(np.asarray(got), np.asarray(full), atol=1e-3)


def test_causal_on_a_2d_grid_by_gradient():
  q, k, v = _inputs(36, seed=7)
  kw = dict(grid=(6, 6), regions_per_side=3, top_k=2, is_causal=True, implementation="chunked")
  arrays = _lepe_arrays(seed=8)
  t = 20  # row 3, column 2: its region (1, 1) holds later tokens

  def row(k, v):
    return jnp.sum(biformer.attention(q, k, v, **kw, **arrays)[:, t])

  dk, dv = jax.jit(jax.grad(row, argnums=(0, 1)))(k, v)
  np.testing.assert_array_equal(np.asarray(dk[:, t + 1 :]), 0.0)
  np.testing.assert_array_equal(np.asarray(dv[:, t + 1 :]), 0.0)
  # LePE's causal taps (dy, dx) = (-1, 0), (0, -1), (0, 0) read these whatever the routing.
  assert np.abs(np.asarray(dv[:, [t - 6, t - 1, t]])).min() > 0


@pytest.mark.parametrize("kind", ["structured", "array", "segments"])
def test_masks_act_on_original_positions(kind):
  q, k, v = _inputs(35, seed=9)
  if kind == "structured":
    kw = dict(mask=masks.SlidingWindow(left=6, right=3))
  elif kind == "array":
    keep = jax.random.bernoulli(jax.random.key(10), 0.6, (B, 1, 35, 35))
    kw = dict(mask=keep.at[:, :, 4].set(False))
  else:
    kw = dict(segment_ids=jnp.broadcast_to((jnp.arange(35) >= 12).astype(jnp.int32), (B, 35)))
  static, traced = (kw, {}) if kind == "structured" else ({}, kw)  # a Mask is not a jit input
  bra = _bra("chunked", grid=(5, 7), regions_per_side=2, top_k=4, lepe_kernel_size=0, **static)
  got = bra(q, k, v, **traced)
  assert_close(got, dot_product_attention(q, k, v, implementation="xla", **kw))


@pytest.mark.parametrize(
  "change, match",
  [
    (dict(grid=(5, 5)), r"grid=\(5, 5\) has 25 cells but T=36"),
    (dict(grid=(6, 0)), "must be a pair"),
    (dict(regions_per_side=0), "regions_per_side=0"),
    (dict(top_k=10), r"top_k=10 must be an int in \[1, 9\]"),
    (dict(top_k=0), r"top_k=0"),
    (dict(lepe_kernel_size=4), "lepe_kernel_size=4 must be odd"),
    (dict(lepe_kernel_size=3), r"do not match lepe_kernel_size=3"),
    (dict(lepe_kernel=None), "needs lepe_kernel"),
    (dict(lepe_kernel_size=0), "lepe_kernel_size=0 .* were given"),
    (dict(S=30), "T == S"),
  ],
)
def test_bad_input_raises_naming_value_and_fix(change, match):
  q, k, v = _inputs(36)
  kw = dict(grid=(6, 6), regions_per_side=3, top_k=2, implementation="xla", **_lepe_arrays())
  S = change.pop("S", None)
  if S is not None:
    k, v = k[:, :S], v[:, :S]
    kw["grid"] = None
  kw.update(change)
  with pytest.raises(ValueError, match=match):
    biformer.attention(q, k, v, **kw)


@pytest.mark.slow
def test_pallas_kernel_equals_chunked_on_the_same_routing():
  q, k, v = random_qkv(11, 1, 16, 16, 2, 1, 8, scale=2.0)
  arrays = _lepe_arrays(seed=12, n=2)
  kw = dict(grid=(4, 4), regions_per_side=2, top_k=2, **arrays)

  def run(impl, q, k, v):
    out = biformer.attention(q, k, v, implementation=impl, **kw)
    return jnp.sum(jnp.sin(out)), out

  grad = lambda impl: jax.value_and_grad(functools.partial(run, impl), (0, 1, 2), has_aux=True)
  (_, want), want_grads = grad("chunked")(q, k, v)
  (_, got), got_grads = grad("pallas")(q, k, v)
  assert_close(got, want)
  for g, w in zip(got_grads, want_grads, strict=True):
    assert_close(g, w, grad=True)
