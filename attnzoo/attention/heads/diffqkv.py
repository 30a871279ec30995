"""Sigma's DiffQKV attention: separate key and value head counts, half-width keys, augmented Q.

"Sigma: Differential Rescaling of Query, Key and Value for Efficient Language Models" (Lin et
al., Microsoft; arXiv 2501.13629v2), §3 (Eq. 1-3), Table 14 and Appendix E (official code).

    head maps (Eq. 3):  query head i reads key head floor(i·Kk/N) and value head floor(i·Kv/N)
    out_i = softmax(q_i k_{floor(i·Kk/N)}ᵀ / √H) v_{floor(i·Kv/N)}
    KV cache per token and layer (Eq. 1): Kk·Hk + Kv·Hv elements (K compressed more than V)
    augmented Q (App. E):  q = W_down(SiLU(W_gate q0) ⊙ W_up q0),  q0 = x W_Q flattened to N·H
    half-width K (§3.1):   k = k_s W_kup,  k_s = x W_K ∈ [Kk, H/2],  W_kup [H/2, H]

Shapes of the function: q [B,T,N,H], k [B,S,Kk,H], v [B,S,Kv,Hv] -> [B,T,N,Hv]; Kk and Kv
divide N. It is softmax attention (`dot_product_attention`, which takes Kk != Kv exactly by
repeating both to lcm(Kk, Kv) heads). The layout knobs act when the layer is built:
`FAMILY.heads` sets Kk = `num_k_heads`, Kv = `num_v_heads` (None = the model's K), and
`FAMILY.projection` computes the keys (always: its `w_k` [D,Kk,Hk] replaces the layer's key
kernel so that `half_k` can narrow it) and, with `aug_q` = d_hq > 0, augments the layer's plain
query q0. Learned arrays (`projection_params`): `w_k` [D,Kk,Hk] (Hk = H/2 with `half_k`, else
H), `k_up` [H/2,H], `q_gate` [N·H,d_hq], `q_up` [N·H,d_hq], `q_down` [d_hq,N·H]: AugQ adds
3·(N·H)·d_hq parameters per layer. A switched-off feature's arrays have shape None (the layer
creates none), so the default layer has exactly GQA's parameters.

Why the cache can hold the small K: q·(W_kup k_s) = (W_kupᵀ q)·k_s, so a decoder may cache
k_s [S,Kk,H/2] and fold W_kup into the query once per step (`absorb_k_up`; exact). The layer
applies W_kup in the projection, which is the same product.

Differences from the paper:
- Eq. 3's maps for any Kk, Kv dividing N (the official group sharing only handles Kk | Kv or
  Kv | Kk, and its fallback duplicates K in the cache; the paper calls that "highly
  discouraged"). Here the repetition exists only inside the attention call, never in a cache.
- Selective V-cache fetching (top-100 entries at decode) is not implemented: it changes the
  semantics and is an inference option.

Choices where the paper is silent:
- RoPE (the layer's `position="rope"`) rotates the up-mapped K, like any other key: with RoPE a
  decoder caches the pre-RoPE k_s and maps up and rotates at read time (the memory saving
  stays; folding W_kup into q does not commute with the rotation). Without positions inside
  attention the absorption is exact.
- `k_up` maps K to the query/key head dim H (the paper: "to V's dim"; here Hv = H).
- Inits: `w_k` as the layer's kernels (LeCun normal over D); `k_up`, `q_gate`, `q_up`,
  `q_down` LeCun normal over their input axis (the paper gives none).
- AugQ and the half-K map are computed in fp32 and cast back to the input dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from attnzoo.attention import registry
from attnzoo.attention.dense.softmax import dot_product_attention
from attnzoo.masks import Mask
from pallas_kernels.block_sparse import BlockSizes

_IMPLEMENTATIONS = ("xla", "chunked", "pallas")


def attention(
  q: Float[Array, "B T N H"],
  k: Float[Array, "B S Kk H"],
  v: Float[Array, "B S Kv V"],
  *,
  mask: Mask | jax.Array | None = None,
  bias: Float[Array, "..."] | None = None,
  is_causal: bool = False,
  scale: float | None = None,
  segment_ids: jax.Array | tuple[jax.Array, jax.Array] | None = None,
  logits_soft_cap: float | None = None,
  num_k_heads: int | None = None,
  num_v_heads: int | None = None,
  aug_q: int | None = None,
  half_k: bool = False,
  implementation: str | None = None,
  block_sizes: BlockSizes | None = None,
  interpret: bool | None = None,
) -> Float[Array, "B T N V"]:
  """DiffQKV attention: softmax with Eq. 3's separate key and value head maps.

  Args:
    q, k, v: [B,T,N,H], [B,S,Kk,H], [B,S,Kv,Hv]; Kk and Kv divide N.
    mask, bias, is_causal, scale, segment_ids, logits_soft_cap: as `dot_product_attention`.
    num_k_heads, num_v_heads, aug_q, half_k: the layer's layout and projections (read by
      `FAMILY.heads` / `FAMILY.projection` when the layer is built; k and v arrive with them
      applied).
    implementation: "xla", "chunked" or "pallas"; None = automatic.
    block_sizes, interpret: as `dot_product_attention`.
  """
  del num_k_heads, num_v_heads, aug_q, half_k  # act through FAMILY.heads / FAMILY.projection
  impl = registry.resolve_implementation(
    implementation, dict.fromkeys(_IMPLEMENTATIONS), family="diffqkv"
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
    implementation=impl,
    block_sizes=block_sizes,
    interpret=interpret,
  )


def absorb_k_up(q: Float[Array, "B T N H"], k_up: Float[Array, "Hs H"]) -> Float[Array, "B T N Hs"]:
  """W_kupᵀ q: scores of q against k_s W_kup equal scores of this against the small k_s."""
  out = jnp.einsum("btnh,ch->btnc", q, k_up, preferred_element_type=jnp.float32)
  return out.astype(q.dtype)


# ------------------------------------------------------------------ layout and projections


def _aug_width(knobs) -> int:
  aug_q = knobs.get("aug_q") or 0
  if not isinstance(aug_q, int) or aug_q < 0:
    raise ValueError(
      f"aug_q={aug_q!r} must be a non-negative int (the augmented query's intermediate width "
      "d_hq; 0 or None = off)"
    )
  return aug_q


def _k_width(dims: registry.Dims) -> int:
  return dims.H // 2 if dims.knobs.get("half_k") else dims.H


def layer_heads(dims: registry.Dims) -> registry.Dims:
  """Kk = num_k_heads, Kv = num_v_heads (None = the model's K); checks aug_q and half_k."""
  knobs = dims.knobs
  _aug_width(knobs)
  if knobs.get("half_k") and dims.H % 2:
    raise ValueError(
      f"half_k=True caches keys at head dim H/2, but H={dims.H} is odd; use an even head_dim "
      "or half_k=False"
    )
  return dims.replace(K=knobs.get("num_k_heads") or dims.K, Kv=knobs.get("num_v_heads") or dims.K)


def _lecun(in_axis, out_axis):
  """LeCun normal over `in_axis`."""
  return jax.nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis, out_axis)


def _aug_shape(d: registry.Dims, down: bool) -> tuple[int, int] | None:
  width = _aug_width(d.knobs)
  if not width:
    return None  # AugQ off: not created
  return (width, d.N * d.H) if down else (d.N * d.H, width)


def _matmul(x, w, spec: str):
  return jnp.einsum(spec, x, w, preferred_element_type=jnp.float32)


def project(params, x_BTD, q_BTNH, k_BTKH, v_BTKV, dims: registry.Dims):
  """`Projection.apply`: keys from `w_k` (mapped up by `k_up` with half_k), AugQ on q0."""
  del k_BTKH  # replaced: the layer creates no key kernel for this family
  dtype = jnp.result_type(x_BTD.dtype, params["w_k"].dtype)
  k_BTKH = _matmul(x_BTD, params["w_k"], "btd,dkh->btkh")
  if dims.knobs.get("half_k"):
    k_BTKH = _matmul(k_BTKH, params["k_up"], "btkc,ch->btkh")
  k_BTKH = k_BTKH.astype(dtype)
  if _aug_width(dims.knobs):
    B, T, N, H = q_BTNH.shape
    q0_BTF = q_BTNH.reshape(B, T, N * H)
    gate_BTA = _matmul(q0_BTF, params["q_gate"], "btf,fa->bta")
    up_BTA = _matmul(q0_BTF, params["q_up"], "btf,fa->bta")
    q_BTF = _matmul(jax.nn.silu(gate_BTA) * up_BTA, params["q_down"], "bta,af->btf")
    q_BTNH = q_BTF.reshape(B, T, N, H).astype(q_BTNH.dtype)
  return q_BTNH, k_BTKH, v_BTKV


PROJECTION = registry.Projection(
  replaces=("k",),
  params={
    "w_k": registry.ParamSpec(
      lambda d: (d.D, d.K, _k_width(d)), _lecun(0, (1, 2)), "DiffQKV key kernel [D, Kk, Hk]"
    ),
    "k_up": registry.ParamSpec(
      lambda d: (_k_width(d), d.H) if d.knobs.get("half_k") else None,
      _lecun(0, 1),
      "half-K map up [H/2, H] (only with half_k)",
    ),
    "q_gate": registry.ParamSpec(
      lambda d: _aug_shape(d, down=False), _lecun(0, 1), "AugQ W_gate [N·H, d_hq]"
    ),
    "q_up": registry.ParamSpec(
      lambda d: _aug_shape(d, down=False), _lecun(0, 1), "AugQ W_up [N·H, d_hq]"
    ),
    "q_down": registry.ParamSpec(
      lambda d: _aug_shape(d, down=True), _lecun(0, 1), "AugQ W_down [d_hq, N·H]"
    ),
  },
  apply=project,
)

FAMILY = registry.Family(
  name="diffqkv",
  attention=attention,
  implementations=_IMPLEMENTATIONS,
  paper="Sigma: Differential Rescaling of Query, Key and Value (arXiv 2501.13629)",
  heads=layer_heads,
  projection=PROJECTION,
  conformance=registry.Conformance(
    # The layout knobs act when a layer is built (the function ignores them), so the suite runs
    # the function with Kk = Kv; separate counts: tests/attention/dense/test_diff_kv_heads.py and
    # tests/attention/heads/test_diffqkv.py. The smoke-train builds a full Sigma layer (one key
    # head, AugQ, half-width keys) from this first setting.
    cases={
      "sigma": registry.ConformanceCase(options={"num_k_heads": 1, "aug_q": 16, "half_k": True})
    },
    implementation_options={
      "chunked": {"block_sizes": BlockSizes(16, 8)},
      "pallas": {"block_sizes": BlockSizes(16, 16)},  # interpreted on CPU (logged)
    },
    slow=("pallas",),
  ),
)
