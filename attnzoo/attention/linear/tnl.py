"""TransNormerLLM pieces: the per-head decay schedule of the official code and NormAttention's norm.

Papers: "Scaling TransNormer to 175 Billion Parameters" / TransNormerLLM (arXiv 2307.14995) and
"Various Lengths, Constant Speed: Efficient Language Modeling with Lightning Attention"
(arXiv 2405.17381), §3 (Eq. 10 decay, NormAttention, SRMSNorm).

Decay. Eq. 10 prints λ_h = exp(-(8h/H)(1 - l/L)); the official code (OpenNLPLab
lightning-attention, `_build_slope_tensor` and `examples/module/tnl_attn.py`) uses the ALiBi slopes
s_h = 2^{-8(h+1)/H} (H a power of two; the ALiBi interleaving otherwise) scaled by
(1 - l/(L-1) + 1e-5), and λ_h = exp(-s_h). We follow the code. `tnl_slopes` returns log λ = -s,
the `decay=` argument of `attnzoo.attention.linear.linear.attention`.

NormAttention: O = SRMSNorm(φ(Q)φ(K)ᵀV) ⊙ U, SRMSNorm(x) = x / (‖x‖₂/√d) with no learned scale.

Differences from the paper / choices where it is silent:
  * num_layers == 1 has no (L-1) to divide by; the layer factor is then 1 + 1e-5 (as for l = 0).
  * SRMSNorm takes an epsilon (x · rsqrt(mean(x²) + eps)) so that an all-zero row stays finite.
  * The norm runs over the merged heads (width N·Hv), as the official module's norm over
    embed_dim does; the gate U (sigmoid of a low-rank projection in the code) is computed by the
    module that owns its parameters and passed in activated.
"""

from __future__ import annotations

import jax.numpy as jnp
from jaxtyping import Array, Float

from attnzoo.attention.hooks import srms_norm
from attnzoo.attention.positions import alibi_slopes


def tnl_slopes(num_heads: int, layer_idx: int, num_layers: int) -> Float[Array, " N"]:
  """log λ [N] (fp32, <= 0) of layer `layer_idx` (0-based) of `num_layers`, as in the TNL code."""
  if not 0 <= layer_idx < num_layers:
    raise ValueError(f"layer_idx={layer_idx} must be in [0, num_layers={num_layers})")
  depth = 0.0 if num_layers == 1 else layer_idx / (num_layers - 1)
  return jnp.asarray(-alibi_slopes(num_heads) * (1.0 - depth + 1e-5), jnp.float32)


def norm_attention_output(
  out: Float[Array, "B T N Hv"],
  gate: Float[Array, "B T D"] | None = None,
  eps: float = 1e-6,
) -> Float[Array, "B T D"]:
  """NormAttention's output: SRMSNorm over the merged heads (D = N·Hv), times the gate U."""
  b, t, n, vd = out.shape
  normed = srms_norm(out.reshape(b, t, n * vd), eps)
  if gate is None:
    return normed
  if gate.shape != normed.shape:
    raise ValueError(f"gate has shape {gate.shape}; expected {normed.shape} = [B,T,N*Hv]")
  return normed * gate.astype(normed.dtype)
