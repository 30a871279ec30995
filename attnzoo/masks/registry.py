"""Masks by name, for configs: `model.mask = "neighborhood"` with `model.mask_kwargs`.

A class with a `shape` field is an N-D mask over the token grid; the model passes its spatial
shape there. Adding a configurable mask = one line in `MASKS`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from attnzoo.masks.base import Mask
from attnzoo.masks.local import AttentionSinks, Chunked, SlidingWindow
from attnzoo.masks.neighborhood import Neighborhood

MASKS: dict[str, type[Mask]] = {
  "sliding_window": SlidingWindow,
  "neighborhood": Neighborhood,
  "chunked": Chunked,
  "sinks": AttentionSinks,
}


def mask_class(name: str) -> type[Mask]:
  if name not in MASKS:
    raise ValueError(f"mask={name!r} is not one of {sorted(MASKS)} (or '' for none)")
  return MASKS[name]


def mask_arguments(name: str) -> dict[str, tuple[Any, str]]:
  """{argument: (default or None, annotation)} of mask `name`, but the grid `shape`."""
  return {
    f.name: (None if f.default is dataclasses.MISSING else f.default, str(f.type))
    for f in dataclasses.fields(mask_class(name))
    if f.init and f.name != "shape"
  }


def build_mask(name: str | None, spatial_shape, kwargs: Mapping[str, Any]) -> Mask | None:
  """The mask object named `name` (None/"" -> no mask); N-D masks get `spatial_shape`."""
  if not name:
    return None
  cls = mask_class(name)
  kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
  if "shape" in {f.name for f in dataclasses.fields(cls)}:
    if not spatial_shape:
      raise ValueError(
        f"mask={name!r} needs a spatial_shape (an image model); got {spatial_shape!r}"
      )
    return cls(shape=tuple(spatial_shape), **kwargs)
  return cls(**kwargs)
