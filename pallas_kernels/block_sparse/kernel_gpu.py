"""GPU lowering of block-sparse flash attention: Pallas on the Triton backend.

Grid (B, N, Qb) for the forward and dQ passes: each program owns one q tile of one query
head and runs `lax.fori_loop` over the `kv_counts` active kv tiles its BlockMap row lists
(a dynamic trip count). Grid (B, K, Kb) for the dK/dV pass: each program owns one kv tile
of one kv head and loops over the G query heads of its group and, per head, the q tiles of
the transposed tables. The Triton backend has no scalar prefetch, so the int32 tables are
ordinary inputs read element by element. K/V (forward, dQ) and Q/dO (dK/dV) are mapped
whole per head and sliced with `pl.ds` inside the loop, as the tables are dynamic.

Mask tables (`mask_tables=`) are further whole-array inputs, read by the predicate through
`table_masks.TableView` gathers. The tile math (masking, online softmax, backward tile) is
`tiles.py`, shared with `kernel_tpu` and the jnp paths.

Layout: [B, T_pad, N, H] in, [B, T_pad, N, Hv] out (padded by `ops`), lse [B, N, T_pad].
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels import compat
from pallas_kernels.block_sparse.config import KernelConfig
from pallas_kernels.block_sparse.table_masks import gpu_keep_fn
from pallas_kernels.block_sparse.tiles import (
  F32,
  backward_tile,
  finalize,
  masked_logits,
  online_softmax_init,
  online_softmax_step,
  tile_logits,
)
from pallas_kernels.compat import pl


def _split_refs(refs, cfg: KernelConfig):
  """(mask table refs, (seg_q_ref, seg_k_ref) or None, remaining refs) of a kernel."""
  n = len(cfg.table_dtypes)
  tables, refs = refs[:n], refs[n:]
  if cfg.has_segments:
    return tables, refs[:2], refs[2:]
  return tables, None, refs


# ------------------------------------------------------------------ kernels


def _group_index(groups: int, i):
  return i if groups > 1 else 0


def _fwd_kernel(kv_idx_ref, kv_cnt_ref, kv_part_ref, *refs, cfg: KernelConfig, heads_map: int):
  table_refs, seg_refs, (q_ref, k_ref, v_ref, o_ref, lse_ref) = _split_refs(refs, cfg)
  if seg_refs:
    seg_q_ref, seg_k_ref = seg_refs
  keep_fn = gpu_keep_fn(cfg, table_refs)
  n, i = pl.program_id(1), pl.program_id(2)
  nm = _group_index(heads_map, n)
  bq, bk = cfg.block_q, cfg.block_k
  q = q_ref[...]
  seg_q = seg_q_ref[...][:, None] if cfg.has_segments else None

  def body(t, carry):
    j = kv_idx_ref[nm, i, t]
    start = pl.multiple_of(j * bk, bk)
    s, _ = tile_logits(q, k_ref[pl.ds(start, bk), :], cfg)
    seg_k = seg_k_ref[pl.ds(start, bk)][None, :] if cfg.has_segments else None
    s = masked_logits(s, i * bq, start, kv_part_ref[nm, i, t], seg_q, seg_k, cfg, keep_fn)
    return online_softmax_step(s, v_ref[pl.ds(start, bk), :], *carry)

  init = online_softmax_init((bq,), v_ref.shape[-1])
  out, lse = finalize(*lax.fori_loop(0, kv_cnt_ref[nm, i], body, init))
  o_ref[...] = out.astype(o_ref.dtype)
  lse_ref[...] = lse[:, 0]


def _dq_kernel(kv_idx_ref, kv_cnt_ref, kv_part_ref, *refs, cfg: KernelConfig, heads_map: int):
  table_refs, seg_refs, rest = _split_refs(refs, cfg)
  q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref = rest
  if seg_refs:
    seg_q_ref, seg_k_ref = seg_refs
  keep_fn = gpu_keep_fn(cfg, table_refs)
  n, i = pl.program_id(1), pl.program_id(2)
  nm = _group_index(heads_map, n)
  bq, bk = cfg.block_q, cfg.block_k
  q, do = q_ref[...], do_ref[...]
  lse, delta = lse_ref[...][:, None], delta_ref[...][:, None]
  seg_q = seg_q_ref[...][:, None] if cfg.has_segments else None

  def body(t, dq):
    j = kv_idx_ref[nm, i, t]
    start = pl.multiple_of(j * bk, bk)
    k = k_ref[pl.ds(start, bk), :]
    seg_k = seg_k_ref[pl.ds(start, bk)][None, :] if cfg.has_segments else None
    ds, _ = backward_tile(
      q,
      k,
      v_ref[pl.ds(start, bk), :],
      do,
      lse,
      delta,
      i * bq,
      start,
      kv_part_ref[nm, i, t],
      seg_q,
      seg_k,
      cfg,
      keep_fn,
    )
    return dq + jnp.dot(ds.astype(k.dtype), k, preferred_element_type=F32)

  dq = lax.fori_loop(0, kv_cnt_ref[nm, i], body, jnp.zeros(q.shape, F32))
  dq_ref[...] = (dq * cfg.scale).astype(dq_ref.dtype)


def _dkdv_kernel(
  q_idx_ref, q_cnt_ref, q_part_ref, *refs, cfg: KernelConfig, heads_map: int, group: int
):
  table_refs, seg_refs, rest = _split_refs(refs, cfg)
  q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref = rest
  if seg_refs:
    seg_q_ref, seg_k_ref = seg_refs
  keep_fn = gpu_keep_fn(cfg, table_refs)
  kh, j = pl.program_id(1), pl.program_id(2)
  bq, bk = cfg.block_q, cfg.block_k
  k, v = k_ref[...], v_ref[...]
  seg_k = seg_k_ref[...][None, :] if cfg.has_segments else None
  dk = jnp.zeros(k.shape, F32)
  dv = jnp.zeros(v.shape, F32)
  for g in range(group):  # static: the G query heads sharing this kv head
    nm = _group_index(heads_map, kh * group + g)

    def body(t, carry, g=g, nm=nm):
      dk, dv = carry
      i = q_idx_ref[nm, j, t]
      start = pl.multiple_of(i * bq, bq)
      rows = pl.ds(start, bq)
      q, do = q_ref[rows, g, :], do_ref[rows, g, :]
      lse, delta = lse_ref[g, rows][:, None], delta_ref[g, rows][:, None]
      seg_q = seg_q_ref[rows][:, None] if cfg.has_segments else None
      ds, p = backward_tile(
        q, k, v, do, lse, delta, start, j * bk, q_part_ref[nm, j, t], seg_q, seg_k, cfg, keep_fn
      )
      dv = dv + jnp.dot(p.astype(do.dtype).T, do, preferred_element_type=F32)
      dk = dk + jnp.dot(ds.astype(q.dtype).T, q, preferred_element_type=F32)
      return dk, dv

    dk, dv = lax.fori_loop(0, q_cnt_ref[nm, j], body, (dk, dv))
  dk_ref[...] = (dk * cfg.scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


# ------------------------------------------------------------------ pallas_call wrappers


def _table_specs(tables):
  """Whole per-batch-group tables [Nm, rows, width] as ordinary inputs (read by element).

  Only scalars are ever loaded from them, so their shapes need not be powers of two.
  """
  specs = []
  for table in tables:
    bm = table.shape[0]

    def index_map(b, *_, bm=bm, ndim=table.ndim):
      return (_group_index(bm, b),) + (0,) * (ndim - 1)

    specs.append(pl.BlockSpec((None, *table.shape[1:]), index_map))
  return specs


def _whole_specs(arrays):
  """Whole-array BlockSpecs (any grid): the mask tables, gathered from by position."""
  return [pl.BlockSpec(a.shape, lambda *_, nd=a.ndim: (0,) * nd) for a in arrays]


def _params(cfg: KernelConfig, interpret: bool):
  if interpret:
    return {}
  return dict(compiler_params=compat.triton_compiler_params(cfg.num_warps, cfg.num_stages))


def forward(q, k, v, kv_tables, segments, mask_inputs, cfg: KernelConfig):
  """q [B, Tp, N, H], k [B, Sp, K, H], v [B, Sp, K, Hv] -> (out [B, Tp, N, Hv], lse [B, N, Tp]).

  `mask_inputs`: what `prepare_tables` returned (empty without mask tables).
  """
  B, Tp, N, H = q.shape
  _, Sp, K, Hv = v.shape
  G, bq = N // K, cfg.block_q
  heads_map = kv_tables[0].shape[1]
  seg_specs, seg_args = [], []
  if cfg.has_segments:
    seg_specs = [
      pl.BlockSpec((None, bq), lambda b, n, i: (b, i)),
      pl.BlockSpec((None, Sp), lambda b, n, i: (b, 0)),
    ]
    seg_args = list(segments)
  in_specs = [
    *_table_specs(kv_tables),
    *_whole_specs(mask_inputs),
    *seg_specs,
    pl.BlockSpec((None, bq, None, H), lambda b, n, i: (b, i, n, 0)),
    pl.BlockSpec((None, Sp, None, H), lambda b, n, i: (b, 0, n // G, 0)),
    pl.BlockSpec((None, Sp, None, Hv), lambda b, n, i: (b, 0, n // G, 0)),
  ]
  out_specs = [
    pl.BlockSpec((None, bq, None, Hv), lambda b, n, i: (b, i, n, 0)),
    pl.BlockSpec((None, None, bq), lambda b, n, i: (b, n, i)),
  ]
  out_shape = [
    jax.ShapeDtypeStruct((B, Tp, N, Hv), q.dtype),
    jax.ShapeDtypeStruct((B, N, Tp), F32),
  ]
  return pl.pallas_call(
    functools.partial(_fwd_kernel, cfg=cfg, heads_map=heads_map),
    grid=(B, N, Tp // bq),
    in_specs=in_specs,
    out_specs=out_specs,
    out_shape=out_shape,
    interpret=cfg.interpret,
    name="block_sparse_fwd",
    **_params(cfg, cfg.interpret),
  )(*kv_tables, *mask_inputs, *seg_args, q, k, v)


def backward(
  q, k, v, do, lse, delta, kv_tables, q_tables, segments, mask_inputs, cfg: KernelConfig
):
  """Returns (dq, dk, dv) in the padded layouts of q, k, v; lse, delta [B, N, Tp] fp32."""
  B, Tp, N, H = q.shape
  _, Sp, K, Hv = v.shape
  G, bq, bk = N // K, cfg.block_q, cfg.block_k
  heads_map = kv_tables[0].shape[1]
  seg_args = list(segments) if cfg.has_segments else []

  seg_specs = []
  if cfg.has_segments:
    seg_specs = [
      pl.BlockSpec((None, bq), lambda b, n, i: (b, i)),
      pl.BlockSpec((None, Sp), lambda b, n, i: (b, 0)),
    ]
  dq = pl.pallas_call(
    functools.partial(_dq_kernel, cfg=cfg, heads_map=heads_map),
    grid=(B, N, Tp // bq),
    in_specs=[
      *_table_specs(kv_tables),
      *_whole_specs(mask_inputs),
      *seg_specs,
      pl.BlockSpec((None, bq, None, H), lambda b, n, i: (b, i, n, 0)),
      pl.BlockSpec((None, Sp, None, H), lambda b, n, i: (b, 0, n // G, 0)),
      pl.BlockSpec((None, Sp, None, Hv), lambda b, n, i: (b, 0, n // G, 0)),
      pl.BlockSpec((None, bq, None, Hv), lambda b, n, i: (b, i, n, 0)),
      pl.BlockSpec((None, None, bq), lambda b, n, i: (b, n, i)),
      pl.BlockSpec((None, None, bq), lambda b, n, i: (b, n, i)),
    ],
    out_specs=pl.BlockSpec((None, bq, None, H), lambda b, n, i: (b, i, n, 0)),
    out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
    interpret=cfg.interpret,
    name="block_sparse_dq",
    **_params(cfg, cfg.interpret),
  )(*kv_tables, *mask_inputs, *seg_args, q, k, v, do, lse, delta)

  seg_specs = []
  if cfg.has_segments:
    seg_specs = [
      pl.BlockSpec((None, Tp), lambda b, h, j: (b, 0)),
      pl.BlockSpec((None, bk), lambda b, h, j: (b, j)),
    ]
  dk, dv = pl.pallas_call(
    functools.partial(_dkdv_kernel, cfg=cfg, heads_map=heads_map, group=G),
    grid=(B, K, Sp // bk),
    in_specs=[
      *_table_specs(q_tables),
      *_whole_specs(mask_inputs),
      *seg_specs,
      pl.BlockSpec((None, Tp, G, H), lambda b, h, j: (b, 0, h, 0)),
      pl.BlockSpec((None, bk, None, H), lambda b, h, j: (b, j, h, 0)),
      pl.BlockSpec((None, bk, None, Hv), lambda b, h, j: (b, j, h, 0)),
      pl.BlockSpec((None, Tp, G, Hv), lambda b, h, j: (b, 0, h, 0)),
      pl.BlockSpec((None, G, Tp), lambda b, h, j: (b, h, 0)),
      pl.BlockSpec((None, G, Tp), lambda b, h, j: (b, h, 0)),
    ],
    out_specs=[
      pl.BlockSpec((None, bk, None, H), lambda b, h, j: (b, j, h, 0)),
      pl.BlockSpec((None, bk, None, Hv), lambda b, h, j: (b, j, h, 0)),
    ],
    out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
    interpret=cfg.interpret,
    name="block_sparse_dkdv",
    **_params(cfg, cfg.interpret),
  )(*q_tables, *mask_inputs, *seg_args, q, k, v, do, lse, delta)
  return dq, dk, dv
