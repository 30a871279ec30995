"""Poolings of a classifier: token states [B,T,D] -> one vector [B,F] per example, by name.

`POOLINGS` maps a name to its `Pooling` entry (`registry.py`: the contract); `get_pooling(name)`
looks one up. Adding a pooling = one module with a `POOLING` entry + one line below.
"""

from __future__ import annotations

from attnzoo.attention.pooling import lama, mean
from attnzoo.attention.pooling.registry import Pooling

POOLINGS: dict[str, Pooling] = {
  "mean": mean.POOLING,
  "lama": lama.POOLING,
}


def get_pooling(name: str) -> Pooling:
  """The registry entry of pooling `name`; KeyError lists the valid names."""
  try:
    return POOLINGS[name]
  except KeyError:
    raise KeyError(f"unknown pooling {name!r}; valid names: {sorted(POOLINGS)}") from None


def all_knobs() -> dict[str, tuple[None, str]]:
  """{knob: (None, annotation)} over every pooling: what a config declares as
  `config.model.pool_knobs.<knob>` (None = the chosen pooling's default), so `pool` can be
  switched on the command line. The first annotation of a name shared by two poolings wins."""
  out: dict[str, tuple[None, str]] = {}
  for entry in POOLINGS.values():
    for knob, (_, annotation) in entry.knobs().items():
      out.setdefault(knob, (None, annotation))
  return out


__all__ = ["POOLINGS", "Pooling", "all_knobs", "get_pooling"]
