"""Tile math of flash attention, written once: the kernels of both lowerings, the jnp "chunked"
path and ring attention all call these functions.

FlashAttention-2 (Dao, arXiv:2307.08691). Forward (Algorithm 1), per kv tile j of a q tile:

  m' = max(m, rowmax(S_j)),  P = exp(S_j - m'),  l' = e^{m - m'} l + rowsum(P),
  acc' = e^{m - m'} acc + P V_j;      at the end  O = acc / l,  lse = m + log l.

Backward (Algorithm 2), per tile: P = exp(S - lse), dS = P * (dO Vᵀ - D), D = rowsum(dO * O).

Conventions every caller follows:
- Dropped logits are -inf. A row with nothing kept so far has m = -inf; the update shifts it
  by 0 instead, so exp() gives exact zeros (no NaN, no explicit zeroing of P).
- Row statistics keep their reduced axis: m, l, lse, D are [..., rows, 1], so they broadcast
  against [..., rows, cols] tiles without reshapes (and are the natural TPU scratch shape).
- A row with no kept key finalises to out = 0 and lse = +inf, so the backward's
  P = exp(S - lse) is exactly 0 there and its gradients are finite.

The generic functions (`soft_cap`, `online_softmax_init`, `online_softmax_step`, `finalize`,
`probs_and_dlogits`, `soft_cap_vjp`) take arrays with any leading axes: the kernels pass one
head's 2-D [bq, bk] tile, the chunked path [B, K, G, bq, bk], ring attention [B, K, G, T, S].
Only the P @ V product depends on the layout, so `online_softmax_step` takes it as `dot`
(default: the 2-D product of a kernel tile). The remaining functions (`tile_logits`,
`masked_logits`, `backward_tile`) are the kernels' 2-D tiles under a `KernelConfig`.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from pallas_kernels.block_sparse.config import KernelConfig

F32 = jnp.float32


# ------------------------------------------------------------------ shape-generic


def soft_cap(s, cap: float | None):
  """(cap * tanh(s / cap), tanh(s / cap)) of fp32 logits; (s, None) without a cap (Gemma 2)."""
  if cap is None:
    return s, None
  t = jnp.tanh(s / cap)
  return cap * t, t


def soft_cap_vjp(ds, tanh):
  """dL/d(uncapped logits) from dL/d(capped logits) and the forward's tanh (None: no cap)."""
  return ds if tanh is None else ds * (1.0 - tanh * tanh)


def matmul(p, v):
  """P @ V of one kernel tile ([bq, bk] x [bk, Hv]): P in V's dtype, fp32 accumulation."""
  return jnp.dot(p.astype(v.dtype), v, preferred_element_type=F32)


def online_softmax_init(rows_shape: tuple[int, ...], value_dim: int):
  """(m, l, acc) before the first kv tile: -inf, 0 and 0, fp32."""
  return (
    jnp.full((*rows_shape, 1), -jnp.inf, F32),
    jnp.zeros((*rows_shape, 1), F32),
    jnp.zeros((*rows_shape, value_dim), F32),
  )


def online_softmax_step(s, v, m, l, acc, *, dot=matmul):
  """Folds one kv tile into the running softmax state (Algorithm 1, inner loop).

  Args:
    s: fp32 logits [..., rows, cols], dropped entries -inf.
    v: the tile's values, in whatever layout `dot` reads.
    m, l: running max and sum [..., rows, 1]; acc: unnormalised output [..., rows, Hv] fp32.
    dot: `(p, v) -> p @ v` as fp32 [..., rows, Hv] (it decides P's dtype for the product).

  Returns:
    (m, l, acc) after the tile.
  """
  m_new = jnp.maximum(m, jnp.max(s, axis=-1, keepdims=True))
  m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # a row with nothing kept so far
  p = jnp.exp(s - m_safe)
  alpha = jnp.exp(m - m_safe)
  l_new = alpha * l + jnp.sum(p, axis=-1, keepdims=True)
  return m_new, l_new, alpha * acc + dot(p, v)


def finalize(m, l, acc):
  """(out = acc / l, lse = m + log l); rows with no kept key give out = 0 and lse = +inf."""
  empty = l == 0.0
  l = jnp.where(empty, 1.0, l)
  return acc / l, jnp.where(empty, jnp.inf, m + jnp.log(l))


def probs_and_dlogits(s, lse, dp, delta):
  """Backward of one tile (Algorithm 2, inner loop): (P, dL/dS).

  s: the forward's logits [..., rows, cols] (-inf where dropped); lse, delta: [..., rows, 1];
  dp = dO @ Vᵀ [..., rows, cols] fp32.
  """
  p = jnp.exp(s - lse)
  return p, p * (dp - delta)


# ------------------------------------------------------------------ kernel tiles (2-D)


def tile_logits(q, k, cfg: KernelConfig):
  """fp32 logits of a [bq, H] x [bk, H] tile after scaling and the soft cap; also tanh."""
  s = jnp.dot(q, k.T, preferred_element_type=F32) * cfg.scale
  return soft_cap(s, cfg.soft_cap)


def masked_logits(s, q_start, k_start, partial, seg_q, seg_k, cfg: KernelConfig, keep_fn):
  """Sets dropped entries of a [bq, bk] logits tile to -inf.

  `keep_fn(q_pos, k_pos)` (the element predicate, or None) runs only when the tile is
  PARTIAL (`lax.cond` on the table flag); keys past the unpadded S are dropped on every
  tile; segment ids ([bq, 1] and [1, bk]) on every tile.
  """
  shape = s.shape
  neg_inf = jnp.full(shape, -jnp.inf, F32)
  if keep_fn is not None:

    def apply_mask(s):
      q_pos = q_start + lax.broadcasted_iota(jnp.int32, shape, 0)
      k_pos = k_start + lax.broadcasted_iota(jnp.int32, shape, 1)
      keep = jnp.broadcast_to(keep_fn(q_pos, k_pos), shape)
      return jnp.where(keep, s, neg_inf)

    s = lax.cond(partial != 0, apply_mask, lambda s: s, s)
  if cfg.seq_k % cfg.block_k:
    k_pos = k_start + lax.broadcasted_iota(jnp.int32, shape, 1)
    s = jnp.where(k_pos < cfg.seq_k, s, neg_inf)
  if seg_q is not None:
    s = jnp.where(seg_q == seg_k, s, neg_inf)
  return s


def backward_tile(q, k, v, do, lse, delta, q_start, k_start, partial, seg_q, seg_k, cfg, keep_fn):
  """Recomputes one tile and returns (ds, p) with ds = dL/d(raw scaled logits)."""
  s, t = tile_logits(q, k, cfg)
  s = masked_logits(s, q_start, k_start, partial, seg_q, seg_k, cfg, keep_fn)
  p, ds = probs_and_dlogits(s, lse, jnp.dot(do, v.T, preferred_element_type=F32), delta)
  return soft_cap_vjp(ds, t), p
