"""Task semantics of MQAR, selective copying and needle-in-a-haystack."""

import re

import numpy as np
import pytest

from attnzoo.data import MQAR, NeedleInHaystack, SelectiveCopy, corpora

# ------------------------------------------------------------------------------------ MQAR


@pytest.mark.parametrize("random_non_queries", [True, False])
def test_mqar_answer_is_the_value_paired_with_the_queried_key(random_non_queries):
  ds = MQAR(seq_len=128, vocab_size=256, num_kv_pairs=12, random_non_queries=random_non_queries)
  n, half = ds.num_kv_pairs, ds.vocab_size // 2
  b = ds.batch(3, 16)
  for x, y, w in zip(b["inputs"], b["targets"], b["weights"], strict=True):
    keys, values = x[0 : 2 * n : 2], x[1 : 2 * n : 2]
    assert len(set(keys)) == n and len(set(values)) == n
    assert keys.min() >= 1 and keys.max() < half
    assert values.min() >= half and values.max() < ds.vocab_size
    (query_pos,) = np.nonzero(w)
    assert query_pos.min() >= 2 * n and np.all((query_pos - 2 * n) % 2 == 0)
    assert sorted(x[query_pos]) == sorted(keys)  # every key is queried exactly once
    for p in query_pos:
      (slot,) = np.nonzero(keys == x[p])
      assert y[p] == values[slot[0]]
    if not random_non_queries:
      others = np.setdiff1d(np.arange(2 * n, ds.seq_len), query_pos)
      np.testing.assert_array_equal(x[others], 0)


@pytest.mark.parametrize("power_a", [0.01, 0.5, 1.0])
def test_mqar_gap_distribution_is_the_power_law(power_a):
  """With one pair the gap's law is exactly P(g) ∝ a (g+1)^(a-1), g in [0, space)."""
  ds = MQAR(seq_len=2 + 2 * 8, vocab_size=64, num_kv_pairs=1, power_a=power_a)
  w = ds.batch(0, 8000)["weights"]
  gaps = (np.argmax(w, axis=1) - 2) // 2
  freq = np.bincount(gaps, minlength=8) / gaps.size
  p = power_a * np.arange(1, 9) ** (power_a - 1)
  np.testing.assert_allclose(freq, p / p.sum(), atol=0.015)


def test_mqar_validation():
  with pytest.raises(ValueError, match="seq_len=63 must be even"):
    MQAR(seq_len=63, vocab_size=128)
  with pytest.raises(ValueError, match="num_kv_pairs=20 needs seq_len >= 4"):
    MQAR(seq_len=64, vocab_size=128, num_kv_pairs=20)
  with pytest.raises(ValueError, match="vocab_size=64 must exceed seq_len=64"):
    MQAR(seq_len=64, vocab_size=64)


# --------------------------------------------------------------------------- selective copy


def test_selective_copy_targets_are_the_scattered_tokens_in_order():
  ds = SelectiveCopy(seq_len=200, num_tokens=10, vocab_size=12)
  m, context = ds.num_tokens, ds.seq_len - ds.num_tokens
  b = ds.batch(4, 16)
  for x, y, w in zip(b["inputs"], b["targets"], b["weights"], strict=True):
    data_tokens = x[:context][x[:context] != ds.noise_id]
    assert data_tokens.size == m
    assert data_tokens.min() >= 1 and data_tokens.max() <= ds.vocab_size - 2
    np.testing.assert_array_equal(x[context:], ds.marker_id)
    np.testing.assert_array_equal(y[context:], data_tokens)
    np.testing.assert_array_equal(w[context:], 1.0)
    np.testing.assert_array_equal(w[:context], 0.0)


def test_selective_copy_positions_are_spread_over_the_context():
  ds = SelectiveCopy(seq_len=72, num_tokens=8, vocab_size=16)
  x = ds.batch(0, 2000)["inputs"][:, :64]
  occupancy = (x != 0).mean(axis=0)  # each slot holds a token with probability 8/64
  np.testing.assert_allclose(occupancy, 8 / 64, atol=0.04)


# ---------------------------------------------------------------------------------- needle

_NEEDLE = re.compile(rb"\nThe secret number for ([a-z]+) is ([0-9]+)\.\n")


@pytest.mark.parametrize("haystack", ["random", "stdlib"])
@pytest.mark.parametrize("depth", [0.0, 0.37, 1.0])
def test_needle_is_at_its_depth_and_the_answer_is_its_value(haystack, depth):
  ds = NeedleInHaystack(seq_len=400, depth=depth, haystack=haystack, max_bytes=2 * 2**20)
  b = ds.batch(2, 6, "test")
  h = ds.haystack_len()
  for x, y, w in zip(b["inputs"], b["targets"], b["weights"], strict=True):
    text = x.astype(np.uint8).tobytes() + y[-1:].astype(np.uint8).tobytes()
    found = [m for m in _NEEDLE.finditer(text) if m.start() < h]
    assert len(found) == 1
    needle = found[0]
    assert needle.start() == round(depth * (h - len(needle.group(0))))
    key, value = needle.group(1), needle.group(2)
    assert text[h:].startswith(ds.question(key))
    (answer_pos,) = np.nonzero(w)
    np.testing.assert_array_equal(answer_pos, np.arange(ds.seq_len - ds.value_digits, ds.seq_len))
    assert y[answer_pos].astype(np.uint8).tobytes() == value
    assert len(key) == ds.key_len and len(value) == ds.value_digits


def test_needle_haystack_comes_from_the_requested_split():
  ds = NeedleInHaystack(seq_len=300, depth=1.0, max_bytes=2 * 2**20)
  corpus = corpora.load_corpus("stdlib", max_bytes=2 * 2**20)
  for split in ("train", "test"):
    x = ds.batch(0, 4, split)["inputs"].astype(np.uint8)
    prefix = x[:, :100]  # depth 1 puts the needle at the end of the haystack
    for row in prefix:
      assert corpus.split(split).tobytes().find(row.tobytes()) >= 0


def test_needle_random_depth_varies():
  ds = NeedleInHaystack(seq_len=300, haystack="random")
  x = ds.batch(0, 16)["inputs"].astype(np.uint8)
  starts = {next(_NEEDLE.finditer(r.tobytes())).start() for r in x}
  assert len(starts) > 8


def test_needle_validation():
  with pytest.raises(ValueError, match="depth=1.5"):
    NeedleInHaystack(depth=1.5)
  with pytest.raises(ValueError, match="haystack='wiki'"):
    NeedleInHaystack(haystack="wiki")
  with pytest.raises(ValueError, match="seq_len=50 must be >="):
    NeedleInHaystack(seq_len=50)
