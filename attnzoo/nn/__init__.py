"""Flax NNX building blocks: the attention layer, positions, MLP and norms."""

from attnzoo.nn.attention import (
  MASKS,
  POSITIONS,
  Attention,
  build_mask,
  family_knobs,
  layer_families,
  mask_arguments,
)
from attnzoo.nn.layers import ACTIVATIONS, MLP, NORMS, norm
from attnzoo.nn.positions import alibi_bias, alibi_slopes, rope

__all__ = [
  "ACTIVATIONS",
  "MASKS",
  "MLP",
  "NORMS",
  "POSITIONS",
  "Attention",
  "alibi_bias",
  "alibi_slopes",
  "build_mask",
  "family_knobs",
  "layer_families",
  "mask_arguments",
  "norm",
  "rope",
]
