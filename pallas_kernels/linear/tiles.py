"""Per-block math of Lightning Attention-2, written once: the GPU and TPU kernels call it on one
head's tiles, and `attnzoo.attention.linear`'s "chunked" path vmaps it over batch and heads
inside its `lax.scan` over blocks.

Lightning Attention-2 (arXiv 2401.04658), Algorithm 1 (forward) and Algorithm 2 (backward), in
log space. For block i of size C with per-head log-decay s = log λ <= 0 and n_i valid rows
(n_i = C except in a ragged last block), let e_a = min(a + 1, n_i) and cum_a = s·e_a:

  forward   O   = [(Q Kᵀ) ⊙ M] V + diag(exp(cum)) Q S           M[a,b] = exp(cum_a - cum_b)[a>=b]
            S'  = exp(s·n_i) S + (diag(exp(s·n_i - cum)) K)ᵀ V
  backward  dQ  = [(dO Vᵀ) ⊙ M] K + diag(exp(cum)) dO Sᵀ          (forward over blocks)
            dK  = [(dO Vᵀ) ⊙ M]ᵀ Q + diag(exp(s·n_i - cum)) V dS'ᵀ (reverse over blocks)
            dV  = [(Q Kᵀ) ⊙ M]ᵀ dO + diag(exp(s·n_i - cum)) K dS'
            dS  = exp(s·n_i) dS' + (diag(exp(cum)) Q)ᵀ dO

For full blocks these are Algorithm 1's Λ = diag(λ¹..λ^C) and λ^C Λ⁻¹ = diag(λ^{C-1-b}) (not Eq. 9's
diag(λ⁰..λ^{C-1}), which is one power off). Every exponent is <= 0, so no λ^{-n} is ever formed.
The min(·, n_i) clamp makes zero-padded tail rows leave the state undecayed, so a ragged last
block gives the exact final state.

Everything is written with 2-D iotas, `where` and `dot_general` so that it lowers through both the
Pallas Triton backend and Mosaic TPU.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

F32 = jnp.float32


def _dot(a, b):  # a @ b
  return lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=F32)


def _dot_nt(a, b):  # a @ bᵀ
  return lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=F32)


def _dot_tn(a, b):  # aᵀ @ b
  return lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=F32)


def decay_factors(s, block_idx, *, block: int, seq_len: int):
  """In-block decays for block `block_idx`: (q_decay [C,1], k_decay [C,1], M [C,C], λ^{n_i})."""
  n_valid = jnp.minimum(block, seq_len - block_idx * block).astype(F32)
  # Mosaic has only integer iotas.
  e_col = jnp.minimum(lax.broadcasted_iota(jnp.int32, (block, 1), 0).astype(F32) + 1.0, n_valid)
  e_row = jnp.minimum(lax.broadcasted_iota(jnp.int32, (1, block), 1).astype(F32) + 1.0, n_valid)
  cum_col, cum_row, total = s * e_col, s * e_row, s * n_valid
  causal = lax.broadcasted_iota(jnp.int32, (block, block), 0) >= lax.broadcasted_iota(
    jnp.int32, (block, block), 1
  )
  intra = jnp.where(causal, jnp.exp(jnp.minimum(cum_col - cum_row, 0.0)), 0.0)
  return jnp.exp(cum_col), jnp.exp(total - cum_col), intra, jnp.exp(total)


def forward_block(q, k, v, state, factors):
  """One block of Algorithm 1: (O [C,V] fp32, next state [H,V] fp32)."""
  q_decay, k_decay, intra, block_decay = factors
  scores = _dot_nt(q, k) * intra
  out = _dot(scores.astype(v.dtype), v) + _dot(q.astype(F32) * q_decay, state)
  state = block_decay * state + _dot_tn(k.astype(F32) * k_decay, v.astype(F32))
  return out, state


def dq_block(k, v, do, state, factors):
  """dQ of one block given the state before it (forward pass of Algorithm 2)."""
  q_decay, _, intra, _ = factors
  d_scores = _dot_nt(do, v) * intra
  return _dot(d_scores.astype(k.dtype), k) + q_decay * _dot_nt(do.astype(F32), state)


def dkv_block(q, k, v, do, d_state, factors):
  """dK, dV of one block and the state cotangent before it (reverse pass of Algorithm 2).

  `d_state` is the cotangent of the state *after* this block.
  """
  q_decay, k_decay, intra, block_decay = factors
  d_scores = _dot_nt(do, v) * intra
  scores = _dot_nt(q, k) * intra
  dk = _dot_tn(d_scores.astype(q.dtype), q) + k_decay * _dot_nt(v.astype(F32), d_state)
  dv = _dot_tn(scores.astype(do.dtype), do) + k_decay * _dot(k.astype(F32), d_state)
  d_state = block_decay * d_state + _dot_tn(q.astype(F32) * q_decay, do.astype(F32))
  return dk, dv, d_state
