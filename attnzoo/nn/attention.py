"""The attention layer: projections + positions around any registered attention family.

The family is looked up by name in `attnzoo.attention` (one seam, no branching on
names) and called as `family.attention(q, k, v, *, is_causal, [mask], [bias], **knobs)`
in the primitive layout q [B,T,N,H], k [B,S,K,H], v [B,S,K,Hv] -> [B,T,N,Hv].
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, Int

from attnzoo import attention as attention_lib
from attnzoo import masks
from attnzoo.attention.linear import tnl
from attnzoo.nn import positions as positions_lib

# name -> mask class. A class with a `shape` field is an N-D mask over the token grid;
# the model passes its spatial shape there.
MASKS: dict[str, type[masks.Mask]] = {
  "sliding_window": masks.SlidingWindow,
  "neighborhood": masks.Neighborhood,
}
POSITIONS = ("none", "rope", "alibi")
# Keyword arguments the layer itself sets; every other keyword-only argument of a
# family's function is a knob (see `family_knobs`).
LAYER_ARGUMENTS = frozenset({"mask", "bias", "is_causal", "segment_ids"})


def family_knobs(name: str) -> dict[str, tuple[Any, str]]:
  """{knob: (default, annotation)} of family `name`: its function's keyword-only
  arguments that the layer does not set itself (KeyError lists the valid names)."""
  sig = inspect.signature(attention_lib.get(name).attention)
  return {
    p.name: (p.default, str(p.annotation))
    for p in sig.parameters.values()
    if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name not in LAYER_ARGUMENTS
  }


def mask_arguments(name: str) -> dict[str, tuple[Any, str]]:
  """{argument: (default or None, annotation)} of mask `name`, but the grid `shape`."""
  cls = _mask_class(name)
  return {
    f.name: (None if f.default is dataclasses.MISSING else f.default, str(f.type))
    for f in dataclasses.fields(cls)
    if f.init and f.name != "shape"
  }


def _mask_class(name: str) -> type[masks.Mask]:
  if name not in MASKS:
    raise ValueError(f"mask={name!r} is not one of {sorted(MASKS)} (or '' for none)")
  return MASKS[name]


def build_mask(name: str | None, spatial_shape, kwargs: Mapping[str, Any]):
  """The mask object named `name` (None/"" -> no mask); N-D masks get `spatial_shape`."""
  if not name:
    return None
  cls = _mask_class(name)
  kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
  if "shape" in {f.name for f in dataclasses.fields(cls)}:
    if not spatial_shape:
      raise ValueError(
        f"mask={name!r} needs a spatial_shape (an image model); got {spatial_shape!r}"
      )
    return cls(shape=tuple(spatial_shape), **kwargs)
  return cls(**kwargs)


class Attention(nnx.Module):
  """Multi-head attention with independent query and key/value head counts.

  `num_kv_heads == num_heads` is MHA (Vaswani et al., arXiv 1706.03762 §3.2.2),
  `1 < num_kv_heads < num_heads` is GQA (Ainslie et al., arXiv 2305.13245),
  `num_kv_heads == 1` is MQA (Shazeer, arXiv 1911.02150). Kernels: query [D, N, H],
  key/value [D, K, H], out [N, H, D] (param paths `query`, `key`, `value`, `out`).

  Args:
    dim: model width D.
    num_heads, num_kv_heads, head_dim: N, K (N % K == 0), H.
    family: registry name of the attention function.
    knobs: keyword arguments passed to the family on every call (None values are
      dropped: None means the family's default).
    position: "none", "rope" or "alibi" (an additive bias; needs a family that takes `bias=`).
    is_causal: decoder (causal) or encoder (bidirectional) attention.
    mask: an `attnzoo.masks.Mask` (e.g. a 2-D Neighborhood) or None.
    attention_fn: replaces the family's function (the model passes ring attention here
      when the sequence axis of the mesh is sharded); it gets the knobs it declares.
    layer, num_layers: this layer's depth, for families whose knobs depend on it
      (`Family.layer_knobs`, e.g. linear attention's `decay="tnl"` schedule).
    output_norm: SRMSNorm over the merged heads before the output projection
      (TransNormerLLM's NormAttention, arXiv 2307.14995 §3.2).
    output_gate: multiply the (normed) heads by a gate U = x W_u (TNL's gated linear
      attention, O = Norm(Q Kᵀ V) ⊙ U).
  """

  def __init__(
    self,
    dim: int,
    *,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    family: str = "softmax",
    knobs: Mapping[str, Any] | None = None,
    position: str = "none",
    rope_base: float = 10000.0,
    is_causal: bool = False,
    mask: Any = None,
    use_bias: bool = False,
    dtype=None,
    attention_fn: Callable[..., Any] | None = None,
    layer: int = 0,
    num_layers: int = 1,
    output_norm: bool = False,
    output_gate: bool = False,
    rngs: nnx.Rngs,
  ):
    if num_heads % num_kv_heads:
      raise ValueError(
        f"num_heads={num_heads} is not divisible by num_kv_heads={num_kv_heads}; "
        "choose num_kv_heads among the divisors of num_heads"
      )
    if position not in POSITIONS:
      raise ValueError(f"position={position!r} is not one of {POSITIONS}")
    self.family = attention_lib.get(family)  # KeyError listing the valid names
    if self.family.causal_only and not is_causal:
      raise ValueError(f"family {family!r} is causal only; use it in a decoder (is_causal=True)")
    if not self.family.supports_mask and (mask is not None or position == "alibi"):
      raise ValueError(
        f"family {family!r} takes no mask/bias, so mask={mask!r} and "
        f"position={position!r} cannot apply; drop them or pick another family"
      )
    self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
    self.knobs = {k: v for k, v in (knobs or {}).items() if v is not None}
    if self.family.layer_knobs is not None:
      self.knobs = self.family.layer_knobs(
        self.knobs, layer=layer, num_layers=num_layers, num_heads=num_heads
      )
    self.output_norm = output_norm
    self.position, self.rope_base, self.is_causal = position, rope_base, is_causal
    self.mask = mask
    self.attention_fn = attention_fn
    proj = lambda heads: nnx.LinearGeneral(
      dim, (heads, head_dim), use_bias=use_bias, dtype=dtype, rngs=rngs
    )
    self.query = proj(num_heads)
    self.key = proj(num_kv_heads)
    self.value = proj(num_kv_heads)
    self.out = nnx.LinearGeneral(
      (num_heads, head_dim), dim, axis=(-2, -1), use_bias=use_bias, dtype=dtype, rngs=rngs
    )
    self.gate = proj(num_heads) if output_gate else None

  def __call__(
    self, x_BTD: Float[Array, "B T D"], positions_BT: Int[Array, "B T"] | None = None
  ) -> Float[Array, "B T D"]:
    B, T, _ = x_BTD.shape
    if positions_BT is None:
      positions_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    q_BTNH = self.query(x_BTD)
    k_BTKH = self.key(x_BTD)
    v_BTKH = self.value(x_BTD)
    kwargs: dict[str, Any] = dict(self.knobs, is_causal=self.is_causal)
    if self.position == "rope":
      q_BTNH = positions_lib.rope(q_BTNH, positions_BT, base=self.rope_base)
      k_BTKH = positions_lib.rope(k_BTKH, positions_BT, base=self.rope_base)
    elif self.position == "alibi":
      kwargs["bias"] = positions_lib.alibi_bias(self.num_heads, positions_BT, positions_BT)
    if self.mask is not None:
      kwargs["mask"] = self.mask
    if self.attention_fn is not None:
      # The override (ring attention) is its own implementation of the same family: it
      # takes the knobs it declares (scale, soft cap), not `implementation`/`interpret`.
      accepted = inspect.signature(self.attention_fn).parameters
      kwargs = {k: v for k, v in kwargs.items() if k in accepted}
      out_BTNH = self.attention_fn(q_BTNH, k_BTKH, v_BTKH, **kwargs)
    else:
      out_BTNH = self.family.attention(q_BTNH, k_BTKH, v_BTKH, **kwargs)
      if self.family.returns_aux:
        out_BTNH, aux = out_BTNH
        self.sow(nnx.Intermediate, "attention_aux", aux)
    if self.output_norm:
      out_BTNH = tnl.srms_norm(out_BTNH.reshape(B, T, -1)).reshape(out_BTNH.shape)
    if self.gate is not None:
      out_BTNH = out_BTNH * self.gate(x_BTD)
    return self.out(out_BTNH)


def layer_families(pattern: Sequence[str], num_layers: int) -> tuple[str, ...]:
  """The family of each layer: `pattern` cycled over `num_layers` (hybrid stacks)."""
  if not pattern:
    raise ValueError("the attention pattern is empty; give at least one family name")
  if num_layers % len(pattern):
    raise ValueError(
      f"attention pattern {tuple(pattern)} (length {len(pattern)}) does not "
      f"divide num_layers={num_layers}; give one name per layer or a divisor"
    )
  return tuple(pattern) * (num_layers // len(pattern))
