"""Knob and pattern parsing shared by config files, the config builder and the attention layer.

- `parse_pattern("linear+softmax")` -> ("linear", "softmax"): the per-layer family pattern.
- `family_knobs(name)`: the run-time knobs of a family = the keyword-only arguments of its pure
  function that neither the layer sets (mask, bias, causality, segment ids, layer inputs) nor
  the family learns or carries (`Family.params` / `Family.state`), plus the layer-level knob
  `hooks` that every family has.
- `aux_weights(names)`: the default weight of every aux loss the families declare.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Iterable
from typing import Any

from attnzoo import attention as attention_lib
from attnzoo.attention import registry

# Keyword arguments the attention layer sets itself.
LAYER_ARGUMENTS = frozenset({"mask", "bias", "is_causal", "segment_ids", *registry.LAYER_INPUTS})
# Knobs the layer consumes for every family (not passed to the pure function).
LAYER_KNOBS: dict[str, tuple[Any, str]] = {"hooks": (None, "str | None")}


def parse_pattern(pattern: str | Iterable[str]) -> tuple[str, ...]:
  """'softmax', 'linear+softmax' or 'linear,softmax' (or a sequence) -> family names.

  Every name must be registered (KeyError lists the valid names)."""
  names = (
    tuple(n.strip() for n in re.split(r"[,+]", pattern))
    if isinstance(pattern, str)
    else tuple(pattern)
  )
  names = tuple(n for n in names if n)
  if not names:
    raise ValueError(
      f"attention pattern {pattern!r} names no family; valid: {sorted(attention_lib.FAMILIES)}"
    )
  for n in names:
    attention_lib.get(n)
  return names


def family_knobs(name: str) -> dict[str, tuple[Any, str]]:
  """{knob: (default, annotation)} of family `name` (KeyError lists the valid names)."""
  family = attention_lib.get(name)
  owned = LAYER_ARGUMENTS | set(family.params) | set(family.state)
  sig = inspect.signature(family.attention)
  knobs = {
    p.name: (p.default, str(p.annotation))
    for p in sig.parameters.values()
    if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name not in owned
  }
  return {**knobs, **LAYER_KNOBS}


def aux_weights(names: Iterable[str]) -> dict[str, float]:
  """Default weight of each aux loss declared by the families `names` (first declaration wins)."""
  out: dict[str, float] = {}
  for n in dict.fromkeys(names):
    for loss, weight in attention_lib.get(n).aux_losses.items():
      out.setdefault(loss, float(weight))
  return out
