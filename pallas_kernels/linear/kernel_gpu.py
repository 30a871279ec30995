"""GPU (Pallas Triton backend) kernels for tiled decayed linear attention.

One program per (batch, query head): grid (B, N) = B·N programs (the forward adds an axis over
value-column slices, `block_v`), each walking its sequence with a `fori_loop` over blocks of C
rows and keeping the fp32 state in registers, as the official Lightning Attention-2 Triton kernel
does. The backward kernel runs Algorithm 2's two passes in
one program: forward over blocks for dQ (recomputing the state), then reverse for dK, dV.

Grouped-query heads: the k/v BlockSpecs map query head n to kv head n // G, so kv heads are read,
never copied. dK and dV come out per query head and the caller sums the G heads of a group.

Inputs are in the kernel layout q [B,N,T,H], k [B,K,T,H], v [B,K,T,V] with T a multiple of C;
`seq_len` (<= T) is the unpadded length. The per-head log-decay [N] is read as a scalar block.
Compiler params are passed explicitly: without them jax >= 0.10 sends the kernel to Mosaic GPU.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels import compat
from pallas_kernels.compat import pl
from pallas_kernels.linear import tiles


def _backward_specs(q_shape, v_shape, groups):
  _, _, t, h = q_shape
  vd = v_shape[3]
  q_spec = pl.BlockSpec((None, None, t, h), lambda b, n: (b, n, 0, 0))
  k_spec = pl.BlockSpec((None, None, t, h), lambda b, n: (b, lax.div(n, groups), 0, 0))
  v_spec = pl.BlockSpec((None, None, t, vd), lambda b, n: (b, lax.div(n, groups), 0, 0))
  qv_spec = pl.BlockSpec((None, None, t, vd), lambda b, n: (b, n, 0, 0))
  state_spec = pl.BlockSpec((None, None, h, vd), lambda b, n: (b, n, 0, 0))
  decay_spec = pl.BlockSpec((None,), lambda b, n: (n,))
  return q_spec, k_spec, v_spec, qv_spec, state_spec, decay_spec


def _forward_kernel(q_ref, k_ref, v_ref, s_ref, state0_ref, o_ref, state_ref, *, block, seq_len):
  s = s_ref[...]
  num_blocks = q_ref.shape[0] // block

  def body(i, state):
    rows = pl.ds(pl.multiple_of(i * block, block), block)
    factors = tiles.decay_factors(s, i, block=block, seq_len=seq_len)
    out, state = tiles.forward_block(q_ref[rows, :], k_ref[rows, :], v_ref[rows, :], state, factors)
    o_ref[rows, :] = out.astype(o_ref.dtype)
    return state

  state_ref[...] = lax.fori_loop(0, num_blocks, body, state0_ref[...].astype(jnp.float32))


def _backward_kernel(
  q_ref,
  k_ref,
  v_ref,
  do_ref,
  s_ref,
  state0_ref,
  d_state_ref,
  dq_ref,
  dk_ref,
  dv_ref,
  d_state0_ref,
  *,
  block,
  seq_len,
):
  s = s_ref[...]
  num_blocks = q_ref.shape[0] // block

  def dq_body(i, state):
    rows = pl.ds(pl.multiple_of(i * block, block), block)
    factors = tiles.decay_factors(s, i, block=block, seq_len=seq_len)
    k, v = k_ref[rows, :], v_ref[rows, :]
    dq_ref[rows, :] = tiles.dq_block(k, v, do_ref[rows, :], state, factors).astype(dq_ref.dtype)
    _, state = tiles.forward_block(q_ref[rows, :], k, v, state, factors)
    return state

  lax.fori_loop(0, num_blocks, dq_body, state0_ref[...].astype(jnp.float32))

  def dkv_body(j, d_state):
    i = num_blocks - 1 - j
    rows = pl.ds(pl.multiple_of(i * block, block), block)
    factors = tiles.decay_factors(s, i, block=block, seq_len=seq_len)
    dk, dv, d_state = tiles.dkv_block(
      q_ref[rows, :], k_ref[rows, :], v_ref[rows, :], do_ref[rows, :], d_state, factors
    )
    dk_ref[rows, :] = dk.astype(dk_ref.dtype)
    dv_ref[rows, :] = dv.astype(dv_ref.dtype)
    return d_state

  d_state0_ref[...] = lax.fori_loop(0, num_blocks, dkv_body, d_state_ref[...])


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
  num_warps=4,
  num_stages=1,
):
  """Returns (out [B,N,T,V] q.dtype, final state [B,N,H,V] fp32).

  `block_v` splits the value dimension over a third grid axis, as the official kernel does:
  each program keeps an [H, block_v] state (fewer registers, more programs) and recomputes the
  cheap Q Kᵀ of its blocks. None = 64 when V is a multiple of 64 larger than 64, else V.
  """
  b, n, t, h = q.shape
  vd = v.shape[3]
  if block_v is None:
    block_v = 64 if vd > 64 and vd % 64 == 0 else vd
  if vd % block_v:
    raise ValueError(f"block_v={block_v} must divide the value head dim V={vd}")
  groups = n // k.shape[1]
  q_spec = pl.BlockSpec((None, None, t, h), lambda b, n, j: (b, n, 0, 0))
  k_spec = pl.BlockSpec((None, None, t, h), lambda b, n, j: (b, lax.div(n, groups), 0, 0))
  v_spec = pl.BlockSpec((None, None, t, block_v), lambda b, n, j: (b, lax.div(n, groups), 0, j))
  o_spec = pl.BlockSpec((None, None, t, block_v), lambda b, n, j: (b, n, 0, j))
  state_spec = pl.BlockSpec((None, None, h, block_v), lambda b, n, j: (b, n, 0, j))
  decay_spec = pl.BlockSpec((None,), lambda b, n, j: (n,))
  return pl.pallas_call(
    functools.partial(_forward_kernel, block=block, seq_len=seq_len),
    grid=(b, n, vd // block_v),
    in_specs=[q_spec, k_spec, v_spec, decay_spec, state_spec],
    out_specs=[o_spec, state_spec],
    out_shape=[
      jax.ShapeDtypeStruct((b, n, t, vd), q.dtype),
      jax.ShapeDtypeStruct((b, n, h, vd), jnp.float32),
    ],
    compiler_params=compat.triton_compiler_params(num_warps, num_stages),
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
  num_warps=4,
  num_stages=1,
):
  """Returns fp32 (dq [B,N,T,H], dk [B,N,T,H], dv [B,N,T,V], d_state0 [B,N,H,V]), per query head.

  dQ needs dO Vᵀ over the whole value dimension, so the backward keeps V whole (`block_v` is
  accepted for a uniform signature and ignored).
  """
  del block_v
  b, n, t, h = q.shape
  vd = v.shape[3]
  q_spec, k_spec, v_spec, qv_spec, state_spec, decay_spec = _backward_specs(
    q.shape, v.shape, n // k.shape[1]
  )
  f32 = jnp.float32
  return pl.pallas_call(
    functools.partial(_backward_kernel, block=block, seq_len=seq_len),
    grid=(b, n),
    in_specs=[q_spec, k_spec, v_spec, qv_spec, decay_spec, state_spec, state_spec],
    out_specs=[q_spec, q_spec, qv_spec, state_spec],
    out_shape=[
      jax.ShapeDtypeStruct((b, n, t, h), f32),
      jax.ShapeDtypeStruct((b, n, t, h), f32),
      jax.ShapeDtypeStruct((b, n, t, vd), f32),
      jax.ShapeDtypeStruct((b, n, h, vd), f32),
    ],
    compiler_params=compat.triton_compiler_params(num_warps, num_stages),
    interpret=interpret,
    name="linear_attention_bwd",
  )(q, k, v, do, log_decay, state0, d_state)
