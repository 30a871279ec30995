"""Both lowerings of `block_sparse_attention` (interpret mode) against `reference.py`.

Every case checks the forward output and the gradients w.r.t. q, k, v (through the
kernels' custom VJP) against autodiff of the fp32 reference. Grids stay tiny: the
interpreter pays per grid step and each case compiles fwd + dQ + dK/dV kernels (~3 s).
"""

import functools

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnzoo import masks
from pallas_kernels.block_sparse import BlockMap, block_sparse_attention, reference_attention
from tests.tolerances import assert_close

BACKENDS = ("gpu", "tpu")


def _qkv(B, T, S, N, K, H, Hv=None, dtype=jnp.float32, seed=0):
  kq, kk, kv, kg = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(kq, (B, T, N, H), jnp.float32).astype(dtype)
  k = jax.random.normal(kk, (B, S, K, H), jnp.float32).astype(dtype)
  v = jax.random.normal(kv, (B, S, K, Hv or H), jnp.float32).astype(dtype)
  d_out = jax.random.normal(kg, (B, T, N, Hv or H), jnp.float32).astype(dtype)
  return q, k, v, d_out


def _out_and_grads(fn, q, k, v, d_out):
  out, vjp = jax.vjp(fn, q, k, v)
  return out, vjp(d_out)


def check(backend, block_map, q, k, v, d_out, **options):
  """Kernel (jit, one compile for out + grads) vs the fp32 reference and its autodiff."""
  kernel = functools.partial(
    block_sparse_attention, block_map=block_map, interpret=True, backend=backend, **options
  )
  got, got_grads = jax.jit(functools.partial(_out_and_grads, kernel))(q, k, v, d_out)
  f32 = lambda x: x.astype(jnp.float32)
  reference = functools.partial(reference_attention, block_map=block_map, **options)
  want, want_grads = jax.jit(functools.partial(_out_and_grads, reference))(
    f32(q), f32(k), f32(v), f32(d_out)
  )
  assert got.dtype == q.dtype
  assert_close(got, want, q.dtype, err_msg="out")
  for name, g, w in zip("qkv", got_grads, want_grads, strict=True):
    assert g.dtype == q.dtype
    assert_close(g, w, q.dtype, grad=True, err_msg=f"d{name}")
  return got, got_grads


# ------------------------------------------------------------------ mask kinds and options


@pytest.mark.parametrize("backend", BACKENDS)
def test_causal_mqa(backend):
  q, k, v, g = _qkv(1, 64, 64, 2, 1, 16)
  mask = masks.Causal()
  check(backend, mask.block_map(64, 64, 32, 32), q, k, v, g, mask_fn=mask.predicate)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sliding_window_has_empty_partial_and_full_tiles(backend):
  q, k, v, g = _qkv(1, 96, 96, 2, 2, 16)
  mask = masks.SlidingWindow(left=40) & masks.Causal()
  block_map = mask.block_map(96, 96, 16, 16)
  kinds = set(np.unique(block_map.to_block_mask()))
  assert kinds == {0, 1, 2}, kinds  # the case must exercise every tile kind
  check(backend, block_map, q, k, v, g, mask_fn=mask.predicate)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gqa_cross_lengths_not_block_multiples(backend):
  T, S = 40, 72  # T != S, neither a multiple of the 32-tiles
  q, k, v, g = _qkv(2, T, S, 4, 2, 16, Hv=8)
  mask = masks.Causal(offset=S - T)
  check(backend, mask.block_map(T, S, 32, 32), q, k, v, g, mask_fn=mask.predicate)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ragged_full_map_drops_out_of_range_keys(backend):
  # No mask_fn: a FULL last tile must still drop the padded keys 50..63.
  T, S = 32, 50
  q, k, v, g = _qkv(1, T, S, 2, 1, 16)
  block_map = BlockMap.from_block_mask(np.full((1, 2), 2), block_q=32, block_k=32, seq_q=T, seq_k=S)
  check(backend, block_map, q, k, v, g)


@pytest.mark.parametrize("backend", BACKENDS)
def test_segment_ids_and_soft_cap(backend):
  q, k, v, g = _qkv(2, 64, 64, 2, 1, 16)
  segment_ids = jnp.asarray([[0] * 20 + [1] * 30 + [2] * 14, [0] * 64])
  mask = masks.Causal()
  check(
    backend,
    mask.block_map(64, 64, 32, 32),
    q * 3,
    k,
    v,
    g,
    mask_fn=mask.predicate,
    segment_ids=segment_ids,
    logits_soft_cap=5.0,
    scale=0.5,
  )


@pytest.mark.parametrize("backend", BACKENDS)
def test_cross_segment_ids_pair(backend):
  T, S = 32, 48
  q, k, v, g = _qkv(1, T, S, 2, 2, 16)
  q_ids = jnp.asarray([[0] * 16 + [1] * 16])
  kv_ids = jnp.asarray([[1] * 20 + [0] * 28])
  block_map = BlockMap.from_block_mask(np.full((1, 2), 2), block_q=32, block_k=32, seq_q=T, seq_k=S)
  check(backend, block_map, q, k, v, g, segment_ids=(q_ids, kv_ids))


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16(backend):
  q, k, v, g = _qkv(1, 64, 64, 2, 1, 32, dtype=jnp.bfloat16)
  mask = masks.Causal()
  check(backend, mask.block_map(64, 64, 32, 32), q, k, v, g, mask_fn=mask.predicate)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fully_masked_rows_give_zeros_and_finite_grads(backend):
  T = S = 64
  q, k, v, g = _qkv(1, T, S, 2, 1, 16)
  # q-block 1 lists no kv tile at all; query 5 has a segment id no key has.
  tiles = np.array([[2, 0], [0, 0]])
  block_map = BlockMap.from_block_mask(tiles, block_q=32, block_k=32, seq_q=T, seq_k=S)
  q_ids = jnp.zeros((1, T), jnp.int32).at[0, 5].set(7)
  kv_ids = jnp.zeros((1, S), jnp.int32)
  out, grads = check(backend, block_map, q, k, v, g, segment_ids=(q_ids, kv_ids))
  np.testing.assert_array_equal(np.asarray(out[0, 32:]), 0.0)
  np.testing.assert_array_equal(np.asarray(out[0, 5]), 0.0)
  np.testing.assert_array_equal(np.asarray(grads[0][0, 32:]), 0.0)
  for grad in grads:
    assert np.all(np.isfinite(np.asarray(grad)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_per_head_traced_maps_inside_jit(backend):
  """Content-dependent maps: one per (batch, head), built from a traced block mask."""
  B, T, N, K = 2, 64, 2, 1
  q, k, v, g = _qkv(B, T, T, N, K, 16)

  def attend(q, k, v, tiles):
    block_map = BlockMap.from_block_mask(tiles, block_q=16, block_k=32, seq_q=T, seq_k=T)
    return block_sparse_attention(q, k, v, block_map, interpret=True, backend=backend)

  tiles = jax.random.bernoulli(jax.random.key(3), 0.5, (B, N, 4, 2)).astype(jnp.int32) * 2
  tiles = tiles.at[0, 1].set(0).at[1, 0, :, 0].set(1)  # an all-empty head; PARTIAL flags
  # `tiles` is a jit argument, so the tables are traced (static width Kb) as for top-k maps.
  got, got_grads = jax.jit(
    lambda q, k, v, g, tiles: _out_and_grads(lambda q, k, v: attend(q, k, v, tiles), q, k, v, g)
  )(q, k, v, g, tiles)
  static_map = BlockMap.from_block_mask(np.asarray(tiles), block_q=16, block_k=32, seq_q=T, seq_k=T)
  want, want_grads = _out_and_grads(
    lambda q, k, v: reference_attention(q, k, v, static_map), q, k, v, g
  )
  assert_close(got, want)
  for got_grad, want_grad in zip(got_grads, want_grads, strict=True):
    assert_close(got_grad, want_grad, grad=True)


def test_gqa_equals_mha_with_repeated_kv_heads():
  q, k, v, _ = _qkv(1, 48, 40, 4, 2, 16)
  mask = masks.SlidingWindow(10, 3)
  attend = functools.partial(
    block_sparse_attention,
    block_map=mask.block_map(48, 40, 16, 16),
    mask_fn=mask.predicate,
    interpret=True,
    backend="gpu",
  )
  repeat = lambda x: jnp.repeat(x, 2, axis=2)
  assert_close(attend(q, k, v), attend(q, repeat(k), repeat(v)))


# ------------------------------------------------------------------ every attnzoo mask kind


def _mask_cases():
  return {
    "chunked": masks.Chunked(24),
    "blocked": masks.Blocked(20, 20),
    "global_or_window": masks.GlobalTokens(3) | masks.SlidingWindow(6, 6),
    "sinks_or_window_and_causal": (masks.SlidingWindow(20) & masks.Causal())
    | masks.AttentionSinks(2),
    "neighborhood_2d": masks.Neighborhood((6, 8), window=(3, 5)),
    "neighborhood_causal": masks.Neighborhood((48,), window=7, causal=True),
    # FULL/EMPTY tiles only at its own block size: the kernel never needs the predicate.
    "random_blocks": masks.RandomBlocks(0.5, 16, 16, seed=1, seq_q=48, seq_k=48),
  }


# The predicate code is shared by both lowerings: each mask kind runs on the GPU-style kernel
# by default and on the TPU-style one in the slow suite.
@pytest.mark.parametrize("backend", ["gpu", pytest.param("tpu", marks=pytest.mark.slow)])
@pytest.mark.parametrize("name", sorted(_mask_cases()))
def test_attnzoo_mask_kinds(name, backend):
  mask = _mask_cases()[name]
  q, k, v, g = _qkv(1, 48, 48, 2, 1, 16)
  check(backend, mask.block_map(48, 48, 16, 16), q, k, v, g, mask_fn=mask.predicate)


# ------------------------------------------------------------------ random block maps


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
@hypothesis.settings(max_examples=3, deadline=None, derandomize=True)
@hypothesis.given(data=st.data())
def test_random_block_maps(backend, data):
  T = data.draw(st.integers(20, 64), label="T")
  S = data.draw(st.integers(20, 64), label="S")
  qb, kb = -(-T // 16), -(-S // 16)
  keep = np.asarray(
    data.draw(st.lists(st.booleans(), min_size=qb * kb, max_size=qb * kb), label="keep")
  ).reshape(qb, kb)
  window = data.draw(st.integers(0, 24), label="window")
  mask = masks.SlidingWindow(window, window)
  # A random subset of the mask's tiles (as a content-dependent selection would give):
  # FULL/PARTIAL labels stay exact, so skipping the predicate on FULL tiles is sound.
  tiles = np.where(keep, mask.block_mask(T, S, 16, 16), 0)
  block_map = BlockMap.from_block_mask(tiles, block_q=16, block_k=16, seq_q=T, seq_k=S)
  q, k, v, g = _qkv(1, T, S, 2, 1, 16, seed=T * 100 + S)
  check(backend, block_map, q, k, v, g, mask_fn=mask.predicate)
