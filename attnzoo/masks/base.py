"""The mask protocol: one predicate, three views (dense, element predicate, block map).

A mask is defined once, by `predicate(q_pos, k_pos, xp)`, written against an
array module `xp` (numpy or jax.numpy) so that the same expression gives the
numpy `dense` definition used by references and tests, the traceable predicate
evaluated inside kernels on partial tiles, and the exact tile classification
behind `block_map`. Subclasses may override `block_mask` with an analytic
classification; tests check every override against the generic one.

Positions are absolute token indices: `q_pos` in [0, T), `k_pos` in [0, S).
True means "keep" (the query may attend to the key).
"""

from __future__ import annotations

import abc
import dataclasses
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
    """Broadcasting elementwise keep-predicate over integer position arrays."""

  # ---------------------------------------------------------------- views

  def dense(self, seq_q: int, seq_k: int) -> np.ndarray:
    """bool[T, S]: the definition of the mask (numpy, for references and tests)."""
    _check_lengths(seq_q, seq_k)
    q = np.arange(seq_q, dtype=np.int64)[:, None]
    k = np.arange(seq_k, dtype=np.int64)[None, :]
    return np.broadcast_to(np.asarray(self.predicate(q, k, np), dtype=bool), (seq_q, seq_k))

  def block_mask(self, seq_q: int, seq_k: int, block_q: int, block_k: int) -> np.ndarray:
    """int32[Qb, Kb] tile classification (EMPTY / PARTIAL / FULL), exact.

    Only in-range elements count: a ragged last tile is FULL when all of its
    in-range elements are kept (kernels always drop out-of-range keys).
    """
    _check_lengths(seq_q, seq_k)
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
        block_q=block_q, block_k=block_k, seq_q=seq_q, seq_k=seq_k)

  # ---------------------------------------------------------------- algebra

  def __and__(self, other: Mask) -> Mask:
    return And((self, other))

  def __or__(self, other: Mask) -> Mask:
    return Or((self, other))


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
  return np.where(all_kept, FULL, np.where(any_kept, PARTIAL, EMPTY)).astype(np.int32)


def _check_lengths(seq_q: int, seq_k: int) -> None:
  for name, value in (("seq_q", seq_q), ("seq_k", seq_k)):
    if not isinstance(value, (int, np.integer)) or value <= 0:
      raise ValueError(f"{name}={value!r} must be a positive int")


def _check_blocks(block_q: int, block_k: int) -> None:
  for name, value in (("block_q", block_q), ("block_k", block_k)):
    if not isinstance(value, (int, np.integer)) or value <= 0:
      raise ValueError(f"{name}={value!r} must be a positive int (a tile size in tokens)")


@dataclasses.dataclass(frozen=True)
class And(Mask):
  """Keep where every mask keeps."""

  masks: tuple[Mask, ...]

  def predicate(self, q_pos, k_pos, xp=jnp):
    out = self.masks[0].predicate(q_pos, k_pos, xp)
    for m in self.masks[1:]:
      out = out & m.predicate(q_pos, k_pos, xp)
    return out


@dataclasses.dataclass(frozen=True)
class Or(Mask):
  """Keep where any mask keeps."""

  masks: tuple[Mask, ...]

  def predicate(self, q_pos, k_pos, xp=jnp):
    out = self.masks[0].predicate(q_pos, k_pos, xp)
    for m in self.masks[1:]:
      out = out | m.predicate(q_pos, k_pos, xp)
    return out


@dataclasses.dataclass(frozen=True)
class Causal(Mask):
  """Query i keeps key j when j <= i + offset.

  offset=0 is top-left alignment (as `jax.nn.dot_product_attention(is_causal=True)`);
  offset = S - T aligns the last query with the last key (decoding against a cache).
  """

  offset: int = 0

  def predicate(self, q_pos, k_pos, xp=jnp):
    return k_pos <= q_pos + self.offset

  def block_mask(self, seq_q, seq_k, block_q, block_k):
    _check_lengths(seq_q, seq_k)
    _check_blocks(block_q, block_k)
    qb, kb = num_blocks(seq_q, block_q), num_blocks(seq_k, block_k)
    q_lo = np.arange(qb)[:, None] * block_q
    q_hi = np.minimum(q_lo + block_q, seq_q) - 1
    k_lo = np.arange(kb)[None, :] * block_k
    k_hi = np.minimum(k_lo + block_k, seq_k) - 1
    full = k_hi <= q_lo + self.offset
    any_ = k_lo <= q_hi + self.offset
    return np.where(full, FULL, np.where(any_, PARTIAL, EMPTY)).astype(np.int32)
