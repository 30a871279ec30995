"""Attention primitives: pure functions, one module per family, and the registry.

`FAMILIES` maps a family name to its `registry.Family` entry; `get(name)` looks one
up. Adding a family = one module with a `FAMILY` entry + one line below.
"""

from __future__ import annotations

from attnzoo.attention.dense import softmax
from attnzoo.attention.dense.softmax import dot_product_attention
from attnzoo.attention.heads import affine_scaled, bam, diffqkv, mfa, moh, rcmha, shrp, sqa
from attnzoo.attention.hybrid import flux
from attnzoo.attention.linear import linear
from attnzoo.attention.registry import IMPLEMENTATIONS, Family, resolve_implementation
from attnzoo.attention.sparse import (
  biformer,
  blockrank,
  dhsa,
  moa,
  pbs,
  rectified,
  sparse,
  sparsifiner,
)

FAMILIES: dict[str, Family] = {
  "softmax": softmax.FAMILY,
  "linear": linear.FAMILY,
  "rcmha": rcmha.FAMILY,
  "moh": moh.FAMILY,
  "affine_scaled": affine_scaled.FAMILY,
  "bam": bam.FAMILY,
  "mfa": mfa.FAMILY,
  "mfa_kr": mfa.FAMILY_KR,
  "shrp": shrp.FAMILY,
  "sqa": sqa.FAMILY,
  "diffqkv": diffqkv.FAMILY,
  "sparse": sparse.FAMILY,
  "biformer": biformer.FAMILY,
  "blockrank": blockrank.FAMILY,
  "sparsifiner": sparsifiner.FAMILY,
  "pbs": pbs.FAMILY,
  "moa": moa.FAMILY,
  "dhsa": dhsa.FAMILY,
  "flux": flux.FAMILY,
  "rectified": rectified.FAMILY,
}


def get(name: str) -> Family:
  """The registry entry of family `name`; KeyError lists the valid names."""
  try:
    return FAMILIES[name]
  except KeyError:
    raise KeyError(f"unknown attention family {name!r}; valid names: {sorted(FAMILIES)}") from None


__all__ = [
  "FAMILIES",
  "IMPLEMENTATIONS",
  "Family",
  "dot_product_attention",
  "get",
  "resolve_implementation",
]
