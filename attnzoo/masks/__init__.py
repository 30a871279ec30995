"""Attention masks: one predicate per mask, viewed as a dense array, an element
predicate for kernels, or a `BlockMap` of empty / partial / full tiles.

    mask = (SlidingWindow(left=256) | AttentionSinks(4)) & Causal()
    keep_TS = mask.dense(T, S)                       # numpy bool[T, S], the definition
    keep = mask.predicate(q_pos, k_pos, jnp)         # traceable, inside kernels
    bmap = mask.block_map(T, S, block_q, block_k)    # pallas_kernels BlockMap

`a & b & c` and `a | b | c` build flat `And` / `Or` masks.
"""

from attnzoo.masks.base import And, Causal, Mask, Or
from attnzoo.masks.blockrank import BlockRank as BlockRank
from attnzoo.masks.local import AttentionSinks, Blocked, Chunked, GlobalTokens, SlidingWindow
from attnzoo.masks.neighborhood import Neighborhood
from attnzoo.masks.registry import MASKS, build_mask, mask_arguments
from attnzoo.masks.tables import DenseMask, RandomBlocks, Segments

__all__ = [
  "MASKS",
  "build_mask",
  "mask_arguments",
  "And",
  "AttentionSinks",
  "Blocked",
  "Causal",
  "Chunked",
  "DenseMask",
  "GlobalTokens",
  "Mask",
  "Neighborhood",
  "Or",
  "RandomBlocks",
  "Segments",
  "SlidingWindow",
]
