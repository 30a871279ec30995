"""Tiled decayed linear attention (Lightning Attention-2, arXiv 2401.04658) as Pallas kernels.

`linear_attention` (ops.py) is the entry point: Triton-backend GPU kernel (kernel_gpu.py), Mosaic
TPU kernel (kernel_tpu.py), both with a custom VJP whose backward kernels follow Algorithm 2.
reference.py holds the readable oracles (quadratic masked form and token recurrence).
"""

from pallas_kernels.linear.ops import BlockSizes, default_platform, linear_attention
from pallas_kernels.linear.reference import linear_attention_recurrent, linear_attention_reference

__all__ = [
  "BlockSizes",
  "default_platform",
  "linear_attention",
  "linear_attention_recurrent",
  "linear_attention_reference",
]
