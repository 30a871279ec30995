"""Masks that read arrays (`mask_tables=` of `block_sparse_attention`): how each lowering gets them.

Pallas kernels cannot capture array constants, so a predicate that reads arrays (segment ids of
packed documents, a dense keep array, a random block pattern) takes them as `mask_tables`:
`mask_fn(tables, q_pos, k_pos)`. The lowerings differ in what they can do with them:

- GPU (Triton): the tables are whole-array kernel inputs (bool stored as int8). The predicate
  reads them through `TableView`s, whose integer-array indexing is a gather *load* from the
  input (`ref[rows, cols]`): the Triton lowering has pointer-tensor loads but no rule for
  `lax.gather` of a loaded value.
- TPU (Mosaic): Mosaic lowers neither a gather of a loaded vector nor a load at vector indices
  ("Only take_along_axis-like gathers supported", "Cannot do int indexing on TPU"), so the
  predicate runs in XLA, before the kernels, on the PARTIAL tiles only: `keep` int32[P, bq, bk]
  holds one tile per distinct PARTIAL (q-tile, kv-tile) of the map (all Qb * Kb tiles when the
  map is traced), and per-entry slot tables give each grid step its keep tile (FULL steps repeat
  a neighbouring slot: no new DMA). Memory: P * bq * bk * 4 bytes, e.g. 256 tiles (the diagonal
  of a causal packed-document mask at T = 32k, 128-tiles) = 16 MiB; int32 because Mosaic's
  native layouts are 32-bit.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from pallas_kernels.block_sparse.config import KernelConfig

# ------------------------------------------------------------------ GPU: gathers in the kernel


class TableView:
  """A mask table inside the GPU kernel: `.shape`, `.ndim`, `.dtype` and gather indexing.

  `view[rows, cols]` (integer arrays, broadcasting) loads only the addressed entries from
  the kernel input. Converting a view to an array (`jnp.asarray`) is not supported: write
  predicates against `table_xp` (whose `asarray` returns views unchanged) or index directly.
  """

  def __init__(self, ref, dtype: str):
    self._ref, self.dtype = ref, jnp.dtype(dtype)

  @property
  def shape(self):
    return self._ref.shape

  @property
  def ndim(self):
    return len(self._ref.shape)

  def __getitem__(self, index):
    value = self._ref[index]
    return value != 0 if self.dtype == jnp.bool_ else value


class _TableNamespace:
  """`jax.numpy`, except that `asarray` returns `TableView`s unchanged.

  The array module for a `mask_fn(tables, q_pos, k_pos)` written as
  `xp.asarray(table)[index]` (as the attnzoo masks are): the same predicate then gathers
  from arrays (references, TPU keep tiles) and from kernel inputs (GPU).
  """

  def __getattr__(self, name):
    return getattr(jnp, name)

  @staticmethod
  def asarray(x, *args, **kwargs):
    return x if isinstance(x, TableView) else jnp.asarray(x, *args, **kwargs)


table_xp = _TableNamespace()


def gpu_inputs(mask_tables):
  """The GPU kernel inputs for `mask_tables`: the tables themselves, bool stored as int8."""
  return tuple(t.astype(jnp.int8) if t.dtype == jnp.bool_ else t for t in mask_tables)


def gpu_keep_fn(cfg: KernelConfig, table_refs):
  """The element predicate `(q_pos, k_pos) -> keep` of a GPU kernel tile, or None."""
  if cfg.mask_fn is None:
    return None
  if not cfg.table_dtypes:
    return cfg.mask_fn
  views = tuple(TableView(r, d) for r, d in zip(table_refs, cfg.table_dtypes, strict=True))
  return lambda q_pos, k_pos: cfg.mask_fn(views, q_pos, k_pos)


# ------------------------------------------------------------------ TPU: keep tiles from XLA


def tpu_inputs(mask_tables, block_map):
  """Host side: which tiles get a keep tile, and the slot of every table entry.

  Returns (mask_tables, tiles int32[P, 2] of (q-tile, kv-tile), kv_slots [Bm, Nm, Qb, Mk],
  q_slots [Bm, Nm, Kb, Mq]); `keep_tiles` evaluates the predicate inside the jitted call.
  """
  qb, kb = block_map.num_q_blocks, block_map.num_kv_blocks
  kv = (block_map.kv_indices, block_map.kv_counts, block_map.kv_partial)
  qt = (block_map.q_indices, block_map.q_counts, block_map.q_partial)
  try:
    kv, qt = jax.tree.map(np.asarray, (kv, qt))
  except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
    xp = jnp  # a traced map: any tile may be PARTIAL, so every tile gets a keep tile
    tile_ids = slot_of = jnp.arange(qb * kb, dtype=jnp.int32)
  else:
    xp = np
    tile_ids = np.unique(_tile_ids(kv[0], kb, q_rows=True)[_active(*kv, np)]).astype(np.int32)
    tile_ids = tile_ids if tile_ids.size else np.zeros(1, np.int32)
    slot_of = np.zeros(qb * kb, np.int32)
    slot_of[tile_ids] = np.arange(tile_ids.size, dtype=np.int32)
  tiles = xp.stack([tile_ids // kb, tile_ids % kb], axis=-1).astype(np.int32)
  return (
    tuple(mask_tables),
    tiles,
    _slots(*kv, slot_of, kb, True, xp),
    _slots(*qt, slot_of, kb, False, xp),
  )


def keep_tiles(mask_fn, tables, tiles, cfg: KernelConfig):
  """int32[P, bq, bk]: `mask_fn(tables, q_pos, k_pos)` on the listed tiles."""
  bq, bk = cfg.block_q, cfg.block_k
  q_pos = tiles[:, 0, None, None] * bq + jnp.arange(bq, dtype=jnp.int32)[None, :, None]
  k_pos = tiles[:, 1, None, None] * bk + jnp.arange(bk, dtype=jnp.int32)[None, None, :]
  keep = mask_fn(tables, q_pos, k_pos)
  return jnp.broadcast_to(keep, (tiles.shape[0], bq, bk)).astype(jnp.int32)


def _active(indices, counts, partial, xp):
  """bool[Bm, Nm, rows, W]: the entry is listed (t < count) and PARTIAL."""
  width = indices.shape[-1]
  return (xp.arange(width)[None, None, None, :] < counts[..., None]) & (partial != 0)


def _tile_ids(indices, kb, *, q_rows):
  """Row-major tile id (i * Kb + j) of every entry of a [Bm, Nm, rows, W] index table;
  `q_rows`: the rows are q tiles (kv tables) rather than kv tiles (transposed tables)."""
  row = np.arange(indices.shape[2], dtype=np.int32)[None, None, :, None]
  return row * kb + indices if q_rows else indices * kb + row


def _slots(indices, counts, partial, slot_of, kb, q_rows, xp):
  """Keep-tile slot of every table entry: its own on PARTIAL entries, else a neighbour's.

  Along a table row the tile ids, hence the slots, ascend: a running max carries the last
  PARTIAL slot over FULL and padding entries, a reversed running min fills the entries
  before the row's first PARTIAL one, so consecutive grid steps rarely change keep tile.
  """
  slot = slot_of[_tile_ids(indices, kb, q_rows=q_rows)]
  active = _active(indices, counts, partial, xp)
  big = np.iinfo(np.int32).max
  cummax = (
    (lambda x: np.maximum.accumulate(x, axis=-1))
    if xp is np
    else (lambda x: lax.cummax(x, axis=x.ndim - 1))
  )
  after = cummax(xp.where(active, slot, -1))
  before = -cummax(xp.where(active, -slot, -big)[..., ::-1])[..., ::-1]
  return xp.where(after >= 0, after, xp.where(before < big, before, 0)).astype(np.int32)


def kernel_inputs(backend: str, mask_tables, block_map):
  """What the `backend` lowering takes for `mask_tables` (host side, outside the jitted call)."""
  return gpu_inputs(mask_tables) if backend == "gpu" else tpu_inputs(mask_tables, block_map)
