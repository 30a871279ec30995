"""MFA / MFA-KR: Multi-matrix Factorization Attention — many query heads over one wide kv head.

"Multi-matrix Factorization Attention" (Hu et al., arXiv 2412.19255, §3: MFA and MFA-Key-Reuse)
as deployed in "Step-3 is Large yet Affordable: Model-system Co-design for Cost-effective
Decoding" (StepFun, arXiv 2507.19427, §3: 64 query heads, one K and one V head of dim 256, a
7168 → 2048 → RMSNorm → 64·256 query path).

In the generalised multi-head view each head c has a QK circuit W_c = W_q^c W_k^cᵀ [D,D] and a VO
circuit U_c = W_v^c W_o^c [D,D]. MFA factorises them with shared key/value projections and a
low-rank query, so only one K head and one V head (width C = H) are cached per token:

    q   = RMSNorm(x W_qa) W_qb       W_qa [D,r], RMSNorm scale [r], W_qb [r,N,H]   (r = q_rank)
    k   = x W_k,  v = x W_v          W_k [D,Kv,H], W_v [D,Kv,H]  (Kv = kv_heads, 1 in the paper)
    out = softmax(q kᵀ / √H) v  per query head (MQA / GQA), then the layer's W_O [N,H,D]

MFA-KR (key reuse) re-parameterises the value from the key, so only K is cached (C per token):

    v   = k + α ⊙ (k M)              M [H,H], α [H] initialised to 0  (v == k at init)

With q_norm=False the query is x (W_qa W_qb): MFA is then exactly MQA with W_q = W_qa @ W_qb,
and head c's score is the bilinear form x_i (W_qa W_qb^c W_kᵀ) x_jᵀ / √H.

The attention function is softmax attention on whatever q/k/v it is given (`dot_product_attention`
"xla", "chunked" or "pallas"); what makes it MFA is the layer around it: `Family.heads` sets the
layer's layout (K = Kv = kv_heads, H = V = head_dim) and `Family.projection` replaces the query
(and, for MFA-KR, the value) projection. The knobs kv_heads, head_dim, q_rank, q_norm size and
configure those; the function only checks their values.

Shapes: q [B,T,N,H], k [B,S,K,H], v [B,S,K,Hv] -> [B,T,N,Hv]; projection params w_qa [D,r],
q_norm_scale [r], w_qb [r,N,H] (+ kr_mix [H,H], kr_alpha [H] for MFA-KR).

Differences from the paper:
- The MFA paper's final variant adds "gating" on top of key reuse; its exact form is not
  available to us, so MFA-KR here is the plain re-parameterisation v = k + α ⊙ (k M).
- RoPE (the layer's `position`) is applied to q and k after the projection, so MFA-KR's value is
  computed from the pre-RoPE key: a decoder caches the pre-RoPE k and rotates it on read.
- The family's projections have no bias (the layer's `use_bias` applies to its plain k/v/o).

Choices where the paper is silent:
- q_rank=None is D // 4 (Step-3: 2048 / 7168 ≈ 0.29 D); head_dim=None is the model's head dim;
  kv_heads=1 (MFA's single shared K and V head); values > 1 give a grouped variant.
- RMSNorm: fp32, eps 1e-6 (the project's norm default), learned scale initialised to 1. With
  q_norm=False the scale is not created (its ParamSpec shape is None).
- Initialisation: W_qa and W_qb LeCun normal over their fan-in (D, r), as the layer's own
  projections; MFA-KR's M LeCun normal over H (not zero: with α = 0 and M = 0 neither would
  receive a gradient), α zero.
- Projections accumulate in fp32 and return x's dtype.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from attnzoo.attention import registry
from attnzoo.attention.dense.softmax import dot_product_attention
from attnzoo.masks import Mask
from pallas_kernels.block_sparse import BlockSizes

_IMPLEMENTATIONS = ("xla", "chunked", "pallas")
_NORM_EPS = 1e-6


def _positive_or_none(name: str, value, fix: str) -> None:
  if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
    raise ValueError(f"{name}={value!r} must be a positive int or None; {fix}")


def check_knobs(kv_heads, head_dim, q_rank, q_norm) -> None:
  """ValueError naming the knob when one is out of range."""
  if isinstance(kv_heads, bool) or not isinstance(kv_heads, int) or kv_heads < 1:
    raise ValueError(
      f"kv_heads={kv_heads!r} must be a positive int (1 = the paper's single K and V head)"
    )
  _positive_or_none("head_dim", head_dim, "None uses the model's head dim")
  _positive_or_none("q_rank", q_rank, "None uses D // 4")
  if not isinstance(q_norm, bool):
    raise ValueError(f"q_norm={q_norm!r} must be True or False (RMSNorm on the low-rank query)")


def q_rank_of(dims: registry.Dims) -> int:
  """The low-rank query width r for a layer (knob q_rank, None = D // 4)."""
  return dims.knobs.get("q_rank") or max(1, dims.D // 4)


def heads(dims: registry.Dims) -> registry.Dims:
  """The layer's layout: the model's N query heads over `kv_heads` K and V heads of `head_dim`."""
  knobs = dims.knobs
  check_knobs(
    knobs.get("kv_heads", 1), knobs.get("head_dim"), knobs.get("q_rank"), knobs.get("q_norm", True)
  )
  head_dim = knobs.get("head_dim") or dims.H
  kv = knobs.get("kv_heads", 1)
  return dims.replace(K=kv, Kv=kv, H=head_dim, V=head_dim)


def low_rank_query(
  x_BTD: Float[Array, "B T D"],
  w_qa: Float[Array, "D R"],
  q_norm_scale: Float[Array, " R"] | None,
  w_qb: Float[Array, "R N H"],
) -> Float[Array, "B T N H"]:
  """q = RMSNorm(x W_qa) W_qb (or x W_qa W_qb when q_norm_scale is None: q_norm=False), fp32
  accumulation."""
  c_BTR = jnp.einsum("btd,dr->btr", x_BTD, w_qa, preferred_element_type=jnp.float32)
  if q_norm_scale is not None:
    inv_BT1 = jax.lax.rsqrt(jnp.mean(c_BTR * c_BTR, axis=-1, keepdims=True) + _NORM_EPS)
    c_BTR = c_BTR * inv_BT1 * q_norm_scale.astype(jnp.float32)[None, None, :]
  q_BTNH = jnp.einsum("btr,rnh->btnh", c_BTR, w_qb, preferred_element_type=jnp.float32)
  return q_BTNH.astype(x_BTD.dtype)


def key_reuse_value(
  k_BSKH: Float[Array, "B S K H"], kr_mix: Float[Array, "H H"], kr_alpha: Float[Array, " H"]
) -> Float[Array, "B S K H"]:
  """MFA-KR's value v = k + α ⊙ (k M) (exactly k when α = 0), fp32 accumulation."""
  kM_BSKH = jnp.einsum("bskh,hg->bskg", k_BSKH, kr_mix, preferred_element_type=jnp.float32)
  alpha = kr_alpha.astype(jnp.float32)[None, None, None, :]
  return (k_BSKH.astype(jnp.float32) + alpha * kM_BSKH).astype(k_BSKH.dtype)


def _apply_mfa(params: Mapping[str, Any], x_BTD, q, k, v, dims: registry.Dims):
  del q
  del dims  # q_norm=False: the scale was never created (its shape is None)
  q_BTNH = low_rank_query(x_BTD, params["w_qa"], params.get("q_norm_scale"), params["w_qb"])
  return q_BTNH, k, v


def _apply_mfa_kr(params: Mapping[str, Any], x_BTD, q, k, v, dims: registry.Dims):
  del v
  q_BTNH, k, _ = _apply_mfa(params, x_BTD, q, k, None, dims)
  return q_BTNH, k, key_reuse_value(k, params["kr_mix"], params["kr_alpha"])


def attention(
  q: Float[Array, "B T N H"],
  k: Float[Array, "B S K H"],
  v: Float[Array, "B S K V"],
  *,
  mask: Mask | jax.Array | None = None,
  bias: Float[Array, "..."] | None = None,
  is_causal: bool = False,
  scale: float | None = None,
  segment_ids: jax.Array | tuple[jax.Array, jax.Array] | None = None,
  logits_soft_cap: float | None = None,
  kv_heads: int = 1,
  head_dim: int | None = None,
  q_rank: int | None = None,
  q_norm: bool = True,
  implementation: str | None = None,
  block_sizes: BlockSizes | None = None,
  interpret: bool | None = None,
) -> Float[Array, "B T N V"]:
  """MFA's attention step: softmax attention of many query heads over few wide kv heads.

  Args:
    q, k, v: [B,T,N,H], [B,S,K,H], [B,S,K,Hv] as the layer's projections produce them.
    mask, bias, is_causal, scale, segment_ids, logits_soft_cap: as `dot_product_attention`.
    kv_heads: K = Kv of the layer (1 = MFA's single K and V head).
    head_dim: H = V of the layer; None = the model's head dim.
    q_rank: r of the low-rank query D → r → N·H; None = D // 4.
    q_norm: RMSNorm (learned scale) between the down and up query projections.
    implementation: "xla", "chunked", "pallas" or None (the platform's best).
    block_sizes, interpret: tiles of the chunked/pallas paths; Pallas interpret mode.

  The four layout knobs are consumed by the layer (`Family.heads`, `Family.projection`); here
  they are only checked.
  """
  check_knobs(kv_heads, head_dim, q_rank, q_norm)
  name = registry.resolve_implementation(
    implementation, dict.fromkeys(_IMPLEMENTATIONS), family="mfa"
  )
  return dot_product_attention(
    q,
    k,
    v,
    mask=mask,
    bias=bias,
    is_causal=is_causal,
    scale=scale,
    segment_ids=segment_ids,
    logits_soft_cap=logits_soft_cap,
    implementation=name,
    block_sizes=block_sizes,
    interpret=interpret,
  )


_LECUN_R_NH = jax.nn.initializers.lecun_normal(in_axis=0, out_axis=(1, 2))
_QUERY_PARAMS = {
  "w_qa": registry.ParamSpec(
    lambda d: (d.D, q_rank_of(d)), jax.nn.initializers.lecun_normal(), "MFA query down W_qa [D,r]"
  ),
  "q_norm_scale": registry.ParamSpec(
    lambda d: (q_rank_of(d),) if d.knobs.get("q_norm", True) else None,
    jax.nn.initializers.ones,
    "RMSNorm scale of the low-rank query [r] (only with q_norm)",
  ),
  "w_qb": registry.ParamSpec(
    lambda d: (q_rank_of(d), d.N, d.H), _LECUN_R_NH, "MFA query up W_qb [r,N,H]", head_axis=1
  ),
}
_KEY_REUSE_PARAMS = {
  "kr_mix": registry.ParamSpec(
    lambda d: (d.H, d.H), jax.nn.initializers.lecun_normal(), "MFA-KR value map M [H,H]"
  ),
  "kr_alpha": registry.ParamSpec(lambda d: (d.H,), doc="MFA-KR value gate α [H] (0: v == k)"),
}
_CONFORMANCE = registry.Conformance(
  # Tiles smaller than the suite's lengths, so ragged tiles and skipping are exercised.
  implementation_options={
    "chunked": {"block_sizes": BlockSizes(16, 8)},
    "pallas": {"block_sizes": BlockSizes(16, 16)},  # interpreted on CPU (logged)
  },
  slow=("pallas",),  # the Pallas interpreter is slow per grid step
)
_PAPER = "Multi-matrix Factorization Attention (arXiv 2412.19255; Step-3, arXiv 2507.19427)"

FAMILY = registry.Family(
  name="mfa",
  attention=attention,
  implementations=_IMPLEMENTATIONS,
  paper=_PAPER,
  heads=heads,
  projection=registry.Projection(replaces=("q",), params=_QUERY_PARAMS, apply=_apply_mfa),
  conformance=_CONFORMANCE,
)

FAMILY_KR = registry.Family(
  name="mfa_kr",
  attention=attention,
  implementations=_IMPLEMENTATIONS,
  paper=_PAPER,
  heads=heads,
  projection=registry.Projection(
    replaces=("q", "v"), params={**_QUERY_PARAMS, **_KEY_REUSE_PARAMS}, apply=_apply_mfa_kr
  ),
  conformance=_CONFORMANCE,
)
