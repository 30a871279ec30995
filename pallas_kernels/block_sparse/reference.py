"""The naive fp32 oracle of block-sparse attention: the spec the kernels are tested against.

out[b, t, n] = sum_s softmax_s(c * tanh(scale * q[b,t,n] . k[b,s,n//G] / c))[where kept] v[b,s,n//G]

A key is kept when the BlockMap lists its tile, `mask_fn(t, s)` (or, with mask tables,
`mask_fn(tables, t, s)`) holds, the segment ids are equal, and s < S. A query with no kept
key gets zeros (safe softmax). Dense [B, N, T, S] logits: use it only at test sizes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from pallas_kernels.block_sparse.block_map import BlockMap


def reference_attention(
  q: Float[Array, "B T N H"],
  k: Float[Array, "B S K H"],
  v: Float[Array, "B S K Hv"],
  block_map: BlockMap | None = None,
  *,
  mask_fn=None,
  mask_tables: tuple[jax.Array, ...] = (),
  scale: float | None = None,
  segment_ids=None,
  logits_soft_cap: float | None = None,
) -> Float[Array, "B T N Hv"]:
  """Dense masked softmax attention in float32, output in q.dtype (see module docstring)."""
  B, T, N, H = q.shape
  _, S, K, _ = k.shape
  scale = H**-0.5 if scale is None else scale
  qf = q.astype(jnp.float32).reshape(B, T, K, N // K, H)  # query head n = kv head * G + g
  logits_BKGTS = jnp.einsum("btkgh,bskh->bkgts", qf, k.astype(jnp.float32)) * scale
  logits_BNTS = logits_BKGTS.reshape(B, N, T, S)
  if logits_soft_cap is not None:
    logits_BNTS = logits_soft_cap * jnp.tanh(logits_BNTS / logits_soft_cap)

  keep_BNTS = jnp.ones((1, 1, T, S), bool)
  if mask_fn is not None:
    pos_q, pos_k = jnp.arange(T, dtype=jnp.int32), jnp.arange(S, dtype=jnp.int32)
    args = (tuple(jnp.asarray(t) for t in mask_tables),) if mask_tables else ()
    keep_BNTS &= jnp.broadcast_to(mask_fn(*args, pos_q[:, None], pos_k[None, :]), (1, 1, T, S))
  if block_map is not None:
    tiles = jnp.asarray(block_map.to_block_mask()) > 0  # [Bm, Nm, Qb, Kb]
    tiles = jnp.repeat(jnp.repeat(tiles, block_map.block_q, 2), block_map.block_k, 3)
    keep_BNTS &= tiles[:, :, :T, :S]
  if segment_ids is not None:
    q_ids, kv_ids = segment_ids if isinstance(segment_ids, tuple) else (segment_ids,) * 2
    keep_BNTS = keep_BNTS & (q_ids[:, None, :, None] == kv_ids[:, None, None, :])

  keep_BNTS = jnp.broadcast_to(keep_BNTS, logits_BNTS.shape)
  logits_BNTS = jnp.where(keep_BNTS, logits_BNTS, jnp.finfo(jnp.float32).min)
  m_BNT1 = jax.lax.stop_gradient(jnp.max(logits_BNTS, axis=-1, keepdims=True))
  p_BNTS = jnp.where(keep_BNTS, jnp.exp(logits_BNTS - m_BNT1), 0.0)
  l_BNT1 = jnp.sum(p_BNTS, axis=-1, keepdims=True)
  p_BNTS = p_BNTS / jnp.where(l_BNT1 == 0.0, 1.0, l_BNT1)
  p_BKGTS = p_BNTS.reshape(B, K, N // K, T, S)
  out = jnp.einsum("bkgts,bskv->btkgv", p_BKGTS, v.astype(jnp.float32))
  return out.reshape(B, T, N, v.shape[-1]).astype(q.dtype)
