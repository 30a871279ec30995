"""Attention with a structured mask per query head (`sparse/per_head.py`).

Against a dense per-head-mask reference (the engine's "xla" with a [1, N, T, S] bool mask),
forward and gradients on xla and chunked (Pallas interpret once, slow); heads with equal
masks share one engine call and a GQA group keeps its kv heads uncopied; the per-head block
map; bad input.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnzoo import masks
from attnzoo.attention import dot_product_attention
from attnzoo.attention.sparse import per_head
from tests.attention.conformance import random_qkv
from tests.tolerances import assert_close

B, T, S, N, K, H, V = 2, 37, 45, 4, 2, 8, 8
BLK = 8

# Heads 0 and 3 share a window (one call); head 1 a chunked pattern, head 2 window + sinks.
MASKS = (
  masks.SlidingWindow(left=3, right=1),
  masks.Chunked(chunk=16, causal=False),
  masks.SlidingWindow(left=9) | masks.AttentionSinks(2),
  masks.SlidingWindow(left=3, right=1),
)


def dense_reference(q, k, v, head_masks, *, is_causal, bias=None, mask=None):
  """Every head's mask as one dense [1, N, T, S] array on the engine's readable path."""
  Tq, Sk = q.shape[1], k.shape[1]
  keep = np.stack([m.dense(Tq, Sk) for m in head_masks])[None]
  if mask is not None:
    keep = keep & mask.dense(Tq, Sk)
  return dot_product_attention(
    q, k, v, mask=jnp.asarray(keep), bias=bias, is_causal=is_causal, implementation="xla"
  )


def run(q, k, v, head_masks=MASKS, **kw):
  return per_head.per_head_mask_attention(
    q, k, v, head_masks, block_q=BLK, block_k=BLK, **{"implementation": "chunked", **kw}
  )


@pytest.mark.parametrize(
  "implementation, is_causal", [("xla", False), ("chunked", False), ("chunked", True)]
)
def test_matches_dense_per_head_reference_forward_and_gradients(implementation, is_causal):
  q, k, v = random_qkv(0, B, T, T if is_causal else S, N, K, H, V)
  Sk = k.shape[1]
  bias = 0.3 * jax.random.normal(jax.random.key(5), (1, N, T, Sk))  # differs per head
  cot = jax.random.normal(jax.random.key(9), (B, T, N, V))

  def value_and_grads(fn):  # jitted: one compile instead of op-by-op dispatch
    def loss(q, k, v):
      out = fn(q, k, v)
      return jnp.sum(out * cot), out

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)

  got_fn = functools.partial(run, implementation=implementation, is_causal=is_causal, bias=bias)
  want_fn = functools.partial(dense_reference, head_masks=MASKS, is_causal=is_causal, bias=bias)
  (_, got_out), got = value_and_grads(got_fn)
  (_, want_out), want = value_and_grads(want_fn)
  assert_close(got_out, want_out)
  for name, g, w in zip("qkv", got, want, strict=True):
    assert_close(g, w, grad=True, err_msg=f"d{name}")


def test_heads_really_differ():
  """The masks matter: heads 1 and 2 differ from the same call with head 0's mask everywhere,
  head 3 (which has head 0's mask) does not."""
  q, k, v = random_qkv(1, B, T, S, N, K, H, V)
  out = run(q, k, v, implementation="xla")
  shared = run(q, k, v, head_masks=(MASKS[0],) * N, implementation="xla")
  for n in (1, 2):
    assert np.max(np.abs(np.asarray(out[:, :, n] - shared[:, :, n]))) > 1e-2
  assert_close(out[:, :, 3], shared[:, :, 3])


def test_structured_mask_and_lse_apply_to_every_head():
  q, k, v = random_qkv(2, B, T, S, N, K, H, V)
  extra = masks.Segments.from_lengths([20, T - 20], [25, S - 25])
  out, lse = run(q, k, v, mask=extra, return_lse=True)
  want_out, want_lse = dot_product_attention(
    q,
    k,
    v,
    mask=jnp.asarray(np.stack([m.dense(T, S) & extra.dense(T, S) for m in MASKS])[None]),
    implementation="xla",
    return_lse=True,
  )
  assert_close(out, want_out)
  assert_close(lse, want_lse)


def test_dense_mask_array_is_sliced_per_group():
  q, k, v = random_qkv(3, B, T, S, N, K, H, V)
  keep = np.asarray(jax.random.bernoulli(jax.random.key(4), 0.7, (B, N, T, S)))
  out = run(q, k, v, mask=jnp.asarray(keep))
  per = np.stack([m.dense(T, S) for m in MASKS])[None]
  want = dot_product_attention(q, k, v, mask=jnp.asarray(per & keep), implementation="xla")
  assert_close(out, want)


# ------------------------------------------------------------------ grouping


def test_head_groups_collect_equal_masks_in_first_use_order():
  groups = per_head.head_groups(MASKS)
  assert [heads for _, heads in groups] == [(0, 3), (1,), (2,)]
  assert [m for m, _ in groups] == [MASKS[0], MASKS[1], MASKS[2]]
  # Equal by value, not identity: a freshly built mask joins the group.
  again = (*MASKS[:3], masks.SlidingWindow(left=3, right=1))
  assert [h for _, h in per_head.head_groups(again)] == [(0, 3), (1,), (2,)]


def test_one_engine_call_per_distinct_mask_and_gqa_groups_keep_kv_heads(monkeypatch):
  calls = []
  engine = per_head.dot_product_attention

  def counting(q, k, v, **kw):
    calls.append((q.shape[2], k.shape[2], kw["mask"]))
    return engine(q, k, v, **kw)

  monkeypatch.setattr(per_head, "dot_product_attention", counting)
  q, k, v = random_qkv(4, 1, 16, 16, 8, 2, H, V)  # G = 4
  window, sinks = masks.SlidingWindow(left=2), masks.SlidingWindow(left=2) | masks.AttentionSinks(1)

  # kv head 0 serves heads 0-3 (window), kv head 1 heads 4-7 (sinks): one GQA call each.
  def trace(head_masks):  # the calls happen at trace time: no need to compute anything
    fn = functools.partial(per_head.per_head_mask_attention, masks=head_masks, implementation="xla")
    jax.eval_shape(fn, q, k, v)

  trace((window,) * 4 + (sinks,) * 4)
  assert calls == [(4, 1, window), (4, 1, sinks)]
  calls.clear()
  # Heads {0, 1, 4, 5}: 2 per kv head -> GQA with both kv heads; {2, 3, 6, 7} likewise.
  alternating = (window, window, sinks, sinks) * 2
  trace(alternating)
  assert calls == [(4, 2, window), (4, 2, sinks)]
  calls.clear()
  # Uneven: {0, 1, 2, 4} reads kv 0 three times and kv 1 once -> one kv head per query head.
  uneven = (window,) * 3 + (sinks, window, sinks, sinks, sinks)
  trace(uneven)
  assert calls == [(4, 4, window), (4, 4, sinks)]


def test_kv_heads_of():
  np.testing.assert_array_equal(per_head.kv_heads_of((0, 1, 4, 5), 2), [0, 2])
  np.testing.assert_array_equal(per_head.kv_heads_of((0, 1, 2), 2), [0, 0, 1])
  np.testing.assert_array_equal(per_head.kv_heads_of((3,), 4), [0])


# ------------------------------------------------------------------ per-head block map


def test_per_head_block_map_is_each_heads_static_map():
  bmap = per_head.per_head_block_map(MASKS, T, S, BLK, BLK, is_causal=True)
  kinds = np.asarray(bmap.to_block_mask())
  assert kinds.shape[:2] == (1, N)
  widths = []
  for n, m in enumerate(MASKS):
    own = (m & masks.Causal()).block_mask(T, S, BLK, BLK)
    np.testing.assert_array_equal(kinds[0, n], own)
    widths.append(int(np.max(np.sum(own > 0, -1))))
  assert bmap.max_kv_blocks == max(widths)
  per = [np.sum(m.block_mask(T, S, BLK, BLK) > 0) for m in (x & masks.Causal() for x in MASKS)]
  np.testing.assert_allclose(
    bmap.density(), np.mean(per) / (bmap.num_q_blocks * bmap.num_kv_blocks)
  )


# ------------------------------------------------------------------ bad input


def test_bad_masks_raise_clearly():
  q, k, v = random_qkv(5, 1, 8, 8, N, K, H, V)
  with pytest.raises(ValueError, match=r"got 3 masks for N=4 query heads"):
    per_head.per_head_mask_attention(q, k, v, MASKS[:3])
  with pytest.raises(TypeError, match=r"sequence of 4"):
    per_head.per_head_mask_attention(q, k, v, MASKS[0])
  with pytest.raises(TypeError, match=r"masks\[1\] is a ndarray"):
    per_head.per_head_mask_attention(q, k, v, (MASKS[0], np.ones((8, 8), bool), *MASKS[2:]))
  with pytest.raises(ValueError, match=r"block_q=8, block_k=None"):
    per_head.per_head_mask_attention(q, k, v, MASKS, block_q=8)


@pytest.mark.slow
def test_pallas_interpret_matches_dense_reference():
  q, k, v = random_qkv(6, 1, 24, 24, N, K, H, V)
  cot = jax.random.normal(jax.random.key(3), (1, 24, N, V))
  fn = functools.partial(run, implementation="pallas", interpret=True, is_causal=True)
  ref = functools.partial(dense_reference, head_masks=MASKS, is_causal=True)

  def value_and_grads(f):
    def loss(q, k, v):
      out = f(q, k, v)
      return jnp.sum(out * cot), out

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)

  (_, got), g = value_and_grads(fn)
  (_, want), w = value_and_grads(ref)
  assert_close(got, want)
  for name, a, b in zip("qkv", g, w, strict=True):
    assert_close(a, b, grad=True, err_msg=f"d{name}")
