"""The dataset contract shared by every `attnzoo.data` dataset, and its small helpers.

A dataset is a frozen dataclass whose `batch(step, batch_size, split)` is a pure
function of `(seed, split, step, batch_size)`: there is no iterator state, so a
trainer resumes by asking for the next step, and any batch can be recomputed in
isolation. Every random draw of a step comes from one generator,
`np.random.default_rng((seed, split_id, step))`.

A batch is a dict of numpy arrays:

| key       | dtype   | shape                            | meaning                          |
|-----------|---------|----------------------------------|----------------------------------|
| `inputs`  | int32   | [B, L]                           | token ids in [0, vocab_size)     |
| `targets` | int32   | [B, L] (task "lm") / [B] ("classify") | next-token ids / class labels |
| `weights` | float32 | same as `targets`                | loss weights (0 = ignore)        |
| `mask`    | float32 | same as `targets`                | the same array as `weights`      |

`mask` is an alias of `weights` (both names appear in the trainer contract); a
position with weight 0 carries target 0. Datasets whose inputs are padded say so
with `pad_id` (the model can derive its key-padding mask as `inputs != pad_id`).
"""

from __future__ import annotations

import numbers
from typing import ClassVar, Protocol, runtime_checkable

import numpy as np

SPLITS: tuple[str, ...] = ("train", "test")

Batch = dict[str, np.ndarray]


@runtime_checkable
class Dataset(Protocol):
  """What the trainer relies on. Every dataset in `attnzoo.data.DATASETS` satisfies it."""

  task: ClassVar[str]  # "lm" or "classify"

  @property
  def vocab_size(self) -> int: ...

  @property
  def seq_len(self) -> int: ...

  @property
  def num_classes(self) -> int | None: ...

  @property
  def spatial_shape(self) -> tuple[int, ...] | None: ...

  @property
  def pad_id(self) -> int | None: ...

  # Bytes of text one token stands for (1.0 for byte-level corpora): the trainer reports
  # bits/byte when it is set. None for tasks whose tokens are not text.
  bytes_per_token: ClassVar[float | None]

  def baselines(self) -> dict[str, float]:
    """Reference scores of trivial predictors on the test split (e.g. a unigram model's
    bits/byte), logged by the trainer beside the model's; {} when there are none."""
    ...

  def batch(self, step: int, batch_size: int, split: str = "train") -> Batch: ...


def split_id(split: str) -> int:
  """The integer that enters the seed: 0 for "train", 1 for "test"."""
  if split not in SPLITS:
    raise ValueError(f"split={split!r} is not one of {SPLITS}; pass 'train' or 'test'")
  return SPLITS.index(split)


def require_int(name: str, value, minimum: int, fix: str = "") -> int:
  """Checks that `value` is an integer >= minimum (bools rejected) and returns it as int."""
  if isinstance(value, bool) or not isinstance(value, numbers.Integral):
    raise TypeError(f"{name}={value!r} must be an int{'; ' + fix if fix else ''}")
  if value < minimum:
    raise ValueError(f"{name}={value} must be >= {minimum}{'; ' + fix if fix else ''}")
  return int(value)


def require_fraction(name: str, value, *, low_open: bool = False, high_open: bool = False):
  """Checks that `value` is a real number in [0, 1] (ends open as requested)."""
  if isinstance(value, bool) or not isinstance(value, numbers.Real):
    raise TypeError(f"{name}={value!r} must be a float in [0, 1]")
  too_low = value <= 0 if low_open else value < 0
  too_high = value >= 1 if high_open else value > 1
  if too_low or too_high:
    lo, hi = "(" if low_open else "[", ")" if high_open else "]"
    raise ValueError(f"{name}={value} must lie in {lo}0, 1{hi}")
  return float(value)


def step_rng(seed: int, split: str, step: int) -> np.random.Generator:
  """The one generator behind batch `step` of `split`: default_rng((seed, split_id, step))."""
  require_int("seed", seed, 0, "seeds are non-negative ints")
  require_int("step", step, 0, "steps count from 0")
  return np.random.default_rng((int(seed), split_id(split), int(step)))


def check_batch_args(seed: int, step: int, batch_size: int, split: str) -> np.random.Generator:
  """Validates the `batch` arguments and returns the step's generator."""
  require_int("batch_size", batch_size, 1)
  return step_rng(seed, split, step)


def make_batch(inputs, targets, weights) -> Batch:
  """Assembles a batch with the contract's dtypes; `mask` aliases `weights`."""
  weights = np.asarray(weights, np.float32)
  targets = np.where(weights > 0, np.asarray(targets), 0).astype(np.int32)
  return {
    "inputs": np.ascontiguousarray(inputs, dtype=np.int32),
    "targets": targets,
    "weights": weights,
    "mask": weights,
  }
