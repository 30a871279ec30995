"""Mean pooling over the valid tokens: the classifier's baseline (no learned arrays, F = D)."""

from __future__ import annotations

from jaxtyping import Array, Bool, Float

from attnzoo.attention.pooling import common
from attnzoo.attention.pooling.registry import Pooling


def mean_pool(
  x_BTD: Float[Array, "B T D"], valid_BT: Bool[Array, "B T"]
) -> tuple[Float[Array, "B D"], None]:
  """(1/|valid|) Σ_{t valid} x_t, computed in fp32 and cast back to x's dtype; zeros for an
  example with no valid token. No attention weights (None)."""
  common.check_tokens(x_BTD, valid_BT)
  return common.masked_mean(x_BTD, valid_BT).astype(x_BTD.dtype), None


POOLING = Pooling(name="mean", pool=mean_pool, out_dim=lambda d: d.D, paper="")
