"""Block-sparse flash attention: the `BlockMap` format and its kernels."""

from pallas_kernels.block_sparse.block_map import EMPTY, FULL, PARTIAL, BlockMap, num_blocks

__all__ = ["EMPTY", "FULL", "PARTIAL", "BlockMap", "num_blocks"]
