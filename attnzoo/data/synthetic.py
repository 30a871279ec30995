"""Synthetic recall tasks: MQAR, selective copying, needle in a haystack.

All three are "lm" tasks scored only where an answer is due: `weights` is 1 on the
positions whose next token is an answer and 0 elsewhere (targets there are 0).
ListOps, the fourth synthetic task, is in `attnzoo.data.listops`.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import numpy as np

from attnzoo.data import corpora
from attnzoo.data.base import (
  Batch,
  check_batch_args,
  make_batch,
  require_fraction,
  require_int,
)
from attnzoo.data.text import random_windows


def _top_k(scores_RM: np.ndarray, count: int) -> np.ndarray:
  """Indices of the `count` largest scores of each row, largest first; O(M) per row."""
  top_RC = np.argpartition(-scores_RM, count - 1, axis=1)[:, :count]
  order_RC = np.argsort(-np.take_along_axis(scores_RM, top_RC, axis=1), axis=1)
  return np.take_along_axis(top_RC, order_RC, axis=1)


def ordered_sample(
  rng: np.random.Generator, rows: int, size: int, count: int, log_p=None
) -> np.ndarray:
  """int [rows, count]: distinct draws from range(size), one after another, P ∝ exp(log_p).

  Gumbel-top-k: the `count` largest of `log_p + Gumbel noise`, in decreasing order,
  have the law of sequential sampling without replacement (numpy's
  `choice(size, count, replace=False, p=p)`), for all rows at once. `log_p=None`
  is uniform: a uniformly random ordered subset.
  """
  if log_p is None:  # any iid continuous scores give a uniform ordered subset; uniforms are cheap
    return _top_k(rng.random((rows, size)), count)
  return _top_k(log_p + rng.gumbel(size=(rows, size)), count)


# ---------------------------------------------------------------------------------------- MQAR


@dataclasses.dataclass(frozen=True)
class MQAR:
  """Multi-query associative recall.

  Source: Arora, Eyuboglu et al., "Zoology: Measuring and Improving Recall in
  Efficient Language Models", arXiv 2312.04927, §3 (the MQAR definition); the
  semantics of the authors' `multiquery_ar` generator (also used by Based, arXiv
  2402.18668).

  Layout of one example (length L = seq_len, n = num_kv_pairs, V = vocab_size):

      k_1 v_1 k_2 v_2 ... k_n v_n | query region of L - 2n tokens

  Keys are n distinct ids from [1, V/2), values n distinct ids from [V/2, V). Every
  key is queried exactly once: key i at position 2n + 2*g_i, where the gaps
  g_1, g_2, ... in [0, (L - 2n)/2) are drawn one after another without replacement
  with P(g) ∝ a*(g+1)^(a-1) (a = power_a; small a favours short gaps, as bigram
  repeats do in real text). At a query position the target is the paired value;
  only those n positions carry weight. With `random_non_queries` every other query-
  region token is uniform in [0, V) (it may collide with a key; it is never scored).

  Differences from the paper's generator: none in the distribution (Gumbel-top-k
  replaces numpy's sequential `choice(replace=False, p=...)`, same law); the next-
  token label shift is already applied (target at the query position itself).
  """

  seq_len: int = 256
  vocab_size: int = 8192
  num_kv_pairs: int = 16
  power_a: float = 0.01
  random_non_queries: bool = True
  seed: int = 0

  task: ClassVar[str] = "lm"
  num_classes: ClassVar[None] = None
  spatial_shape: ClassVar[None] = None
  pad_id: ClassVar[None] = None
  bytes_per_token: ClassVar[float | None] = None

  def baselines(self) -> dict[str, float]:
    return {}

  def __post_init__(self):
    require_int("seq_len", self.seq_len, 4)
    require_int("num_kv_pairs", self.num_kv_pairs, 1)
    require_int("vocab_size", self.vocab_size, 4)
    require_int("seed", self.seed, 0)
    if self.seq_len % 2:
      raise ValueError(f"seq_len={self.seq_len} must be even (key/query slots come in pairs)")
    if 4 * self.num_kv_pairs > self.seq_len:
      raise ValueError(
        f"num_kv_pairs={self.num_kv_pairs} needs seq_len >= 4*num_kv_pairs="
        f"{4 * self.num_kv_pairs} (pairs, then one query slot per pair); got {self.seq_len}"
      )
    if self.vocab_size <= self.seq_len:
      raise ValueError(
        f"vocab_size={self.vocab_size} must exceed seq_len={self.seq_len} (Zoology's rule)"
      )
    if self.num_kv_pairs > self.vocab_size // 2 - 1:
      raise ValueError(
        f"num_kv_pairs={self.num_kv_pairs} exceeds the {self.vocab_size // 2 - 1} distinct "
        f"keys of vocab_size={self.vocab_size}; raise vocab_size"
      )
    if not self.power_a > 0:
      raise ValueError(f"power_a={self.power_a} must be > 0 (1.0 gives uniform gaps)")

  def batch(self, step: int, batch_size: int, split: str = "train") -> Batch:
    rng = check_batch_args(self.seed, step, batch_size, split)
    b, n, half = batch_size, self.num_kv_pairs, self.vocab_size // 2
    keys_BN = 1 + ordered_sample(rng, b, half - 1, n)
    values_BN = half + ordered_sample(rng, b, self.vocab_size - half, n)

    space = (self.seq_len - 2 * n) // 2
    gap = np.arange(1, space + 1, dtype=np.float64)
    log_p = np.log(self.power_a) + (self.power_a - 1.0) * np.log(gap)
    query_pos_BN = 2 * n + 2 * ordered_sample(rng, b, space, n, log_p)

    inputs_BL = np.zeros((b, self.seq_len), np.int64)
    inputs_BL[:, 0 : 2 * n : 2] = keys_BN
    inputs_BL[:, 1 : 2 * n : 2] = values_BN
    rows = np.arange(b)[:, None]
    inputs_BL[rows, query_pos_BN] = keys_BN
    targets_BL = np.zeros_like(inputs_BL)
    targets_BL[rows, query_pos_BN] = values_BN
    weights_BL = np.zeros((b, self.seq_len), np.float32)
    weights_BL[rows, query_pos_BN] = 1.0
    if self.random_non_queries:
      noise_BL = rng.integers(0, self.vocab_size, size=inputs_BL.shape)
      inputs_BL = np.where(inputs_BL == 0, noise_BL, inputs_BL)
    return make_batch(inputs_BL, targets_BL, weights_BL)


# ------------------------------------------------------------------------------ selective copy


@dataclasses.dataclass(frozen=True)
class SelectiveCopy:
  """Selective copying: recall tokens scattered among noise, in order, after markers.

  Source: Gu & Dao, "Mamba: Linear-Time Sequence Modeling with Selective State
  Spaces", arXiv 2312.00752, §3.1 and Fig. 2 (and App. E.1: length 4096, 16 tokens
  to copy, vocabulary 16); the generator follows the H3/Safari `copying` data
  (Fu, Dao et al., arXiv 2212.14052) with variable token positions.

  Layout (L = seq_len, M = num_tokens, V = vocab_size):

      [ context of L - M tokens: noise 0 with M data tokens at sorted random positions ]
      [ M marker tokens V-1 ]

  Data tokens are uniform in [1, V-2]. At the i-th marker the target is the i-th
  data token (in order of position); only the M marker positions carry weight.

  Differences from the paper: seq_len is the whole input (context plus markers);
  the paper's "length 4096" is the context, i.e. seq_len = 4096 + 16.
  """

  seq_len: int = 4096 + 16
  num_tokens: int = 16
  vocab_size: int = 16
  seed: int = 0

  task: ClassVar[str] = "lm"
  num_classes: ClassVar[None] = None
  spatial_shape: ClassVar[None] = None
  pad_id: ClassVar[None] = None
  bytes_per_token: ClassVar[float | None] = None

  def baselines(self) -> dict[str, float]:
    return {}

  noise_id: ClassVar[int] = 0

  @property
  def marker_id(self) -> int:
    return self.vocab_size - 1

  def __post_init__(self):
    require_int("num_tokens", self.num_tokens, 1)
    require_int("vocab_size", self.vocab_size, 3, "noise, marker and at least one data token")
    require_int("seed", self.seed, 0)
    require_int(
      "seq_len",
      self.seq_len,
      2 * self.num_tokens,
      f"the context holds num_tokens={self.num_tokens} tokens and is followed by as many markers",
    )

  def batch(self, step: int, batch_size: int, split: str = "train") -> Batch:
    rng = check_batch_args(self.seed, step, batch_size, split)
    b, m = batch_size, self.num_tokens
    context = self.seq_len - m
    pos_BM = np.sort(ordered_sample(rng, b, context, m), axis=1)
    tokens_BM = rng.integers(1, self.vocab_size - 1, size=(b, m))

    inputs_BL = np.full((b, self.seq_len), self.noise_id, np.int64)
    np.put_along_axis(inputs_BL, pos_BM, tokens_BM, axis=1)
    inputs_BL[:, context:] = self.marker_id
    targets_BL = np.zeros_like(inputs_BL)
    targets_BL[:, context:] = tokens_BM
    weights_BL = np.zeros((b, self.seq_len), np.float32)
    weights_BL[:, context:] = 1.0
    return make_batch(inputs_BL, targets_BL, weights_BL)


# ------------------------------------------------------------------------------------- needle

_LETTERS = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz", np.uint8)
_DIGITS = np.frombuffer(b"0123456789", np.uint8)
HAYSTACKS: tuple[str, ...] = (*corpora.CORPORA, "random")


@dataclasses.dataclass(frozen=True)
class NeedleInHaystack:
  """Byte-level needle-in-a-haystack retrieval at a chosen length and depth.

  Source: the "needle in a haystack" test (G. Kamradt, 2023) as formalised in
  RULER (Hsieh et al., "RULER: What's the Real Context Size of Your Long-Context
  Language Models?", arXiv 2404.06654, §3.1, single-key NIAH with a word key and a
  number value).

  One example is `seq_len + 1` bytes (inputs = all but the last, targets = all but
  the first):

      haystack ... "\\nThe secret number for {key} is {value}.\\n" ... haystack
      "\\nWhat is the secret number for {key}? The secret number for {key} is {value}"

  `key` is `key_len` random lowercase letters, `value` `value_digits` random digits.
  The needle starts at byte round(depth * (H - len(needle))) of the haystack of H
  bytes, overwriting it (depth 0: first byte; 1: just before the question). Only
  the positions whose next byte is a digit of the answer carry weight: the last
  `value_digits` positions of the example.

  The haystack is a random window of a corpus split ("stdlib", "shakespeare"; the
  same held-out split as `TextLM`) or uniform random bytes ("random").

  Choices where the sources are silent: a fixed English template; `depth=None`
  draws a uniform depth per example (a fixed depth is what a depth sweep sets).
  """

  seq_len: int = 2048
  depth: float | None = None
  haystack: str = "stdlib"
  key_len: int = 6
  value_digits: int = 6
  seed: int = 0
  max_bytes: int | None = 16 * 2**20
  test_fraction: float = 0.05

  task: ClassVar[str] = "lm"
  vocab_size: ClassVar[int] = 256
  num_classes: ClassVar[None] = None
  spatial_shape: ClassVar[None] = None
  pad_id: ClassVar[None] = None
  bytes_per_token: ClassVar[float | None] = None

  def baselines(self) -> dict[str, float]:
    return {}

  def __post_init__(self):
    if self.haystack not in HAYSTACKS:
      raise ValueError(f"haystack={self.haystack!r} is not one of {HAYSTACKS}")
    if self.depth is not None:
      require_fraction("depth", self.depth)
    require_int("key_len", self.key_len, 1)
    require_int("value_digits", self.value_digits, 1)
    require_int("seed", self.seed, 0)
    need = len(self.needle(b"k" * self.key_len, b"0" * self.value_digits))
    need += len(self.question(b"k" * self.key_len))
    require_int("seq_len", self.seq_len, need, "the needle and the question must fit")

  @staticmethod
  def needle(key: bytes, value: bytes) -> bytes:
    return b"\nThe secret number for " + key + b" is " + value + b".\n"

  @staticmethod
  def question(key: bytes) -> bytes:
    return b"\nWhat is the secret number for " + key + b"? The secret number for " + key + b" is "

  def haystack_len(self) -> int:
    """H: bytes of haystack per example (the rest is the question and the answer)."""
    return self.seq_len + 1 - len(self.question(b"k" * self.key_len)) - self.value_digits

  def batch(self, step: int, batch_size: int, split: str = "train") -> Batch:
    rng = check_batch_args(self.seed, step, batch_size, split)
    b, h = batch_size, self.haystack_len()
    keys_BK = rng.choice(_LETTERS, size=(b, self.key_len))
    values_BV = rng.choice(_DIGITS, size=(b, self.value_digits))
    depth_B = rng.random(b) if self.depth is None else np.full(b, self.depth)
    if self.haystack == "random":
      hay_BH = rng.integers(0, 256, size=(b, h), dtype=np.uint8)
    else:
      data = corpora.load_corpus(
        self.haystack, max_bytes=self.max_bytes, test_fraction=self.test_fraction
      ).split(split)
      hay_BH = random_windows(data, rng, b, h)

    rows = []
    for i in range(b):
      key, value = keys_BK[i].tobytes(), values_BV[i].tobytes()
      needle = self.needle(key, value)
      start = int(np.round(depth_B[i] * (h - len(needle))))
      hay = hay_BH[i].tobytes()
      rows.append(hay[:start] + needle + hay[start + len(needle) :] + self.question(key) + value)
    seq_BL1 = np.frombuffer(b"".join(rows), np.uint8).reshape(b, self.seq_len + 1)

    weights_BL = np.zeros((b, self.seq_len), np.float32)
    weights_BL[:, -self.value_digits :] = 1.0
    return make_batch(seq_BL1[:, :-1], seq_BL1[:, 1:], weights_BL)
