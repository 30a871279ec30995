"""The pooling contract: how a classifier turns token states [B,T,D] into one vector per example.

A pooling is a pure function `pool(x_BTD, valid_BT, *, <learned arrays>, <knobs>) ->
(pooled_BF, weights)` plus a `Pooling` entry, so the model, the config and the tables use it by
name (`attnzoo.attention.pooling.POOLINGS`) without knowing which one it is:

- `valid_BT` is False at padding tokens; a pooling gives them no weight, and an example with no
  valid token pools to zeros (finite gradients).
- `weights` is `[B, M, T]` fp32, one distribution over the tokens per pooling head (each row sums
  to 1 over the valid tokens, 0 at padding; all zeros for an example with no valid token), or
  None for a pooling without attention weights (mean).
- `params`: the arrays it learns, as `ParamSpec`s whose shapes come from `Dims` (only `D` and
  `Dims.knobs` are meaningful for a pooling: `Pooling.dims`); the model creates them as
  `nnx.Param`s and passes them by keyword.
- `out_dim`: F, the width of `pooled_BF` (the classifier head's input width).
- knobs: the function's other keyword-only arguments (their defaults updated with the configured
  `pool_knobs`; `Pooling.knob_values`).
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Mapping
from typing import Any

import jax

from attnzoo.attention.registry import Dims, ParamSpec


@dataclasses.dataclass(frozen=True)
class Pooling:
  """One registered pooling.

  Attributes:
    name: the config name (`config.model.pool`).
    pool: the pure function (see the module docstring).
    out_dim: `Dims -> F`, the pooled width.
    params: learned arrays by name (passed to `pool` by keyword).
    paper: title and arXiv id, for tables and docs.
  """

  name: str
  pool: Callable[..., tuple[jax.Array, jax.Array | None]]
  out_dim: Callable[[Dims], int]
  params: Mapping[str, ParamSpec] = dataclasses.field(default_factory=dict)
  paper: str = ""

  def knobs(self) -> dict[str, tuple[Any, str]]:
    """{knob: (default, annotation)}: keyword-only arguments of `pool` that are not learned."""
    return {
      p.name: (p.default, str(p.annotation))
      for p in inspect.signature(self.pool).parameters.values()
      if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name not in self.params
    }

  def knob_values(self, given: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The function's knob defaults updated with `given` (None values = the default).

    Raises ValueError naming an unknown knob and the valid ones."""
    values = {name: default for name, (default, _) in self.knobs().items()}
    given = {k: v for k, v in (given or {}).items() if v is not None}
    unknown = sorted(set(given) - set(values))
    if unknown:
      raise ValueError(
        f"pooling {self.name!r} has no knobs {unknown}; its knobs: {sorted(values) or 'none'}"
      )
    values.update(given)
    return values

  def dims(self, D: int, given: Mapping[str, Any] | None = None) -> Dims:
    """The `Dims` its arrays are sized by: width D and the knob values (no heads: N=K=1, H=V=D)."""
    return Dims(D=D, N=1, K=1, H=D, V=D, knobs=self.knob_values(given))

  def num_params(self, D: int, given: Mapping[str, Any] | None = None) -> int:
    """Learned elements for width D (from the `ParamSpec` shapes; nothing is allocated)."""
    dims = self.dims(D, given)
    total = 0
    for spec in self.params.values():
      size = 1
      for s in spec.shape(dims):
        size *= int(s)
      total += size
    return total
