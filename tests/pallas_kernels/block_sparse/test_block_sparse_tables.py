"""Masks that read arrays (`mask_tables=`): both lowerings, the TPU keep-tile slots, lowering.

The GPU kernel gathers from the tables inside the kernel; the TPU kernel reads keep tiles
that XLA evaluated on the PARTIAL tiles (see `table_masks`). Each case compares the output
and the q/k/v gradients (custom VJP) with autodiff of the fp32 reference.
"""

import functools
import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnzoo import masks
from pallas_kernels import lowering_check as lc
from pallas_kernels.block_sparse import (
  BlockMap,
  block_sparse_attention,
  reference_attention,
  table_masks,
)
from pallas_kernels.block_sparse.config import KernelConfig
from pallas_kernels.block_sparse.ops import MaskPredicate
from tests.tolerances import assert_close

BACKENDS = ("gpu", "tpu")


def _qkv(B, T, S, N, K, H, seed=0):
  kq, kk, kv, kg = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(kq, (B, T, N, H))
  k = jax.random.normal(kk, (B, S, K, H))
  v = jax.random.normal(kv, (B, S, K, H))
  return q, k, v, jax.random.normal(kg, (B, T, N, H))


def _out_and_grads(fn, q, k, v, d_out):
  out, vjp = jax.vjp(fn, q, k, v)
  return out, vjp(d_out)


def check_table_mask(backend, mask, block_map, q, k, v, d_out):
  """Kernel with `mask.tables()` as inputs vs the reference with the mask's own predicate."""
  kernel = functools.partial(
    block_sparse_attention,
    block_map=block_map,
    mask_fn=MaskPredicate(mask),
    mask_tables=mask.tables(),
    interpret=True,
    backend=backend,
  )
  got, got_grads = jax.jit(functools.partial(_out_and_grads, kernel))(q, k, v, d_out)
  reference = functools.partial(reference_attention, block_map=block_map, mask_fn=mask.predicate)
  want, want_grads = _out_and_grads(reference, q, k, v, d_out)
  assert_close(got, want, err_msg="out")
  for name, g, w in zip("qkv", got_grads, want_grads, strict=True):
    assert_close(g, w, grad=True, err_msg=f"d{name}")
  return got


def _dense(T, S, seed=0):
  keep = np.random.default_rng(seed).random((T, S)) < 0.35
  keep[5] = False  # a fully masked query row
  return masks.DenseMask(keep)


# ------------------------------------------------------------------ both lowerings


@pytest.mark.parametrize("backend", BACKENDS)
def test_dense_mask_gqa_ragged(backend):
  T, S = 40, 56  # T != S, neither a multiple of the 16-tiles
  mask = _dense(T, S)
  q, k, v, g = _qkv(1, T, S, 4, 2, 16)
  out = check_table_mask(backend, mask, mask.block_map(T, S, 16, 16), q, k, v, g)
  np.testing.assert_array_equal(np.asarray(out[:, 5]), 0.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_documents_and_causal(backend):
  T = 64
  mask = masks.Segments.from_lengths([8, 40, 16]) & masks.Causal()
  block_map = mask.block_map(T, T, 16, 16)
  assert {0, 1, 2} <= set(np.unique(block_map.to_block_mask())), "needs every tile kind"
  q, k, v, g = _qkv(2, T, T, 2, 1, 16, seed=1)
  check_table_mask(backend, mask, block_map, q, k, v, g)


@pytest.mark.parametrize("backend", BACKENDS)
def test_random_blocks_at_another_tile_size_or_window(backend):
  # 8x8 random blocks seen through 16x16 kernel tiles: partial tiles read the pattern.
  T = 48
  mask = masks.RandomBlocks(0.4, 8, 8, seed=3, seq_q=T, seq_k=T) | masks.SlidingWindow(2, 2)
  q, k, v, g = _qkv(1, T, T, 2, 2, 16, seed=2)
  check_table_mask(backend, mask, mask.block_map(T, T, 16, 16), q, k, v, g)


@pytest.mark.parametrize("backend", BACKENDS)
def test_traced_block_map_with_a_table_mask(backend):
  """A content-dependent (traced) map restricting a table mask: TPU keeps every tile."""
  T = 48
  mask = masks.Segments.from_lengths([20, 28])
  static = mask.block_mask(T, T, 16, 16)
  q, k, v, g = _qkv(1, T, T, 2, 1, 16, seed=4)

  def attend(q, k, v, tiles):
    block_map = BlockMap.from_block_mask(tiles, block_q=16, block_k=16, seq_q=T, seq_k=T)
    return block_sparse_attention(
      q,
      k,
      v,
      block_map,
      mask_fn=MaskPredicate(mask),
      mask_tables=mask.tables(),
      interpret=True,
      backend=backend,
    )

  tiles = jnp.asarray(static).at[2, 2].set(0)  # drop one FULL tile, as a top-k might
  got, got_grads = jax.jit(
    lambda q, k, v, g, tiles: _out_and_grads(lambda q, k, v: attend(q, k, v, tiles), q, k, v, g)
  )(q, k, v, g, tiles)
  block_map = BlockMap.from_block_mask(np.asarray(tiles), block_q=16, block_k=16, seq_q=T, seq_k=T)
  ref = functools.partial(reference_attention, block_map=block_map, mask_fn=mask.predicate)
  want, want_grads = _out_and_grads(ref, q, k, v, g)
  assert_close(got, want)
  for got_grad, want_grad in zip(got_grads, want_grads, strict=True):
    assert_close(got_grad, want_grad, grad=True)


def test_a_plain_table_predicate_and_bool_tables():
  """The kernel contract without attnzoo: tables indexed directly, a bool one among them."""
  T = 32
  ids = jnp.asarray(np.repeat([0, 1, 2], [7, 9, 16]), jnp.int32)
  allowed = jnp.asarray(np.eye(3, dtype=bool) | np.eye(3, k=-1, dtype=bool))  # doc d sees d-1

  def mask_fn(tables, q_pos, k_pos):
    ids, allowed = tables
    last = ids.shape[0] - 1
    return allowed[ids[jnp.clip(q_pos, 0, last)], ids[jnp.clip(k_pos, 0, last)]]

  keep = np.asarray(allowed)[np.asarray(ids)[:, None], np.asarray(ids)[None, :]]
  block_map = masks.DenseMask(keep).block_map(T, T, 16, 16)
  q, k, v, _ = _qkv(1, T, T, 2, 1, 16, seed=5)
  got = block_sparse_attention(
    q, k, v, block_map, mask_fn=mask_fn, mask_tables=(ids, allowed), interpret=True
  )
  want = reference_attention(q, k, v, block_map, mask_fn=mask_fn, mask_tables=(ids, allowed))
  assert_close(got, want)
  assert_close(got, jax.nn.dot_product_attention(q, k, v, mask=jnp.asarray(keep)[None, None]))


# ------------------------------------------------------------------ TPU keep-tile slots


def test_tpu_keep_tiles_cover_exactly_the_partial_tiles():
  T, S, b = 96, 80, 16
  mask = masks.Segments.from_lengths([30, 40, 26], [20, 35, 25]) & masks.Causal(offset=S - T)
  block_map = mask.block_map(T, S, b, b)
  cfg = KernelConfig(
    mask_fn=MaskPredicate(mask),
    scale=1.0,
    soft_cap=None,
    block_q=b,
    block_k=b,
    seq_q=T,
    seq_k=S,
    has_segments=False,
    interpret=True,
    table_dtypes=("int32", "int32"),
  )
  tables, tiles, kv_slots, q_slots = table_masks.tpu_inputs(mask.tables(), block_map)
  classes = mask.block_mask(T, S, b, b)
  np.testing.assert_array_equal(sorted(map(tuple, tiles)), np.argwhere(classes == 1))
  # Every PARTIAL entry of both tables reads its own tile; slots never leave [0, P).
  for rows_are_q, (idx, cnt, part), slots in (
    (True, (block_map.kv_indices, block_map.kv_counts, block_map.kv_partial), kv_slots),
    (False, (block_map.q_indices, block_map.q_counts, block_map.q_partial), q_slots),
  ):
    assert slots.min() >= 0 and slots.max() < len(tiles)
    for r in range(idx.shape[2]):
      for t in range(cnt[0, 0, r]):
        if part[0, 0, r, t]:
          want = (r, idx[0, 0, r, t]) if rows_are_q else (idx[0, 0, r, t], r)
          assert tuple(tiles[slots[0, 0, r, t]]) == want
  keep = table_masks.keep_tiles(cfg.mask_fn, tables, jnp.asarray(tiles), cfg)
  dense = mask.dense(T, S)
  i, j = tiles[0]
  np.testing.assert_array_equal(np.asarray(keep[0]), dense[i * b : i * b + b, j * b : j * b + b])


# ------------------------------------------------------------------ validation


def test_bad_tables_raise_naming_the_value():
  q, k, v, _ = _qkv(1, 32, 32, 2, 1, 8)
  mask = _dense(32, 32)
  block_map = mask.block_map(32, 32, 16, 16)
  with pytest.raises(ValueError, match="without a mask_fn"):
    block_sparse_attention(q, k, v, block_map, mask_tables=mask.tables(), interpret=True)
  with pytest.raises(ValueError, match=r"mask_tables\[0\]"):
    block_sparse_attention(
      q,
      k,
      v,
      block_map,
      mask_fn=lambda t, a, b: a >= b,
      mask_tables=(jnp.int32(3),),
      interpret=True,
    )
  with pytest.raises(TypeError, match="tuple of arrays"):
    block_sparse_attention(
      q, k, v, block_map, mask_fn=MaskPredicate(mask), mask_tables=mask.array, interpret=True
    )
  captured = jnp.asarray(mask.array)
  with pytest.raises(NotImplementedError, match="mask_tables="):
    block_sparse_attention(
      q,
      k,
      v,
      block_map,
      mask_fn=lambda tables, a, b: tables[0][a, b] & captured[a, b],
      mask_tables=mask.tables(),
      interpret=True,
    )


# ------------------------------------------------------------------ compile-only (real hardware)

B, T, S, N, K, H = 1, 500, 380, 4, 2, 128
LOWERING_MASKS = {
  "dense": masks.DenseMask(np.random.default_rng(0).random((T, S)) < 0.5),
  "documents_causal": masks.Segments.from_lengths([200, 300], [150, 230])
  & masks.Causal(offset=S - T),
}


def _fns(mask, backend):
  def forward(q, k, v):
    return block_sparse_attention(
      q,
      k,
      v,
      mask.block_map(T, S, 128, 128),
      mask_fn=MaskPredicate(mask),
      mask_tables=mask.tables(),
      interpret=False,  # compile for `backend` (lowering only: this host has no GPU/TPU)
      backend=backend,
    )

  def loss(q, k, v):
    return jnp.sum(forward(q, k, v).astype(jnp.float32))

  return forward, jax.grad(loss, argnums=(0, 1, 2))


def _args():
  sds = jax.ShapeDtypeStruct
  return (
    sds((B, T, N, H), jnp.bfloat16),
    sds((B, S, K, H), jnp.bfloat16),
    sds((B, S, K, H), jnp.bfloat16),
  )


@pytest.mark.parametrize("name", sorted(LOWERING_MASKS))
def test_tpu_mosaic_export_with_table_masks(name):
  forward, grad = _fns(LOWERING_MASKS[name], "tpu")
  assert lc.tpu_export(forward, *_args()) == 1
  assert lc.tpu_export(grad, *_args()) == 3


@functools.cache
def _ttirs(name):
  forward, grad = _fns(LOWERING_MASKS[name], "gpu")
  return lc.triton_ttir(forward, *_args()), lc.triton_ttir(grad, *_args())


@pytest.mark.parametrize("name", sorted(LOWERING_MASKS))
def test_gpu_triton_lowering_gathers_from_tables(name):
  fwd_ttir, grad_ttir = _ttirs(name)
  assert len(fwd_ttir) == 1 and len(grad_ttir) == 3
  for module in fwd_ttir + grad_ttir:
    assert "tt.dot" in module
    # The table gather: a load through a [bq, bk] tensor of pointers.
    assert "tensor<128x128x!tt.ptr<i" in module, "no gather load from a mask table"


@pytest.mark.skipif(
  importlib.util.find_spec("triton") is None,
  reason="the `triton` package is not installed (pip install .[triton]); "
  "TTIR -> PTX for sm_90 needs it",
)
def test_gpu_ttir_with_table_gathers_compiles_to_ptx_sm90():
  for module in _ttirs("documents_causal")[1]:
    result = lc.triton_compile(module)
    assert result["ptx_chars"] > 0 and result["shared_bytes"] <= 227 * 1024
