"""`BlockMap`: which (q-block, kv-block) tiles of an attention matrix to visit.

A tile is EMPTY (every element masked: skipped), FULL (every element visible: no
element predicate needed) or PARTIAL (visit and evaluate the element predicate).
The map stores, per q-block, the kv-blocks to visit compactly, plus the
transposed tables (per kv-block, the q-blocks that touch it) that drive the
dK/dV pass of a backward kernel.

Tables carry two leading "group" axes ``[Bm, Nm, ...]`` with ``Bm`` in ``{1, B}``
and ``Nm`` in ``{1, N}`` (query heads): a static structured mask has ``Bm = Nm =
1``; a content-dependent map (top-k over pooled scores, routing) has one map per
batch element and/or head. Padding entries beyond ``count`` repeat the last valid
index, so a TPU index_map that reads them fetches no new block.

Built statically with numpy (from a structured mask) or traced with jnp (from
content) through the same `from_block_mask`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

EMPTY, PARTIAL, FULL = 0, 1, 2


def num_blocks(length: int, block: int) -> int:
  """Number of blocks of size `block` covering `length` (the last may be ragged)."""
  return -(-length // block)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class BlockMap:
  """Compact block-sparsity tables for a [T, S] attention matrix.

  Shape letters: Bm/Nm are the map's batch/head group sizes (1 = shared),
  Qb = ceil(T / block_q), Kb = ceil(S / block_k), Mk <= Kb and Mq <= Qb the static
  maximum number of active blocks per row / column.

  Attributes:
    kv_indices: int32[Bm, Nm, Qb, Mk] active kv-block indices per q-block, ascending.
    kv_counts:  int32[Bm, Nm, Qb] number of valid entries of `kv_indices`.
    kv_partial: int32[Bm, Nm, Qb, Mk] 1 where the tile needs the element predicate.
    q_indices:  int32[Bm, Nm, Kb, Mq] active q-block indices per kv-block (transposed).
    q_counts:   int32[Bm, Nm, Kb].
    q_partial:  int32[Bm, Nm, Kb, Mq].
    block_q, block_k, seq_q, seq_k: static ints.
  """

  kv_indices: jax.Array
  kv_counts: jax.Array
  kv_partial: jax.Array
  q_indices: jax.Array
  q_counts: jax.Array
  q_partial: jax.Array
  block_q: int = dataclasses.field(metadata=dict(static=True))
  block_k: int = dataclasses.field(metadata=dict(static=True))
  seq_q: int = dataclasses.field(metadata=dict(static=True))
  seq_k: int = dataclasses.field(metadata=dict(static=True))

  # ---------------------------------------------------------------- construction

  @classmethod
  def from_block_mask(
    cls,
    block_mask: Any,
    *,
    block_q: int,
    block_k: int,
    seq_q: int,
    seq_k: int,
    max_kv_blocks: int | None = None,
    max_q_blocks: int | None = None,
  ) -> BlockMap:
    """Builds the tables from a per-tile classification.

    Args:
      block_mask: int[Qb, Kb] or int[Bm, Nm, Qb, Kb] with values EMPTY/PARTIAL/FULL
        (a bool array means True = PARTIAL). A numpy array gives numpy-backed
        (static) tables; a jax array (possibly traced) gives jnp tables.
      block_q, block_k: tile sizes; seq_q, seq_k: the unpadded lengths T and S.
      max_kv_blocks, max_q_blocks: static table widths. Default: the exact
        maximum for a concrete mask, Kb / Qb for a traced one. A traced mask with
        more active blocks than the width keeps the lowest indices.
    """
    _check_block_sizes(block_q, block_k, seq_q, seq_k)
    traced = isinstance(block_mask, jax.Array) and not _is_concrete(block_mask)
    xp = jnp if isinstance(block_mask, jax.Array) else np
    bm = xp.asarray(block_mask)
    if bm.dtype == bool:
      bm = bm.astype(np.int32)
    bm = bm.astype(np.int32)
    if bm.ndim == 2:
      bm = bm[None, None]
    if bm.ndim != 4:
      raise ValueError(f"block_mask must have shape [Qb, Kb] or [Bm, Nm, Qb, Kb], got {bm.shape}")
    qb, kb = num_blocks(seq_q, block_q), num_blocks(seq_k, block_k)
    if bm.shape[-2:] != (qb, kb):
      raise ValueError(
        f"block_mask has tile grid {bm.shape[-2:]}, but T={seq_q}, S={seq_k} with "
        f"block_q={block_q}, block_k={block_k} need {(qb, kb)}"
      )
    if max_kv_blocks is None:
      max_kv_blocks = kb if traced else max(1, int(np.max(np.sum(np.asarray(bm) > 0, -1))))
    if max_q_blocks is None:
      max_q_blocks = qb if traced else max(1, int(np.max(np.sum(np.asarray(bm) > 0, -2))))
    kv_idx, kv_cnt, kv_part = _compact(bm, max_kv_blocks, xp)
    q_idx, q_cnt, q_part = _compact(xp.swapaxes(bm, -1, -2), max_q_blocks, xp)
    return cls(
      kv_idx,
      kv_cnt,
      kv_part,
      q_idx,
      q_cnt,
      q_part,
      block_q=block_q,
      block_k=block_k,
      seq_q=seq_q,
      seq_k=seq_k,
    )

  # ---------------------------------------------------------------- views

  @property
  def num_q_blocks(self) -> int:
    return num_blocks(self.seq_q, self.block_q)

  @property
  def num_kv_blocks(self) -> int:
    return num_blocks(self.seq_k, self.block_k)

  @property
  def max_kv_blocks(self) -> int:
    return self.kv_indices.shape[-1]

  @property
  def max_q_blocks(self) -> int:
    return self.q_indices.shape[-1]

  def to_block_mask(self) -> jax.Array:
    """The per-tile classification int32[Bm, Nm, Qb, Kb] these tables encode."""
    xp = np if isinstance(self.kv_indices, np.ndarray) else jnp
    kb = self.num_kv_blocks
    valid = _iota(self.max_kv_blocks, self.kv_indices.ndim, xp) < self.kv_counts[..., None]
    kind = xp.where(valid, xp.where(self.kv_partial > 0, PARTIAL, FULL), EMPTY)
    onehot = self.kv_indices[..., None] == _iota(kb, self.kv_indices.ndim + 1, xp)
    return xp.max(xp.where(onehot, kind[..., None], EMPTY), axis=-2).astype(np.int32)

  def density(self) -> float:
    """Fraction of tiles visited (mean over map groups); a host-side number."""
    counts = np.asarray(self.kv_counts)
    return float(counts.sum() / (counts.size * self.num_kv_blocks))

  def broadcast_to_groups(self, batch: int, heads: int) -> BlockMap:
    """Checks the map's groups broadcast against [batch, heads]."""
    bm, nm = self.kv_counts.shape[:2]
    if bm not in (1, batch) or nm not in (1, heads):
      raise ValueError(
        f"BlockMap groups (Bm={bm}, Nm={nm}) do not broadcast to batch={batch}, "
        f"query heads={heads}: build one map per batch element/head or a shared one"
      )
    return self


def _is_concrete(x: jax.Array) -> bool:
  try:
    np.asarray(x)
    return True
  except jax.errors.TracerArrayConversionError:
    return False
  except jax.errors.ConcretizationTypeError:
    return False


def _check_block_sizes(block_q: int, block_k: int, seq_q: int, seq_k: int) -> None:
  for name, value in (("block_q", block_q), ("block_k", block_k)):
    if not isinstance(value, (int, np.integer)) or value <= 0:
      raise ValueError(f"{name}={value!r} must be a positive int")
  for name, value in (("seq_q", seq_q), ("seq_k", seq_k)):
    if not isinstance(value, (int, np.integer)) or value <= 0:
      raise ValueError(f"{name}={value!r} must be a positive int")


def _iota(n: int, ndim: int, xp):
  """arange(n) along the last of `ndim` axes (explicit rank: jax_numpy_rank_promotion="raise")."""
  return xp.arange(n).reshape((1,) * (ndim - 1) + (n,))


def _compact(bm, width: int, xp):
  """Row-wise compaction of nonzero entries of bm[..., R, C] into width slots."""
  cols = bm.shape[-1]
  active = bm > 0
  # Active columns sort first, in ascending order; a stable key keeps it exact.
  key = xp.where(active, 0, cols) + _iota(cols, bm.ndim, xp)
  order = xp.argsort(key, axis=-1)[..., :width].astype(np.int32)
  counts = xp.minimum(xp.sum(active, axis=-1), width).astype(np.int32)
  slot = _iota(width, bm.ndim, xp)
  valid = slot < counts[..., None]
  # Padding repeats the last valid index (0 for an empty row).
  last = xp.take_along_axis(order, xp.maximum(counts - 1, 0)[..., None], axis=-1)
  indices = xp.where(valid, order, last).astype(np.int32)
  partial = xp.take_along_axis(bm, indices, axis=-1) == PARTIAL
  partial = xp.where(valid, partial, False).astype(np.int32)
  return indices, counts, partial
