"""Hand-checked cases, algebra, hashing and input validation of every mask kind."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnzoo import masks
from attnzoo.masks import (
  And,
  AttentionSinks,
  Blocked,
  Causal,
  Chunked,
  DenseMask,
  GlobalTokens,
  Neighborhood,
  Or,
  RandomBlocks,
  Segments,
  SlidingWindow,
)
from pallas_kernels.block_sparse import EMPTY, FULL, PARTIAL


def grid(*rows: str) -> np.ndarray:
  """bool matrix from rows of '1'/'0' (hand-written expectations)."""
  return np.array([[c == "1" for c in row] for row in rows])


# ------------------------------------------------------------------ hand-checked dense masks

HAND = {
  "window_l2_r1": (SlidingWindow(2, 1), 5, 6, ["110000", "111000", "111100", "011110", "001111"]),
  "causal_window": (SlidingWindow(1), 4, 4, ["1000", "1100", "0110", "0011"]),
  "causal_offset": (Causal(2), 3, 5, ["11100", "11110", "11111"]),
  "window_decode_offset": (SlidingWindow(1, offset=3), 2, 5, ["00110", "00011"]),
  "chunked_causal": (
    Chunked(3),
    6,
    6,
    ["100000", "110000", "111000", "000100", "000110", "000111"],
  ),
  "chunked_bidirectional": (Chunked(2, causal=False), 3, 5, ["11000", "11000", "00110"]),
  "blocked_2x3": (Blocked(2, 3), 4, 7, ["1110000", "1110000", "0001110", "0001110"]),
  "global_tokens": (GlobalTokens(1), 4, 4, ["1111", "1000", "1000", "1000"]),
  "global_keys_only": (GlobalTokens(2, queries_see_all=False), 3, 4, ["1100"] * 3),
  "sinks_or_window": (
    AttentionSinks(1) | SlidingWindow(1),
    5,
    5,
    ["10000", "11000", "11100", "10110", "10011"],
  ),
  "segments": (Segments.from_lengths([2, 3]), 5, 5, ["11000", "11000", "00111", "00111", "00111"]),
  "segments_q_kv": (Segments([0, 1, 1], kv_ids=[1, 0, 0, 1]), 3, 4, ["0110", "1001", "1001"]),
  "segments_causal": (Segments([5, 5, 2, 2]) & Causal(), 4, 4, ["1000", "1100", "0010", "0011"]),
}


@pytest.mark.parametrize("name", sorted(HAND))
def test_hand_checked_dense(name):
  mask, seq_q, seq_k, rows = HAND[name]
  keep = mask.dense(seq_q, seq_k)
  assert keep.dtype == np.bool_ and keep.shape == (seq_q, seq_k)
  np.testing.assert_array_equal(keep, grid(*rows))


def test_causal_sliding_window_keeps_left_plus_one_keys():
  keep = SlidingWindow(left=7).dense(40, 40)
  np.testing.assert_array_equal(keep.sum(-1), np.minimum(np.arange(40) + 1, 8))
  np.testing.assert_array_equal(keep & ~Causal().dense(40, 40), False)


def test_chunked_without_causal_is_blocked():
  np.testing.assert_array_equal(Chunked(5, causal=False).dense(23, 19), Blocked(5).dense(23, 19))


# ------------------------------------------------------------------ block classification


@pytest.mark.parametrize(
  "mask",
  [
    Causal(),
    Causal(-3),
    Causal(7),
    SlidingWindow(5, 2),
    SlidingWindow(0),
    SlidingWindow(0, 9),
    SlidingWindow(3, 1, offset=-5),
    SlidingWindow(2, offset=8),
    Chunked(6),
    Chunked(6, causal=False),
    Chunked(1),
    Blocked(4),
    Blocked(3, 7),
    GlobalTokens(5),
    GlobalTokens(9, queries_see_all=False),
    GlobalTokens(0),
    AttentionSinks(3),
    Segments(np.repeat(np.arange(4), 10)[:37], np.repeat(np.arange(5), 9)),
    Segments(np.arange(37) % 3, np.arange(45) % 2),
    (SlidingWindow(4) & Causal()) | AttentionSinks(2),
    Chunked(8) | GlobalTokens(3, queries_see_all=False),
    Causal(-2) & Blocked(5) & SlidingWindow(9, 9),
    Or((Causal(),)),
  ],
  ids=lambda m: type(m).__name__,
)
@pytest.mark.parametrize("tiling", [(1, 1), (4, 4), (5, 3), (8, 16), (64, 64)])
def test_analytic_block_mask_equals_generic(mask, tiling):
  seq_q, seq_k = 37, 45
  np.testing.assert_array_equal(
    mask.block_mask(seq_q, seq_k, *tiling), masks.Mask.block_mask(mask, seq_q, seq_k, *tiling)
  )


def test_block_mask_hand_case():
  # 6 x 6 causal window of 2 keys, tiles of 2: diagonal tiles PARTIAL, sub-diagonal PARTIAL.
  got = SlidingWindow(1).block_mask(6, 6, 2, 2)
  np.testing.assert_array_equal(
    got, [[PARTIAL, EMPTY, EMPTY], [PARTIAL, PARTIAL, EMPTY], [EMPTY, PARTIAL, PARTIAL]]
  )
  # Ragged last tile: only in-range elements count, so [4, 5) x [4, 5) is FULL.
  np.testing.assert_array_equal(Causal().block_mask(5, 5, 4, 4), [[PARTIAL, EMPTY], [FULL, FULL]])


# ------------------------------------------------------------------ random blocks


def test_random_blocks_is_deterministic_in_seed():
  a = RandomBlocks(0.3, 4, 4, seed=3, seq_q=64, seq_k=64)
  b = RandomBlocks(0.3, 4, 4, seed=3, seq_q=64, seq_k=64)
  c = RandomBlocks(0.3, 4, 4, seed=4, seq_q=64, seq_k=64)
  np.testing.assert_array_equal(a.dense(64, 64), b.dense(64, 64))
  assert a == b and hash(a) == hash(b)
  assert a != c and (a.pattern != c.pattern).any()


def test_random_blocks_density():
  mask = RandomBlocks(0.25, 2, 2, seed=0, seq_q=256, seq_k=256)  # 16384 Bernoulli blocks
  frac = mask.pattern.mean()
  assert abs(frac - 0.25) < 4 * np.sqrt(0.25 * 0.75 / mask.pattern.size), frac
  assert not RandomBlocks(0.0, 4, 4, 0, 30, 20).dense(30, 20).any()
  assert RandomBlocks(1.0, 4, 4, 0, 30, 20).dense(30, 20).all()


def test_random_blocks_keep_diagonal_and_own_tiling():
  mask = RandomBlocks(0.0, 4, 3, seed=1, seq_q=10, seq_k=13, keep_diagonal=True)
  keep = mask.dense(10, 13)
  assert keep[np.arange(10), np.arange(10)].all()
  # In its own tiling the pattern is the block mask: every tile FULL or EMPTY.
  np.testing.assert_array_equal(mask.block_mask(10, 13, 4, 3), np.where(mask.pattern, FULL, EMPTY))
  np.testing.assert_array_equal(
    mask.block_mask(10, 13, 4, 3), masks.Mask.block_mask(mask, 10, 13, 4, 3)
  )


# ------------------------------------------------------------------ dense arrays, segments


def test_dense_mask_round_trip_and_broadcast():
  array = np.random.default_rng(0).random((7, 5)) < 0.5
  np.testing.assert_array_equal(DenseMask(array).dense(7, 5), array)
  row = np.array([[True, False, True, True, False]])
  np.testing.assert_array_equal(DenseMask(row).dense(3, 5), np.repeat(row, 3, 0))
  assert DenseMask(np.ones((1, 1), bool)).dense(4, 9).all()


def test_table_masks_hash_by_content_and_work_as_static_jit_args():
  a, b = Segments([0, 0, 1]), Segments(np.array([0, 0, 1]))
  assert a == b and hash(a) == hash(b) and a != Segments([0, 1, 1])
  d = DenseMask(np.eye(3, dtype=bool))
  assert d == DenseMask(np.eye(3, dtype=bool)) and d != DenseMask(~np.eye(3, dtype=bool))

  @functools.partial(jax.jit, static_argnums=0)
  def keep(mask):
    return mask.predicate(jnp.arange(3)[:, None], jnp.arange(3)[None, :], jnp)

  np.testing.assert_array_equal(keep(a & d), a.dense(3, 3) & np.eye(3, dtype=bool))


def test_table_masks_copy_their_input():
  ids = np.array([0, 0, 1])
  mask = Segments(ids)
  ids[:] = 7
  np.testing.assert_array_equal(mask.q_ids, [0, 0, 1])
  with pytest.raises(ValueError):
    mask.q_ids[0] = 3  # read-only


def test_predicate_with_reads_the_given_tables():
  mask = Causal() & Segments([0, 0, 1, 1]) | DenseMask(np.eye(4, dtype=bool)[::-1])
  assert [t.shape for t in mask.tables()] == [(4,), (4,), (4, 4)]
  q, k = np.arange(4)[:, None], np.arange(4)[None, :]
  np.testing.assert_array_equal(mask.predicate_with(mask.tables(), q, k, np), mask.dense(4, 4))
  all_one_segment = (np.zeros(4, np.int32), np.zeros(4, np.int32), np.zeros((4, 4), bool))
  np.testing.assert_array_equal(
    mask.predicate_with(all_one_segment, q, k, np), Causal().dense(4, 4)
  )
  with pytest.raises(ValueError, match="got 2 tables, but the masks use 3"):
    mask.predicate_with(all_one_segment[:2], q, k, np)


# ------------------------------------------------------------------ algebra


def test_and_or_flatten():
  a, b, c, d = Causal(), SlidingWindow(3), GlobalTokens(1), Chunked(4)
  assert a & b & c == And((a, b, c))
  assert (a | b) | (c | d) == Or((a, b, c, d))
  mixed = a & (b | c) & d
  assert mixed == And((a, Or((b, c)), d))
  np.testing.assert_array_equal(
    mixed.dense(20, 20), a.dense(20, 20) & (b.dense(20, 20) | c.dense(20, 20)) & d.dense(20, 20)
  )


def test_algebra_with_every_kind():
  seq = 16
  kinds = [
    Causal(),
    SlidingWindow(2, 1),
    Chunked(4),
    Blocked(8),
    GlobalTokens(2),
    AttentionSinks(1),
    Neighborhood((4, 4), 3),
    Segments.from_lengths([5, 11]),
    RandomBlocks(0.5, 4, 4, 0, seq, seq),
    DenseMask(np.tri(seq, k=-2, dtype=bool)),
  ]
  dense = [m.dense(seq, seq) for m in kinds]
  all_and, all_or = kinds[0], kinds[0]
  for m in kinds[1:]:
    all_and, all_or = all_and & m, all_or | m
  assert len(all_and.masks) == len(all_or.masks) == len(kinds)
  np.testing.assert_array_equal(all_and.dense(seq, seq), np.logical_and.reduce(dense))
  np.testing.assert_array_equal(all_or.dense(seq, seq), np.logical_or.reduce(dense))


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
  "build, error, match",
  [
    (lambda: SlidingWindow(-1), ValueError, r"SlidingWindow.left=-1 must be >= 0"),
    (lambda: SlidingWindow(2, -3), ValueError, r"SlidingWindow.right=-3"),
    (lambda: SlidingWindow(1.5), TypeError, r"SlidingWindow.left=1.5 must be an int"),
    (lambda: Chunked(0), ValueError, r"Chunked.chunk=0 must be >= 1"),
    (lambda: Blocked(4, 0), ValueError, r"Blocked.size_k=0"),
    (lambda: GlobalTokens(-2), ValueError, r"GlobalTokens.num_global=-2"),
    (lambda: AttentionSinks(-1), ValueError, r"AttentionSinks.num_sinks=-1"),
    (lambda: RandomBlocks(1.5, 4, 4, 0, 8, 8), ValueError, r"density=1.5 is outside \[0, 1\]"),
    (lambda: RandomBlocks(-0.1, 4, 4, 0, 8, 8), ValueError, r"density=-0.1"),
    (lambda: RandomBlocks(float("nan"), 4, 4, 0, 8, 8), ValueError, r"density=nan"),
    (lambda: RandomBlocks(0.5, 0, 4, 0, 8, 8), ValueError, r"RandomBlocks.block_q=0"),
    (lambda: RandomBlocks(0.5, 4, -4, 0, 8, 8), ValueError, r"RandomBlocks.block_k=-4"),
    (lambda: Segments(np.zeros((2, 2), int)), ValueError, r"shape \(2, 2\).*1-D"),
    (lambda: Segments([0.5, 1.0]), TypeError, r"segment ids must be integers"),
    (lambda: Segments.from_lengths([3, 0]), ValueError, r"lengths\[1\]=0"),
    (lambda: DenseMask(np.ones((3, 3), int)), TypeError, r"dtype int64; pass a bool array"),
    (lambda: DenseMask(np.ones(3, bool)), ValueError, r"shape \(3,\)"),
    (lambda: And(()), ValueError, r"non-empty tuple"),
    (lambda: Or((Causal(), np.ones((2, 2)))), TypeError, r"is not a Mask; wrap arrays"),
    (lambda: Causal() & np.ones((2, 2), bool), TypeError, r"unsupported operand"),
  ],
)
def test_bad_parameters_raise(build, error, match):
  with pytest.raises(error, match=match):
    build()


@pytest.mark.parametrize(
  "call, match",
  [
    (lambda: Causal().block_map(8, 8, 0, 4), r"block_q=0 must be a positive int"),
    (lambda: Causal().block_mask(8, 8, 4, -2), r"block_k=-2 must be a positive int"),
    (lambda: SlidingWindow(2).block_mask(8, 8, 4, 0), r"block_k=0"),
    (lambda: Causal().dense(0, 4), r"seq_q=0 must be a positive int"),
    (lambda: Segments([0, 0, 1]).dense(3, 4), r"3 key ids .* T=3 x S=4"),
    (
      lambda: RandomBlocks(0.5, 2, 2, 0, 8, 8).block_map(8, 6, 2, 2),
      r"drawn for T=8 x S=8 .* seq_q=8, seq_k=6",
    ),
    (lambda: DenseMask(np.ones((3, 4), bool)).dense(4, 4), r"shape \(3, 4\).*T=4 x S=4"),
    (lambda: (Causal() & Neighborhood((3, 3), 3)).dense(9, 10), r"T = S = 9"),
  ],
)
def test_bad_lengths_and_tiles_raise(call, match):
  with pytest.raises(ValueError, match=match):
    call()
