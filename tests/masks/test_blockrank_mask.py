"""BlockRank's mask (arXiv 2510.05396 §3; spec: shared/papers/architecture.md §14.3).

The dense view against a hand-written matrix, the paper's exact density formula, the analytic
block classification against the generic one on random layouts, EMPTY doc↔doc tiles, the
traced predicate, the softmax implementations under the mask, and bad layouts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnzoo import masks
from attnzoo.attention import dot_product_attention
from attnzoo.masks.base import Mask
from attnzoo.masks.blockrank import PAD, QUERY, layout_from_blocks, layout_from_lengths
from pallas_kernels.block_sparse import EMPTY, BlockSizes
from tests.masks.test_masks_properties import classify_from_dense
from tests.tolerances import assert_close


def test_dense_equals_hand_built_reference():
  # [I I | d1 d1 d1 | d2 d2 | Q Q]
  mask = masks.BlockRank.from_lengths(2, [3, 2], 2)
  np.testing.assert_array_equal(mask.q_ids, [0, 0, 1, 1, 1, 2, 2, -1, -1])
  want = np.array(
    [
      [1, 0, 0, 0, 0, 0, 0, 0, 0],
      [1, 1, 0, 0, 0, 0, 0, 0, 0],
      [1, 1, 1, 0, 0, 0, 0, 0, 0],
      [1, 1, 1, 1, 0, 0, 0, 0, 0],
      [1, 1, 1, 1, 1, 0, 0, 0, 0],
      [1, 1, 0, 0, 0, 1, 0, 0, 0],  # doc 2 sees the instruction and itself, not doc 1
      [1, 1, 0, 0, 0, 1, 1, 0, 0],
      [1, 1, 1, 1, 1, 1, 1, 1, 0],  # the query sees everything before it
      [1, 1, 1, 1, 1, 1, 1, 1, 1],
    ],
    bool,
  )
  np.testing.assert_array_equal(mask.dense(9, 9), want)
  # Bidirectional variant: the same block rules, whole own segment.
  free = masks.BlockRank(mask.q_ids, causal=False).dense(9, 9)
  np.testing.assert_array_equal(free[5], [1, 1, 0, 0, 0, 1, 1, 0, 0])
  np.testing.assert_array_equal(free[0], [1, 1, 0, 0, 0, 0, 0, 0, 0])
  np.testing.assert_array_equal(free[7], np.ones(9, bool))


def test_padding_is_never_attended_and_attends_nothing():
  ids = np.array([PAD, 0, 0, PAD, 1, 1, PAD, 2, QUERY, QUERY])
  keep = masks.BlockRank(ids).dense(10, 10)
  pad = ids == PAD
  assert not keep[:, pad].any() and not keep[pad].any()
  np.testing.assert_array_equal(keep[9], ~pad)


@pytest.mark.parametrize(("M", "H"), [(4, 3), (6, 5), (32, 16)])
def test_allowed_entries_match_the_paper_count(M, H):
  # §14.3: M·H(H+1)/2 + (M−2)·H² + (M−1)·H² kept entries vs MH(MH+1)/2 dense causal.
  keep = masks.BlockRank.from_blocks(M * H, H).dense(M * H, M * H)
  assert keep.sum() == M * H * (H + 1) // 2 + (M - 2) * H * H + (M - 1) * H * H
  assert keep.sum() < M * H * (M * H + 1) // 2


def _random_layout(rng, length):
  """A valid layout: instruction, documents, query, with PAD sprinkled in."""
  cuts = np.sort(
    rng.choice(np.arange(1, length), size=min(length - 1, rng.integers(0, 6)), replace=False)
  )
  parts = np.diff([0, *cuts, length])
  ids = np.concatenate(
    [np.full(n, i if i < len(parts) - 1 else QUERY) for i, n in enumerate(parts)]
  )
  if len(parts) == 1:
    ids[:] = 0
  ids[rng.random(length) < 0.1] = PAD
  return ids


@pytest.mark.parametrize("causal", [True, False])
def test_analytic_block_mask_equals_the_generic_classification(causal):
  rng = np.random.default_rng(0)
  for _ in range(40):
    T = int(rng.integers(1, 80))
    ids = _random_layout(rng, T)
    S = int(rng.integers(1, T + 1))
    mask = masks.BlockRank(ids, ids[:S], causal=causal)
    bq, bk = int(rng.integers(1, 20)), int(rng.integers(1, 20))
    want = classify_from_dense(mask.dense(T, S), bq, bk)
    np.testing.assert_array_equal(mask.block_mask(T, S, bq, bk), want, err_msg=f"{ids} {S}")
    np.testing.assert_array_equal(Mask.block_mask(mask, T, S, bq, bk), want)


def test_block_map_skips_cross_document_tiles():
  H, M = 8, 6
  mask = masks.BlockRank.from_blocks(M * H, H)
  kinds = mask.block_mask(M * H, M * H, H, H)
  for i in range(1, M - 1):
    for j in range(1, M - 1):
      if i != j:
        assert kinds[i, j] == EMPTY, (i, j)
  assert (kinds[M - 1] != EMPTY).all()  # the query block visits every block
  bmap = mask.block_map(M * H, M * H, H, H)
  # Per doc row: instruction + itself (2 tiles) instead of the causal i + 1.
  np.testing.assert_array_equal(np.asarray(bmap.kv_counts).reshape(-1), [1, 2, 2, 2, 2, M])


def test_traced_predicate_equals_dense():
  mask = masks.BlockRank(_random_layout(np.random.default_rng(3), 50))
  q, k = jnp.arange(50)[:, None], jnp.arange(50)[None, :]
  traced = jax.jit(lambda q, k: mask.predicate_with(mask.tables(), q, k))(q, k)
  np.testing.assert_array_equal(np.asarray(traced), mask.dense(50, 50))


def _softmax_case(implementation, **kw):
  ids = layout_from_lengths(5, [7, 9, 6], 6)
  mask = masks.BlockRank(ids)
  T = ids.shape[0]
  kq, kk, kv = jax.random.split(jax.random.key(0), 3)
  q = jax.random.normal(kq, (2, T, 4, 16))
  k = jax.random.normal(kk, (2, T, 2, 16))
  v = jax.random.normal(kv, (2, T, 2, 8))

  def f(q, k, v, mask):
    return dot_product_attention(q, k, v, mask=mask, implementation=implementation, **kw)

  dense = masks.DenseMask(mask.dense(T, T))
  loss = lambda m: lambda q, k, v: jnp.sum(f(q, k, v, m) ** 2)
  got = f(q, k, v, mask), jax.grad(loss(mask), argnums=(0, 1, 2))(q, k, v)
  want = (
    dot_product_attention(q, k, v, mask=dense, implementation="xla"),
    jax.grad(
      lambda q, k, v: jnp.sum(
        dot_product_attention(q, k, v, mask=dense, implementation="xla") ** 2
      ),
      argnums=(0, 1, 2),
    )(q, k, v),
  )
  assert_close(got[0], want[0])
  for g, w in zip(got[1], want[1], strict=True):
    assert_close(g, w, grad=True)


@pytest.mark.parametrize("implementation", ["xla", "chunked"])
def test_softmax_implementations_agree_under_the_mask(implementation):
  kw = {"block_sizes": BlockSizes(8, 8)} if implementation == "chunked" else {}
  _softmax_case(implementation, **kw)


@pytest.mark.slow
def test_pallas_interpret_agrees_under_the_mask():
  _softmax_case("pallas", block_sizes=BlockSizes(16, 16), interpret=True)


def test_default_block_layout():
  np.testing.assert_array_equal(layout_from_blocks(7, 3), [0, 0, 0, 1, 1, 1, QUERY])
  np.testing.assert_array_equal(layout_from_blocks(3, 3), [0, 0, 0])  # one block: instruction
  np.testing.assert_array_equal(masks.blockrank.parse_layout("1|2,1|2"), [0, 1, 1, 2, -1, -1])


@pytest.mark.parametrize(
  ("ids", "match"),
  [
    ([0, 1, 0, QUERY], r"layout\[2\]=0 follows layout\[1\]=1"),
    ([0, QUERY, 1], r"layout\[2\]=1 follows layout\[1\]=-1"),
    ([0, 1, 1, 2, 1, QUERY], r"layout\[4\]=1 follows layout\[3\]=2"),
    ([0, 2, 2, QUERY], r"document ids \[2\] but no document 1"),
    ([0, -3, QUERY], r"layout\[1\]=-3 is not a valid id"),
  ],
)
def test_bad_layouts_raise_naming_the_value_and_the_fix(ids, match):
  with pytest.raises(ValueError, match=match):
    masks.blockrank.check_layout(np.array(ids))


def test_bad_arguments_raise():
  with pytest.raises(ValueError, match=r"3 query ids and 3 key ids but .* T=4"):
    masks.BlockRank.from_lengths(1, [1], 1).dense(4, 4)
  with pytest.raises(ValueError, match="not 'I|d1,d2,...|Q'"):
    masks.blockrank.parse_layout("3,4,5")
  with pytest.raises(ValueError, match=r"documents\[1\]=0 must be >= 1"):
    layout_from_lengths(2, [3, 0], 1)
  with pytest.raises(TypeError, match="dtype float"):
    masks.BlockRank(np.array([0.0, 1.0]))
