"""Property tests: for every mask kind (and AND/OR combinations) and random tilings,
the block classification, the BlockMap tables and the traced predicate all agree
with `dense`, the definition."""

from __future__ import annotations

import functools

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings

from attnzoo import masks
from pallas_kernels.block_sparse import EMPTY, FULL, PARTIAL, BlockMap, num_blocks

MAX_LEN = 300
SETTINGS = settings(max_examples=100, deadline=None)
JIT_SETTINGS = settings(max_examples=15, deadline=None)


# ------------------------------------------------------------------ strategies


def _grid_shapes():
  """1-D to 3-D grids with at most MAX_LEN cells."""
  return st.lists(st.integers(1, 12), min_size=1, max_size=3).filter(
    lambda s: int(np.prod(s)) <= MAX_LEN
  ) | st.lists(st.integers(1, MAX_LEN), min_size=1, max_size=1)


@st.composite
def neighborhoods(draw, shape):
  window, stride, dilation, causal = [], [], [], []
  for n in shape:
    d = draw(st.integers(1, min(3, n)))
    w = draw(st.integers(1, n // d))
    window.append(w)
    stride.append(draw(st.integers(1, w)))
    dilation.append(d)
    causal.append(draw(st.booleans()))
  return masks.Neighborhood(
    tuple(shape), tuple(window), tuple(stride), tuple(dilation), tuple(causal)
  )


@st.composite
def segment_ids(draw, length):
  if draw(st.booleans()):  # contiguous documents
    cuts = sorted(draw(st.sets(st.integers(1, max(1, length - 1)), max_size=6)))
    cuts = [c for c in cuts if c < length]
    return np.repeat(np.arange(len(cuts) + 1), np.diff([0, *cuts, length]))
  seed = draw(st.integers(0, 2**31 - 1))
  return np.random.default_rng(seed).integers(0, draw(st.integers(1, 4)), length)


@st.composite
def leaves(draw, seq_q, seq_k, shape):
  kinds = [
    "causal",
    "window",
    "chunked",
    "blocked",
    "global",
    "sinks",
    "segments",
    "random",
    "dense",
  ]
  if shape is not None:
    kinds.append("neighborhood")
  kind = draw(st.sampled_from(kinds))
  small = st.integers(0, 48)
  if kind == "causal":
    return masks.Causal(draw(st.integers(-seq_q, seq_k)))
  if kind == "window":
    return masks.SlidingWindow(draw(small), draw(small), draw(st.integers(-seq_q, seq_k)))
  if kind == "chunked":
    return masks.Chunked(draw(st.integers(1, 64)), draw(st.booleans()))
  if kind == "blocked":
    return masks.Blocked(draw(st.integers(1, 64)), draw(st.none() | st.integers(1, 64)))
  if kind == "global":
    return masks.GlobalTokens(draw(small), draw(st.booleans()))
  if kind == "sinks":
    return masks.AttentionSinks(draw(small))
  if kind == "segments":
    return masks.Segments(draw(segment_ids(seq_q)), draw(segment_ids(seq_k)))
  if kind == "random":
    return masks.RandomBlocks(
      draw(st.floats(0.0, 1.0)),
      draw(st.integers(1, 64)),
      draw(st.integers(1, 64)),
      draw(st.integers(0, 2**31 - 1)),
      seq_q,
      seq_k,
      draw(st.booleans()),
    )
  if kind == "dense":
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    shape = (draw(st.sampled_from([1, seq_q])), draw(st.sampled_from([1, seq_k])))
    return masks.DenseMask(rng.random(shape) < draw(st.floats(0.0, 1.0)))
  return draw(neighborhoods(shape))


@st.composite
def masks_and_lengths(draw):
  """(mask, T, S): a leaf mask or an AND/OR tree of up to 3 leaves."""
  shape = None
  if draw(st.booleans()):
    shape = draw(_grid_shapes())
    seq_q = seq_k = int(np.prod(shape))
  else:
    seq_q, seq_k = draw(st.integers(1, MAX_LEN)), draw(st.integers(1, MAX_LEN))
  leaf = leaves(seq_q, seq_k, shape)
  mask = draw(leaf)
  for _ in range(draw(st.integers(0, 2))):
    other = draw(leaf)
    mask = mask & other if draw(st.booleans()) else mask | other
  return mask, seq_q, seq_k


tilings = st.tuples(st.integers(1, 96), st.integers(1, 96))


# ------------------------------------------------------------------ oracles


def classify_from_dense(keep: np.ndarray, block_q: int, block_k: int) -> np.ndarray:
  """EMPTY iff no in-range element kept; FULL iff every in-range element kept."""
  seq_q, seq_k = keep.shape
  out = np.empty((num_blocks(seq_q, block_q), num_blocks(seq_k, block_k)), np.int32)
  for i in range(out.shape[0]):
    for j in range(out.shape[1]):
      tile = keep[i * block_q : (i + 1) * block_q, j * block_k : (j + 1) * block_k]
      out[i, j] = FULL if tile.all() else PARTIAL if tile.any() else EMPTY
  return out


def assert_tables_consistent(indices, counts, partial, block_mask):
  """One direction of the BlockMap tables against block_mask[rows, cols]."""
  rows, width = indices.shape
  np.testing.assert_array_equal(counts, (block_mask > 0).sum(-1))
  assert width == max(1, counts.max()), "static tables use the exact maximum width"
  for r in range(rows):
    c = counts[r]
    active = np.flatnonzero(block_mask[r])
    np.testing.assert_array_equal(indices[r, :c], active, err_msg=f"row {r}")
    np.testing.assert_array_equal(np.diff(indices[r, :c]) > 0, True)
    np.testing.assert_array_equal(indices[r, c:], active[-1] if c else 0, err_msg=f"pad {r}")
    np.testing.assert_array_equal(partial[r, :c], block_mask[r, active] == PARTIAL)
    np.testing.assert_array_equal(partial[r, c:], 0)


# ------------------------------------------------------------------ properties


@SETTINGS
@given(masks_and_lengths(), tilings)
def test_block_classification_matches_dense(mask_lengths, tiling):
  mask, seq_q, seq_k = mask_lengths
  block_q, block_k = tiling
  expected = classify_from_dense(mask.dense(seq_q, seq_k), block_q, block_k)
  got = mask.block_mask(seq_q, seq_k, block_q, block_k)
  assert got.dtype == np.int32
  np.testing.assert_array_equal(got, expected, err_msg=repr(mask))
  # Analytic overrides agree with the generic exact classification.
  np.testing.assert_array_equal(
    got, masks.Mask.block_mask(mask, seq_q, seq_k, block_q, block_k), err_msg=repr(mask)
  )
  bmap = mask.block_map(seq_q, seq_k, block_q, block_k)
  np.testing.assert_array_equal(bmap.to_block_mask()[0, 0], expected, err_msg=repr(mask))


@SETTINGS
@given(masks_and_lengths(), tilings)
def test_block_map_tables_are_consistent(mask_lengths, tiling):
  mask, seq_q, seq_k = mask_lengths
  block_q, block_k = tiling
  block_mask = mask.block_mask(seq_q, seq_k, block_q, block_k)
  bmap = mask.block_map(seq_q, seq_k, block_q, block_k)
  qb, kb = block_mask.shape
  tables = (
    bmap.kv_indices,
    bmap.kv_counts,
    bmap.kv_partial,
    bmap.q_indices,
    bmap.q_counts,
    bmap.q_partial,
  )
  for table in tables:
    assert isinstance(table, np.ndarray) and table.dtype == np.int32
  assert bmap.kv_indices.shape[:3] == (1, 1, qb) and bmap.q_indices.shape[:3] == (1, 1, kb)
  assert_tables_consistent(
    bmap.kv_indices[0, 0], bmap.kv_counts[0, 0], bmap.kv_partial[0, 0], block_mask
  )
  assert_tables_consistent(
    bmap.q_indices[0, 0], bmap.q_counts[0, 0], bmap.q_partial[0, 0], block_mask.T
  )
  np.testing.assert_allclose(bmap.density(), (block_mask > 0).mean())


def _tile_positions(seq_q, seq_k, block_q, block_k):
  # As a kernel sees them: positions of whole tiles, ragged tails included.
  q = jnp.arange(num_blocks(seq_q, block_q) * block_q, dtype=jnp.int32)[:, None]
  k = jnp.arange(num_blocks(seq_k, block_k) * block_k, dtype=jnp.int32)[None, :]
  return q, k


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4))
def _padded_predicate(mask, seq_q, seq_k, block_q, block_k):
  q, k = _tile_positions(seq_q, seq_k, block_q, block_k)
  return jnp.broadcast_to(mask.predicate(q, k, jnp), (q.shape[0], k.shape[1]))


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4))
def _padded_predicate_with(mask, seq_q, seq_k, block_q, block_k, tables):
  # The tables arrive traced, as kernel inputs do: nothing is captured as a constant.
  q, k = _tile_positions(seq_q, seq_k, block_q, block_k)
  return jnp.broadcast_to(mask.predicate_with(tables, q, k, jnp), (q.shape[0], k.shape[1]))


@JIT_SETTINGS
@given(masks_and_lengths(), tilings)
def test_jitted_predicate_matches_dense(mask_lengths, tiling):
  mask, seq_q, seq_k = mask_lengths
  expected = mask.dense(seq_q, seq_k)
  keep = _padded_predicate(mask, seq_q, seq_k, *tiling)
  assert keep.dtype == jnp.bool_
  np.testing.assert_array_equal(np.asarray(keep)[:seq_q, :seq_k], expected, err_msg=repr(mask))
  tables = tuple(jnp.asarray(t) for t in mask.tables())
  keep = _padded_predicate_with(mask, seq_q, seq_k, *tiling, tables)
  np.testing.assert_array_equal(np.asarray(keep)[:seq_q, :seq_k], expected, err_msg=repr(mask))


@JIT_SETTINGS
@given(masks_and_lengths(), tilings)
def test_traced_block_map_matches_static(mask_lengths, tiling):
  mask, seq_q, seq_k = mask_lengths
  block_q, block_k = tiling
  static = mask.block_map(seq_q, seq_k, block_q, block_k)
  sizes = dict(block_q=block_q, block_k=block_k, seq_q=seq_q, seq_k=seq_k)

  @jax.jit
  def build(block_mask):
    exact = BlockMap.from_block_mask(
      block_mask, **sizes, max_kv_blocks=static.max_kv_blocks, max_q_blocks=static.max_q_blocks
    )
    return exact, BlockMap.from_block_mask(block_mask, **sizes).to_block_mask()

  traced, wide_block_mask = build(jnp.asarray(mask.block_mask(seq_q, seq_k, block_q, block_k)))
  traced_np = jax.tree.map(np.asarray, traced)
  for name in ("kv_indices", "kv_counts", "kv_partial", "q_indices", "q_counts", "q_partial"):
    np.testing.assert_array_equal(getattr(traced_np, name), getattr(static, name), err_msg=name)
  np.testing.assert_array_equal(wide_block_mask, static.to_block_mask())
