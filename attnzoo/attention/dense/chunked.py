"""Flash-style softmax attention in plain jnp: O(T·H) memory forward and backward.

Queries and keys are cut into (block_q, block_k) tiles. For each q tile an online
softmax (running max `m`, running sum `l`, fp32 accumulator) walks only the kv
tiles that the mask's `BlockMap` lists; the element predicate is evaluated only
on PARTIAL tiles. A `custom_vjp` saves the output and the per-row log-sum-exp and
recomputes each visited tile once in the backward pass, as in FlashAttention-2 (Dao,
arXiv 2307.08691, Alg. 2): a scan over kv tiles walks each one's q tiles (the
BlockMap's transposed tables), keeping dK/dV in the loop carry and adding dQ (and
d bias) into output-sized buffers.

The tile math (soft cap, online-softmax update, finalisation, the backward's P and dS) is
`pallas_kernels.block_sparse.tiles`, the same functions the Pallas kernels run; tiles here are
head-major [B, K, G, bq, bk], so only the P @ V product is spelt for this layout. Dropped logits
are -inf and rows with no kept key finalise to out = 0, lse = +inf (see `tiles`).

This is the reference for the Pallas kernel's tiling, and the best CPU path.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from attnzoo.masks import Mask
from pallas_kernels.block_sparse import BlockMap, num_blocks
from pallas_kernels.block_sparse.tiles import (
  finalize,
  online_softmax_init,
  online_softmax_step,
  probs_and_dlogits,
  soft_cap,
  soft_cap_vjp,
)

# Finite stand-in for -inf for paths differentiated by autodiff (softmax's "xla" reference):
# exp(MASK - m) underflows to 0 without producing NaNs. The tiles here use -inf (custom VJP).
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)


@dataclasses.dataclass(frozen=True)
class _Static:
  """Everything about a call that is Python-static (shapes, callables)."""

  seq_q: int
  seq_k: int
  block_q: int
  block_k: int
  groups: int  # G = N // K
  scale: float
  soft_cap: float | None
  structured: Mask | None
  # Backward over the forward tables with per-visit dK/dV slots (`_slot_grads`) instead of
  # the transposed walk that adds dQ into a buffer: under vmap (per-(batch, head) maps) that
  # in-place add becomes a scatter per visited tile and the transposed counts differ between
  # instances; measured 1.8x faster f+b at 12 % density. Used for tables at most half the kv
  # tiles wide (top-k maps); full-width tables (mass maps) keep the transposed walk (a first
  # version that stacked every slot took 64 s instead of ~8 s f+b at 16k; not re-measured since
  # slots are added per q tile).
  slot_backward: bool = False


def chunked_attention(
  q,
  k,
  v,
  *,
  structured,
  dense_mask,
  bias,
  segment_ids,
  scale,
  soft_cap,
  block_q,
  block_k,
  block_map: BlockMap | None = None,
  return_lse: bool = False,
  positions: tuple[jax.Array, jax.Array] | None = None,
):
  """q [B,T,N,H], k [B,S,K,H], v [B,S,K,Hv] -> [B,T,N,Hv]; inputs already validated.
  With `return_lse`: (out, lse [B,T,N] fp32, -inf for rows with no kept key), both
  differentiable.

  dense_mask: bool [Bm,Nm,T,S] or None; bias: float [Bb,Nb,T,S] or None (both with
  broadcastable leading axes); segment_ids: (q_ids [B,T], kv_ids [B,S]) or None.
  block_map: the tiles to visit, possibly traced (chosen from the data) and per batch element
  and query head ([Bm, Nm] groups, 1 or B / N); its tile sizes are block_q, block_k and its
  PARTIAL flags say where `structured`'s predicate runs. None: the mask's own static map.
  positions: (q_pos int32 [B, Nq, T], kv_pos int32 [B, Kk, S]), Nq in {1, N}, Kk in {1, K}:
  the original positions of a permuted layout; `structured`'s predicate then runs on them in
  every visited tile (PARTIAL flags are ignored), and None for block_map means every tile.
  """
  B, T, N, H = q.shape
  S, K = k.shape[1], k.shape[2]
  if block_map is None:
    if structured is None or positions is not None:
      kb = num_blocks(S, block_k)
      full = np.full((num_blocks(T, block_q), kb), 2, np.int32)
      block_map = BlockMap.from_block_mask(full, block_q=block_q, block_k=block_k, seq_q=T, seq_k=S)
    else:
      block_map = structured.block_map(T, S, block_q, block_k)
  Bm, Nm = block_map.kv_counts.shape[:2]
  if Bm == 1 and Nm == 1:  # one map for every (batch, head): all heads walk it together
    st = _Static(T, S, block_q, block_k, N // K, float(scale), soft_cap, structured)
    pos = None
    if positions is not None:
      q_pos, kv_pos = positions
      q_pos = q_pos.reshape(B, K, N // K, T) if q_pos.shape[1] == N else q_pos[:, :, None]
      pos = (q_pos, kv_pos[:, :, None])
    extras = _Extras(dense_mask, segment_ids, _Tables.of(block_map, 0, 0), pos)
    out, lse = _attention(st, q, k, v, bias, extras)
  else:
    out, lse = _per_head_maps(
      q, k, v, bias, dense_mask, segment_ids, block_map, structured, scale, soft_cap, positions
    )
  return (out, lse) if return_lse else out


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class _Tables:
  """One map's tile tables (`BlockMap` fields of one group), traced or constant."""

  kv_idx: jax.Array  # [Qb, Mk]
  kv_cnt: jax.Array  # [Qb]
  kv_part: jax.Array  # [Qb, Mk]
  q_idx: jax.Array  # [Kb, Mq]
  q_cnt: jax.Array  # [Kb]
  q_part: jax.Array  # [Kb, Mq]

  @classmethod
  def of(cls, bm: BlockMap, b: int, n: int) -> _Tables:
    fields = (bm.kv_indices, bm.kv_counts, bm.kv_partial, bm.q_indices, bm.q_counts, bm.q_partial)
    return cls(*(jnp.asarray(a[b, n]) for a in fields))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class _Extras:
  """Non-differentiable inputs: mask array, segment ids, the tile tables, and the original
  positions of a permuted layout (q_pos [Bx, Kx, Gx, T], kv_pos [Bx, Kx, 1, S]) or None."""

  dense_mask: jax.Array | None
  segment_ids: tuple[jax.Array, jax.Array] | None
  tables: _Tables
  positions: tuple[jax.Array, jax.Array] | None = None


def _per_head_maps(
  q, k, v, bias, dense_mask, segment_ids, bm, structured, scale, soft_cap, positions=None
):
  """One map per (batch element, query head): the single-head flash attention vmapped over b
  and n, each instance walking its own tiles (a while loop per instance under vmap runs to the
  longest row count; maps of static width keep that equal). K/V heads are repeated to the
  query heads for the call."""
  B, T, N, _ = q.shape
  S, K = k.shape[1], k.shape[2]
  bm = bm.broadcast_to_groups(B, N)
  st = _Static(
    T,
    S,
    bm.block_q,
    bm.block_k,
    1,
    float(scale),
    soft_cap,
    structured,
    # Narrow (top-k) tables only: see `slot_backward`.
    slot_backward=2 * bm.kv_indices.shape[-1] <= num_blocks(S, bm.block_k),
  )

  def groups(x):
    """x [X0, X1, ...] (X0 in {1, B}, X1 in {1, N}) -> (x with unit group axes dropped,
    outer (batch) vmap axis, inner (head) vmap axis)."""
    if x is None:
      return None, None, None
    by_b, by_n = x.shape[0] == B, x.shape[1] == N
    x = x if by_n else x[:, 0]
    x = x if by_b else x[0]
    return x, (0 if by_b else None), (0 if by_n else None)

  fields = (bm.kv_indices, bm.kv_counts, bm.kv_partial, bm.q_indices, bm.q_counts, bm.q_partial)
  parts = [groups(jnp.asarray(a)) for a in fields]
  tables = _Tables(*(p[0] for p in parts))
  tab_b, tab_n = parts[0][1], parts[0][2]  # every table shares the map's groups
  bias, bias_b, bias_n = groups(bias)
  mask, mask_b, mask_n = groups(dense_mask)
  heads_first = lambda x: jnp.swapaxes(x, 1, 2)  # [B, L, N, X] -> [B, N, L, X]
  q_bn = heads_first(q)
  k_bn, v_bn = (heads_first(jnp.repeat(x, N // K, axis=2)) for x in (k, v))
  pos, pos_n = None, None
  if positions is not None:  # [B, Nq, T], [B, Kk, S]; kv heads repeated like k and v
    q_pos, kv_pos = positions
    kv_pos = jnp.repeat(kv_pos, N // K, axis=1) if kv_pos.shape[1] == K > 1 else kv_pos
    pos = tuple(x if x.shape[1] == N else x[:, 0] for x in (q_pos, kv_pos))
    pos_n = tuple(0 if x.shape[1] == N else None for x in (q_pos, kv_pos))

  def one(q1, k1, v1, bias1, mask1, seg1, tab1, pos1):
    # q1 [T,H], k1 [S,H], v1 [S,Hv]; bias1 / mask1 [T,S] or None; seg1 ([T], [S]) or None;
    # pos1 ([T], [S]) or None.
    grid = lambda x: None if x is None else x[None, None]
    rows = lambda x: x[None, :, None]
    seg = None if seg1 is None else (seg1[0][None], seg1[1][None])
    pos = None if pos1 is None else tuple(x[None, None, None] for x in pos1)
    extras1 = _Extras(grid(mask1), seg, tab1, pos)
    out, lse = _attention(st, rows(q1), rows(k1), rows(v1), grid(bias1), extras1)
    return out[0, :, 0], lse[0, :, 0]

  per_n = jax.vmap(one, in_axes=(0, 0, 0, bias_n, mask_n, None, tab_n, pos_n))
  seg_b = None if segment_ids is None else 0
  pos_b = None if pos is None else (0, 0)
  per_bn = jax.vmap(per_n, in_axes=(0, 0, 0, bias_b, mask_b, seg_b, tab_b, pos_b))
  out, lse = per_bn(q_bn, k_bn, v_bn, bias, mask, segment_ids, tables, pos)  # [B,N,T,Hv], [B,N,T]
  return heads_first(out), jnp.swapaxes(lse, 1, 2)


# ------------------------------------------------------------------ layout helpers


def _pad_to(x, axis, size, value=0):
  pad = size - x.shape[axis]
  if pad == 0:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, pad)
  return jnp.pad(x, widths, constant_values=value)


def _split_heads(x_bnts, groups):
  """[Bx, Nx, T, S] -> [Bx, Kx, Gx, T, S], where Nx is 1 or N = K * groups."""
  b, n, t, s = x_bnts.shape
  if n == 1:
    return x_bnts.reshape(b, 1, 1, t, s)
  return x_bnts.reshape(b, n // groups, groups, t, s)


def to_head_major(x_btnh, kv_heads):
  """[B, T, N, H] -> [B, K, G, T, H] (query head n = k * G + g)."""
  b, t, n, h = x_btnh.shape
  return jnp.transpose(x_btnh.reshape(b, t, kv_heads, n // kv_heads, h), (0, 2, 3, 1, 4))


def from_head_major(x_bkgth):
  """[B, K, G, T, H] -> [B, T, N, H]."""
  b, k, g, t, h = x_bkgth.shape
  return jnp.transpose(x_bkgth, (0, 3, 1, 2, 4)).reshape(b, t, k * g, h)


def _reduce_to(x, shape):
  """Sums x over the axes where `shape` has size 1 (the adjoint of broadcasting)."""
  axes = tuple(i for i, (a, b) in enumerate(zip(x.shape, shape, strict=True)) if b == 1 and a != 1)
  return jnp.sum(x, axis=axes, keepdims=True) if axes else x


class _Tiles:
  """Padded operands and the per-tile logits/keep computation shared by all passes."""

  def __init__(self, st: _Static, q, k, v, bias, extras: _Extras):
    self.st = st
    B, _, N, H = q.shape
    K = k.shape[2]
    self.qb, self.kb = num_blocks(st.seq_q, st.block_q), num_blocks(st.seq_k, st.block_k)
    self.tq, self.tk = self.qb * st.block_q, self.kb * st.block_k
    # Head-major layouts ([B,K,G,T,H], [B,K,S,H]): every tile product below is then a
    # batched matmul over (b, k) whose output needs no transpose.
    self.q = to_head_major(_pad_to(q, 1, self.tq), K)
    self.k = jnp.swapaxes(_pad_to(k, 1, self.tk), 1, 2)
    self.v = jnp.swapaxes(_pad_to(v, 1, self.tk), 1, 2)
    self.bias = None
    if bias is not None:
      self.bias = _split_heads(_pad_to(_pad_to(bias, 2, self.tq), 3, self.tk), st.groups)
    self.mask = None
    if extras.dense_mask is not None:
      m = _pad_to(_pad_to(extras.dense_mask, 2, self.tq, False), 3, self.tk, False)
      self.mask = _split_heads(m, st.groups)
    self.seg = None
    if extras.segment_ids is not None:
      q_ids, kv_ids = extras.segment_ids
      self.seg = (_pad_to(q_ids, 1, self.tq, -1), _pad_to(kv_ids, 1, self.tk, -2))
    self.pos = None
    if extras.positions is not None:  # padded rows/keys are dropped by the padding checks
      q_pos, kv_pos = extras.positions
      self.pos = (_pad_to(q_pos, 3, self.tq), _pad_to(kv_pos, 3, self.tk))
    self.needs_key_padding = self.tk != st.seq_k

  def q_tile(self, x, i, axis=3):
    """Rows of q tile i of a [B,K,G,T,...] array (axis=1 for [B,T] segment ids)."""
    return lax.dynamic_slice_in_dim(x, i * self.st.block_q, self.st.block_q, axis=axis)

  def k_tile(self, x, j, axis=2):
    """Rows of kv tile j of a [B,K,S,...] array (axis=1 for [B,S] segment ids)."""
    return lax.dynamic_slice_in_dim(x, j * self.st.block_k, self.st.block_k, axis=axis)

  def _elem_tile(self, x, i, j):
    bq, bk = self.st.block_q, self.st.block_k
    x = lax.dynamic_slice_in_dim(x, i * bq, bq, axis=3)
    return lax.dynamic_slice_in_dim(x, j * bk, bk, axis=4)

  def logits(self, q_t, k_t, i, j, partial):
    """Returns (s [B,K,G,bq,bk] fp32 after soft-cap and bias, keep or None, tanh or None)."""
    st = self.st
    s = jnp.einsum("bkgqh,bksh->bkgqs", q_t, k_t, preferred_element_type=jnp.float32)
    s, tanh = soft_cap(s * st.scale, st.soft_cap)
    if self.bias is not None:
      s = s + self._elem_tile(self.bias, i, j).astype(jnp.float32)
    keep = None

    def conj(a, b):
      b = b.reshape((1,) * (5 - b.ndim) + b.shape)
      return b if a is None else a & b

    q_pos = i * st.block_q + lax.broadcasted_iota(jnp.int32, (st.block_q, st.block_k), 0)
    k_pos = j * st.block_k + lax.broadcasted_iota(jnp.int32, (st.block_q, st.block_k), 1)
    if st.structured is not None and self.pos is not None:
      # A permuted layout: the predicate reads the original positions, in every tile.
      orig_q = lax.dynamic_slice_in_dim(self.pos[0], i * st.block_q, st.block_q, axis=3)
      orig_k = lax.dynamic_slice_in_dim(self.pos[1], j * st.block_k, st.block_k, axis=3)
      keep = conj(keep, st.structured.predicate(orig_q[..., :, None], orig_k[..., None, :], jnp))
    elif st.structured is not None:
      pred = lambda: jnp.broadcast_to(st.structured.predicate(q_pos, k_pos, jnp), q_pos.shape)
      keep = conj(keep, lax.cond(partial > 0, pred, lambda: jnp.ones(q_pos.shape, bool)))
    if self.needs_key_padding:
      keep = conj(keep, k_pos < st.seq_k)
    if self.mask is not None:
      keep = conj(keep, self._elem_tile(self.mask, i, j))
    if self.seg is not None:
      q_ids = self.q_tile(self.seg[0], i, axis=1)[:, None, None, :, None]
      kv_ids = self.k_tile(self.seg[1], j, axis=1)[:, None, None, None, :]
      keep = conj(keep, q_ids == kv_ids)
    return s, keep, tanh


def _masked(s, keep):
  return s if keep is None else jnp.where(keep, s, -jnp.inf)


def _pv(p, v_t):
  """P @ V of a head-major tile: [B,K,G,bq,bk] x [B,K,bk,Hv] -> [B,K,G,bq,Hv] fp32."""
  return jnp.einsum("bkgqs,bksv->bkgqv", p, v_t, preferred_element_type=jnp.float32)


# ------------------------------------------------------------------ forward


def _forward(st: _Static, q, k, v, bias, extras):
  tiles = _Tiles(st, q, k, v, bias, extras)
  B, K, G, _, _ = tiles.q.shape
  Hv = v.shape[-1]
  tab = extras.tables
  kv_idx, kv_cnt, kv_part = tab.kv_idx, tab.kv_cnt, tab.kv_part

  def q_block(i):
    q_t = tiles.q_tile(tiles.q, i)

    def step(t, carry):
      j = kv_idx[i, t]
      s, keep, _ = tiles.logits(q_t, tiles.k_tile(tiles.k, j), i, j, kv_part[i, t])
      return online_softmax_step(_masked(s, keep), tiles.k_tile(tiles.v, j), *carry, dot=_pv)

    init = online_softmax_init((B, K, G, st.block_q), Hv)
    return finalize(*lax.fori_loop(0, kv_cnt[i], step, init))

  out, lse = lax.map(q_block, jnp.arange(tiles.qb))  # [Qb,B,K,G,bq,Hv], [Qb,B,K,G,bq,1]
  out = jnp.moveaxis(out, 0, 3).reshape(B, K, G, tiles.tq, Hv)
  lse = jnp.moveaxis(lse, 0, 3).reshape(B, K, G, tiles.tq, 1)
  out_btnv = from_head_major(out)[:, : st.seq_q]
  return out_btnv.astype(q.dtype), lse


# ------------------------------------------------------------------ custom_vjp


def _public_lse(st: _Static, lse_hm):
  """Internal [B,K,G,tq,1] (+inf for rows with no kept key) -> [B,T,N] fp32 (-inf there)."""
  lse = from_head_major(lse_hm)[:, : st.seq_q, :, 0]
  return jnp.where(jnp.isposinf(lse), -jnp.inf, lse)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(st, q, k, v, bias, extras):
  """(out [B,T,N,Hv], lse [B,T,N] fp32); both differentiable."""
  out, lse = _forward(st, q, k, v, bias, extras)
  return out, _public_lse(st, lse)


def _attention_fwd(st, q, k, v, bias, extras):
  out, lse = _forward(st, q, k, v, bias, extras)
  return (out, _public_lse(st, lse)), (q, k, v, bias, extras, out, lse)


def _attention_bwd(st, res, cotangents):
  d_out, d_lse = cotangents
  q, k, v, bias, extras, out, lse = res
  tiles = _Tiles(st, q, k, v, bias, extras)
  B, K, G, _, H = tiles.q.shape
  Hv = v.shape[-1]
  tab = extras.tables
  do = to_head_major(_pad_to(d_out, 1, tiles.tq), K).astype(jnp.float32)
  o = to_head_major(_pad_to(out, 1, tiles.tq), K).astype(jnp.float32)
  delta = jnp.sum(do * o, axis=-1, keepdims=True)  # rowsum(dO * O), FlashAttention-2 "D"
  # d lse_i / d s_ij = P_ij, so an lse cotangent g_i enters dS = P ⊙ (dP − D) as D − g.
  g = to_head_major(_pad_to(d_lse.astype(jnp.float32)[..., None], 1, tiles.tq), K)
  delta = delta - jnp.where(jnp.isinf(lse), 0.0, g)

  def row_stats(i):
    sl = lambda x: lax.dynamic_slice_in_dim(x, i * st.block_q, st.block_q, axis=3)
    return sl(lse), sl(delta)

  def tile_grads(i, j, partial, q_t, do_t):
    """P, dS (w.r.t. the post-cap logits, = d bias) and dS_raw (w.r.t. scale * q.k)."""
    s, keep, tanh = tiles.logits(q_t, tiles.k_tile(tiles.k, j), i, j, partial)
    v_t = tiles.k_tile(tiles.v, j)
    dp = jnp.einsum("bkgqv,bksv->bkgqs", do_t, v_t, preferred_element_type=jnp.float32)
    lse_t, delta_t = row_stats(i)
    p, ds = probs_and_dlogits(_masked(s, keep), lse_t, dp, delta_t)
    return p, ds, soft_cap_vjp(ds, tanh)

  if st.slot_backward and bias is None:
    dq, dk, dv = _slot_grads(st, tiles, tab, do, tile_grads)
    extras_ct = jax.tree.map(lambda _: None, extras)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, extras_ct

  # One pass over kv tiles (the transposed tables): each tile's dK/dV accumulate in the loop
  # carry, while its dQ (and d bias) contributions are added into O(T·H) buffers in place.
  # Recomputing the tiles once instead of in separate dQ and dK/dV passes saves two of
  # seven tile matmuls.
  q_idx, q_cnt, q_part = tab.q_idx, tab.q_cnt, tab.q_part

  def kv_block(carry, j):
    k_t = tiles.k_tile(tiles.k, j).astype(jnp.float32)

    def step(t, c):
      dk_t, dv_t, dq_buf, dbias_buf = c
      i = q_idx[j, t]
      q_t, do_t = tiles.q_tile(tiles.q, i), tiles.q_tile(do, i)
      p, ds, ds_raw = tile_grads(i, j, q_part[j, t], q_t, do_t)
      dv_t = dv_t + jnp.einsum("bkgqs,bkgqv->bksv", p, do_t)
      dk_t = dk_t + jnp.einsum("bkgqs,bkgqh->bksh", ds_raw, q_t.astype(jnp.float32)) * st.scale
      dq_t = tiles.q_tile(dq_buf, i) + jnp.einsum("bkgqs,bksh->bkgqh", ds_raw, k_t) * st.scale
      dq_buf = lax.dynamic_update_slice_in_dim(dq_buf, dq_t, i * st.block_q, axis=3)
      if dbias_buf is not None:
        tile = _reduce_to(ds, dbias_buf.shape[:3] + ds.shape[3:]).astype(dbias_buf.dtype)
        dbias_buf = lax.dynamic_update_slice(
          dbias_buf, tile, (0, 0, 0, i * st.block_q, j * st.block_k)
        )
      return dk_t, dv_t, dq_buf, dbias_buf

    init = (
      jnp.zeros((B, K, st.block_k, H), jnp.float32),
      jnp.zeros((B, K, st.block_k, Hv), jnp.float32),
      *carry,
    )
    dk_t, dv_t, dq_buf, dbias_buf = lax.fori_loop(0, q_cnt[j], step, init)
    return (dq_buf, dbias_buf), (dk_t, dv_t)

  dbias0 = None if tiles.bias is None else jnp.zeros(tiles.bias.shape, jnp.float32)
  dq0 = jnp.zeros((B, K, G, tiles.tq, H), jnp.float32)
  (dq, dbias), (dk, dv) = lax.scan(kv_block, (dq0, dbias0), jnp.arange(tiles.kb))
  # dk, dv: [Kb, B, K, bk, H]

  def kv_rows(x):  # [Kb, B, K, bk, X] -> [B, S, K, X]
    kb, b, kk, bk, x_dim = x.shape
    return jnp.transpose(x, (1, 0, 3, 2, 4)).reshape(b, kb * bk, kk, x_dim)[:, : st.seq_k]

  dk, dv = kv_rows(dk), kv_rows(dv)
  dq = from_head_major(dq)[:, : st.seq_q]
  d_bias = None
  if bias is not None:
    b, n = bias.shape[:2]
    d_bias = dbias.reshape(b, n, tiles.tq, tiles.tk)[:, :, : st.seq_q, : st.seq_k]
    d_bias = d_bias.astype(bias.dtype)
  extras_ct = jax.tree.map(lambda _: None, extras)
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), d_bias, extras_ct


def _slot_grads(st, tiles, tab, do, tile_grads):
  """(dq [B,T,N,H], dk [B,S,K,H], dv [B,S,K,Hv]) fp32 in one pass over the forward tables.

  Each q tile walks its listed kv tiles with dQ in the loop carry; the dK/dV contribution of
  visit t is written to slot t of a [Mk, ...] buffer (the loop index, the same in every vmap
  instance, so the write stays in place), and the q tile's slots are added into the dK/dV
  accumulators by kv tile once per q tile. No per-visit scatter and no walk of the transposed
  tables, whose counts differ between heads (under vmap every instance would run to the
  largest)."""
  B, K, G, _, H = tiles.q.shape
  Hv = tiles.v.shape[-1]
  width = tab.kv_idx.shape[1]

  def q_block(i):
    q_t, do_t = tiles.q_tile(tiles.q, i), tiles.q_tile(do, i)

    def step(t, c):
      dq_t, dk_slots, dv_slots = c
      j = tab.kv_idx[i, t]
      p, _, ds_raw = tile_grads(i, j, tab.kv_part[i, t], q_t, do_t)
      k_t = tiles.k_tile(tiles.k, j).astype(jnp.float32)
      dq_t = dq_t + jnp.einsum("bkgqs,bksh->bkgqh", ds_raw, k_t) * st.scale
      dv = jnp.einsum("bkgqs,bkgqv->bksv", p, do_t)
      dk = jnp.einsum("bkgqs,bkgqh->bksh", ds_raw, q_t.astype(jnp.float32)) * st.scale
      dk_slots = lax.dynamic_update_index_in_dim(dk_slots, dk, t, axis=0)
      dv_slots = lax.dynamic_update_index_in_dim(dv_slots, dv, t, axis=0)
      return dq_t, dk_slots, dv_slots

    init = (
      jnp.zeros((B, K, G, st.block_q, H), jnp.float32),
      jnp.zeros((width, B, K, st.block_k, H), jnp.float32),
      jnp.zeros((width, B, K, st.block_k, Hv), jnp.float32),
    )
    return lax.fori_loop(0, tab.kv_cnt[i], step, init)

  # A q tile's slots are added into the dK/dV accumulators (the scan carry) by kv tile index:
  # one scatter-add of Mk tiles per q tile, O(S · H) memory (10 % faster than stacking every
  # slot and one segment sum at the end, which took O(visited tiles · bk · H)).
  def row(acc, i):
    dq_i, dk_s, dv_s = q_block(i)
    ids = jnp.clip(tab.kv_idx[i], 0, tiles.kb - 1)
    return (acc[0].at[ids].add(dk_s), acc[1].at[ids].add(dv_s)), dq_i

  acc0 = (
    jnp.zeros((tiles.kb, B, K, st.block_k, H), jnp.float32),
    jnp.zeros((tiles.kb, B, K, st.block_k, Hv), jnp.float32),
  )
  (dk, dv), dq = lax.scan(row, acc0, jnp.arange(tiles.qb))
  dq = jnp.moveaxis(dq, 0, 3).reshape(B, K, G, tiles.tq, H)

  def kv_rows(x):  # [Kb, B, K, bk, X] -> [B, S, K, X]
    kb, b, kk, bk, x_dim = x.shape
    return jnp.transpose(x, (1, 0, 3, 2, 4)).reshape(b, kb * bk, kk, x_dim)[:, : st.seq_k]

  return from_head_major(dq)[:, : st.seq_q], kv_rows(dk), kv_rows(dv)


_attention.defvjp(_attention_fwd, _attention_bwd)
