"""Analytic cost models: decode cost per token and GNA's simulated tile-level speed-up.

numpy only; nothing here imports the rest of attnzoo, so the models run anywhere.
"""

from attnzoo.accounting.decode import (
  DEEPSEEK_V3,
  PRESETS,
  QWEN3_32B,
  QWEN3_235B,
  STEP3,
  AttentionSpec,
  DecodeCost,
  decode_cost,
)
from attnzoo.accounting.gna import SimResult, amdahl, axis_keep, simulated_speedup

__all__ = [
  "DEEPSEEK_V3",
  "PRESETS",
  "QWEN3_235B",
  "QWEN3_32B",
  "STEP3",
  "AttentionSpec",
  "DecodeCost",
  "SimResult",
  "amdahl",
  "axis_keep",
  "decode_cost",
  "simulated_speedup",
]
