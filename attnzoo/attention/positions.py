"""Position pieces shared by families and layers (one definition each)."""

from __future__ import annotations

import math

import numpy as np


def alibi_slopes(num_heads: int) -> np.ndarray:
  """Head slopes of ALiBi, Press et al. (arXiv 2108.12409) §3, float64 [N].

  For N a power of two: the geometric sequence 2^(-8/N), 2^(-16/N), ..., 2^(-8). Otherwise the
  paper's recipe: the slopes of the closest smaller power of two, then every other slope of the
  next power of two. Used by the ALiBi bias (`attnzoo.nn.positions`) and TNL's decay schedule
  (`attnzoo.attention.linear.tnl`).
  """
  if num_heads < 1:
    raise ValueError(f"num_heads={num_heads} must be >= 1")

  def geometric(n):
    start = 2.0 ** (-8.0 / n)
    return [start ** (i + 1) for i in range(n)]

  closest = 2 ** math.floor(math.log2(num_heads))
  slopes = geometric(closest)
  if closest != num_heads:
    slopes += geometric(2 * closest)[0::2][: num_heads - closest]
  return np.asarray(slopes, np.float64)
