"""Feed-forward and normalisation layers of the transformer block (Flax NNX)."""

from __future__ import annotations

import jax
from flax import nnx
from jaxtyping import Array, Float

from attnzoo.attention import hooks


class SRMSNorm(nnx.Module):
  """SRMSNorm: RMSNorm without a learned scale (TransNormerLLM, arXiv 2307.14995 §3.2), the
  norm of every TNL block. The function itself is `attnzoo.attention.hooks.srms_norm` (one
  definition, shared with the NormAttention output hook)."""

  def __init__(self, dim: int, *, dtype=None, rngs: nnx.Rngs | None = None):
    del dim, rngs
    self.dtype = dtype

  def __call__(self, x: Float[Array, "... D"]) -> Float[Array, "... D"]:
    y = hooks.srms_norm(x)
    return y if self.dtype is None else y.astype(self.dtype)


ACTIVATIONS = {"gelu": jax.nn.gelu, "relu": jax.nn.relu, "silu": jax.nn.silu}
NORMS = {"rms": nnx.RMSNorm, "layer": nnx.LayerNorm, "srms": SRMSNorm}


def norm(kind: str, dim: int, *, dtype, rngs: nnx.Rngs) -> nnx.Module:
  """RMSNorm (arXiv 1910.07467), LayerNorm (arXiv 1607.06450) or SRMSNorm (no scale)."""
  if kind not in NORMS:
    raise ValueError(f"norm={kind!r} is not one of {sorted(NORMS)}")
  return NORMS[kind](dim, dtype=dtype, rngs=rngs)


class MLP(nnx.Module):
  """Position-wise feed-forward layer, plain or gated.

  plain: `down(act(up(x)))` (Vaswani et al., arXiv 1706.03762, Eq. 2).
  gated: `down(act(gate(x)) * up(x))` (Shazeer, "GLU Variants Improve Transformer",
  arXiv 2002.05202, Eq. 6; SwiGLU when act = silu).
  Param paths `up`, `gate`, `down` are what the sharding rules match on.
  """

  def __init__(
    self,
    dim: int,
    hidden: int,
    *,
    gated: bool,
    activation: str = "gelu",
    use_bias: bool = False,
    dtype=None,
    rngs: nnx.Rngs,
  ):
    if activation not in ACTIVATIONS:
      raise ValueError(f"activation={activation!r} is not one of {sorted(ACTIVATIONS)}")
    self.activation = activation
    linear = lambda i, o: nnx.Linear(i, o, use_bias=use_bias, dtype=dtype, rngs=rngs)
    self.up = linear(dim, hidden)
    self.gate = linear(dim, hidden) if gated else None
    self.down = linear(hidden, dim)

  def __call__(self, x_BTD: Float[Array, "B T D"]) -> Float[Array, "B T D"]:
    act = ACTIVATIONS[self.activation]
    h_BTF = self.up(x_BTD)
    h_BTF = act(self.gate(x_BTD)) * h_BTF if self.gate is not None else act(h_BTF)
    return self.down(h_BTF)
