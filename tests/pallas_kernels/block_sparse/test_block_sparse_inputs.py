"""Input validation, backend / interpret choice, and the reference against an independent oracle."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnzoo import masks
from pallas_kernels.block_sparse import (
  BlockMap,
  BlockSizes,
  block_sparse_attention,
  reference_attention,
)
from tests.tolerances import assert_close


def _qkv(T=32, S=32, N=2, K=1, H=8):
  keys = jax.random.split(jax.random.key(0), 3)
  return (
    jax.random.normal(keys[0], (1, T, N, H)),
    jax.random.normal(keys[1], (1, S, K, H)),
    jax.random.normal(keys[2], (1, S, K, H)),
  )


def _full_map(T=32, S=32, block=16):
  return BlockMap.from_block_mask(
    np.full((-(-T // block), -(-S // block)), 2), block_q=block, block_k=block, seq_q=T, seq_k=S
  )


# ------------------------------------------------------------------ the reference


def test_reference_matches_jax_dot_product_attention_with_gqa_mask_and_cap():
  q, k, v = _qkv(T=24, S=40, N=4, K=2)
  mask = masks.SlidingWindow(5, 9)
  keep = jnp.asarray(mask.dense(24, 40))
  got = reference_attention(q, k, v, mask.block_map(24, 40, 16, 16), mask_fn=mask.predicate)
  want = jax.nn.dot_product_attention(q, k, v, mask=keep[None, None])
  assert_close(got, want)
  # Soft cap against the closed form on dense logits.
  cap, scale = 2.0, 0.7
  logits = jnp.einsum("btnh,bsnh->bnts", q, jnp.repeat(k, 2, axis=2)) * scale
  probs = jax.nn.softmax(cap * jnp.tanh(logits / cap), axis=-1)
  want = jnp.einsum("bnts,bsnh->btnh", probs, jnp.repeat(v, 2, axis=2))
  assert_close(reference_attention(q, k, v, logits_soft_cap=cap, scale=scale), want)


def test_reference_masks_by_tiles_and_gives_zero_rows():
  q, k, v = _qkv()
  block_map = BlockMap.from_block_mask(
    np.array([[2, 0], [0, 0]]), block_q=16, block_k=16, seq_q=32, seq_k=32
  )
  got = reference_attention(q, k, v, block_map)
  want = jax.nn.dot_product_attention(q[:, :16], k[:, :16], v[:, :16])
  assert_close(got[:, :16], want)
  np.testing.assert_array_equal(np.asarray(got[:, 16:]), 0.0)
  grads = jax.grad(lambda q, k, v: reference_attention(q, k, v, block_map).sum(), (0, 1, 2))(
    q, k, v
  )
  assert all(np.all(np.isfinite(np.asarray(g))) for g in grads)


# ------------------------------------------------------------------ validation


def test_interpret_and_backend_defaults_on_cpu(caplog):
  """None interprets off GPU/TPU (logged), False raises, a bad backend names the choices."""
  q, k, v = _qkv()
  with caplog.at_level("WARNING", logger="pallas_kernels"):
    got = block_sparse_attention(q, k, v, _full_map())  # the GPU-style kernel, interpreted
  assert_close(got, reference_attention(q, k, v))
  assert "block_sparse_attention" in caplog.text and "interpreter" in caplog.text
  with pytest.raises(ValueError, match="interpret=None"):
    block_sparse_attention(q, k, v, _full_map(), interpret=False)
  with pytest.raises(ValueError, match="backend="):
    block_sparse_attention(q, k, v, _full_map(), interpret=True, backend="cuda")


@pytest.mark.parametrize(
  "change, error, match",
  [
    (dict(block_map=_full_map(T=48)), ValueError, "seq_q=48"),
    (dict(block_sizes=BlockSizes(32, 16)), ValueError, "block_sizes"),
    (dict(k=jnp.zeros((1, 32, 3, 8)), v=jnp.zeros((1, 32, 3, 8))), ValueError, "N=2 query"),
    (dict(k=jnp.zeros((1, 32, 2, 8))), ValueError, "do not match"),
    (dict(v=jnp.zeros((1, 32, 1, 8), jnp.bfloat16)), TypeError, "dtypes differ"),
    (dict(q=jnp.zeros((32, 2, 8))), ValueError, "q must be 4-D"),
    (dict(segment_ids=jnp.zeros((1, 31), jnp.int32)), ValueError, r"\(1, 32\)"),
    (dict(segment_ids=jnp.zeros((1, 32))), TypeError, "integer"),
    (dict(logits_soft_cap=0.0), ValueError, "logits_soft_cap"),
    (dict(mask_fn="causal"), TypeError, "mask_fn"),
    (
      dict(
        block_map=BlockMap.from_block_mask(
          np.full((3, 2, 2, 2), 2), block_q=16, block_k=16, seq_q=32, seq_k=32
        )
      ),
      ValueError,
      "Bm=3",
    ),
  ],
)
def test_bad_inputs_raise_naming_the_value(change, error, match):
  q, k, v = _qkv()
  kwargs = dict(q=q, k=k, v=v, block_map=_full_map(), interpret=True)
  kwargs.update(change)
  with pytest.raises(error, match=match):
    block_sparse_attention(**kwargs)


def test_mask_fn_closing_over_an_array_is_not_implemented():
  mask = masks.DenseMask(np.tril(np.ones((32, 32), bool)) & (np.arange(32) % 3 != 0))
  q, k, v = _qkv()
  with pytest.raises(NotImplementedError, match="closes over arrays"):
    block_sparse_attention(
      q, k, v, mask.block_map(32, 32, 16, 16), mask_fn=mask.predicate, interpret=True
    )


def test_mask_fn_is_dropped_when_no_tile_is_partial():
  # RandomBlocks' predicate is a table lookup, but at its own tiles every tile is FULL/EMPTY.
  mask = masks.RandomBlocks(0.5, 16, 16, seed=0, seq_q=32, seq_k=32, keep_diagonal=True)
  q, k, v = _qkv()
  block_map = mask.block_map(32, 32, 16, 16)
  got = block_sparse_attention(q, k, v, block_map, mask_fn=mask.predicate, interpret=True)
  assert_close(got, reference_attention(q, k, v, block_map, mask_fn=mask.predicate))


@pytest.mark.parametrize(
  "backend, block_sizes, match",
  [
    ("gpu", BlockSizes(48, 16), "block_q=48"),
    ("tpu", BlockSizes(16, 16), "block_k % 128"),
  ],
)
def test_compiled_kernels_check_tile_sizes(backend, block_sizes, match):
  q, k, v = _qkv(T=48, S=48, H=16)
  bq, bk = block_sizes.block_q, block_sizes.block_k
  block_map = BlockMap.from_block_mask(
    np.full((48 // bq, 48 // bk), 2), block_q=bq, block_k=bk, seq_q=48, seq_k=48
  )
  with pytest.raises(ValueError, match=match):
    block_sparse_attention(
      q, k, v, block_map, backend=backend, block_sizes=block_sizes, interpret=False
    )
