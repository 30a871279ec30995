"""The mask protocol: one predicate, three views (dense, element predicate, block map).

A mask is defined once, by `predicate(q_pos, k_pos, xp)`, written against an
array module `xp` (numpy or jax.numpy) so that the same expression gives the
numpy `dense` definition used by references and tests, the traceable predicate
evaluated inside kernels on partial tiles, and the exact tile classification
behind `block_map`. Subclasses may override `block_mask` with an analytic
classification; tests check every override against the generic one.

Positions are absolute token indices: `q_pos` in [0, T), `k_pos` in [0, S).
True means "keep" (the query may attend to the key). Kernels may evaluate the
predicate on the padded positions of a ragged last tile; its value there is
ignored, so a predicate only has to be finite (table lookups clip the index).

A mask that only makes sense for particular lengths (a neighborhood over a grid,
per-token segment ids, a dense array) overrides `check_lengths`; `dense`,
`block_mask` and `block_map` call it first.
"""

from __future__ import annotations

import abc
import dataclasses
import operator
from types import ModuleType

import jax.numpy as jnp
import numpy as np

from pallas_kernels.block_sparse import EMPTY, FULL, PARTIAL, BlockMap, num_blocks

# Rows of q-blocks classified per numpy call; bounds host memory at O(rows * S).
_CLASSIFY_ROWS = 1 << 22


class Mask(abc.ABC):
  """Base class of all structured masks. Subclasses are frozen dataclasses."""

  @abc.abstractmethod
  def predicate(self, q_pos, k_pos, xp: ModuleType = jnp):
    """Broadcasting elementwise keep-predicate over integer position arrays.

    The result broadcasts against `q_pos` and `k_pos` but may have fewer distinct
    axes (`AttentionSinks` depends on `k_pos` only); callers broadcast it.
    """

  def tables(self) -> tuple[np.ndarray, ...]:
    """Static host arrays that `predicate` gathers from (segment ids, block patterns).

    Empty for masks that are pure position arithmetic. A Pallas kernel cannot close
    over array constants, so it passes these as inputs and evaluates
    `predicate_with(loaded_tables, q_pos, k_pos)` instead of `predicate`.
    """
    return ()

  def predicate_with(self, tables, q_pos, k_pos, xp: ModuleType = jnp):
    """`predicate`, reading `tables()` from `tables` (same order, e.g. traced arrays)."""
    del tables
    return self.predicate(q_pos, k_pos, xp)

  def check_lengths(self, seq_q: int, seq_k: int) -> None:
    """Raises ValueError when the mask is not defined for a [seq_q, seq_k] matrix."""
    _check_lengths(seq_q, seq_k)

  # ---------------------------------------------------------------- views

  def dense(self, seq_q: int, seq_k: int) -> np.ndarray:
    """bool[T, S]: the definition of the mask (numpy, for references and tests)."""
    self.check_lengths(seq_q, seq_k)
    q = np.arange(seq_q, dtype=np.int64)[:, None]
    k = np.arange(seq_k, dtype=np.int64)[None, :]
    keep = np.asarray(self.predicate(q, k, np), dtype=bool)
    return np.array(np.broadcast_to(keep, (seq_q, seq_k)))  # a writable copy

  def block_mask(self, seq_q: int, seq_k: int, block_q: int, block_k: int) -> np.ndarray:
    """int32[Qb, Kb] tile classification (EMPTY / PARTIAL / FULL), exact.

    Only in-range elements count: a ragged last tile is FULL when all of its
    in-range elements are kept (kernels always drop out-of-range keys).
    """
    self.check_lengths(seq_q, seq_k)
    _check_blocks(block_q, block_k)
    qb, kb = num_blocks(seq_q, block_q), num_blocks(seq_k, block_k)
    out = np.empty((qb, kb), np.int32)
    rows_per_call = max(1, _CLASSIFY_ROWS // max(1, block_q * seq_k))
    k = np.arange(seq_k, dtype=np.int64)[None, :]
    for start in range(0, qb, rows_per_call):
      stop = min(qb, start + rows_per_call)
      q = np.arange(start * block_q, min(seq_q, stop * block_q), dtype=np.int64)[:, None]
      keep = np.broadcast_to(np.asarray(self.predicate(q, k, np), bool), (q.shape[0], seq_k))
      out[start:stop] = _classify(keep, block_q, block_k, stop - start, kb)
    return out

  def block_map(self, seq_q: int, seq_k: int, block_q: int, block_k: int) -> BlockMap:
    """The `BlockMap` (static, numpy tables) of this mask under the given tiling."""
    return BlockMap.from_block_mask(
      self.block_mask(seq_q, seq_k, block_q, block_k),
      block_q=block_q,
      block_k=block_k,
      seq_q=seq_q,
      seq_k=seq_k,
    )

  # ---------------------------------------------------------------- algebra

  def __and__(self, other: Mask) -> Mask:
    if not isinstance(other, Mask):
      return NotImplemented
    return And(_flatten(And, (self, other)))

  def __or__(self, other: Mask) -> Mask:
    if not isinstance(other, Mask):
      return NotImplemented
    return Or(_flatten(Or, (self, other)))


def _flatten(kind: type, masks) -> tuple[Mask, ...]:
  """`a & b & c` -> And((a, b, c)): nested masks of the same kind are spliced in."""
  out = []
  for m in masks:
    out.extend(m.masks if type(m) is kind else (m,))
  return tuple(out)


def tile_bounds(seq_q: int, seq_k: int, block_q: int, block_k: int):
  """Inclusive in-range position bounds of every tile, for analytic `block_mask`s.

  Returns q_lo, q_hi, k_lo, k_hi, each int64[Qb, Kb] (tile (i, j) covers queries
  q_lo..q_hi and keys k_lo..k_hi); the last tile's upper bound is clipped to the
  sequence, matching the exact classification.
  """
  _check_lengths(seq_q, seq_k)
  _check_blocks(block_q, block_k)
  qb, kb = num_blocks(seq_q, block_q), num_blocks(seq_k, block_k)
  q_lo = np.arange(qb, dtype=np.int64)[:, None] * block_q
  k_lo = np.arange(kb, dtype=np.int64)[None, :] * block_k
  q_hi = np.minimum(q_lo + block_q, seq_q) - 1
  k_hi = np.minimum(k_lo + block_k, seq_k) - 1
  return tuple(np.broadcast_to(b, (qb, kb)) for b in (q_lo, q_hi, k_lo, k_hi))


def classify(any_kept: np.ndarray, all_kept: np.ndarray) -> np.ndarray:
  """int32 EMPTY/PARTIAL/FULL from per-tile "some element kept" / "every element kept"."""
  return np.where(all_kept, FULL, np.where(any_kept, PARTIAL, EMPTY)).astype(np.int32)


def require_int(name: str, value, minimum: int | None, fix: str = "") -> int:
  """Validates an integer hyper-parameter (bools rejected) and returns it as `int`."""
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise TypeError(f"{name}={value!r} must be an int{'; ' + fix if fix else ''}")
  if minimum is not None and value < minimum:
    raise ValueError(f"{name}={value!r} must be >= {minimum}{'; ' + fix if fix else ''}")
  return int(value)


def _classify(keep: np.ndarray, block_q: int, block_k: int, qb: int, kb: int) -> np.ndarray:
  rows, cols = keep.shape
  pad_q, pad_k = qb * block_q - rows, kb * block_k - cols
  # Out-of-range elements are neutral: they count as kept for "all" and dropped for "any".
  valid = np.pad(np.ones_like(keep), ((0, pad_q), (0, pad_k)))
  kept = np.pad(keep, ((0, pad_q), (0, pad_k)))
  kept = kept.reshape(qb, block_q, kb, block_k)
  valid = valid.reshape(qb, block_q, kb, block_k)
  any_kept = kept.any(axis=(1, 3))
  all_kept = (kept | ~valid).all(axis=(1, 3))
  return classify(any_kept, all_kept)


def _combine(mask, seq_q, seq_k, block_q, block_k, decided_empty, decided_full):
  """Block mask of an And/Or from its operands' block masks.

  Tiles decided by the operands alone (e.g. one EMPTY operand of an And) are
  classified without touching elements; only the rest (typically a band along
  the diagonal) are classified exactly from the predicate, tile by tile.
  """
  mask.check_lengths(seq_q, seq_k)
  parts = np.stack([m.block_mask(seq_q, seq_k, block_q, block_k) for m in mask.masks])
  empty, full = decided_empty(parts), decided_full(parts)
  out = classify(~empty, full)
  todo = np.argwhere(~empty & ~full)
  per_call = max(1, _CLASSIFY_ROWS // (block_q * block_k))
  offsets_q = np.arange(block_q, dtype=np.int64)[None, :, None]
  offsets_k = np.arange(block_k, dtype=np.int64)[None, None, :]
  for start in range(0, len(todo), per_call):
    tiles = todo[start : start + per_call]
    q = tiles[:, 0, None, None] * block_q + offsets_q  # [n, bq, 1]
    k = tiles[:, 1, None, None] * block_k + offsets_k  # [n, 1, bk]
    valid = (q < seq_q) & (k < seq_k)
    keep = np.asarray(mask.predicate(q, k, np), bool) & valid
    out[tiles[:, 0], tiles[:, 1]] = classify(keep.any((1, 2)), (keep | ~valid).all((1, 2)))
  return out


def _check_lengths(seq_q: int, seq_k: int) -> None:
  for name, value in (("seq_q", seq_q), ("seq_k", seq_k)):
    if not isinstance(value, (int, np.integer)) or value <= 0:
      raise ValueError(f"{name}={value!r} must be a positive int")


def _check_blocks(block_q: int, block_k: int) -> None:
  for name, value in (("block_q", block_q), ("block_k", block_k)):
    if not isinstance(value, (int, np.integer)) or value <= 0:
      raise ValueError(f"{name}={value!r} must be a positive int (a tile size in tokens)")


def _check_operands(self) -> None:
  masks = tuple(self.masks) if isinstance(self.masks, (list, tuple)) else None
  if not masks:
    raise ValueError(
      f"{type(self).__name__}(masks={self.masks!r}) needs a non-empty tuple of Mask objects"
    )
  for m in masks:
    if not isinstance(m, Mask):
      raise TypeError(
        f"{type(self).__name__} operand {m!r} is not a Mask; wrap arrays in DenseMask"
      )
  object.__setattr__(self, "masks", masks)


def _split_tables(masks, tables) -> list[tuple]:
  """Hands each operand its own slice of the concatenated `tables()`."""
  tables, out, start = tuple(tables), [], 0
  for m in masks:
    n = len(m.tables())
    out.append(tables[start : start + n])
    start += n
  if start != len(tables):
    raise ValueError(f"got {len(tables)} tables, but the masks use {start}; pass mask.tables()")
  return out


@dataclasses.dataclass(frozen=True)
class _Combination(Mask):
  """A boolean combination of masks; subclasses fix the operator and the tile rules."""

  masks: tuple[Mask, ...]

  __post_init__ = _check_operands

  @staticmethod
  def _op(a, b):
    raise NotImplementedError

  @staticmethod
  def _decided_empty(kinds):  # kinds: int[len(masks), Qb, Kb]
    raise NotImplementedError

  @staticmethod
  def _decided_full(kinds):
    raise NotImplementedError

  def check_lengths(self, seq_q, seq_k):
    for m in self.masks:
      m.check_lengths(seq_q, seq_k)

  def predicate(self, q_pos, k_pos, xp=jnp):
    return self.predicate_with(self.tables(), q_pos, k_pos, xp)

  def tables(self):
    return tuple(t for m in self.masks for t in m.tables())

  def predicate_with(self, tables, q_pos, k_pos, xp=jnp):
    out = None
    for m, own in zip(self.masks, _split_tables(self.masks, tables), strict=True):
      keep = m.predicate_with(own, q_pos, k_pos, xp)
      out = keep if out is None else self._op(out, keep)
    return out

  def block_mask(self, seq_q, seq_k, block_q, block_k):
    return _combine(
      self,
      seq_q,
      seq_k,
      block_q,
      block_k,
      decided_empty=self._decided_empty,
      decided_full=self._decided_full,
    )


@dataclasses.dataclass(frozen=True)
class And(_Combination):
  """Keep where every mask keeps."""

  _op = staticmethod(operator.and_)
  _decided_empty = staticmethod(lambda kinds: (kinds == EMPTY).any(0))
  _decided_full = staticmethod(lambda kinds: (kinds == FULL).all(0))


@dataclasses.dataclass(frozen=True)
class Or(_Combination):
  """Keep where any mask keeps."""

  _op = staticmethod(operator.or_)
  _decided_empty = staticmethod(lambda kinds: (kinds == EMPTY).all(0))
  _decided_full = staticmethod(lambda kinds: (kinds == FULL).any(0))


@dataclasses.dataclass(frozen=True)
class Causal(Mask):
  """Query i keeps key j when j <= i + offset.

  offset=0 is top-left alignment (as `jax.nn.dot_product_attention(is_causal=True)`);
  offset = S - T aligns the last query with the last key (decoding against a cache).
  """

  offset: int = 0

  def predicate(self, q_pos, k_pos, xp=jnp):
    return k_pos <= q_pos + self.offset

  def __post_init__(self):
    require_int("Causal.offset", self.offset, None)

  def block_mask(self, seq_q, seq_k, block_q, block_k):
    self.check_lengths(seq_q, seq_k)
    q_lo, q_hi, k_lo, k_hi = tile_bounds(seq_q, seq_k, block_q, block_k)
    return classify(k_lo <= q_hi + self.offset, k_hi <= q_lo + self.offset)
