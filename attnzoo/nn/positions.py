"""Positional schemes for the attention layer: RoPE (rotary) and ALiBi (additive bias).

Both are pure functions of integer positions; the attention layer picks one by name
from `POSITIONS` (none / rope / alibi). Learned absolute embeddings live in the model
(they act on the residual stream, not inside attention).
"""

from __future__ import annotations

import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from attnzoo.attention import positions as shared_positions


def rope(
  x: Float[Array, "B T N H"], positions: Int[Array, "B T"], *, base: float = 10000.0
) -> Float[Array, "B T N H"]:
  """Rotary position embedding, RoFormer (arXiv 2104.09864) §3.4.2, Eq. (34).

  Pairs (x_i, x_{i + H/2}) are rotated by angle `pos * base^(-2i/H)`, so that
  <rope(q, m), rope(k, n)> depends on m - n only.

  Differences from the paper: the paper rotates adjacent pairs (x_{2i}, x_{2i+1});
  we rotate the two halves ("rotate-half", as GPT-NeoX / LLaMA), an equivalent
  permutation of the head dimension. Angles are computed in float32.
  """
  H = x.shape[-1]
  if H % 2:
    raise ValueError(f"RoPE needs an even head dim, got H={H}; choose an even head_dim")
  half = H // 2
  inv_freq_F = base ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angle_BTF = positions.astype(jnp.float32)[..., None] * inv_freq_F[None, None, :]
  cos_BT1F = jnp.cos(angle_BTF)[:, :, None, :]
  sin_BT1F = jnp.sin(angle_BTF)[:, :, None, :]
  x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
  out = jnp.concatenate([x1 * cos_BT1F - x2 * sin_BT1F, x2 * cos_BT1F + x1 * sin_BT1F], axis=-1)
  return out.astype(x.dtype)


def alibi_slopes(num_heads: int) -> Float[Array, " N"]:
  """ALiBi head slopes (arXiv 2108.12409 §3) as float32; the one definition is
  `attnzoo.attention.positions.alibi_slopes`."""
  return jnp.asarray(shared_positions.alibi_slopes(num_heads), jnp.float32)


def alibi_bias(
  num_heads: int, q_positions: Int[Array, "B T"], k_positions: Int[Array, "B S"]
) -> Float[Array, "B N T S"]:
  """ALiBi additive bias `-slope_n * |i - j|` (arXiv 2108.12409, §3), float32.

  Differences from the paper: the paper is causal only, with bias -slope * (i - j) on
  the kept keys j <= i; |i - j| equals that there, and the future half is masked by
  causal attention anyway. For bidirectional attention |i - j| is the symmetric
  variant (our choice; the paper is silent).
  """
  dist_BTS = jnp.abs(q_positions[:, :, None] - k_positions[:, None, :]).astype(jnp.float32)
  return -alibi_slopes(num_heads)[None, :, None, None] * dist_BTS[:, None, :, :]
