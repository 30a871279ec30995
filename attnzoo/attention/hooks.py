"""Input and output hooks of the attention layer: small transformations around a family.

A hook runs in the attention layer before the family (stage "input": on q, k, v) or after it
(stage "output": on the per-head output [B,T,N,V], before the output projection). It may own
learned arrays, declared as `ParamSpec`s exactly like a family's. A family names its default
hooks (`Family.hooks`); a run picks others with the knob `hooks` of that family
(`--config.model.knobs.linear.hooks=srms_norm+output_gate`). The layer never branches on a
hook's or a family's name.

Output hook: `apply(params, out_BTNV, *, x_BTD) -> out_BTNV`.
Input hook:  `apply(params, q, k, v, *, x_BTD) -> (q, k, v)`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from attnzoo.attention.registry import ParamSpec

STAGES = ("input", "output")


@dataclasses.dataclass(frozen=True)
class Hook:
  """One layer hook: its stage, its function and the arrays it learns."""

  stage: str
  apply: Callable[..., object]
  params: Mapping[str, ParamSpec] = dataclasses.field(default_factory=dict)
  doc: str = ""

  def __post_init__(self):
    if self.stage not in STAGES:
      raise ValueError(f"hook stage={self.stage!r} is not one of {STAGES}")


def srms_norm(x: Float[Array, "... D"], eps: float = 1e-6) -> Float[Array, "... D"]:
  """SRMSNorm(x) = x / sqrt(mean(x²) + eps) over the last axis, in fp32, cast back.

  TransNormerLLM (arXiv 2307.14995) §3.2: RMSNorm without a learned scale. The epsilon keeps an
  all-zero row finite (the paper writes x / (‖x‖₂/√d)).
  """
  x32 = x.astype(jnp.float32)
  inv = jax.lax.rsqrt(jnp.mean(x32 * x32, -1, keepdims=True) + eps)
  return (x32 * inv).astype(x.dtype)


def _srms_norm_heads(params, out_BTNV, *, x_BTD):
  del params, x_BTD
  B, T, N, V = out_BTNV.shape
  return srms_norm(out_BTNV.reshape(B, T, N * V)).reshape(B, T, N, V)


def _output_gate(params, out_BTNV, *, x_BTD):
  gate_BTNV = jnp.einsum("btd,dnv->btnv", x_BTD, params["kernel"].astype(x_BTD.dtype))
  return out_BTNV * gate_BTNV.astype(out_BTNV.dtype)


def _qk_norm(params, q_BTNH, k_BTKH, v_BTKV, *, x_BTD):
  """RMS-normalise every query and key head vector, times a learned per-head scale."""
  del x_BTD

  def rms(x, scale_XH):
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, -1, keepdims=True) + 1e-6)
    return (x32 * scale_XH.astype(jnp.float32)[None, None]).astype(x.dtype)

  return rms(q_BTNH, params["query_scale"]), rms(k_BTKH, params["key_scale"]), v_BTKV


def _ones(key, shape, dtype=jnp.float32):
  del key
  return jnp.ones(shape, dtype)


def _lecun_normal(key, shape, dtype=jnp.float32):
  return jax.nn.initializers.lecun_normal(in_axis=0, out_axis=(1, 2))(key, shape, dtype)


HOOKS: dict[str, Hook] = {
  "qk_norm": Hook(
    stage="input",
    apply=_qk_norm,
    params={
      "query_scale": ParamSpec(lambda d: (d.N, d.H), _ones, "per-head query scale"),
      "key_scale": ParamSpec(lambda d: (d.K, d.H), _ones, "per-head key scale"),
    },
    doc="QK-norm: RMSNorm of each q and k head with a learned scale (Dehghani et al., "
    "arXiv 2302.05442 §3.1; there LayerNorm) before positions and the family",
  ),
  "srms_norm": Hook(
    stage="output",
    apply=_srms_norm_heads,
    doc="SRMSNorm over the merged heads (TransNormerLLM NormAttention, arXiv 2307.14995 §3.2)",
  ),
  "output_gate": Hook(
    stage="output",
    apply=_output_gate,
    params={"kernel": ParamSpec(lambda d: (d.D, d.N, d.V), _lecun_normal, "gate U = x W_u")},
    doc="multiply the heads by a gate U = x W_u (TNL's gated output, O = Norm(QKᵀV) ⊙ U)",
  ),
}


def parse(spec: str | tuple[str, ...] | None) -> tuple[str, ...]:
  """'srms_norm+output_gate' (or a tuple) -> ('srms_norm', 'output_gate'); unknown names raise."""
  if spec is None or spec == "none":
    return ()
  names = (
    tuple(n.strip() for n in spec.replace(",", "+").split("+"))
    if isinstance(spec, str)
    else tuple(spec)
  )
  names = tuple(n for n in names if n)
  unknown = [n for n in names if n not in HOOKS]
  if unknown:
    raise ValueError(f"unknown attention hooks {unknown}; valid hooks: {sorted(HOOKS)}")
  return names
