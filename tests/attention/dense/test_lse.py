"""Row statistics out: `dot_product_attention(..., return_lse=True)` returns the per-row
log-sum-exp of the kept logits, the same on every implementation, with gradients (the lse
cotangent enters the flash backward as D − g); partial attentions merge exactly through it."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnzoo import masks
from attnzoo.attention import dot_product_attention
from attnzoo.attention.sparse import block_select
from pallas_kernels.block_sparse import BlockSizes
from tests.attention.conformance import random_qkv
from tests.tolerances import assert_close

B, T, N, K, H = 2, 19, 4, 2, 8
TILES = BlockSizes(8, 8)


def _attend(implementation, q, k, v, **kw):
  if implementation != "xla":
    kw.setdefault("block_sizes", TILES)
  return dot_product_attention(q, k, v, implementation=implementation, return_lse=True, **kw)


def _mask_with_an_empty_row():
  keep = np.tril(np.ones((T, T), bool))
  keep[5] = False  # query 5 sees nothing: out 0, lse -inf
  return jnp.asarray(keep)


def test_lse_is_the_logsumexp_of_the_kept_scaled_logits():
  q, k, v = random_qkv(0, B, T, T, N, K, H)
  keep = _mask_with_an_empty_row()
  out, lse = _attend("xla", q, k, v, mask=keep)
  logits = jnp.einsum("btnh,bsnh->bnts", q, jnp.repeat(k, N // K, axis=2)) / np.sqrt(H)
  want = jax.nn.logsumexp(jnp.where(keep, logits, -jnp.inf), axis=-1)  # [B, N, T]
  want = jnp.swapaxes(want, 1, 2)
  assert lse.shape == (B, T, N) and lse.dtype == jnp.float32
  assert np.all(np.isneginf(np.asarray(lse[:, 5])))
  rows = np.arange(T) != 5
  assert_close(lse[:, rows], want[:, rows])
  np.testing.assert_array_equal(np.asarray(out[:, 5]), 0.0)


@pytest.mark.parametrize(
  "implementation", ["chunked", pytest.param("pallas", marks=pytest.mark.slow)]
)
def test_fast_paths_return_the_same_lse_with_the_same_gradients(implementation):
  q, k, v = random_qkv(1, B, T, T, N, K, H, scale=2.0)

  def loss(impl, q, k, v):
    out, lse = _attend(impl, q, k, v, is_causal=True)
    return jnp.sum(jnp.sin(out)) + jnp.sum(jnp.cos(lse)), (out, lse)

  grad = lambda impl: jax.grad(functools.partial(loss, impl), argnums=(0, 1, 2), has_aux=True)
  (want_g, (want_out, want_lse)) = grad("xla")(q, k, v)
  (got_g, (got_out, got_lse)) = grad(implementation)(q, k, v)
  assert_close(got_out, want_out)
  assert_close(got_lse, want_lse)
  for g, w in zip(got_g, want_g, strict=True):
    assert_close(g, w, grad=True)


def test_partial_attentions_merge_exactly_through_lse():
  """Attention over keys [0, s) and [s, S) merged by their lse equals attention over all
  keys — forward and gradients (what ring attention and sparse corrections rely on)."""
  q, k, v = random_qkv(2, B, T, T, N, K, H)
  split = 11

  def merged(q, k, v):
    o1, l1 = _attend("chunked", q, k[:, :split], v[:, :split])
    o2, l2 = _attend("chunked", q, k[:, split:], v[:, split:])
    lse = jnp.logaddexp(l1, l2)
    w1, w2 = jnp.exp(l1 - lse)[..., None], jnp.exp(l2 - lse)[..., None]
    return w1 * o1 + w2 * o2

  full = lambda q, k, v: dot_product_attention(q, k, v, implementation="xla")
  assert_close(merged(q, k, v), full(q, k, v))
  cot = jax.random.normal(jax.random.key(3), (B, T, N, H))
  gm = jax.grad(lambda *a: jnp.sum(merged(*a) * cot), argnums=(0, 1, 2))(q, k, v)
  gf = jax.grad(lambda *a: jnp.sum(full(*a) * cot), argnums=(0, 1, 2))(q, k, v)
  for g, w in zip(gm, gf, strict=True):
    assert_close(g, w, grad=True)


def test_runtime_maps_return_lse_and_the_kept_mass():
  q, k, v = random_qkv(4, B, 40, 40, N, K, H, scale=2.0)
  bmap = block_select.topk_block_map(
    q, k, block_q=8, block_k=8, num_blocks_per_row=1, mask=masks.Causal()
  )
  _, sparse = _attend("chunked", q, k, v, is_causal=True, block_map=bmap)
  _, sparse_ref = _attend("xla", q, k, v, is_causal=True, block_map=bmap)
  _, dense = _attend("chunked", q, k, v, is_causal=True)
  assert_close(sparse, sparse_ref)
  kept = np.asarray(jnp.exp(sparse - dense))  # attention mass the selection keeps, per row
  assert np.all(kept <= 1.0 + 1e-6) and np.all(kept > 0.0)
  assert kept.min() < 0.99  # the selection did drop mass somewhere


def test_ring_refuses_return_lse():
  q, k, v = random_qkv(5, B, T, T, N, K, H)
  with pytest.raises((NotImplementedError, ValueError)):
    dot_product_attention(q, k, v, implementation="ring", return_lse=True)
