"""Block-sparse flash attention: the `BlockMap` format and its kernels.

Layout (the template every kernel package follows): `ops.py` public entry + custom VJP,
`config.py` (`BlockSizes`, `KernelConfig`), `tiles.py` (the tile math, once),
`kernel_gpu.py` / `kernel_tpu.py` (the lowerings: loads, stores, grids), `reference.py`
(the fp32 oracle). Here also `block_map.py` (the tables) and `table_masks.py` (masks that
read arrays).
"""

from pallas_kernels._common import default_backend
from pallas_kernels.block_sparse.block_map import (
  EMPTY,
  FULL,
  PARTIAL,
  BlockMap,
  num_blocks,
)
from pallas_kernels.block_sparse.config import BlockSizes
from pallas_kernels.block_sparse.ops import MaskPredicate, block_sparse_attention, table_xp
from pallas_kernels.block_sparse.reference import reference_attention

__all__ = [
  "EMPTY",
  "FULL",
  "PARTIAL",
  "BlockMap",
  "BlockSizes",
  "MaskPredicate",
  "block_sparse_attention",
  "default_backend",
  "num_blocks",
  "reference_attention",
  "table_xp",
]
