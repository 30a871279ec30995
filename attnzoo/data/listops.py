"""ListOps: evaluate a nested list of MAX / MIN / MED / SM operations over digits.

Sources: Nangia & Bowman, "ListOps: A Diagnostic Dataset for Latent Tree
Learning", arXiv 1804.06028; the long-sequence version of Tay et al., "Long Range
Arena: A Benchmark for Efficient Transformers", arXiv 2011.04006, §2.2.1, whose
generator (`lra_benchmarks/data/listops.py`) fixes the rules reproduced here:

- A node at depth d < max_depth (the root has depth 1) is an operator with
  probability 0.25, else a digit; at d = max_depth it is always a digit.
- Digits are uniform in 0..9; operators uniform over MIN, MAX, MED (median,
  int(np.median), i.e. the mean of the middle two truncated for an even count) and
  SM (sum mod 10); an operator has uniform 2..max_args arguments.
- A tree's length counts one token per digit, operator and closing bracket; trees
  are resampled until min_length < length < max_length (both strict).
- The label is the tree's value: 10 classes.

Example: `[MAX 2 9 [MIN 4 7 ] 0 ]` has value 9.

Tokens: 0 is padding, digit v is v + 1, then [MIN, [MAX, [MED, [SM, ] (vocab 16).
Sequences are left-aligned and padded to seq_len with `pad_id` 0.

Differences from LRA: LRA tokenises with a TFDS tokenizer that drops ']' (and the
parentheses of its tuple dump), which leaves the expression ambiguous; the closing
bracket is kept here, as in later ListOps pipelines (S4). LRA de-duplicates the
96k/2k/2k examples it writes to disk; a procedural stream cannot, so a train and
a test tree coincide with negligible probability (lengths > 500 by default) rather
than never. The random draws are consumed in a different order (same law).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import numpy as np

from attnzoo.data.base import Batch, check_batch_args, make_batch, require_int

PAD = 0
DIGIT_OFFSET = 1
OPERATORS: tuple[str, ...] = ("[MIN", "[MAX", "[MED", "[SM")
OP_OFFSET = DIGIT_OFFSET + 10
END = OP_OFFSET + len(OPERATORS)
VOCAB: tuple[str, ...] = ("<pad>", *map(str, range(10)), *OPERATORS, "]")
VALUE_P = 0.25  # LRA: a node below max_depth is an operator when random() <= VALUE_P
_MAX_ATTEMPTS = 100_000


def _apply(op: int, args: list[int]) -> int:
  name = OPERATORS[op]
  if name == "[MIN":
    return min(args)
  if name == "[MAX":
    return max(args)
  if name == "[SM":
    return sum(args) % 10
  s = sorted(args)
  m = len(s) // 2
  return s[m] if len(s) % 2 else (s[m - 1] + s[m]) // 2


class _TooLong(Exception):
  """The tree under construction already has at least max_length tokens."""


class _Uniforms:
  """Uniform [0, 1) floats from `rng`, drawn in chunks (a per-scalar call is slow)."""

  def __init__(self, rng: np.random.Generator, chunk: int = 4096):
    self._rng, self._chunk = rng, chunk
    self._buf, self._i = rng.random(chunk).tolist(), 0

  def __call__(self) -> float:
    if self._i == len(self._buf):
      self._buf, self._i = self._rng.random(self._chunk).tolist(), 0
    self._i += 1
    return self._buf[self._i - 1]


def sample_tree(
  uniform, *, max_depth: int, max_args: int, max_length: int
) -> tuple[list[int], int] | None:
  """One LRA tree as (tokens, value), or None once it reaches max_length tokens."""
  tokens: list[int] = []
  open_ops = 0

  def node(depth: int) -> int:
    nonlocal open_ops
    r = uniform() if depth < max_depth else 1.0
    if r > VALUE_P:
      value = int(uniform() * 10)
      tokens.append(DIGIT_OFFSET + value)
      if len(tokens) + open_ops >= max_length:
        raise _TooLong
      return value
    num_args = 2 + int(uniform() * (max_args - 1))
    op = int(uniform() * len(OPERATORS))
    tokens.append(OP_OFFSET + op)
    open_ops += 1
    args = [node(depth + 1) for _ in range(num_args)]
    tokens.append(END)
    open_ops -= 1
    return _apply(op, args)

  try:
    value = node(1)
  except _TooLong:
    return None
  return tokens, value


def decode(tokens) -> str:
  """Token ids -> the LRA surface form without parentheses; padding is dropped."""
  return " ".join(VOCAB[int(t)] for t in np.asarray(tokens).ravel() if int(t) != PAD)


@dataclasses.dataclass(frozen=True)
class ListOps:
  """ListOps classification with the LRA generator's rules (see the module docstring).

  Attributes:
    seq_len: L, padded input length; must be >= max_length - 1 (the longest tree).
    max_depth, max_args, min_length, max_length: the LRA generator's knobs (LRA: 10,
      10, 500, 2000).
    seed: the data seed.
  """

  seq_len: int = 2048
  max_depth: int = 10
  max_args: int = 10
  min_length: int = 500
  max_length: int = 2000
  seed: int = 0

  task: ClassVar[str] = "classify"
  vocab_size: ClassVar[int] = len(VOCAB)
  num_classes: ClassVar[int] = 10
  spatial_shape: ClassVar[None] = None
  pad_id: ClassVar[int] = PAD
  bytes_per_token: ClassVar[float | None] = None

  def baselines(self) -> dict[str, float]:
    return {}

  def __post_init__(self):
    require_int("max_depth", self.max_depth, 1)
    require_int("max_args", self.max_args, 2)
    require_int("min_length", self.min_length, 0)
    require_int(
      "max_length",
      self.max_length,
      self.min_length + 2,
      "lengths are accepted when min_length < length < max_length",
    )
    require_int("seed", self.seed, 0)
    require_int(
      "seq_len",
      self.seq_len,
      self.max_length - 1,
      f"the longest accepted tree has max_length - 1 = {self.max_length - 1} tokens",
    )
    if self.longest_tree() <= self.min_length:
      raise ValueError(
        f"min_length={self.min_length} is unreachable: at max_depth={self.max_depth}, "
        f"max_args={self.max_args} no tree is longer than {self.longest_tree()} tokens"
      )

  def longest_tree(self) -> int:
    """Tokens in the largest tree the rules allow (operators everywhere above the leaves)."""
    length = 1
    for _ in range(self.max_depth - 1):
      length = 2 + self.max_args * length
    return length

  def sample(self, uniform) -> tuple[list[int], int]:
    """Resamples trees until one's length lies strictly between min and max_length."""
    for _ in range(_MAX_ATTEMPTS):
      tree = sample_tree(
        uniform, max_depth=self.max_depth, max_args=self.max_args, max_length=self.max_length
      )
      if tree is not None and len(tree[0]) > self.min_length:
        return tree
    raise RuntimeError(
      f"no tree with {self.min_length} < length < {self.max_length} in {_MAX_ATTEMPTS} "
      f"draws at max_depth={self.max_depth}, max_args={self.max_args}; widen the range"
    )

  def batch(self, step: int, batch_size: int, split: str = "train") -> Batch:
    uniform = _Uniforms(check_batch_args(self.seed, step, batch_size, split))
    inputs_BL = np.full((batch_size, self.seq_len), PAD, np.int32)
    labels_B = np.empty(batch_size, np.int32)
    for i in range(batch_size):
      tokens, labels_B[i] = self.sample(uniform)
      inputs_BL[i, : len(tokens)] = tokens
    return make_batch(inputs_BL, labels_B, np.ones(batch_size, np.float32))
