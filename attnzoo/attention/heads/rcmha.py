"""RCMHA: relative convolutional multi-head attention.

"RCMHA: Relative Convolutional Multi-Head Attention for Natural Language Modelling" (Sugiharto,
Aradea, Mubarok; arXiv 2308.03429; the method as the abstract states it and the official code
`hermansh-id/rcmha` @ 87df49b, `rcmha/attention.py`, implements it): Transformer-XL relative
attention (Dai et al., arXiv 1901.02860 §3.3, in the labml implementation) whose projected
queries, keys and values first pass through a Primer-EZ-style causal depth-wise convolution over
time (So et al., arXiv 2109.08668):

    q̃ = DWConv(q),  k̃ = DWConv(k),  ṽ = DWConv(v)      (three convolutions, one per input)
    DWConv(x)_t = β + Σ_{c<C} w_c ⊙ x_{t-(C-1)+c}          (x_{<0} = 0: causal, "pad C-1, drop
                                                           the last C-1" of Conv1d)
    s_ij = [(q̃_i + u)·k̃_j  +  q̃_i·R_{i-j}  +  b_{i-j}] / √H
    out_i = Σ_j softmax_j(s_ij) ṽ_j

Shapes: q [B,T,N,H], k [B,S,K,H], v [B,S,K,Hv] -> [B,T,N,Hv] (N % K == 0: grouped-query heads,
query head n reads kv head n // (N // K)). Learned arrays (`FAMILY.params`):

- `conv_{q,k}_kernel` [C,H], `conv_v_kernel` [C,Hv] and biases [H] / [Hv]: one depth-wise
  kernel per channel, shared by every head (the official code convolves [B·heads, H, T] with
  `groups=H`); tap C-1 multiplies the current step, tap 0 the step C-1 back.
- `key_pos_emb` R [2P,N,H], `key_pos_bias` b [2P,N], `query_pos_bias` u [N,H] (the official
  names): distance d = i - j reads row P - d, as the official `key_pos_embeddings[P - S : P + T]`
  followed by `shift_right` does. Relative parameters are per query head.

The relative term q̃_i·R_{i-j} + b_{i-j} is an additive [B,N,T,S] logits bias, and u·k̃_j is
folded into the queries (q̃ + u), so the whole score goes through softmax attention's
differentiable `bias=` path: "xla" and "chunked" are `dot_product_attention`'s implementations,
with every mask, causality and fully-masked-row convention of the softmax family. The 1/√H
scale multiplies the whole sum (the official `scores *= self.scale` after `ac + bd`), so the
bias handed to the softmax is pre-scaled. Logits, the convolution and the bias are fp32; the
attention inputs are cast back to the input dtype.

Differences from the paper / official code:
- Initialisation: the convolutions start as the identity (tap C-1 = 1, every other tap and the
  bias 0; PyTorch's Conv1d default is Kaiming-uniform) and R, b, u start at zero (as the
  official code). A fresh layer is therefore plain softmax attention, and RCMHA departs from
  RMHA (Transformer-XL) and MHA only as it trains.
- P: the official table has P = 4096 rows per side and indexes out of range past it; here
  P = MAX_DISTANCE = 128 by default (2·128·N·H parameters per layer) and distances are clipped
  to [-(P-1), P], so positions further apart share the edge rows (as T5-style clipping).
- No Transformer-XL memory (the layer carries none) and no attention dropout.
- Kernel size C and P are knobs (`kernel_size`, `max_distance`) that size the learned arrays
  through `Dims.knobs`; the function checks the arrays it is given match them.
- The q/k-bias-free, v-with-bias projections of the official code belong to the layer.

Choices where the paper is silent:
- Alignment when T != S: query i sits at position i and key j at position j (top-left, the
  convention of `is_causal` in this package); the official code aligns the last query with the
  last key (memory before the segment). Identical when T == S.
- The convolution runs over each input's own sequence axis (q over T, k and v over S) and is
  always causal, also for `is_causal=False` (the paper's convolution is causal; a bidirectional
  model still gets a causal smoothing). Each call convolves the sequence it is given from a
  zero history, so incremental decoding would need carried conv state (not provided), and the
  convolution reads across packed-document boundaries (masks act on attention only).
- GQA (not in the paper): the conv is per channel, so it commutes with repeating kv heads;
  GQA equals MHA with repeated kv heads.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from attnzoo.attention import _validate, registry
from attnzoo.attention.dense.softmax import dot_product_attention
from attnzoo.masks import Mask
from pallas_kernels.block_sparse import BlockSizes

KERNEL_SIZE = 3  # the official SpatialDepthWiseConvolution default
MAX_DISTANCE = 128  # P: relative table rows per side (official: 4096)
_IMPLEMENTATIONS = ("xla", "chunked")


def attention(
  q: Float[Array, "B T N H"],
  k: Float[Array, "B S K H"],
  v: Float[Array, "B S K V"],
  *,
  mask: Mask | jax.Array | None = None,
  bias: Float[Array, "..."] | None = None,
  is_causal: bool = False,
  conv_q_kernel: Float[Array, "C H"],
  conv_q_bias: Float[Array, " H"],
  conv_k_kernel: Float[Array, "C H"],
  conv_k_bias: Float[Array, " H"],
  conv_v_kernel: Float[Array, "C V"],
  conv_v_bias: Float[Array, " V"],
  key_pos_emb: Float[Array, "R N H"],
  key_pos_bias: Float[Array, "R N"],
  query_pos_bias: Float[Array, "N H"],
  kernel_size: int | None = None,
  max_distance: int | None = None,
  block_sizes: BlockSizes | None = None,
  implementation: str | None = None,
) -> Float[Array, "B T N V"]:
  """RCMHA; see the module docstring for the equation and conventions.

  Args:
    q, k, v: projected queries [B,T,N,H], keys [B,S,K,H], values [B,S,K,Hv].
    mask, is_causal: as `dot_product_attention` (True = keep; top-left causal).
    bias: an extra additive logits bias broadcastable to [B,N,T,S] (e.g. ALiBi from the layer),
      added to the relative term.
    conv_*_kernel, conv_*_bias: causal depth-wise convolutions [C,H] / [C,Hv] and [H] / [Hv].
    key_pos_emb, key_pos_bias, query_pos_bias: R [2P,N,H], b [2P,N], u [N,H].
    kernel_size, max_distance: C and P (default 3 and 128); they size the layer's arrays
      (`Dims.knobs`). None = read them off the arrays; given, they must match the arrays.
    block_sizes: tiles of the "chunked" implementation.
    implementation: "xla", "chunked", or None for the platform's best.
  """
  _, _, _, N, _, H, Hv = _validate.check_qkv(q, k, v)
  taps = _check_conv("q", conv_q_kernel, conv_q_bias, H)
  for name, kernel, conv_bias, width in (
    ("k", conv_k_kernel, conv_k_bias, H),
    ("v", conv_v_kernel, conv_v_bias, Hv),
  ):
    if _check_conv(name, kernel, conv_bias, width) != taps:
      raise ValueError(
        f"conv_{name}_kernel has kernel size {kernel.shape[0]} but conv_q_kernel has "
        f"{taps}; the three convolutions must share one kernel size"
      )
  _check_relative(key_pos_emb, key_pos_bias, query_pos_bias, N, H)
  if (kernel_size is not None and kernel_size != taps) or (
    max_distance is not None and 2 * max_distance != key_pos_emb.shape[0]
  ):
    raise ValueError(
      f"kernel_size={kernel_size} and max_distance={max_distance} do not match the arrays "
      f"(conv taps {conv_q_kernel.shape[0]}, relative rows {key_pos_emb.shape[0]} = 2P); pass "
      "the knobs the arrays were created with"
    )
  name = registry.resolve_implementation(
    implementation, dict.fromkeys(_IMPLEMENTATIONS), family="rcmha"
  )

  q_BTNH = causal_depthwise_conv(q, conv_q_kernel, conv_q_bias)
  k_BSKH = causal_depthwise_conv(k, conv_k_kernel, conv_k_bias)
  v_BSKV = causal_depthwise_conv(v, conv_v_kernel, conv_v_bias)
  scale = 1.0 / math.sqrt(H)
  rel_BNTS = scale * relative_bias(q_BTNH, key_pos_emb, key_pos_bias, k.shape[1])
  if bias is not None:
    rel_BNTS = rel_BNTS + _validate.broadcast_to_bnts(
      jnp.asarray(bias, jnp.float32), "bias", rel_BNTS.shape
    )
  u_11NH = query_pos_bias.astype(jnp.float32)[None, None]
  q_u_BTNH = (q_BTNH.astype(jnp.float32) + u_11NH).astype(q.dtype)
  return dot_product_attention(
    q_u_BTNH,
    k_BSKH,
    v_BSKV,
    mask=mask,
    bias=rel_BNTS,
    is_causal=is_causal,
    scale=scale,
    implementation=name,
    block_sizes=block_sizes,
  )


def causal_depthwise_conv(
  x: Float[Array, "B S K H"], kernel: Float[Array, "C H"], bias: Float[Array, " H"]
) -> Float[Array, "B S K H"]:
  """out_t = bias + Σ_c kernel_c ⊙ x_{t-(C-1)+c} over axis 1, zeros before the start.

  The official `SpatialDepthWiseConvolution` (Conv1d, groups=H, padding C-1, last C-1 outputs
  dropped) with its torch weight [H,1,C] stored as `kernel[c, h] = weight[h, 0, c]`; one kernel
  per channel, shared by the heads. Accumulates in fp32, returns x's dtype.
  """
  C, S = kernel.shape[0], x.shape[1]
  x_pad = jnp.pad(x.astype(jnp.float32), ((0, 0), (C - 1, 0), (0, 0), (0, 0)))
  kernel_C111H = kernel.astype(jnp.float32)[:, None, None, None, :]
  out = jnp.broadcast_to(bias.astype(jnp.float32)[None, None, None, :], x.shape)
  for c in range(C):
    out = out + kernel_C111H[c] * x_pad[:, c : c + S]
  return out.astype(x.dtype)


def relative_positions(T: int, S: int, max_distance: int) -> jax.Array:
  """int [T,S]: the row of the [2P, ...] relative tables that query i reads for key j.

  Distance d = i - j (top-left aligned), clipped to [-(P-1), P]; row = P - d, in [0, 2P).
  """
  d_TS = jnp.arange(T, dtype=jnp.int32)[:, None] - jnp.arange(S, dtype=jnp.int32)[None, :]
  return max_distance - jnp.clip(d_TS, -(max_distance - 1), max_distance)


def relative_bias(
  q: Float[Array, "B T N H"],
  key_pos_emb: Float[Array, "R N H"],
  key_pos_bias: Float[Array, "R N"],
  S: int,
) -> Float[Array, "B N T S"]:
  """fp32 [B,N,T,S]: q_i·R_{i-j} + b_{i-j}, unscaled (Transformer-XL's terms (b) + (d)).

  An exact gather of `relative_positions` (the official code's shift trick gives the same for
  T == S); q·R is computed only for the contiguous range of rows the T x S pairs read.
  """
  T, P = q.shape[1], key_pos_emb.shape[0] // 2
  rows_TS = relative_positions(T, S, P)
  lo = P - min(T - 1, P)
  hi = P + min(S - 1, P - 1)  # rows lo..hi inclusive: distances T-1 .. -(S-1), clipped
  emb_RNH = key_pos_emb[lo : hi + 1].astype(jnp.float32)
  qr_BNTR = jnp.einsum("btnh,rnh->bntr", q.astype(jnp.float32), emb_RNH)
  qr_BNTR = qr_BNTR + key_pos_bias[lo : hi + 1].astype(jnp.float32).T[None, :, None, :]
  B, N = qr_BNTR.shape[:2]
  index_BNTS = jnp.broadcast_to((rows_TS - lo)[None, None], (B, N, T, S))
  return jnp.take_along_axis(qr_BNTR, index_BNTS, axis=-1)


def _check_conv(name: str, kernel, bias, width: int) -> int:
  if kernel.ndim != 2 or kernel.shape[1] != width:
    raise ValueError(
      f"conv_{name}_kernel has shape {kernel.shape}; it must be [kernel_size, {width}] (one "
      f"depth-wise tap per channel of {name}'s head dim {width}, shared by the heads)"
    )
  if kernel.shape[0] < 1:
    raise ValueError(
      f"conv_{name}_kernel has kernel size {kernel.shape[0]}; it must be >= 1 (1 is a "
      "per-channel scale, the paper uses 3)"
    )
  if bias.shape != (width,):
    raise ValueError(f"conv_{name}_bias has shape {bias.shape}; it must be ({width},)")
  return kernel.shape[0]


def _check_relative(emb, pos_bias, query_bias, N: int, H: int) -> None:
  if emb.ndim != 3 or emb.shape[1:] != (N, H):
    raise ValueError(
      f"key_pos_emb has shape {emb.shape}; it must be [2 * max_distance, N={N}, H={H}] "
      "(relative embeddings are per query head)"
    )
  rows = emb.shape[0]
  if rows < 2 or rows % 2:
    raise ValueError(
      f"key_pos_emb has {rows} rows, i.e. max_distance={rows / 2}; it needs 2 * max_distance "
      "rows with max_distance an integer >= 1 (rows P - d for distances d in [-(P-1), P])"
    )
  if pos_bias.shape != (rows, N):
    raise ValueError(f"key_pos_bias has shape {pos_bias.shape}; it must be ({rows}, {N})")
  if query_bias.shape != (N, H):
    raise ValueError(f"query_pos_bias has shape {query_bias.shape}; it must be ({N}, {H})")


def _identity_taps(key, shape, dtype=jnp.float32):
  """Conv kernel [C, width] that passes the current step through: a fresh layer is RMHA."""
  del key
  return jnp.zeros(shape, dtype).at[-1].set(1)


def _conv_params(tag: str, width) -> dict[str, registry.ParamSpec]:
  return {
    f"conv_{tag}_kernel": registry.ParamSpec(
      lambda d: (d.knobs.get("kernel_size") or KERNEL_SIZE, width(d)),
      _identity_taps,
      f"causal depth-wise conv taps on {tag}",
    ),
    f"conv_{tag}_bias": registry.ParamSpec(
      lambda d: (width(d),), doc=f"causal depth-wise conv bias on {tag}"
    ),
  }


FAMILY = registry.Family(
  name="rcmha",
  attention=attention,
  implementations=_IMPLEMENTATIONS,
  paper="RCMHA: Relative Convolutional Multi-Head Attention for Natural Language Modelling "
  "(arXiv 2308.03429)",
  params={
    **_conv_params("q", lambda d: d.H),
    **_conv_params("k", lambda d: d.H),
    **_conv_params("v", lambda d: d.V),
    "key_pos_emb": registry.ParamSpec(
      lambda d: (2 * (d.knobs.get("max_distance") or MAX_DISTANCE), d.N, d.H),
      doc="R: relative key embeddings, row P - (i - j)",
    ),
    "key_pos_bias": registry.ParamSpec(
      lambda d: (2 * (d.knobs.get("max_distance") or MAX_DISTANCE), d.N),
      doc="b: relative logit bias, row P - (i - j)",
    ),
    "query_pos_bias": registry.ParamSpec(lambda d: (d.N, d.H), doc="u: global query bias"),
  },
  conformance=registry.Conformance(
    implementation_options={"chunked": {"block_sizes": BlockSizes(16, 8)}},
  ),
)
