"""Content-dependent block maps: forced ⊆ selected ⊆ allowed, budgets, tile-level causality."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnzoo import masks
from attnzoo.attention.sparse import block_select
from pallas_kernels.block_sparse import EMPTY
from pallas_kernels.block_sparse.reference import reference_attention
from tests.attention.conformance import random_qkv
from tests.tolerances import assert_close

B, T, N, K, H, BLK = 2, 64, 4, 2, 8, 8


def _selectors():
  return {
    "topk": functools.partial(block_select.topk_block_map, num_blocks_per_row=2),
    "mass": functools.partial(block_select.mass_block_map, mass=0.5),
  }


@pytest.mark.parametrize("kind", ["topk", "mass"])
@pytest.mark.parametrize("static", ["none", "causal", "window"])
def test_selected_contains_forced_and_respects_static_mask(kind, static):
  q, k, _ = random_qkv(0, B, T, T, N, K, H, scale=2.0)
  static_mask = {"none": None, "causal": masks.Causal(), "window": masks.SlidingWindow(24, 0)}[
    static
  ]
  bmap = jax.jit(lambda q, k: _selectors()[kind](q, k, block_q=BLK, block_k=BLK, mask=static_mask))(
    q, k
  )
  assert bmap.kv_counts.shape == (B, N, T // BLK)
  chosen = np.asarray(bmap.to_block_mask()) != EMPTY  # [B, N, Qb, Kb]
  diag = np.eye(T // BLK, dtype=bool)
  assert (chosen | ~diag).all(), "a forced (diagonal) tile was not selected"
  if static_mask is not None:
    allowed = static_mask.block_mask(T, T, BLK, BLK) != EMPTY
    assert not (chosen & ~allowed).any(), "a tile outside the static mask was selected"
    # PARTIAL/FULL classification comes from the static mask.
    np.testing.assert_array_equal(
      np.where(chosen, static_mask.block_mask(T, T, BLK, BLK), 0), np.asarray(bmap.to_block_mask())
    )
  if kind == "topk":
    assert int(np.max(bmap.kv_counts)) <= 3
  # Content-dependent: heads or batch elements choose differently.
  assert len({chosen[b, n].tobytes() for b in range(B) for n in range(N)}) > 1


def test_topk_picks_the_highest_scoring_tiles():
  q, k, _ = random_qkv(1, 1, T, T, 2, 2, H)
  scores = np.asarray(block_select.pooled_block_scores(q, k, block_q=BLK, block_k=BLK))
  bmap = block_select.topk_block_map(
    q,
    k,
    block_q=BLK,
    block_k=BLK,
    num_blocks_per_row=3,
    forced=np.zeros((T // BLK, T // BLK), bool),
  )
  chosen = np.asarray(bmap.to_block_mask()) != EMPTY
  want = np.argsort(-scores, axis=-1)[..., :3]
  for n in range(2):
    for i in range(T // BLK):
      assert set(np.flatnonzero(chosen[0, n, i])) == set(want[0, n, i])


def test_mass_threshold_one_keeps_every_allowed_tile_and_small_mass_keeps_few():
  q, k, _ = random_qkv(2, 1, T, T, 2, 1, H, scale=3.0)
  full = block_select.mass_block_map(q, k, block_q=BLK, block_k=BLK, mass=1.0, mask=masks.Causal())
  allowed = masks.Causal().block_mask(T, T, BLK, BLK) != EMPTY
  np.testing.assert_array_equal(np.asarray(full.to_block_mask()[0, 0]) != EMPTY, allowed)
  few = block_select.mass_block_map(q, k, block_q=BLK, block_k=BLK, mass=0.05, mask=masks.Causal())
  assert np.asarray(few.kv_counts).max() <= 2  # best tile + forced diagonal


@pytest.mark.parametrize("kind", ["topk", "mass"])
def test_causal_selection_never_leaks_future_tiles(kind):
  q, k, v = random_qkv(3, 1, T, T, N, K, H, scale=2.0)
  causal = masks.Causal()

  def run(q, k, v):
    bmap = _selectors()[kind](q, k, block_q=BLK, block_k=BLK, mask=causal)
    return reference_attention(q, k, v, bmap, mask_fn=lambda a, b: causal.predicate(a, b, jnp))

  out = run(q, k, v)
  cut = 3 * BLK  # perturb every token from q tile 3 on
  noise = random_qkv(4, 1, T, T, N, K, H, scale=5.0)
  q2, k2, v2 = (x.at[:, cut:].set(n[:, cut:]) for x, n in zip((q, k, v), noise, strict=True))
  assert_close(run(q2, k2, v2)[:, :cut], out[:, :cut])
  assert np.abs(np.asarray(run(q2, k2, v2)[:, cut:] - out[:, cut:])).max() > 1e-3


def test_selection_carries_no_gradient():
  q, k, _ = random_qkv(5, 1, 32, 32, 2, 2, H)
  g = jax.grad(lambda q: jnp.sum(block_select.pooled_block_scores(q, k, block_q=8, block_k=8)))(q)
  np.testing.assert_array_equal(np.asarray(g), 0.0)


def test_bad_arguments():
  q, k, _ = random_qkv(6, 1, 32, 32, 2, 2, H)
  with pytest.raises(ValueError, match="num_blocks_per_row=9"):
    block_select.topk_block_map(q, k, block_q=8, block_k=8, num_blocks_per_row=9)
  with pytest.raises(ValueError, match="mass=0"):
    block_select.mass_block_map(q, k, block_q=8, block_k=8, mass=0.0)
