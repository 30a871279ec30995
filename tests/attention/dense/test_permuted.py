"""Permuted layouts: `dot_product_attention(positions=...)` evaluates the structured mask on the
original positions of each row, so attention in any permuted layout equals the unpermuted one
(forward and gradients, xla and chunked, shared and per-(batch, head) runtime maps), causality
holds on the original order, and the output is un-permuted exactly."""

import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnzoo import masks
from attnzoo.attention import dot_product_attention
from attnzoo.attention.dense.permuted import (
  check_permutation,
  invert_permutation,
  permuted_attention,
  tile_major_order,
)
from attnzoo.attention.sparse import block_select
from pallas_kernels.block_sparse import BlockSizes
from tests.attention.conformance import random_qkv
from tests.tolerances import assert_close

B, T, N, K, H = 2, 44, 4, 2, 8
TILES = BlockSizes(16, 8)


def _grads(fn, q, k, v):
  loss = lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v)))
  return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)


@pytest.mark.parametrize("implementation", ["xla", "chunked"])
@pytest.mark.parametrize(
  "mask, is_causal",
  [(None, True), (masks.SlidingWindow(left=6, right=2), False), (masks.AttentionSinks(3), True)],
)
def test_any_permutation_equals_the_original_layout(implementation, mask, is_causal):
  q, k, v = random_qkv(0, B, T, T, N, K, H, scale=2.0)
  rng = np.random.default_rng(1)
  q_perm = np.stack([rng.permutation(T) for _ in range(B)])  # one layout per batch element
  kv_perm = rng.permutation(T)
  kw = dict(mask=mask, is_causal=is_causal)
  opts = dict(implementation=implementation, block_sizes=TILES if implementation != "xla" else None)
  want = functools.partial(dot_product_attention, implementation="xla", **kw)
  got = jax.jit(functools.partial(permuted_attention, q_perm=q_perm, kv_perm=kv_perm, **kw, **opts))
  assert_close(got(q, k, v), want(q, k, v))
  for g, w in zip(_grads(got, q, k, v), _grads(want, q, k, v), strict=True):
    assert_close(g, w, grad=True)


def test_causal_in_permuted_order_would_leak_and_positions_prevent_it():
  """Causality by gradient on the ORIGINAL order: no output depends on a later token."""
  q, k, v = random_qkv(2, 1, T, T, N, K, H)
  kv_perm = np.random.default_rng(3).permutation(T)
  k_p, v_p = k[:, kv_perm], v[:, kv_perm]
  run = lambda k_p, pos: dot_product_attention(
    q, k_p, v_p, is_causal=True, positions=pos, implementation="chunked", block_sizes=TILES
  )
  t = 20
  orig = (jnp.arange(T)[None], jnp.asarray(kv_perm)[None])
  grad_k = jax.grad(lambda k_p: jnp.sum(run(k_p, orig)[:, t]))(k_p)
  future = kv_perm > t  # rows of the permuted layout holding later tokens
  assert np.all(np.asarray(grad_k)[0, future] == 0)
  assert np.any(np.asarray(grad_k)[0, ~future] != 0)
  # Without positions the same layout is masked in permuted order: a different (wrong) result.
  plain = dot_product_attention(q, k_p, v_p, is_causal=True, implementation="chunked")
  assert not np.allclose(np.asarray(plain), np.asarray(run(k_p, orig)), atol=1e-3)


@pytest.mark.parametrize("per_head_positions", [False, True])
def test_runtime_maps_in_a_permuted_layout_agree_between_xla_and_chunked(per_head_positions):
  q, k, v = random_qkv(4, B, T, T, N, K, H, scale=2.0)
  rng = np.random.default_rng(5)
  if per_head_positions:  # each kv head's keys in its own order (PBS-Attn: per head)
    kv_pos = np.stack([np.stack([rng.permutation(T) for _ in range(K)], -1) for _ in range(B)])
    k = jnp.take_along_axis(k, kv_pos[..., None], axis=1)
    v = jnp.take_along_axis(v, kv_pos[..., None], axis=1)
  else:
    kv_pos = np.broadcast_to(rng.permutation(T), (B, T))
    k, v = k[:, kv_pos[0]], v[:, kv_pos[0]]
  q_pos = np.broadcast_to(np.arange(T), (B, T))
  bmap = block_select.topk_block_map(q, k, block_q=16, block_k=8, num_blocks_per_row=3)
  kw = dict(is_causal=True, block_map=bmap, positions=(q_pos, kv_pos))
  want = functools.partial(dot_product_attention, implementation="xla", **kw)
  got = jax.jit(functools.partial(dot_product_attention, implementation="chunked", **kw))
  assert_close(got(q, k, v), want(q, k, v))
  for g, w in zip(_grads(got, q, k, v), _grads(want, q, k, v), strict=True):
    assert_close(g, w, grad=True)


def test_tile_major_neighborhood_is_exact_and_unpermuted():
  shape = (8, 6)
  mask = masks.Neighborhood(shape=shape, window=(3, 3))
  L = int(np.prod(shape))
  q, k, v = random_qkv(6, 1, L, L, 2, 2, H)
  order = tile_major_order(shape, (4, 3))
  assert sorted(order.tolist()) == list(range(L))
  got = permuted_attention(
    q, k, v, q_perm=order, kv_perm=order, mask=mask, implementation="chunked", block_sizes=TILES
  )
  assert_close(got, dot_product_attention(q, k, v, mask=mask, implementation="xla"))


def test_identity_positions_change_nothing():
  q, k, v = random_qkv(7, B, T, T, N, K, H)
  ident = np.broadcast_to(np.arange(T), (B, T))
  kw = dict(is_causal=True, implementation="chunked", block_sizes=TILES)
  got = dot_product_attention(q, k, v, positions=(ident, ident), **kw)
  assert_close(got, dot_product_attention(q, k, v, **kw))


def test_pallas_falls_back_to_chunked_with_a_logged_reason(caplog):
  q, k, v = random_qkv(8, 1, 16, 16, 2, 2, H)
  ident = np.arange(16)[None]
  with caplog.at_level(logging.WARNING):
    out = dot_product_attention(q, k, v, is_causal=True, positions=(ident, ident))
  assert_close(out, dot_product_attention(q, k, v, is_causal=True, implementation="xla"))
  with pytest.raises(NotImplementedError, match="position tables"):
    dot_product_attention(q, k, v, positions=(ident, ident), implementation="pallas")


def test_bad_positions_and_permutations_raise():
  q, k, v = random_qkv(9, 1, 16, 16, 2, 2, H)
  ident = np.arange(16)[None]
  with pytest.raises(ValueError, match=r"q positions have shape \(1, 15\)"):
    dot_product_attention(q, k, v, positions=(ident[:, :15], ident))
  with pytest.raises(TypeError, match="integers"):
    dot_product_attention(q, k, v, positions=(ident * 1.0, ident))
  with pytest.raises(TypeError, match="pair"):
    dot_product_attention(q, k, v, positions=ident)
  with pytest.raises(ValueError, match="not a permutation"):
    check_permutation(np.array([0, 1, 1, 3]), 4)
  with pytest.raises(ValueError, match=r"expected \[\.\.\., 5\]"):
    check_permutation(np.arange(4), 5)
  with pytest.raises(ValueError, match="not a permutation"):
    permuted_attention(q, k, v, kv_perm=np.zeros(16, np.int32))
  perm = np.random.default_rng(0).permutation(16)
  assert np.array_equal(np.asarray(invert_permutation(perm))[perm], np.arange(16))
