"""The two configuration objects of the block-sparse kernels.

`BlockSizes` is the public tile choice (a frozen dataclass, as in every kernel package);
`KernelConfig` is the static description of one call that `ops` builds and both lowerings read
(hashable: a jit / custom_vjp static argument).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tile sizes of block-sparse attention (tokens). Kernels may add fields with defaults."""

  block_q: int = 128
  block_k: int = 128
  # Triton launch parameters of the GPU lowering (ignored by the TPU lowering).
  num_warps: int = 4
  num_stages: int = 2

  def __post_init__(self):
    for name in ("block_q", "block_k"):
      value = getattr(self, name)
      if not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"{name}={value!r} must be a positive int")


@dataclasses.dataclass(frozen=True)
class KernelConfig:
  """Static description of one block-sparse attention call (hashable: a jit/vjp static)."""

  mask_fn: Callable | None
  scale: float
  soft_cap: float | None
  block_q: int
  block_k: int
  seq_q: int  # unpadded T
  seq_k: int  # unpadded S
  has_segments: bool
  interpret: bool
  num_warps: int = 4
  num_stages: int = 2
  # dtypes (names) of the mask tables as the caller gave them; non-empty means
  # `mask_fn(tables, q_pos, k_pos)`, empty means `mask_fn(q_pos, k_pos)`.
  table_dtypes: tuple[str, ...] = ()
