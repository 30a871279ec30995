"""`simulated_speedup` on layouts small enough to count tiles by hand."""

import numpy as np
import pytest

from attnzoo.accounting import amdahl, axis_keep, simulated_speedup


def _windows(keep):
  rows = [np.flatnonzero(r) for r in keep]
  return [(int(r[0]), int(r[-1]), len(r)) for r in rows]


def test_axis_keep_shifts_windows_inward_at_borders():
  # n=8, w=3: centre = clip(x, 1, 6); every query keeps exactly 3 keys.
  assert _windows(axis_keep(8, 3)) == [
    (0, 2, 3),
    (0, 2, 3),
    (1, 3, 3),
    (2, 4, 3),
    (3, 5, 3),
    (4, 6, 3),
    (5, 7, 3),
    (5, 7, 3),
  ]


def test_axis_keep_even_window_and_stride_are_right_biased():
  # w=4: wl=2, wr=1. s=2: leader = 2*(x//2) + 1, so queries {0,1} share centre clip(1,2,6)=2.
  keep = axis_keep(8, 4, stride=2)
  assert _windows(keep)[:4] == [(0, 3, 4), (0, 3, 4), (1, 4, 4), (1, 4, 4)]
  assert _windows(keep)[-2:] == [(4, 7, 4), (4, 7, 4)]


def test_axis_keep_causal_with_stride_uses_the_last_query_of_the_group():
  # w=3, s=2: leader = 2*(x//2) + 1, keep leader-2 <= y <= x.
  keep = axis_keep(6, 3, stride=2, causal=True)
  assert _windows(keep) == [(0, 0, 1), (0, 1, 2), (1, 2, 2), (1, 3, 3), (3, 4, 2), (3, 5, 3)]


def test_axis_keep_dilation_applies_the_rule_inside_each_group():
  keep = axis_keep(8, 2, dilation=2)
  # Group {0,2,4,6}: local windows [0,1],[0,1],[1,2],[2,3] -> positions below.
  assert [tuple(np.flatnonzero(keep[x])) for x in (0, 2, 4, 6, 1)] == [
    (0, 2),
    (0, 2),
    (2, 4),
    (4, 6),
    (1, 3),
  ]


def test_one_dimensional_counts_by_hand():
  # n=8, w=3, q tiles of 4, kv tiles of 2 (4 tiles). Q tile 0 needs keys 0..4 -> kv tiles 0,1,2;
  # q tile 1 needs keys 3..7 -> kv tiles 1,2,3. Worst = 3 of 4.
  r = simulated_speedup((8,), 3, q_tile=4, kv_tile=2)
  assert (r.dense_kv_tiles, r.max_kv_tiles) == (4, 3)
  np.testing.assert_allclose(r.speedup, 4 / 3)
  np.testing.assert_allclose(r.flop_speedup, 8 / 3)
  assert not r.perfect_block_sparsity
  assert r.e2e_speedup is None


def test_stride_equal_window_is_perfectly_block_sparse():
  r = simulated_speedup((12,), 4, stride=4, q_tile=4, kv_tile=4)
  assert r.perfect_block_sparsity
  assert (r.dense_kv_tiles, r.max_kv_tiles) == (3, 1)
  np.testing.assert_allclose(r.speedup, r.flop_speedup)
  np.testing.assert_allclose(r.speedup, 3.0)


def test_window_equal_to_the_layout_gives_speedup_one():
  r = simulated_speedup((6, 10), (6, 10), q_tile=(2, 4), kv_tile=(3, 2), attention_share=0.6)
  np.testing.assert_allclose([r.speedup, r.flop_speedup, r.e2e_speedup], [1.0, 1.0, 1.0])
  assert r.perfect_block_sparsity


def test_multi_dimensional_visits_are_the_product_of_axes():
  # Each axis as in the 1-D case: 3 of 4 kv tiles -> 9 of 16.
  r = simulated_speedup((8, 8), 3, q_tile=4, kv_tile=2)
  assert (r.dense_kv_tiles, r.max_kv_tiles) == (16, 9)
  np.testing.assert_allclose(r.flop_speedup, 64 / 9)


def test_dynamic_tiling_is_perfect_when_tiles_divide_window_and_stride():
  # n=12, w=4, s=2: q tile {2,3} needs keys 1..4, which straddle static kv tiles [0,4) and [4,8).
  static = simulated_speedup((12,), 4, stride=2, q_tile=2, kv_tile=4)
  dynamic = simulated_speedup((12,), 4, stride=2, q_tile=2, kv_tile=4, kv_tiling="dynamic")
  assert (static.max_kv_tiles, dynamic.max_kv_tiles) == (2, 1)
  assert dynamic.perfect_block_sparsity and not static.perfect_block_sparsity
  np.testing.assert_allclose([static.speedup, dynamic.speedup], [1.5, 3.0])
  np.testing.assert_allclose(dynamic.speedup, dynamic.flop_speedup)


def test_causal_full_window_gives_no_tile_speedup_but_halves_flops():
  # The last q tile of a causal mask visits every kv tile; kept keys per query average 4.5 of 8.
  r = simulated_speedup((8,), 8, causal=True, q_tile=2, kv_tile=2)
  assert (r.dense_kv_tiles, r.max_kv_tiles) == (4, 4)
  np.testing.assert_allclose(r.flop_speedup, 64 / 36)
  np.testing.assert_allclose(r.mean_kv_tiles, (1 + 2 + 3 + 4) / 4)


def test_dilation_groups_are_tiled_contiguously():
  # Two groups of 4 (even / odd positions) made contiguous; a q tile of 4 is one group and needs
  # only that group's kv tile.
  r = simulated_speedup((8,), 2, dilation=2, q_tile=4, kv_tile=4)
  assert (r.dense_kv_tiles, r.max_kv_tiles) == (2, 1)
  np.testing.assert_allclose(r.flop_speedup, 4.0)


def test_amdahl_by_hand():
  np.testing.assert_allclose(amdahl(0.5, 2.0), 4 / 3)
  np.testing.assert_allclose(amdahl(0.0, 10.0), 1.0)
  r = simulated_speedup((12,), 4, stride=4, q_tile=4, kv_tile=4, attention_share=0.5)
  np.testing.assert_allclose(r.e2e_speedup, 1 / (0.5 + 0.5 / 3))


@pytest.mark.parametrize(
  "kwargs, match",
  [
    (dict(spatial_shape=(8,), window=3, stride=4), "stride=4"),
    (dict(spatial_shape=(8,), window=9), "window=9"),
    (dict(spatial_shape=(8, 8), window=(3, 3, 3)), "window="),
    (dict(spatial_shape=(8,), window=3, kv_tiling="ragged"), "kv_tiling"),
    (dict(spatial_shape=(8,), window=3, q_tile=0), "q_tile"),
  ],
)
def test_bad_arguments_raise_value_error_naming_the_value(kwargs, match):
  with pytest.raises(ValueError, match=match):
    simulated_speedup(**kwargs)


def test_amdahl_rejects_a_share_outside_unit_interval():
  with pytest.raises(ValueError, match="attention_share=1.5"):
    amdahl(1.5, 2.0)


def _neighborhood():
  masks = pytest.importorskip("attnzoo.masks")
  if not hasattr(masks, "Neighborhood"):
    pytest.skip("attnzoo.masks.Neighborhood is not there yet")
  return masks.Neighborhood


@pytest.mark.parametrize(
  "n, w, s, d, c",
  [
    (9, 3, 1, 1, False),
    (10, 4, 2, 1, False),
    (8, 3, 2, 1, True),
    (12, 4, 4, 1, False),
    (10, 2, 1, 2, False),
    (11, 3, 2, 3, True),
  ],
)
def test_axis_keep_matches_the_neighborhood_mask(n, w, s, d, c):
  mask = _neighborhood()(shape=(n,), window=(w,), stride=(s,), dilation=(d,), causal=(c,))
  np.testing.assert_array_equal(mask.dense(n, n), axis_keep(n, w, s, d, c))


def test_simulation_matches_the_block_map_of_the_multi_dimensional_mask():
  # Reorder tokens so that every 2x4 tile of the 6x8 grid is contiguous, then count the kv tiles
  # each q tile visits directly on the N-D mask: the per-axis product must agree.
  shape, window, stride, tile = (6, 8), (3, 5), (1, 2), (2, 4)
  keep = _neighborhood()(shape=shape, window=window, stride=stride).dense(48, 48)
  rows, cols = np.divmod(np.arange(48), shape[1])
  order = np.lexsort((cols % tile[1], rows % tile[0], cols // tile[1], rows // tile[0]))
  tiles = keep[np.ix_(order, order)].reshape(6, 8, 6, 8)
  visited = tiles.any(axis=(1, 3)).sum(axis=1)
  partial = (tiles.any(axis=(1, 3)) & ~tiles.all(axis=(1, 3))).any()
  r = simulated_speedup(shape, window, stride, q_tile=tile, kv_tile=tile)
  assert (r.max_kv_tiles, r.dense_kv_tiles) == (visited.max(), 6)
  np.testing.assert_allclose(r.mean_kv_tiles, visited.mean())
  assert r.perfect_block_sparsity == (not partial)
