"""Flax NNX building blocks: the attention layer, positions, MLP and norms."""

from attnzoo.nn.attention_layer import (
  POSITIONS,
  Attention,
  AttentionAux,
  AuxTotals,
  FamilyState,
  apply_state_updates,
  layer_families,
  run_with_aux,
)
from attnzoo.nn.layers import ACTIVATIONS, MLP, NORMS, norm
from attnzoo.nn.moe import MoEFFN
from attnzoo.nn.positions import alibi_bias, alibi_slopes, rope

__all__ = [
  "ACTIVATIONS",
  "MLP",
  "NORMS",
  "POSITIONS",
  "Attention",
  "AttentionAux",
  "AuxTotals",
  "FamilyState",
  "MoEFFN",
  "alibi_bias",
  "alibi_slopes",
  "apply_state_updates",
  "layer_families",
  "norm",
  "rope",
  "run_with_aux",
]
