"""Table-lookup masks: segment ids, a seeded random block pattern, an arbitrary dense array.

Their predicates gather from static host tables (`xp.asarray(table)[index]`), so
they are traceable but carry the tables as constants; a Pallas kernel, which cannot
capture constants, passes `mask.tables()` as inputs and calls `predicate_with`.
Indices are clipped into the table, so padded positions of a ragged last tile read
a valid entry (whose value the kernels ignore). Array-holding masks compare and
hash by content, so they can be static arguments of `jax.jit`.
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
import numpy as np

from attnzoo.masks.base import Mask, classify, require_int, tile_bounds
from pallas_kernels.block_sparse import EMPTY, FULL, num_blocks


def _frozen(array: np.ndarray) -> np.ndarray:
  array = np.array(array, copy=True)
  array.setflags(write=False)
  return array


def _array_key(array: np.ndarray | None):
  return None if array is None else (array.shape, array.dtype.str, array.tobytes())


def _lookup(table, index, xp):
  return xp.asarray(table)[xp.clip(index, 0, table.shape[0] - 1)]


def _lookup2(table, row, col, xp):
  rows, cols = table.shape
  return xp.asarray(table)[xp.clip(row, 0, rows - 1), xp.clip(col, 0, cols - 1)]


def _ids(name: str, ids) -> np.ndarray:
  ids = np.asarray(ids)
  if ids.ndim != 1 or ids.size == 0:
    raise ValueError(
      f"Segments.{name} has shape {ids.shape}; pass a non-empty 1-D array with one "
      f"segment id per token"
    )
  if not np.issubdtype(ids.dtype, np.integer):
    raise TypeError(f"Segments.{name} has dtype {ids.dtype}; segment ids must be integers")
  info = np.iinfo(np.int32)
  if ids.min() < info.min or ids.max() > info.max:
    raise ValueError(f"Segments.{name} values must fit in int32, got [{ids.min()}, {ids.max()}]")
  return _frozen(ids.astype(np.int32))


@dataclasses.dataclass(frozen=True, eq=False)
class Segments(Mask):
  """Document (segment) masking: query q keeps key k when q_ids[q] == kv_ids[k].

  Packed-sequence training puts several documents in one row; attention must not
  cross document boundaries (e.g. Llama 3, "The Llama 3 Herd of Models",
  arXiv 2407.21783, §3.2: "an attention mask that prevents self-attention between
  different documents"; Zhao et al., arXiv 2402.13991, intra-document causal masking).

  `q_ids`: int[T] static segment id per query; `kv_ids`: int[S] per key (defaults to
  `q_ids`). `Segments.from_lengths([3, 5, 2])` builds ids from contiguous document
  lengths. Combine with `Causal()` for causal LM packing.

  Chosen where the sources are silent: ids need not be sorted or contiguous; no id
  is special (mask padding by giving it an id no query uses, or AND another mask).
  For per-batch traced ids use the primitive's `segment_ids=` argument instead.
  """

  q_ids: np.ndarray
  kv_ids: np.ndarray | None = None

  def __post_init__(self):
    object.__setattr__(self, "q_ids", _ids("q_ids", self.q_ids))
    kv = self.q_ids if self.kv_ids is None else _ids("kv_ids", self.kv_ids)
    object.__setattr__(self, "kv_ids", kv)

  @classmethod
  def from_lengths(cls, lengths, kv_lengths=None) -> Segments:
    """Segment i covers `lengths[i]` consecutive tokens (ids 0, 1, ...)."""

    def ids(name, lens):
      lens = [
        require_int(f"{name}[{i}]", n, 1, "segment lengths are positive token counts")
        for i, n in enumerate(lens)
      ]
      if not lens:
        raise ValueError(f"{name}=[] is empty; pass at least one segment length")
      return np.repeat(np.arange(len(lens)), lens)

    kv = None if kv_lengths is None else ids("kv_lengths", kv_lengths)
    return cls(ids("lengths", lengths), kv)

  def check_lengths(self, seq_q, seq_k):
    super().check_lengths(seq_q, seq_k)
    if (seq_q, seq_k) != (self.q_ids.shape[0], self.kv_ids.shape[0]):
      raise ValueError(
        f"Segments has {self.q_ids.shape[0]} query ids and {self.kv_ids.shape[0]} key ids "
        f"but the attention matrix is T={seq_q} x S={seq_k}; pass one id per token"
      )

  def tables(self):
    return (self.q_ids, self.kv_ids)

  def predicate(self, q_pos, k_pos, xp=jnp):
    return self.predicate_with(self.tables(), q_pos, k_pos, xp)

  def predicate_with(self, tables, q_pos, k_pos, xp=jnp):
    q_ids, kv_ids = tables
    return _lookup(q_ids, q_pos, xp) == _lookup(kv_ids, k_pos, xp)

  def block_mask(self, seq_q, seq_k, block_q, block_k):
    """Exact, from per-tile id histograms (O(Qb * Kb * #ids) work instead of O(T * S)).

    Tile (i, j) keeps sum over ids of n_q[i, id] * n_k[j, id] of its elements.
    """
    self.check_lengths(seq_q, seq_k)
    q_lo, q_hi, k_lo, k_hi = tile_bounds(seq_q, seq_k, block_q, block_k)
    qb, kb = q_lo.shape
    _, ids = np.unique(np.concatenate([self.q_ids, self.kv_ids]), return_inverse=True)
    num_ids = int(ids.max()) + 1
    if qb * kb * num_ids > seq_q * seq_k:
      return super().block_mask(seq_q, seq_k, block_q, block_k)
    hist_q = np.zeros((qb, num_ids), np.int64)
    hist_k = np.zeros((kb, num_ids), np.int64)
    np.add.at(hist_q, (np.arange(seq_q) // block_q, ids[:seq_q]), 1)
    np.add.at(hist_k, (np.arange(seq_k) // block_k, ids[seq_q:]), 1)
    kept = hist_q @ hist_k.T
    return classify(kept > 0, kept == (q_hi - q_lo + 1) * (k_hi - k_lo + 1))

  def __eq__(self, other):
    if type(other) is not type(self):
      return NotImplemented
    return (_array_key(self.q_ids), _array_key(self.kv_ids)) == (
      _array_key(other.q_ids),
      _array_key(other.kv_ids),
    )

  def __hash__(self):
    return hash((type(self), _array_key(self.q_ids), _array_key(self.kv_ids)))


@dataclasses.dataclass(frozen=True)
class RandomBlocks(Mask):
  """A seeded random pattern of [block_q x block_k] blocks, each kept with prob. `density`.

  Source: BigBird (Zaheer et al., "Big Bird: Transformers for Longer Sequences",
  arXiv 2007.14062, §2, random attention; blocked as in its implementation).

  The pattern is drawn once on the host: tile (i, j) of the
  ceil(seq_q / block_q) x ceil(seq_k / block_k) grid is kept when
  `numpy.random.default_rng(seed).random((Qb, Kb))[i, j] < density`, so it is
  deterministic in `seed`. `keep_diagonal=True` also keeps every block that the
  token diagonal q == k passes through (so each query with q < S keeps itself).

  Differences from the paper: BigBird samples exactly r random key blocks per
  query block; here blocks are independent Bernoulli(density) draws (the expected
  fraction kept is `density`). Compose with `SlidingWindow | GlobalTokens` for the
  full BigBird pattern.
  """

  density: float
  block_q: int
  block_k: int
  seed: int
  seq_q: int
  seq_k: int
  keep_diagonal: bool = False
  pattern: np.ndarray = dataclasses.field(init=False, repr=False, compare=False)

  def __post_init__(self):
    density = self.density
    if isinstance(density, bool) or not isinstance(density, (int, float, np.floating, np.integer)):
      raise TypeError(f"RandomBlocks.density={density!r} must be a number in [0, 1]")
    if not 0.0 <= float(density) <= 1.0:
      raise ValueError(
        f"RandomBlocks.density={density!r} is outside [0, 1]; pass the fraction of blocks to keep"
      )
    for name in ("block_q", "block_k", "seq_q", "seq_k"):
      require_int(f"RandomBlocks.{name}", getattr(self, name), 1, "pass a positive token count")
    require_int("RandomBlocks.seed", self.seed, 0, "pass a non-negative numpy seed")
    if not isinstance(self.keep_diagonal, (bool, np.bool_)):
      raise TypeError(f"RandomBlocks.keep_diagonal={self.keep_diagonal!r} must be a bool")
    qb, kb = num_blocks(self.seq_q, self.block_q), num_blocks(self.seq_k, self.block_k)
    pattern = np.random.default_rng(self.seed).random((qb, kb)) < float(density)
    if self.keep_diagonal:
      diag = np.arange(min(self.seq_q, self.seq_k))
      pattern[diag // self.block_q, diag // self.block_k] = True
    object.__setattr__(self, "pattern", _frozen(pattern))

  def check_lengths(self, seq_q, seq_k):
    super().check_lengths(seq_q, seq_k)
    if (seq_q, seq_k) != (self.seq_q, self.seq_k):
      raise ValueError(
        f"RandomBlocks was drawn for T={self.seq_q} x S={self.seq_k} but the attention "
        f"matrix is T={seq_q} x S={seq_k}; build it with seq_q={seq_q}, seq_k={seq_k}"
      )

  def tables(self):
    return (self.pattern,)

  def predicate(self, q_pos, k_pos, xp=jnp):
    return self.predicate_with(self.tables(), q_pos, k_pos, xp)

  def predicate_with(self, tables, q_pos, k_pos, xp=jnp):
    (pattern,) = tables
    return _lookup2(pattern, q_pos // self.block_q, k_pos // self.block_k, xp)

  def block_mask(self, seq_q, seq_k, block_q, block_k):
    if (block_q, block_k) != (self.block_q, self.block_k):
      return super().block_mask(seq_q, seq_k, block_q, block_k)
    self.check_lengths(seq_q, seq_k)
    return np.where(self.pattern, FULL, EMPTY).astype(np.int32)


@dataclasses.dataclass(frozen=True, eq=False)
class DenseMask(Mask):
  """An arbitrary static boolean mask `array[T, S]` (True = keep).

  The escape hatch for patterns without structure (hand-made tests, masks loaded
  from elsewhere). Costs a [T, S] host table; prefer a structured mask when one fits.
  An axis of size 1 broadcasts (as in numpy): `[1, S]` keeps the same keys for every
  query, `[1, 1]` is a constant (all keep / all drop) for any T and S.
  """

  array: np.ndarray

  def __post_init__(self):
    array = np.asarray(self.array)
    if array.dtype != np.bool_:
      raise TypeError(
        f"DenseMask.array has dtype {array.dtype}; pass a bool array (True = keep), e.g. array != 0"
      )
    if array.ndim != 2 or math.prod(array.shape) == 0:
      raise ValueError(
        f"DenseMask.array has shape {array.shape}; pass a non-empty bool[T, S] (or an "
        f"array with size-1 axes that broadcast to [T, S])"
      )
    object.__setattr__(self, "array", _frozen(array))

  def check_lengths(self, seq_q, seq_k):
    super().check_lengths(seq_q, seq_k)
    if any(
      n not in (1, length) for n, length in zip(self.array.shape, (seq_q, seq_k), strict=True)
    ):
      raise ValueError(
        f"DenseMask has shape {self.array.shape}, which does not broadcast to the "
        f"attention matrix T={seq_q} x S={seq_k}; pass a bool[{seq_q}, {seq_k}] array"
      )

  def tables(self):
    return (self.array,)

  def predicate(self, q_pos, k_pos, xp=jnp):
    return self.predicate_with(self.tables(), q_pos, k_pos, xp)

  def predicate_with(self, tables, q_pos, k_pos, xp=jnp):
    (array,) = tables
    return _lookup2(array, q_pos, k_pos, xp)

  def __eq__(self, other):
    if type(other) is not type(self):
      return NotImplemented
    return _array_key(self.array) == _array_key(other.array)

  def __hash__(self):
    return hash((type(self), _array_key(self.array)))
