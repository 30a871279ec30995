"""The two configuration objects of the linear-attention kernels.

`BlockSizes` is the public tile choice (a frozen dataclass, as in every kernel package);
`KernelConfig` is the static description of one call that `ops` builds and both lowerings read
(hashable: a custom_vjp static argument).
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tile sizes and GPU launch knobs.

  block: rows per tile (LA-2 uses a block ≈ H; a power of two >= 16 for Triton).
  block_v: GPU forward only: value columns per program (None = 64 if V is a larger multiple
    of 64, else all of V); 32-64 keeps the [H, block_v] fp32 state in registers for H = 128.
  num_warps, num_stages: Triton launch parameters (ignored on TPU).
  """

  block: int = 64
  block_v: int | None = None
  num_warps: int = 4
  num_stages: int = 1

  def __post_init__(self):
    if self.block < 8 or self.block % 8:
      raise ValueError(f"block={self.block} must be a positive multiple of 8 (e.g. 64)")
    if self.block_v is not None and (self.block_v < 8 or self.block_v % 8):
      raise ValueError(f"block_v={self.block_v} must be None or a positive multiple of 8")


@dataclasses.dataclass(frozen=True)
class KernelConfig:
  """Static description of one linear-attention call (hashable: a custom_vjp static)."""

  seq_len: int  # unpadded T
  block_sizes: BlockSizes
  interpret: bool
  backend: str  # "gpu" | "tpu"

  def kernel_kwargs(self):
    bs = self.block_sizes
    return dict(
      block=bs.block,
      seq_len=self.seq_len,
      block_v=bs.block_v,
      interpret=self.interpret,
      num_warps=bs.num_warps,
      num_stages=bs.num_stages,
    )
