"""Runtime (data-chosen, traced) block maps through `dot_product_attention(block_map=...)`:
the chunked path walks per-(batch, head) tiles forward and backward and agrees with the dense
reference ("xla": the selection as a mask) and with the Pallas kernel (interpret) on the same
maps; the static mask is always respected; unselected tiles have no influence."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnzoo import masks
from attnzoo.attention import dot_product_attention
from attnzoo.attention.dense.softmax import selected_elements
from attnzoo.attention.sparse import block_select
from pallas_kernels.block_sparse import EMPTY, BlockMap, BlockSizes
from tests.attention.conformance import random_qkv
from tests.tolerances import assert_close

B, T, N, K, H, BLK = 2, 44, 4, 2, 8, 8  # ragged last tile (44 = 5·8 + 4)


def _topk_map(q, k, mask=None, blocks=2):
  return block_select.topk_block_map(
    q, k, block_q=BLK, block_k=BLK, num_blocks_per_row=blocks, mask=mask
  )


def _run(implementation, q, k, v, bmap, **kw):
  return dot_product_attention(q, k, v, block_map=bmap, implementation=implementation, **kw)


def _loss_and_grads(implementation, q, k, v, bmap, **kw):
  def loss(q, k, v):
    out = _run(implementation, q, k, v, bmap, **kw)
    return jnp.sum(out * jnp.cos(out)), out

  (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
  return out, grads


@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("per_head", [True, False])
def test_chunked_walks_the_runtime_map_as_the_dense_reference_does(is_causal, per_head):
  q, k, v = random_qkv(0, B, T, T, N, K, H, scale=2.0)
  mask = masks.Causal() if is_causal else None
  bmap = jax.jit(functools.partial(_topk_map, mask=mask))(q, k)
  if not per_head:  # one shared (still traced) map: all heads walk it together
    bmap = jax.tree.map(lambda a: a[:1, :1], bmap)
  assert bmap.kv_counts.shape[:2] == ((B, N) if per_head else (1, 1))
  kw = dict(is_causal=is_causal)
  want, want_grads = _loss_and_grads("xla", q, k, v, bmap, **kw)
  got, got_grads = jax.jit(functools.partial(_loss_and_grads, "chunked", **kw))(q, k, v, bmap)
  assert_close(got, want)
  for g, w in zip(got_grads, want_grads, strict=True):
    assert_close(g, w, grad=True)
  # The selection really is sparse: the output differs from dense attention.
  dense = dot_product_attention(q, k, v, implementation="xla", **kw)
  assert not np.allclose(np.asarray(got), np.asarray(dense), atol=1e-3)


def test_wide_per_head_maps_take_the_transposed_backward():
  """Full-width tables (mass maps) use the transposed-walk backward, narrow ones (top-k) the
  per-visit slots; both must equal the reference."""
  q, k, v = random_qkv(5, B, T, T, N, K, H, scale=2.0)
  bmap = block_select.mass_block_map(q, k, block_q=BLK, block_k=BLK, mass=0.6, mask=masks.Causal())
  assert bmap.kv_indices.shape[-1] == 6  # kb: wider than half the kv tiles
  want, want_grads = _loss_and_grads("xla", q, k, v, bmap, is_causal=True)
  got, got_grads = _loss_and_grads("chunked", q, k, v, bmap, is_causal=True)
  assert_close(got, want)
  for g, w in zip(got_grads, want_grads, strict=True):
    assert_close(g, w, grad=True)


def test_every_tile_selected_is_dense_attention():
  q, k, v = random_qkv(1, B, T, T, N, K, H)
  bmap = block_select.mass_block_map(q, k, block_q=BLK, block_k=BLK, mass=1.0, mask=masks.Causal())
  got = _run("chunked", q, k, v, bmap, is_causal=True)
  assert_close(got, dot_product_attention(q, k, v, is_causal=True, implementation="xla"))


def test_unselected_tiles_have_no_influence_and_selected_ones_do():
  q, k, v = random_qkv(2, B, T, T, N, K, H, scale=2.0)
  bmap = _topk_map(q, k, blocks=1)
  chosen = np.asarray(bmap.to_block_mask()) != EMPTY  # [B, N, Qb, Kb]
  # q tile 1 of (batch 0, head 0): one kv tile it did not select and one it did.
  row = chosen[0, 0, 1]
  j, used = int(np.flatnonzero(~row)[0]), int(np.flatnonzero(row)[0])
  rows = slice(BLK, 2 * BLK)

  def bumped(tile):  # head 0 reads kv head 0
    return k + jnp.zeros_like(k).at[0, tile * BLK : (tile + 1) * BLK, 0].set(5.0)

  base = np.asarray(_run("chunked", q, k, v, bmap)[0, rows, 0])
  np.testing.assert_array_equal(
    np.asarray(_run("chunked", q, bumped(j), v, bmap)[0, rows, 0]), base
  )
  assert not np.allclose(np.asarray(_run("chunked", q, bumped(used), v, bmap)[0, rows, 0]), base)


def test_a_map_built_without_the_mask_cannot_break_causality():
  q, k, v = random_qkv(3, B, T, T, N, K, H, scale=2.0)
  bmap = _topk_map(q, k, mask=None, blocks=3)  # may select future tiles
  out_fn = lambda k: _run("chunked", q, k, v, bmap, is_causal=True)
  # d out[t] / d k[s] == 0 for s > t (token-level causality by gradient).
  t = 20
  grad = jax.grad(lambda k: jnp.sum(out_fn(k)[:, t]))(k)
  assert float(jnp.abs(grad[:, t + 1 :]).max()) == 0.0
  assert float(jnp.abs(grad[:, : t + 1]).max()) > 0.0
  want = _run("xla", q, k, v, bmap, is_causal=True)
  assert_close(out_fn(k), want)


def test_selected_elements_expand_tiles_and_trim_ragged_edges():
  mask = np.zeros((1, 1, 2, 3), np.int32)
  mask[0, 0, 0, 2] = 2
  mask[0, 0, 1, 0] = 1
  bmap = BlockMap.from_block_mask(mask, block_q=4, block_k=4, seq_q=7, seq_k=10)
  dense = np.asarray(selected_elements(bmap))[0, 0]
  assert dense.shape == (7, 10)
  want = np.zeros((7, 10), bool)
  want[:4, 8:] = True
  want[4:, :4] = True
  np.testing.assert_array_equal(dense, want)


@pytest.mark.slow
def test_chunked_agrees_with_the_pallas_kernel_on_the_same_maps():
  q, k, v = random_qkv(4, B, 32, 32, N, K, H, scale=2.0)
  bmap = _topk_map(q, k, mask=masks.Causal())
  got, got_grads = _loss_and_grads("chunked", q, k, v, bmap, is_causal=True)
  want, want_grads = _loss_and_grads("pallas", q, k, v, bmap, is_causal=True, interpret=True)
  assert_close(got, want)
  for g, w in zip(got_grads, want_grads, strict=True):
    assert_close(g, w, grad=True)


@pytest.mark.parametrize(
  "change, match",
  [
    (dict(T=40), "built for T=44"),
    (dict(block_sizes=BlockSizes(16, 16)), "block_sizes has tiles"),
    (dict(groups=(3, 1)), "do not broadcast"),
    (dict(not_a_map=True), "must be a pallas_kernels.block_sparse.BlockMap"),
  ],
)
def test_bad_maps_raise_naming_the_value(change, match):
  q, k, v = random_qkv(5, B, T, T, N, K, H)
  bmap = _topk_map(q, k)
  kw = {}
  if "T" in change:
    q, k, v = (x[:, : change["T"]] for x in (q, k, v))
  if "block_sizes" in change:
    kw["block_sizes"] = change["block_sizes"]
  if "groups" in change:
    bmap = jax.tree.map(lambda a: jnp.concatenate([a[:1]] * 3), bmap)
  if "not_a_map" in change:
    bmap = np.asarray(bmap.to_block_mask())
  with pytest.raises((ValueError, TypeError), match=match):
    _run("chunked", q, k, v, bmap, **kw)
