"""Neighborhood (NA / GNA) masks against hand-derived cases and a loop reference.

NATTEN (the reference implementation) needs torch and is not installed here, so
the 1-D cases below are derived by hand from the GNA definition
(`attnzoo/masks/neighborhood.py`), and `na_1d_reference` restates it as loops
over explicit dilation groups and a shifted window start, independently of the
vectorised predicate.
"""

from __future__ import annotations

import math

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings

from attnzoo.masks import Blocked, Mask, Neighborhood


def na_1d_reference(n, window, stride=1, dilation=1, causal=False):
  """bool[n, n] by loops: per dilation group, a window of `window` keys per query."""
  keep = np.zeros((n, n), bool)
  for group in range(dilation):
    members = list(range(group, n, dilation))
    m = len(members)
    for i, x in enumerate(members):
      if causal:
        last_of_stride_group = min(i // stride * stride + stride - 1, m - 1)
        keys = [j for j in range(i + 1) if last_of_stride_group - j < window]
      else:
        leader = min(i // stride * stride + stride // 2, m - 1)
        start = leader - window // 2  # even windows put the extra key on the left
        start = min(max(start, 0), m - window)  # shift inward at the borders
        keys = range(start, start + window)
      for j in keys:
        keep[x, members[j]] = True
  return keep


def na_reference(shape, window, stride, dilation, causal):
  """AND over axes of the 1-D reference, on row-major flattened tokens."""
  size = math.prod(shape)
  coords = np.unravel_index(np.arange(size), shape)
  keep = np.ones((size, size), bool)
  for axis, n in enumerate(shape):
    axis_keep = na_1d_reference(n, window[axis], stride[axis], dilation[axis], causal[axis])
    keep &= axis_keep[coords[axis][:, None], coords[axis][None, :]]
  return keep


def keys_per_query(keep):
  return [np.flatnonzero(row).tolist() for row in keep]


# (n, window, stride, dilation, causal) -> the kept keys of every query, derived by hand.
HAND_CASES = {
  "w5_interior_and_borders": (
    (8, 5, 1, 1, False),
    [[0, 1, 2, 3, 4]] * 3 + [[1, 2, 3, 4, 5], [2, 3, 4, 5, 6]] + [[3, 4, 5, 6, 7]] * 3,
  ),
  "w4_even_extra_key_left": (
    (8, 4, 1, 1, False),
    [[0, 1, 2, 3]] * 3 + [[1, 2, 3, 4], [2, 3, 4, 5], [3, 4, 5, 6]] + [[4, 5, 6, 7]] * 2,
  ),
  "s_equals_w_is_blocked": ((8, 4, 4, 1, False), [[0, 1, 2, 3]] * 4 + [[4, 5, 6, 7]] * 4),
  "s_equals_w_ragged_tail": (
    (10, 4, 4, 1, False),
    [[0, 1, 2, 3]] * 4 + [[4, 5, 6, 7]] * 4 + [[6, 7, 8, 9]] * 2,
  ),
  "w3_s2_leader_centre": (
    (7, 3, 2, 1, False),
    [[0, 1, 2]] * 2 + [[2, 3, 4]] * 2 + [[4, 5, 6]] * 3,
  ),
  "w4_s2_even_stride_right_biased": (
    # leaders 1, 3, 5, 7 (right of centre); centres clip(leader, 2, 6) = 2, 3, 5, 6;
    # window [centre - 2, centre + 1].
    (8, 4, 2, 1, False),
    [[0, 1, 2, 3]] * 2 + [[1, 2, 3, 4]] * 2 + [[3, 4, 5, 6]] * 2 + [[4, 5, 6, 7]] * 2,
  ),
  "causal_w3": ((6, 3, 1, 1, True), [[0], [0, 1], [0, 1, 2], [1, 2, 3], [2, 3, 4], [3, 4, 5]]),
  "causal_w3_s2": (
    # leader = last query of the stride group; keys leader-2..query.
    (6, 3, 2, 1, True),
    [[0], [0, 1], [1, 2], [1, 2, 3], [3, 4], [3, 4, 5]],
  ),
  "dilation2_non_divisible": (
    # Groups {0,2,4,6} (size 4) and {1,3,5} (size 3), window 3 inside each group.
    (7, 3, 1, 2, False),
    [[0, 2, 4], [1, 3, 5], [0, 2, 4], [1, 3, 5], [2, 4, 6], [1, 3, 5], [2, 4, 6]],
  ),
  "dilation3_causal": (
    (7, 2, 1, 3, True),
    [[0], [1], [2], [0, 3], [1, 4], [2, 5], [3, 6]],
  ),
}


@pytest.mark.parametrize("name", sorted(HAND_CASES))
def test_hand_derived_1d(name):
  (n, w, s, d, causal), expected = HAND_CASES[name]
  mask = Neighborhood((n,), w, stride=s, dilation=d, causal=causal)
  assert keys_per_query(mask.dense(n, n)) == expected
  assert keys_per_query(na_1d_reference(n, w, s, d, causal)) == expected


def test_stride_equal_window_is_block_diagonal():
  np.testing.assert_array_equal(
    Neighborhood(12, 4, stride=4).dense(12, 12), Blocked(4).dense(12, 12)
  )
  # 2-D Swin-style windows: same tile of the 6 x 8 grid in both axes.
  shape, window = (6, 8), (3, 4)
  rows, cols = np.unravel_index(np.arange(48), shape)
  tile = (rows // 3) * 2 + cols // 4
  np.testing.assert_array_equal(
    Neighborhood(shape, window, stride=window).dense(48, 48), tile[:, None] == tile[None, :]
  )


@pytest.mark.parametrize(
  "shape, window, stride, dilation",
  [
    ((17,), 5, 1, 1),
    ((16,), 4, 3, 1),
    ((7, 9), (3, 4), (1, 2), 1),
    ((4, 5, 6), (3, 2, 5), 1, 1),
    ((4, 5, 6), (2, 3, 2), (2, 3, 1), (2, 1, 3)),
    ((11,), 3, 2, 3),
  ],
)
def test_non_causal_queries_see_exactly_prod_window_keys(shape, window, stride, dilation):
  mask = Neighborhood(shape, window, stride, dilation)
  size = math.prod(shape)
  np.testing.assert_array_equal(mask.dense(size, size).sum(-1), math.prod(mask.window))


@pytest.mark.parametrize("shape, stride", [((9,), 1), ((9,), 4), ((3, 4), (2, 3)), ((2, 3, 4), 2)])
def test_full_window_is_dense_attention(shape, stride):
  size = math.prod(shape)
  stride = stride if isinstance(stride, tuple) else (stride,) * len(shape)
  stride = tuple(min(s, n) for s, n in zip(stride, shape, strict=True))
  assert Neighborhood(shape, shape, stride).dense(size, size).all()


def test_2d_per_axis_causal_hand_case():
  # Rows causal with window 2, columns bidirectional with window 3 on a 3 x 3 grid.
  mask = Neighborhood((3, 3), (2, 3), causal=(True, False))
  keep = mask.dense(9, 9)
  assert keys_per_query(keep)[0] == [0, 1, 2]  # (0, 0): row 0 only
  assert keys_per_query(keep)[4] == [0, 1, 2, 3, 4, 5]  # (1, 1): rows 0-1, all columns
  assert keys_per_query(keep)[8] == [3, 4, 5, 6, 7, 8]  # (2, 2): rows 1-2


def test_3d_hand_case():
  # 2 x 3 x 4 grid, window 1 x 3 x 2: a query sees its own frame, a 3 x 2 box.
  keep = Neighborhood((2, 3, 4), (1, 3, 2)).dense(24, 24)
  # Query (1, 0, 3) = 12 + 3: rows 0..2, columns 2..3 (even window shifted inward), frame 1.
  assert keys_per_query(keep)[15] == [14, 15, 18, 19, 22, 23]


@st.composite
def neighborhood_params(draw):
  shape = tuple(draw(st.lists(st.integers(1, 9), min_size=1, max_size=3)))
  window, stride, dilation, causal = [], [], [], []
  for n in shape:
    d = draw(st.integers(1, min(3, n)))
    w = draw(st.integers(1, n // d))
    window.append(w)
    stride.append(draw(st.integers(1, w)))
    dilation.append(d)
    causal.append(draw(st.booleans()))
  return shape, tuple(window), tuple(stride), tuple(dilation), tuple(causal)


@settings(max_examples=80, deadline=None)
@given(neighborhood_params())
def test_matches_loop_reference(params):
  shape, window, stride, dilation, causal = params
  size = math.prod(shape)
  mask = Neighborhood(shape, window, stride, dilation, causal)
  np.testing.assert_array_equal(mask.dense(size, size), na_reference(*params), err_msg=repr(mask))


def test_jitted_3d_predicate_matches_dense():
  mask = Neighborhood(
    (3, 4, 5), (3, 2, 3), stride=(1, 2, 3), dilation=(1, 2, 1), causal=(True, False, False)
  )
  q = jnp.arange(60, dtype=jnp.int32)[:, None]
  k = jnp.arange(60, dtype=jnp.int32)[None, :]
  keep = jax.jit(lambda q, k: mask.predicate(q, k, jnp))(q, k)
  np.testing.assert_array_equal(np.asarray(keep), mask.dense(60, 60))


def test_unravel_is_row_major():
  mask = Neighborhood((3, 4, 5), 1)
  pos = np.arange(60)
  for got, want in zip(mask.unravel(pos), np.unravel_index(pos, (3, 4, 5)), strict=True):
    np.testing.assert_array_equal(got, want)


def test_scalars_broadcast_to_every_axis():
  mask = Neighborhood([4, 6], 3, stride=2, dilation=1, causal=True)
  assert (mask.shape, mask.window, mask.stride, mask.dilation, mask.causal) == (
    (4, 6),
    (3, 3),
    (2, 2),
    (1, 1),
    (True, True),
  )
  assert hash(mask) == hash(Neighborhood((4, 6), (3, 3), (2, 2), (1, 1), (True, True)))


@pytest.mark.parametrize(
  "kwargs, match",
  [
    (dict(shape=(8,), window=9), r"window\[0\]=9 .* use window <= 8"),
    (dict(shape=(8,), window=3, dilation=3), r"dilation\[0\]=3 spans 9 > shape\[0\]=8"),
    (dict(shape=(8,), window=3, stride=4), r"stride\[0\]=4 exceeds window\[0\]=3"),
    (dict(shape=(8,), window=0), r"window\[0\]=0 must be >= 1"),
    (dict(shape=(8,), window=-2), r"window\[0\]=-2"),
    (dict(shape=(8, 8), window=(3, 3, 3)), r"window=\(3, 3, 3\) has 3 entries"),
    (dict(shape=(), window=3), r"shape=\(\) must be a non-empty tuple"),
    (dict(shape=(8, 0), window=1), r"shape\[1\]=0 must be >= 1"),
  ],
)
def test_bad_parameters_raise(kwargs, match):
  with pytest.raises(ValueError, match=match):
    Neighborhood(**kwargs)


def test_lengths_must_match_the_grid():
  mask = Neighborhood((4, 4), 3)
  with pytest.raises(ValueError, match=r"16 tokens but .* T=15 x S=16.*T = S = 16"):
    mask.dense(15, 16)
  with pytest.raises(ValueError, match="T=16 x S=20"):
    mask.block_map(16, 20, 4, 4)


@settings(max_examples=60, deadline=None)
@given(neighborhood_params(), st.integers(1, 40), st.integers(1, 40))
def test_counting_block_mask_equals_generic(params, block_q, block_k):
  mask = Neighborhood(*params)
  size = mask.size
  np.testing.assert_array_equal(
    mask.block_mask(size, size, block_q, block_k),
    Mask.block_mask(mask, size, size, block_q, block_k),
    err_msg=repr(mask),
  )


def test_key_intervals_count_matches_dense():
  mask = Neighborhood(
    (5, 6, 7), (3, 2, 5), stride=(3, 1, 2), dilation=(1, 3, 1), causal=(False, True, False)
  )
  pos = np.arange(mask.size)
  sizes = [hi - lo + 1 for _, lo, hi in mask.key_intervals(pos, np)]
  np.testing.assert_array_equal(math.prod(sizes), mask.dense(mask.size, mask.size).sum(-1))
