"""TPU (Mosaic) kernels for tiled decayed linear attention.

Grid (B, N, T/C) with the block axis "arbitrary" (sequential): each step loads one [C, H] tile,
and the [H, V] fp32 state lives in a VMEM scratch buffer that persists across the block axis. The
per-head log-decays [N] sit in SMEM. Backward = two kernels (Algorithm 2 of Lightning
Attention-2): dQ walks the blocks forward recomputing the state; dK/dV walks them in reverse (the
index maps read block T/C - 1 - c) carrying the state cotangent.

Grouped-query heads: k/v index maps read kv head n // G; dK/dV come out per query head and the
caller sums each group. Layout and padding contract as in kernel_gpu.py.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels import compat
from pallas_kernels.compat import pl, pltpu
from pallas_kernels.linear import tiles

_SEMANTICS = ("parallel", "parallel", "arbitrary")


def _specs(q_shape, v_shape, groups, block, *, reverse):
  h, vd = q_shape[3], v_shape[3]
  num_blocks = q_shape[2] // block
  blk = (lambda c: num_blocks - 1 - c) if reverse else (lambda c: c)
  q_spec = pl.BlockSpec((None, None, block, h), lambda b, n, c: (b, n, blk(c), 0))
  k_spec = pl.BlockSpec((None, None, block, h), lambda b, n, c: (b, lax.div(n, groups), blk(c), 0))
  v_spec = pl.BlockSpec((None, None, block, vd), lambda b, n, c: (b, lax.div(n, groups), blk(c), 0))
  qv_spec = pl.BlockSpec((None, None, block, vd), lambda b, n, c: (b, n, blk(c), 0))
  state_spec = pl.BlockSpec((None, None, h, vd), lambda b, n, c: (b, n, 0, 0))
  decay_spec = pl.BlockSpec(memory_space=pltpu.SMEM)
  return q_spec, k_spec, v_spec, qv_spec, state_spec, decay_spec


def _forward_kernel(
  q_ref, k_ref, v_ref, s_ref, state0_ref, o_ref, state_out_ref, state_ref, *, block, seq_len
):
  c = pl.program_id(2)

  @pl.when(c == 0)
  def _():
    state_ref[...] = state0_ref[...].astype(jnp.float32)

  factors = tiles.decay_factors(s_ref[pl.program_id(1)], c, block=block, seq_len=seq_len)
  out, state_ref[...] = tiles.forward_block(
    q_ref[...], k_ref[...], v_ref[...], state_ref[...], factors
  )
  o_ref[...] = out.astype(o_ref.dtype)

  @pl.when(c == pl.num_programs(2) - 1)
  def _():
    state_out_ref[...] = state_ref[...]


def _dq_kernel(
  q_ref, k_ref, v_ref, do_ref, s_ref, state0_ref, dq_ref, state_ref, *, block, seq_len
):
  c = pl.program_id(2)

  @pl.when(c == 0)
  def _():
    state_ref[...] = state0_ref[...].astype(jnp.float32)

  factors = tiles.decay_factors(s_ref[pl.program_id(1)], c, block=block, seq_len=seq_len)
  k, v, state = k_ref[...], v_ref[...], state_ref[...]
  dq_ref[...] = tiles.dq_block(k, v, do_ref[...], state, factors).astype(dq_ref.dtype)
  _, state_ref[...] = tiles.forward_block(q_ref[...], k, v, state, factors)


def _dkv_kernel(
  q_ref,
  k_ref,
  v_ref,
  do_ref,
  s_ref,
  d_state_ref,
  dk_ref,
  dv_ref,
  d_state0_ref,
  d_state_scratch,
  *,
  block,
  seq_len,
):
  c = pl.program_id(2)
  num_blocks = pl.num_programs(2)

  @pl.when(c == 0)
  def _():
    d_state_scratch[...] = d_state_ref[...]

  factors = tiles.decay_factors(
    s_ref[pl.program_id(1)], num_blocks - 1 - c, block=block, seq_len=seq_len
  )
  dk, dv, d_state_scratch[...] = tiles.dkv_block(
    q_ref[...], k_ref[...], v_ref[...], do_ref[...], d_state_scratch[...], factors
  )
  dk_ref[...] = dk.astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)

  @pl.when(c == num_blocks - 1)
  def _():
    d_state0_ref[...] = d_state_scratch[...]


def forward(
  q,
  k,
  v,
  log_decay,
  state0,
  *,
  block,
  seq_len,
  block_v=None,
  interpret=False,
  num_warps=None,
  num_stages=None,
):
  """Returns (out [B,N,T,V] q.dtype, final state [B,N,H,V] fp32). GPU-only knobs are ignored."""
  del block_v, num_warps, num_stages
  b, n, t, h = q.shape
  vd = v.shape[3]
  q_spec, k_spec, v_spec, qv_spec, state_spec, decay_spec = _specs(
    q.shape, v.shape, n // k.shape[1], block, reverse=False
  )
  return pl.pallas_call(
    functools.partial(_forward_kernel, block=block, seq_len=seq_len),
    grid=(b, n, t // block),
    in_specs=[q_spec, k_spec, v_spec, decay_spec, state_spec],
    out_specs=[qv_spec, state_spec],
    out_shape=[
      jax.ShapeDtypeStruct((b, n, t, vd), q.dtype),
      jax.ShapeDtypeStruct((b, n, h, vd), jnp.float32),
    ],
    scratch_shapes=[pltpu.VMEM((h, vd), jnp.float32)],
    compiler_params=compat.tpu_compiler_params(_SEMANTICS),
    interpret=interpret,
    name="linear_attention_fwd",
  )(q, k, v, log_decay, state0)


def backward(
  q,
  k,
  v,
  do,
  log_decay,
  state0,
  d_state,
  *,
  block,
  seq_len,
  block_v=None,
  interpret=False,
  num_warps=None,
  num_stages=None,
):
  """Returns fp32 (dq [B,N,T,H], dk [B,N,T,H], dv [B,N,T,V], d_state0 [B,N,H,V]), per query head."""
  del block_v, num_warps, num_stages
  b, n, t, h = q.shape
  vd = v.shape[3]
  f32 = jnp.float32
  groups = n // k.shape[1]
  q_spec, k_spec, v_spec, qv_spec, state_spec, decay_spec = _specs(
    q.shape, v.shape, groups, block, reverse=False
  )
  dq = pl.pallas_call(
    functools.partial(_dq_kernel, block=block, seq_len=seq_len),
    grid=(b, n, t // block),
    in_specs=[q_spec, k_spec, v_spec, qv_spec, decay_spec, state_spec],
    out_specs=q_spec,
    out_shape=jax.ShapeDtypeStruct((b, n, t, h), f32),
    scratch_shapes=[pltpu.VMEM((h, vd), f32)],
    compiler_params=compat.tpu_compiler_params(_SEMANTICS),
    interpret=interpret,
    name="linear_attention_bwd_dq",
  )(q, k, v, do, log_decay, state0)
  q_spec, k_spec, v_spec, qv_spec, state_spec, decay_spec = _specs(
    q.shape, v.shape, groups, block, reverse=True
  )
  dk, dv, d_state0 = pl.pallas_call(
    functools.partial(_dkv_kernel, block=block, seq_len=seq_len),
    grid=(b, n, t // block),
    in_specs=[q_spec, k_spec, v_spec, qv_spec, decay_spec, state_spec],
    out_specs=[q_spec, qv_spec, state_spec],
    out_shape=[
      jax.ShapeDtypeStruct((b, n, t, h), f32),
      jax.ShapeDtypeStruct((b, n, t, vd), f32),
      jax.ShapeDtypeStruct((b, n, h, vd), f32),
    ],
    scratch_shapes=[pltpu.VMEM((h, vd), f32)],
    compiler_params=compat.tpu_compiler_params(_SEMANTICS),
    interpret=interpret,
    name="linear_attention_bwd_dkv",
  )(q, k, v, do, log_decay, d_state)
  return dq, dk, dv, d_state0
