"""Block-sparse flash attention: the `BlockMap` format and its kernels."""

from pallas_kernels.block_sparse.block_map import (
  EMPTY,
  FULL,
  PARTIAL,
  BlockMap,
  BlockSizes,
  num_blocks,
)
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
  "num_blocks",
  "reference_attention",
  "table_xp",
]
