"""Tiled decayed linear attention (Lightning Attention-2, arXiv 2401.04658) as Pallas kernels.

Layout (the template every kernel package follows): `ops.py` public entry `linear_attention` +
custom VJP (Algorithm 2's backward kernels), `config.py` (`BlockSizes`, `KernelConfig`),
`tiles.py` (the per-block math, once), `kernel_gpu.py` (Triton) / `kernel_tpu.py` (Mosaic) (the
lowerings: loads, stores, grids), `reference.py` (the readable oracles: quadratic masked form and
token recurrence).
"""

from pallas_kernels._common import default_backend
from pallas_kernels.linear.config import BlockSizes
from pallas_kernels.linear.ops import linear_attention
from pallas_kernels.linear.reference import linear_attention_recurrent, linear_attention_reference

__all__ = [
  "BlockSizes",
  "default_backend",
  "linear_attention",
  "linear_attention_recurrent",
  "linear_attention_reference",
]
