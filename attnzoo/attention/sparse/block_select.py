"""Content-dependent block maps: which kv tiles each q tile visits, chosen from the data.

Both selectors score tiles with mean-pooled queries and keys,

    score[b, n, i, j] = scale · mean(q[b, tile_i, n]) · mean(k[b, tile_j, n // G]),

a cheap O((T/bq)·(S/bk)·H) estimate of the tile's attention mass, then pick tiles per
(batch, head, q tile):

- `topk_block_map`: the `num_blocks` best tiles (as in BiFormer's region routing,
  arXiv 2303.08810 §3.2, and MoBA-style block selection);
- `mass_block_map`: the fewest tiles whose softmax mass over the pooled scores
  reaches `mass` (the cumulative-threshold rule of PBS-Attn, arXiv 2510.21270 §3.3,
  and MInference's vertical-slash estimate).

A static `mask` restricts the choice (tiles it leaves EMPTY are never chosen, so
causality holds by construction) and supplies the element predicate for the
PARTIAL tiles; `forced` tiles (default: the static mask's diagonal tiles, i.e. the
local context) are always kept. The result is a traced `BlockMap` with one map per
batch element and query head and a static width, ready for
`pallas_kernels.block_sparse.block_sparse_attention`.

Causality: with `mask=Causal()` a q tile only ever chooses among tiles at or before
its diagonal, and forced tiles do not compete for the top-k slots, so the outputs of
q tile i depend on no token after tile i. Inside tile i the pooled query mixes all of
the tile's rows (the tile-level estimate these papers use for prefill); use tiles of
one query row for strict token-level causality.

Selection is discrete and carries no gradient: the pooled q/k pass through
`lax.stop_gradient` explicitly; a family that wants a learned router adds its own
differentiable term (as BiFormer and MoA do).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jaxtyping import Array, Float

from attnzoo.attention import _validate
from attnzoo.masks import Mask
from pallas_kernels.block_sparse import EMPTY, FULL, PARTIAL, BlockMap, num_blocks


def pooled_block_scores(
  q: Float[Array, "B T N H"],
  k: Float[Array, "B S K H"],
  *,
  block_q: int,
  block_k: int,
  scale: float | None = None,
) -> Float[Array, "B N Qb Kb"]:
  """Mean-pooled tile scores (padding excluded from the means), fp32, no gradient."""
  B, T, S, N, K, H, _ = _validate.check_qkv(q, k, k)
  scale = 1.0 / math.sqrt(H) if scale is None else scale
  q_pool = _mean_pool(lax.stop_gradient(q), block_q)  # [B, Qb, N, H]
  k_pool = _mean_pool(lax.stop_gradient(k), block_k)  # [B, Kb, K, H]
  G = N // K
  q_pool = q_pool.reshape(B, q_pool.shape[1], K, G, H)
  scores = jnp.einsum("bikgh,bjkh->bkgij", q_pool, k_pool) * scale
  return scores.reshape(B, N, q_pool.shape[1], k_pool.shape[1])


def _mean_pool(x, block):
  B, L, heads, H = x.shape
  nb = num_blocks(L, block)
  x = jnp.pad(x.astype(jnp.float32), ((0, 0), (0, nb * block - L), (0, 0), (0, 0)))
  counts = np.minimum(block, L - np.arange(nb) * block).astype(np.float32)
  return x.reshape(B, nb, block, heads, H).sum(2) / counts[None, :, None, None]


def _static_tiles(mask, forced, T, S, block_q, block_k):
  """Static classification (EMPTY/PARTIAL/FULL) and forced-tile table, numpy."""
  qb, kb = num_blocks(T, block_q), num_blocks(S, block_k)
  allowed = (
    np.full((qb, kb), FULL, np.int32) if mask is None else mask.block_mask(T, S, block_q, block_k)
  )
  if forced is None:
    # The diagonal tiles in token space (local context), wherever the mask allows them.
    centre_k = (np.arange(qb) * block_q + block_q // 2) * S // T // block_k
    forced_tbl = np.zeros((qb, kb), bool)
    forced_tbl[np.arange(qb), np.minimum(centre_k, kb - 1)] = True
  elif isinstance(forced, Mask):
    forced_tbl = forced.block_mask(T, S, block_q, block_k) != EMPTY
  else:
    forced_tbl = np.asarray(forced, bool)
    if forced_tbl.shape != (qb, kb):
      raise ValueError(f"forced tile table has shape {forced_tbl.shape}, expected {(qb, kb)}")
  forced_tbl &= allowed != EMPTY
  return allowed[None, None], forced_tbl[None, None]  # [1, 1, Qb, Kb]: shared by all groups


def _finish(chosen, allowed, forced_tbl, width, T, S, block_q, block_k):
  chosen = (chosen | forced_tbl) & (allowed != EMPTY)
  block_mask = jnp.where(chosen, jnp.asarray(allowed), EMPTY).astype(jnp.int32)
  return BlockMap.from_block_mask(
    block_mask, block_q=block_q, block_k=block_k, seq_q=T, seq_k=S, max_kv_blocks=width
  )


def topk_block_map(
  q: Float[Array, "B T N H"],
  k: Float[Array, "B S K H"],
  *,
  block_q: int,
  block_k: int,
  num_blocks_per_row: int,
  mask: Mask | None = None,
  forced: Mask | np.ndarray | None = None,
  scale: float | None = None,
) -> BlockMap:
  """Per (batch, head, q tile): the `num_blocks_per_row` best-scoring allowed kv tiles
  plus the forced ones. Width of the tables = num_blocks_per_row + max forced per row."""
  _, T, S, *_ = _validate.check_qkv(q, k, k)
  kb = num_blocks(S, block_k)
  if not (isinstance(num_blocks_per_row, int) and 1 <= num_blocks_per_row <= kb):
    raise ValueError(
      f"num_blocks_per_row={num_blocks_per_row!r} must be an int in [1, {kb}] "
      f"(there are {kb} kv tiles of block_k={block_k})"
    )
  allowed, forced_tbl = _static_tiles(mask, forced, T, S, block_q, block_k)
  scores = pooled_block_scores(q, k, block_q=block_q, block_k=block_k, scale=scale)
  # Forced tiles do not compete for the k slots: their (possibly future-dependent) pooled
  # keys then cannot change which other tiles are chosen.
  eligible = jnp.asarray((allowed != EMPTY) & ~forced_tbl)
  scores = jnp.where(eligible, scores, -jnp.inf)
  _, top = lax.top_k(scores, num_blocks_per_row)  # [B, N, Qb, k]
  chosen = jnp.any(top[..., None] == jnp.arange(kb).reshape((1,) * top.ndim + (kb,)), axis=-2)
  # Disallowed tiles may fill the top-k of rows with few allowed tiles; _finish drops them.
  width = min(kb, num_blocks_per_row + int(forced_tbl.sum(-1).max(initial=0)))
  return _finish(chosen, allowed, forced_tbl, width, T, S, block_q, block_k)


def mass_block_map(
  q: Float[Array, "B T N H"],
  k: Float[Array, "B S K H"],
  *,
  block_q: int,
  block_k: int,
  mass: float,
  mask: Mask | None = None,
  forced: Mask | np.ndarray | None = None,
  max_blocks_per_row: int | None = None,
  scale: float | None = None,
) -> BlockMap:
  """Per (batch, head, q tile): the fewest allowed kv tiles whose softmax mass over the
  pooled scores reaches `mass` (at least one), plus the forced ones. Tiles weigh by
  their number of keys, so a ragged last tile is not over-counted."""
  _, T, S, *_ = _validate.check_qkv(q, k, k)
  if not 0.0 < mass <= 1.0:
    raise ValueError(f"mass={mass} must be in (0, 1]: the fraction of estimated attention mass")
  kb = num_blocks(S, block_k)
  width = kb if max_blocks_per_row is None else max_blocks_per_row
  if not (isinstance(width, int) and 1 <= width <= kb):
    raise ValueError(f"max_blocks_per_row={max_blocks_per_row!r} must be an int in [1, {kb}]")
  allowed, forced_tbl = _static_tiles(mask, forced, T, S, block_q, block_k)
  scores = pooled_block_scores(q, k, block_q=block_q, block_k=block_k, scale=scale)
  sizes = np.minimum(block_k, S - np.arange(kb) * block_k).astype(np.float32)
  logits = jnp.where(
    jnp.asarray(allowed != EMPTY), scores + np.log(sizes)[None, None, None, :], -jnp.inf
  )
  # Forced tiles count towards the mass (they are attended) but are always taken.
  forced_j = jnp.asarray(forced_tbl)
  probs = jax.nn.softmax(logits, axis=-1)
  order = jnp.argsort(-probs, axis=-1)
  sorted_p = jnp.take_along_axis(probs, order, axis=-1)
  before = jnp.cumsum(sorted_p, axis=-1) - sorted_p  # mass of the better tiles
  sorted_ok = jnp.take_along_axis(
    jnp.broadcast_to(jnp.asarray(allowed != EMPTY), probs.shape), order, axis=-1
  )
  # mass = 1 keeps every allowed tile, whatever the rounding of the cumulative sum.
  take_sorted = sorted_ok if mass >= 1.0 else (before < mass) & sorted_ok
  # Forced tiles are always kept; the others share what is left of the table width.
  sorted_forced = jnp.take_along_axis(jnp.broadcast_to(forced_j, probs.shape), order, axis=-1)
  take_sorted = take_sorted & ~sorted_forced
  budget = max(1, width - int(forced_tbl.sum(-1).max(initial=0)))
  take_sorted = take_sorted & (jnp.cumsum(take_sorted, axis=-1) <= budget)
  chosen = jnp.zeros(probs.shape, bool)
  chosen = jnp.put_along_axis(chosen, order, take_sorted, axis=-1, inplace=False) | forced_j
  return _finish(chosen, allowed, forced_tbl, width, T, S, block_q, block_k)


__all__ = ["mass_block_map", "pooled_block_scores", "topk_block_map", "PARTIAL", "FULL"]
