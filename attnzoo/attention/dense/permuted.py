"""Attention in a permuted layout with masks on the original positions.

Sparse methods reorder tokens so that the tiles they keep are denser: PBS-Attn sorts keys
inside segments by importance (arXiv 2510.21270, §3), BiFormer gathers 2-D regions, N-D
neighborhood kernels walk tokens tile-major (GNA, arXiv 2504.16922). Softmax attention is
invariant to a permutation of the keys and equivariant to one of the queries, so the result is
exact provided every mask is evaluated on the tokens' *original* positions — a causal mask
applied in permuted order leaks future tokens.

`dot_product_attention(..., positions=(q_pos, kv_pos))` is the engine: the structured mask's
predicate reads the position tables in every visited tile. This module adds the bookkeeping:
`permuted_attention` gathers q/k/v into the layout, runs the engine with the tables and
scatters the output back, so `permuted_attention(q, k, v, q_perm=p, kv_perm=r, mask=m)` equals
`dot_product_attention(q, k, v, mask=m)` for any permutations p, r (forward and gradients).
Permutations are arrays whose row i holds the original position of the token placed at i
(`x_permuted = x[:, perm]`); shared by the batch ([T]) or one per batch element ([B, T]).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from attnzoo.attention.dense.softmax import dot_product_attention
from attnzoo.masks import Mask


def check_permutation(perm, length: int, *, name: str = "perm") -> None:
  """Raises if a concrete `perm` [..., length] is not a permutation of 0..length-1 in every
  row (traced arrays are checked for shape only: their values are unknown at trace time)."""
  shape = np.shape(perm)
  if not shape or shape[-1] != length:
    raise ValueError(f"{name} has shape {shape}; expected [..., {length}] (one row per layout)")
  if isinstance(perm, jax.core.Tracer):
    return
  rows = np.asarray(perm).reshape(-1, length)
  if not np.issubdtype(rows.dtype, np.integer):
    raise TypeError(f"{name} must be integer positions, got dtype {rows.dtype}")
  want = np.arange(length)
  for r, row in enumerate(rows):
    if not np.array_equal(np.sort(row), want):
      missing = np.setdiff1d(want, row)[:5].tolist()
      raise ValueError(
        f"{name} row {r} is not a permutation of 0..{length - 1} (missing e.g. {missing}); "
        "every original position must appear exactly once"
      )


def invert_permutation(perm: Int[Array, "... L"]) -> Int[Array, "... L"]:
  """inv with inv[perm[i]] = i (per row), so x == x_permuted[..., inv]."""
  return jnp.argsort(perm, axis=-1).astype(jnp.int32)


def tile_major_order(shape: tuple[int, ...], tile: tuple[int, ...]) -> np.ndarray:
  """int32 [prod(shape)]: row-major token ids of an N-D grid visited tile by tile (tiles in
  row-major order, tokens row-major inside a tile) — the layout in which an N-D neighborhood
  keeps contiguous 1-D tiles dense. Every extent must be a multiple of its tile."""
  if len(shape) != len(tile) or any(s % t for s, t in zip(shape, tile, strict=True)):
    raise ValueError(f"tile {tile} must have one extent per axis of {shape} and divide it")
  grid = np.arange(int(np.prod(shape)), dtype=np.int32).reshape(shape)
  split = []
  for s, t in zip(shape, tile, strict=True):
    split += [s // t, t]
  d = len(shape)
  order = list(range(0, 2 * d, 2)) + list(range(1, 2 * d, 2))  # tile indices, then offsets
  return grid.reshape(split).transpose(order).reshape(-1)


def _gather_rows(x, perm):
  """x [B, L, ...] with perm [L] or [B, L] -> x[:, perm] per batch element."""
  if perm.ndim == 1:
    return jnp.take(x, perm, axis=1)
  return jnp.take_along_axis(x, perm.reshape(perm.shape + (1,) * (x.ndim - 2)), axis=1)


def _batched(perm, B):
  return jnp.broadcast_to(perm, (B, perm.shape[-1]))


def permuted_attention(
  q: Float[Array, "B T N H"],
  k: Float[Array, "B S K H"],
  v: Float[Array, "B S K V"],
  *,
  q_perm: Int[Array, "*B T"] | None = None,
  kv_perm: Int[Array, "*B S"] | None = None,
  mask: Mask | None = None,
  is_causal: bool = False,
  **kwargs,
) -> Float[Array, "B T N V"]:
  """Softmax attention computed in the layout (q[:, q_perm], k[:, kv_perm], v[:, kv_perm])
  with `mask` / `is_causal` on the original positions; the output is returned in the original
  query order. `kwargs` go to `dot_product_attention` and refer to the *permuted* layout
  (`block_map`, `implementation`, `block_sizes`, ...). None = identity. A dense mask array
  or bias must be permuted by the caller and passed with `dot_product_attention(positions=)`.
  """
  if mask is not None and not isinstance(mask, Mask):
    raise TypeError(
      "permuted_attention takes a structured Mask (evaluated on original positions); permute a "
      "dense mask array yourself and call dot_product_attention(..., positions=...)"
    )
  if kwargs.get("return_lse"):
    raise ValueError("permuted_attention returns the output only; use dot_product_attention")
  B, T, S = q.shape[0], q.shape[1], k.shape[1]
  q_perm = jnp.arange(T, dtype=jnp.int32) if q_perm is None else q_perm
  kv_perm = jnp.arange(S, dtype=jnp.int32) if kv_perm is None else kv_perm
  check_permutation(q_perm, T, name="q_perm")
  check_permutation(kv_perm, S, name="kv_perm")
  q_perm, kv_perm = jnp.asarray(q_perm, jnp.int32), jnp.asarray(kv_perm, jnp.int32)
  out_p = dot_product_attention(
    _gather_rows(q, q_perm),
    _gather_rows(k, kv_perm),
    _gather_rows(v, kv_perm),
    mask=mask,
    is_causal=is_causal,
    positions=(_batched(q_perm, B), _batched(kv_perm, B)),
    **kwargs,
  )
  return _gather_rows(out_p, invert_permutation(q_perm))
