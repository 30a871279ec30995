"""TPU lowering of block-sparse flash attention: Pallas on Mosaic with scalar prefetch.

The BlockMap tables are flattened to 1-D int32 and prefetched into SMEM
(`pltpu.PrefetchScalarGridSpec`); the BlockSpec index_maps read them to choose which kv (or
q) tile the pipeline DMAs next, so only listed tiles are ever fetched. Padding entries of a
table repeat the last valid index, so the steps past `count` re-map the same block (no new
DMA) and are skipped with `pl.when`.

- forward and dQ: grid (B, N, Qb, Mk); the last axis walks the active kv tiles of q tile i
  ("arbitrary": the running max/sum/accumulator live in VMEM scratch across it).
- dK/dV: grid (B, K, Kb, G, Mq); the last two axes walk the G query heads of kv head kh
  and the active q tiles of kv tile j (from the transposed tables).

Mask tables (`mask_tables=`): Mosaic cannot gather, so XLA evaluates the predicate on the
PARTIAL tiles before the kernels (`table_masks.tpu_inputs`, `keep_tiles`): `keep` int32[P, bq,
bk], and a fourth prefetched table gives each grid step its keep tile, which the pipeline DMAs
beside the K/V tile.

Tile math (masking, online softmax, backward tile) is `tiles.py`, shared with the GPU
lowering. Inputs are transposed to head-major [B, heads, seq, dim] so each block is a
lane-dense [tile, dim] slab; row statistics (lse, delta) travel as [..., seq, 1].
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels import compat
from pallas_kernels.block_sparse.config import KernelConfig
from pallas_kernels.block_sparse.table_masks import keep_tiles
from pallas_kernels.block_sparse.tiles import (
  F32,
  backward_tile,
  finalize,
  masked_logits,
  online_softmax_init,
  online_softmax_step,
  tile_logits,
)
from pallas_kernels.compat import pl, pltpu


def _flat_tables(tables):
  """[Bm, Nm, R, W], [Bm, Nm, R], [Bm, Nm, R, W] -> 1-D (SMEM pads 2-D arrays heavily)."""
  indices, counts, partial = tables
  bm, nm, rows, width = indices.shape
  return (indices.reshape(-1), counts.reshape(-1), partial.reshape(-1)), (bm, nm, rows, width)


def _row(dims, b, n, r):
  bm, nm, rows, _ = dims
  return ((b if bm > 1 else 0) * nm + (n if nm > 1 else 0)) * rows + r


def _head_major(x):
  return jnp.swapaxes(x, 1, 2)


# ------------------------------------------------------------------ forward / dQ


def _split_refs(refs, cfg: KernelConfig):
  """(keep_fn, (seg_q_ref, seg_k_ref) or None, remaining refs) of a kernel.

  With mask tables the refs start with the prefetched slots and the keep tile of the step.
  """
  keep_fn = cfg.mask_fn
  if cfg.table_dtypes:
    _, keep_ref, *refs = refs
    keep_fn = lambda q_pos, k_pos: keep_ref[...] != 0
  if cfg.has_segments:
    return keep_fn, refs[:2], refs[2:]
  return keep_fn, None, refs


def _fwd_kernel(idx_ref, cnt_ref, part_ref, *refs, cfg: KernelConfig, dims):
  keep_fn, seg_refs, rest = _split_refs(refs, cfg)
  q_ref, k_ref, v_ref, o_ref, lse_ref, m_s, l_s, acc_s = rest
  b, n, i, t = (pl.program_id(a) for a in range(4))
  row = _row(dims, b, n, i)
  slot = row * dims[3] + t

  @pl.when(t == 0)
  def _init():
    m_s[...], l_s[...], acc_s[...] = online_softmax_init(m_s.shape[:1], acc_s.shape[1])

  @pl.when(t < cnt_ref[row])
  def _step():
    start = idx_ref[slot] * cfg.block_k
    s, _ = tile_logits(q_ref[...], k_ref[...], cfg)
    seg_q, seg_k = (seg_refs[0][...], seg_refs[1][...]) if seg_refs else (None, None)
    s = masked_logits(s, i * cfg.block_q, start, part_ref[slot], seg_q, seg_k, cfg, keep_fn)
    m, denom, acc = online_softmax_step(s, v_ref[...], m_s[...], l_s[...], acc_s[...])
    m_s[...], l_s[...], acc_s[...] = m, denom, acc

  @pl.when(t == pl.num_programs(3) - 1)
  def _write():
    out, lse = finalize(m_s[...], l_s[...], acc_s[...])
    o_ref[...] = out.astype(o_ref.dtype)
    lse_ref[...] = lse


def _dq_kernel(idx_ref, cnt_ref, part_ref, *refs, cfg: KernelConfig, dims):
  keep_fn, seg_refs, rest = _split_refs(refs, cfg)
  q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, dq_s = rest
  b, n, i, t = (pl.program_id(a) for a in range(4))
  row = _row(dims, b, n, i)
  slot = row * dims[3] + t

  @pl.when(t == 0)
  def _init():
    dq_s[...] = jnp.zeros(dq_s.shape, F32)

  @pl.when(t < cnt_ref[row])
  def _step():
    k = k_ref[...]
    seg_q, seg_k = (seg_refs[0][...], seg_refs[1][...]) if seg_refs else (None, None)
    ds, _ = backward_tile(
      q_ref[...],
      k,
      v_ref[...],
      do_ref[...],
      lse_ref[...],
      delta_ref[...],
      i * cfg.block_q,
      idx_ref[slot] * cfg.block_k,
      part_ref[slot],
      seg_q,
      seg_k,
      cfg,
      keep_fn,
    )
    dq_s[...] += jnp.dot(ds.astype(k.dtype), k, preferred_element_type=F32)

  @pl.when(t == pl.num_programs(3) - 1)
  def _write():
    dq_ref[...] = (dq_s[...] * cfg.scale).astype(dq_ref.dtype)


def _dkdv_kernel(idx_ref, cnt_ref, part_ref, *refs, cfg: KernelConfig, dims, group: int):
  keep_fn, seg_refs, rest = _split_refs(refs, cfg)
  q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, dk_s, dv_s = rest
  b, kh, j, g, t = (pl.program_id(a) for a in range(5))
  row = _row(dims, b, kh * group + g, j)
  slot = row * dims[3] + t

  @pl.when((g == 0) & (t == 0))
  def _init():
    dk_s[...] = jnp.zeros(dk_s.shape, F32)
    dv_s[...] = jnp.zeros(dv_s.shape, F32)

  @pl.when(t < cnt_ref[row])
  def _step():
    q, do = q_ref[...], do_ref[...]
    seg_q, seg_k = (seg_refs[0][...], seg_refs[1][...]) if seg_refs else (None, None)
    ds, p = backward_tile(
      q,
      k_ref[...],
      v_ref[...],
      do,
      lse_ref[...],
      delta_ref[...],
      idx_ref[slot] * cfg.block_q,
      j * cfg.block_k,
      part_ref[slot],
      seg_q,
      seg_k,
      cfg,
      keep_fn,
    )
    dv_s[...] += jnp.dot(p.astype(do.dtype).T, do, preferred_element_type=F32)
    dk_s[...] += jnp.dot(ds.astype(q.dtype).T, q, preferred_element_type=F32)

  @pl.when((g == pl.num_programs(3) - 1) & (t == pl.num_programs(4) - 1))
  def _write():
    dk_ref[...] = (dk_s[...] * cfg.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv_s[...].astype(dv_ref.dtype)


# ------------------------------------------------------------------ pallas_call wrappers


def _q_side_specs(cfg: KernelConfig, H, Hv, G, dims):
  """Specs of the forward/dQ grid (b, n, i, t, *tables)."""
  bq, bk = cfg.block_q, cfg.block_k

  def kv_block(b, n, i, t, idx, *_):
    # lax.div, not //: jnp's floor division emits `sign`, which needs a TPU device to lower.
    return (b, lax.div(n, G), idx[_row(dims, b, n, i) * dims[3] + t], 0)

  def seg_k_block(b, n, i, t, idx, *_):
    return (b, 0, idx[_row(dims, b, n, i) * dims[3] + t])

  q_block = lambda b, n, i, t, *_: (b, n, i, 0)
  seg = []
  if cfg.has_segments:
    seg = [
      pl.BlockSpec((None, bq, 1), lambda b, n, i, t, *_: (b, i, 0)),
      pl.BlockSpec((None, 1, bk), seg_k_block),
    ]
  return seg, dict(
    q=pl.BlockSpec((None, None, bq, H), q_block),
    k=pl.BlockSpec((None, None, bk, H), kv_block),
    v=pl.BlockSpec((None, None, bk, Hv), kv_block),
    o=pl.BlockSpec((None, None, bq, Hv), q_block),
    stat=pl.BlockSpec((None, None, bq, 1), q_block),
  )


def _segments(segments):
  q_ids, kv_ids = segments
  return [q_ids[:, :, None], kv_ids[:, None, :]]


def _keep_operands(keep, mask_inputs, walks: str, cfg: KernelConfig, entry):
  """(prefetch tables, in_specs, args) that give each grid step its keep tile, if any.

  `walks` is "kv" (forward, dQ) or "q" (dK/dV): the tables the grid follows;
  `entry(*grid_indices)` is the flat table entry of a grid step.
  """
  if keep is None:
    return [], [], []
  slots = mask_inputs[2] if walks == "kv" else mask_inputs[3]

  def keep_block(*indices):
    *grid, slots_ref = indices
    return (slots_ref[entry(*grid[:-3])], 0, 0)

  spec = pl.BlockSpec((None, cfg.block_q, cfg.block_k), keep_block)
  return [slots.reshape(-1)], [spec], [keep]


def _keep(mask_inputs, cfg: KernelConfig):
  if not cfg.table_dtypes:
    return None
  tables, tiles, _, _ = mask_inputs
  return keep_tiles(cfg.mask_fn, tables, tiles, cfg)


def forward(q, k, v, kv_tables, segments, mask_inputs, cfg: KernelConfig):
  """Same contract as `kernel_gpu.forward`: [B, Tp, N, H] -> ([B, Tp, N, Hv], lse [B, N, Tp])."""
  B, Tp, N, H = q.shape
  _, Sp, K, Hv = v.shape
  tables, dims = _flat_tables(kv_tables)
  seg, spec = _q_side_specs(cfg, H, Hv, N // K, dims)
  keep_tables, keep_specs, keep_args = _keep_operands(
    _keep(mask_inputs, cfg),
    mask_inputs,
    "kv",
    cfg,
    lambda b, n, i, t: _row(dims, b, n, i) * dims[3] + t,
  )
  grid_spec = pltpu.PrefetchScalarGridSpec(
    num_scalar_prefetch=3 + len(keep_tables),
    grid=(B, N, Tp // cfg.block_q, dims[3]),
    in_specs=[*keep_specs, *seg, spec["q"], spec["k"], spec["v"]],
    out_specs=[spec["o"], spec["stat"]],
    scratch_shapes=[
      pltpu.VMEM((cfg.block_q, 1), F32),
      pltpu.VMEM((cfg.block_q, 1), F32),
      pltpu.VMEM((cfg.block_q, Hv), F32),
    ],
  )
  out, lse = pl.pallas_call(
    functools.partial(_fwd_kernel, cfg=cfg, dims=dims),
    grid_spec=grid_spec,
    out_shape=[
      jax.ShapeDtypeStruct((B, N, Tp, Hv), q.dtype),
      jax.ShapeDtypeStruct((B, N, Tp, 1), F32),
    ],
    compiler_params=compat.tpu_compiler_params(("parallel", "parallel", "parallel", "arbitrary")),
    interpret=cfg.interpret,
    name="block_sparse_fwd",
  )(
    *tables,
    *keep_tables,
    *keep_args,
    *(_segments(segments) if cfg.has_segments else []),
    _head_major(q),
    _head_major(k),
    _head_major(v),
  )
  return _head_major(out), lse[..., 0]


def backward(
  q, k, v, do, lse, delta, kv_tables, q_tables, segments, mask_inputs, cfg: KernelConfig
):
  """Same contract as `kernel_gpu.backward`."""
  B, Tp, N, H = q.shape
  _, Sp, K, Hv = v.shape
  G, bq, bk = N // K, cfg.block_q, cfg.block_k
  seg_args = _segments(segments) if cfg.has_segments else []
  qh, kh, vh, doh = (_head_major(x) for x in (q, k, v, do))
  lse, delta = lse[..., None], delta[..., None]
  keep = _keep(mask_inputs, cfg)

  tables, dims = _flat_tables(kv_tables)
  seg, spec = _q_side_specs(cfg, H, Hv, G, dims)
  keep_tables, keep_specs, keep_args = _keep_operands(
    keep, mask_inputs, "kv", cfg, lambda b, n, i, t: _row(dims, b, n, i) * dims[3] + t
  )
  dq = pl.pallas_call(
    functools.partial(_dq_kernel, cfg=cfg, dims=dims),
    grid_spec=pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=3 + len(keep_tables),
      grid=(B, N, Tp // bq, dims[3]),
      in_specs=[
        *keep_specs,
        *seg,
        spec["q"],
        spec["k"],
        spec["v"],
        spec["o"],
        spec["stat"],
        spec["stat"],
      ],
      out_specs=spec["q"],
      scratch_shapes=[pltpu.VMEM((bq, H), F32)],
    ),
    out_shape=jax.ShapeDtypeStruct(qh.shape, q.dtype),
    compiler_params=compat.tpu_compiler_params(("parallel", "parallel", "parallel", "arbitrary")),
    interpret=cfg.interpret,
    name="block_sparse_dq",
  )(*tables, *keep_tables, *keep_args, *seg_args, qh, kh, vh, doh, lse, delta)

  tables, dims = _flat_tables(q_tables)
  keep_tables, keep_specs, keep_args = _keep_operands(
    keep, mask_inputs, "q", cfg, lambda b, h, j, g, t: _row(dims, b, h * G + g, j) * dims[3] + t
  )

  def q_block(b, h, j, g, t, idx, *_):
    n = h * G + g
    return (b, n, idx[_row(dims, b, n, j) * dims[3] + t], 0)

  def seg_q_block(b, h, j, g, t, idx, *_):
    return (b, idx[_row(dims, b, h * G + g, j) * dims[3] + t], 0)

  kv_block = lambda b, h, j, g, t, *_: (b, h, j, 0)
  seg = []
  if cfg.has_segments:
    seg = [
      pl.BlockSpec((None, bq, 1), seg_q_block),
      pl.BlockSpec((None, 1, bk), lambda b, h, j, g, t, *_: (b, 0, j)),
    ]
  dk, dv = pl.pallas_call(
    functools.partial(_dkdv_kernel, cfg=cfg, dims=dims, group=G),
    grid_spec=pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=3 + len(keep_tables),
      grid=(B, K, Sp // bk, G, dims[3]),
      in_specs=[
        *keep_specs,
        *seg,
        pl.BlockSpec((None, None, bq, H), q_block),
        pl.BlockSpec((None, None, bk, H), kv_block),
        pl.BlockSpec((None, None, bk, Hv), kv_block),
        pl.BlockSpec((None, None, bq, Hv), q_block),
        pl.BlockSpec((None, None, bq, 1), q_block),
        pl.BlockSpec((None, None, bq, 1), q_block),
      ],
      out_specs=[
        pl.BlockSpec((None, None, bk, H), kv_block),
        pl.BlockSpec((None, None, bk, Hv), kv_block),
      ],
      scratch_shapes=[pltpu.VMEM((bk, H), F32), pltpu.VMEM((bk, Hv), F32)],
    ),
    out_shape=[jax.ShapeDtypeStruct(kh.shape, k.dtype), jax.ShapeDtypeStruct(vh.shape, v.dtype)],
    compiler_params=compat.tpu_compiler_params(
      ("parallel", "parallel", "parallel", "arbitrary", "arbitrary")
    ),
    interpret=cfg.interpret,
    name="block_sparse_dkdv",
  )(*tables, *keep_tables, *keep_args, *seg_args, qh, kh, vh, doh, lse, delta)
  return _head_major(dq), _head_major(dk), _head_major(dv)
