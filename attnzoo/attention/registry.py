"""The family registry entry and implementation dispatch shared by all families."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
from absl import logging

IMPLEMENTATIONS = ("xla", "chunked", "pallas")


@dataclasses.dataclass(frozen=True)
class Family:
  """One attention family: what is computed, and which implementations compute it.

  Attributes:
    name: registry key.
    attention: the pure function `attention(q, k, v, *, ..., implementation=None)`
      with the layout q [B,T,N,H], k [B,S,K,H], v [B,S,K,Hv] -> [B,T,N,Hv]
      (or `(out, aux)` when `returns_aux`).
    implementations: the `implementation=` values it accepts, best first.
    paper: "Title (arXiv id)" of the defining paper, or "" for textbook attention.
    returns_aux: the function returns `(out, aux)`.
    supports_mask: accepts `mask=` / `is_causal=` like softmax attention.
    causal_only: only defined for causal attention (a recurrence).
    decode_step: optional single-token step `(state, q_t, k_t, v_t) -> (out_t, state)`.
    layer_knobs: optional `(knobs, *, layer, num_layers, num_heads) -> knobs`: resolves knob
      values that depend on the layer's depth (e.g. TNL's per-layer decay schedule) when a
      model builds its layers; the pure function itself only ever sees concrete values.
  """

  name: str
  attention: Callable[..., Any]
  implementations: tuple[str, ...]
  paper: str = ""
  returns_aux: bool = False
  supports_mask: bool = True
  causal_only: bool = False
  decode_step: Callable[..., Any] | None = None
  layer_knobs: Callable[..., dict[str, Any]] | None = None


def resolve_implementation(
  requested: str | None,
  available: Mapping[str, Callable[..., Any]],
  *,
  family: str,
) -> str:
  """Picks an implementation name; `None` means the best for the current platform.

  Raises ValueError for an unknown name. Automatic choice prefers the Pallas
  kernel on GPU/TPU and the chunked jnp path on CPU, falling back (with a log
  line, never silently) when the preferred one is absent.
  """
  if requested is not None:
    if requested not in available:
      raise ValueError(
        f"implementation={requested!r} is not one of {sorted(available)} for the "
        f"{family!r} family; pass one of those or None to choose automatically"
      )
    return requested
  platform = jax.default_backend()
  preference = ("pallas", "chunked", "xla") if platform in ("gpu", "tpu") else ("chunked", "xla")
  for name in preference:
    if name in available:
      if name != preference[0]:
        logging.info(
          "%s: no %r implementation on %s, using %r", family, preference[0], platform, name
        )
      return name
  return next(iter(available))
