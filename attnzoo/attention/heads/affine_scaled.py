"""Affine-scaled attention: softmax weights rescaled per query and shifted by a uniform term.

"Affine-Scaled Attention: Towards Flexible and Stable Transformer Attention" (Bae et al.,
arXiv 2602.23057, method section, Eqs. 6-9):

    out_i = Σ_j [α_i · P_ij + β_i · keep_ij] v_j
          = α_i · softmax-attn(q, k, v)_i + β_i · Σ_j keep_ij v_j
    α_i   = φ(x_i W_a)                      per query token i and head n, W_a: [D, N], no bias
    β_i   = (α_ma − α_i) / N_keys(i)
    α_ma ← ρ · α_ma + (1 − ρ) · mean_{valid b, t}(α)     (ρ = `momentum`, α_ma,0 = 0)
    φ(z)  = clip(0.1 z + 0.5, 0, 1)  ("linear_clip", the paper's best)  or  sigmoid(z)

where P is the softmax of the masked logits (mask, `is_causal`, `segment_ids`; `bias` and the
soft cap enter P only) and keep_ij the same visibility pattern. With N_keys(i) = Σ_j keep_ij (the
keys query i sees, `n_keys="visible"`, the default), every row's weights sum to exactly α_ma:
the layer learns how peaked each row is (α) while the row's total mass follows a slow EMA. The
weights are not a convex combination: α_i > α_ma makes the shift negative, so weights can be < 0.

Shapes: q [B,T,N,H], k [B,S,K,H], v [B,S,K,Hv] -> [B,T,N,Hv] (GQA: N % K == 0); learned
`w_alpha` [D,N]; carried `alpha_ma` [N]; layer inputs x [B,T,D] and valid bool [B,T].

Implementations (one semantics): "xla" materialises the keep pattern [B,N,T,S] and computes
Σ_j keep_ij v_j and N_keys with it beside the softmax's "xla" reference. "chunked" never forms a
[T,S] array: the softmax term is the softmax's "chunked" flash path; the shift term is a prefix
sum of v (causal or no mask: Σ_{j<=i} v_j = cumsum(v)_i, N_keys = min(i+1, S)), and for any other
mask the mean of the visible values, computed as softmax attention with all-zero logits (uniform
weights over exactly the keys the softmax keeps; its flash tiles skip empty blocks and give zeros
for rows with no key). `n_keys="full"` additionally needs each row's count, summed there one
tile of `block_q` query rows at a time.

Differences from the paper / choices where it is silent:
- N_keys: the paper writes N = key sequence length (Eq. 8); under a causal mask that makes the
  row sum α + (i+1)(α_ma − α)/S depend on the position. Default "visible" counts the keys query
  i actually sees (row sums = α_ma everywhere); `n_keys="full"` is the paper's literal N = S.
- α_ma is per head ([N], one EMA per head of the batch-and-token mean of α); the paper says
  "batch-wise mean" without naming the axes. The mean is over valid (non-padding) tokens; a
  batch without valid tokens leaves α_ma unchanged.
- The forward uses the carried α_ma (the value before this step's update), stop-gradient: an
  output never depends on other tokens' α (no information from other examples or from future
  tokens of a causal model), and training and evaluation compute the same function. The update
  comes back in `Aux.state` and is written after the optimizer step.
- `w_alpha` is initialised at zero, so α = φ(0) = 0.5 at init with linear clipping (the paper
  does not give an init); with α_ma,0 = 0 the early shift is −α/N_keys, a subtracted mean of v.
- A row with no visible key returns zeros (as the softmax does); `bias` changes P, not keep.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Bool, Float

from attnzoo.attention import _validate, registry
from attnzoo.attention.dense.softmax import dot_product_attention
from attnzoo.masks import Causal, Mask
from pallas_kernels.block_sparse import BlockSizes

PHIS = ("linear_clip", "sigmoid")
N_KEYS = ("visible", "full")
_DEFAULT_ROW_TILE = 512


def attention(
  q: Float[Array, "B T N H"],
  k: Float[Array, "B S K H"],
  v: Float[Array, "B S K V"],
  *,
  w_alpha: Float[Array, "D N"],
  alpha_ma: Float[Array, " N"],
  x: Float[Array, "B T D"],
  valid: Bool[Array, "B T"] | None = None,
  mask: Mask | jax.Array | None = None,
  bias: Float[Array, "..."] | None = None,
  is_causal: bool = False,
  segment_ids: jax.Array | tuple[jax.Array, jax.Array] | None = None,
  scale: float | None = None,
  logits_soft_cap: float | None = None,
  phi: str = "linear_clip",
  n_keys: str = "visible",
  momentum: float = 0.9,
  implementation: str | None = None,
  block_sizes: BlockSizes | None = None,
) -> tuple[Float[Array, "B T N V"], registry.Aux]:
  """Affine-scaled attention; see the module docstring for the equations and conventions.

  Args:
    q, k, v: queries [B,T,N,H], keys [B,S,K,H], values [B,S,K,Hv].
    w_alpha: learned [D,N] projection of the layer input to one α logit per head.
    alpha_ma: carried [N] EMA of the mean α per head (never differentiated).
    x: the layer input [B,T,D]; valid: bool [B,T], False at padding (None = all valid).
    mask, bias, is_causal, segment_ids, scale, logits_soft_cap: as `dot_product_attention`.
    phi: "linear_clip" (clip(0.1 z + 0.5, 0, 1)) or "sigmoid".
    n_keys: "visible" (N_keys = keys query i sees) or "full" (N_keys = S, the paper's Eq. 8).
    momentum: EMA factor ρ in [0, 1) of the α_ma update.
    implementation: "xla", "chunked" or None (the platform's best).
    block_sizes: tiles of the chunked path.

  Returns:
    (out [B,T,N,Hv] in q's dtype, Aux(metrics={affine_alpha, affine_alpha_ma},
    state={"alpha_ma": the updated EMA})).
  """
  B, T, S, N, K, _, _ = _validate.check_qkv(q, k, v)
  if phi not in PHIS:
    raise ValueError(f"phi={phi!r} is not one of {PHIS}; pick one of those")
  if n_keys not in N_KEYS:
    raise ValueError(f"n_keys={n_keys!r} is not one of {N_KEYS}; pick one of those")
  if not 0.0 <= momentum < 1.0:
    raise ValueError(f"momentum={momentum} must lie in [0, 1) (the paper uses 0.9)")
  D = _validate.check_layer_input(x, B, T)
  _validate.check_shape("w_alpha", w_alpha, (D, N), "[D, N]: create it from FAMILY.params")
  _validate.check_shape("alpha_ma", alpha_ma, (N,), "one EMA per head: create it from FAMILY.state")
  valid = _validate.check_valid(valid, B, T)
  name = registry.resolve_implementation(implementation, _SHIFT_SUMS, family="affine_scaled")

  z_BTN = jnp.einsum("btd,dn->btn", x.astype(jnp.float32), w_alpha.astype(jnp.float32))
  if phi == "linear_clip":
    alpha_BTN = jnp.clip(0.1 * z_BTN + 0.5, 0.0, 1.0)
  else:
    alpha_BTN = jax.nn.sigmoid(z_BTN)
  alpha_ma_N = lax.stop_gradient(alpha_ma.astype(jnp.float32))

  attn_BTNV = dot_product_attention(
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
  )
  visible = _Visibility.build(mask, is_causal, segment_ids, B, N, T, S)
  sum_BTNV, count_BTN = _SHIFT_SUMS[name](v, visible, n_keys=n_keys, block_sizes=block_sizes)
  n_keys_BTN = count_BTN if n_keys == "visible" else jnp.full_like(count_BTN, S)
  # A row with no visible key has Σ_j keep_ij v_j = 0: any finite β gives the softmax's zeros.
  beta_BTN = (alpha_ma_N[None, None, :] - alpha_BTN) / jnp.maximum(n_keys_BTN, 1.0)
  out_BTNV = alpha_BTN[..., None] * attn_BTNV.astype(jnp.float32) + beta_BTN[..., None] * sum_BTNV

  valid_BT1 = valid[..., None].astype(jnp.float32)
  n_valid = jnp.sum(valid_BT1)
  alpha_mean_N = jnp.sum(lax.stop_gradient(alpha_BTN) * valid_BT1, axis=(0, 1)) / jnp.maximum(
    n_valid, 1.0
  )
  new_ma_N = jnp.where(
    n_valid > 0, momentum * alpha_ma_N + (1.0 - momentum) * alpha_mean_N, alpha_ma_N
  )
  aux = registry.Aux(
    metrics={
      "affine_alpha": jnp.sum(alpha_mean_N) / N,
      "affine_alpha_ma": jnp.mean(alpha_ma_N),
    },
    state={"alpha_ma": new_ma_N.astype(alpha_ma.dtype)},
  )
  return out_BTNV.astype(q.dtype), aux


class _Visibility:
  """The keep pattern of a call, split as the softmax splits it: a structured mask (with
  `is_causal` folded in), a dense bool array [Bm,Nm,Tm,S] (Bm, Nm, Tm in {1, full}), segment
  ids (q_ids [B,T], kv_ids [B,S]). Also keeps the original arguments for the softmax."""

  def __init__(self, structured, dense, segments, args, shape_bnts):
    self.structured, self.dense, self.segments = structured, dense, segments
    self.args, self.shape_bnts = args, shape_bnts

  @classmethod
  def build(cls, mask, is_causal, segment_ids, B, N, T, S):
    structured, dense = (mask, None) if isinstance(mask, Mask) else (None, mask)
    if dense is not None:
      dense = _validate.broadcast_to_bnts(jnp.asarray(dense), "mask", (B, N, T, S))
    if is_causal:
      structured = Causal() if structured is None else structured & Causal()
    segments = _validate.split_segment_ids(segment_ids, B, T, S)
    args = dict(mask=mask, is_causal=is_causal, segment_ids=segment_ids)
    return cls(structured, dense, segments, args, (B, N, T, S))

  @property
  def causal_only(self) -> bool:
    s = self.structured
    return self.dense is None and self.segments is None and type(s) is Causal and s.offset == 0

  @property
  def unmasked(self) -> bool:
    return self.structured is None and self.dense is None and self.segments is None

  def rows(self, row0: int, R: int) -> Bool[Array, "Bk Nk R S"]:
    """keep_ij of query rows row0 .. row0 + R - 1 (leading axes 1 where the pattern is shared)."""
    _, _, _, S = self.shape_bnts
    keep = jnp.ones((1, 1, R, S), jnp.bool_)
    if self.structured is not None:
      q_pos = row0 + jnp.arange(R, dtype=jnp.int32)[:, None]
      k_pos = jnp.arange(S, dtype=jnp.int32)[None, :]
      pred = jnp.broadcast_to(self.structured.predicate(q_pos, k_pos, jnp), (R, S))
      keep = keep & pred[None, None]
    if self.dense is not None:
      d = self.dense
      keep = keep & (d if d.shape[2] == 1 else lax.dynamic_slice_in_dim(d, row0, R, axis=2))
    if self.segments is not None:
      q_ids, kv_ids = self.segments
      q_ids = lax.dynamic_slice_in_dim(q_ids, row0, R, axis=1)
      keep = keep & (q_ids[:, None, :, None] == kv_ids[:, None, None, :])
    return keep


# ------------------------------------------------------------------ Σ_j keep_ij v_j and counts


def _xla_shift_sum(v, visible: _Visibility, **_):
  """The reference: Σ_j keep_ij v_j and Σ_j keep_ij from the materialised [B,N,T,S] pattern."""
  B, N, T, S = visible.shape_bnts
  K, Hv = v.shape[2], v.shape[3]
  keep_BNTS = jnp.broadcast_to(visible.rows(0, T), (B, N, T, S)).astype(jnp.float32)
  keep_BKGTS = keep_BNTS.reshape(B, K, N // K, T, S)
  sum_BTKGV = jnp.einsum("bkgts,bskv->btkgv", keep_BKGTS, v.astype(jnp.float32))
  count_BTN = jnp.transpose(jnp.sum(keep_BNTS, axis=-1), (0, 2, 1))
  return sum_BTKGV.reshape(B, T, N, Hv), count_BTN


def _chunked_shift_sum(v, visible: _Visibility, *, n_keys, block_sizes):
  """Σ_j keep_ij v_j and N_keys without a [T,S] array (see the module docstring)."""
  B, N, T, S = visible.shape_bnts
  G = N // v.shape[2]
  v32 = v.astype(jnp.float32)
  if visible.unmasked or visible.causal_only:
    csum_BSKV = jnp.cumsum(v32, axis=1)
    last_T = jnp.minimum(jnp.arange(T), S - 1) if visible.causal_only else jnp.full((T,), S - 1)
    sum_BTNV = jnp.repeat(jnp.take(csum_BSKV, last_T, axis=1), G, axis=2)
    count_T = (last_T + 1).astype(jnp.float32)
    return sum_BTNV, jnp.broadcast_to(count_T[None, :, None], (B, T, N))
  # Uniform weights over the kept keys: all-zero logits through the softmax's own masking.
  mean_BTNV = dot_product_attention(
    jnp.zeros((B, T, N, 1), jnp.float32),
    jnp.zeros((B, S, v.shape[2], 1), jnp.float32),
    v32,
    scale=1.0,
    implementation="chunked",
    block_sizes=block_sizes,
    **visible.args,
  )
  if n_keys == "visible":
    # Only the product β · Σ = (α_ma − α) · mean is used: a count of 1 stands in for N_keys.
    return mean_BTNV, jnp.ones((B, T, N), jnp.float32)
  count_BTN = _row_counts(visible, block_sizes)
  return mean_BTNV * count_BTN[..., None], count_BTN


def _row_counts(visible: _Visibility, block_sizes) -> Float[Array, "B T N"]:
  """Σ_j keep_ij, one tile of query rows at a time ([B?, N?, R, S] live, never [T, S])."""
  B, N, T, S = visible.shape_bnts
  R = block_sizes.block_q if block_sizes is not None else _DEFAULT_ROW_TILE
  R = min(R, T)

  def count(row0, rows):
    return jnp.broadcast_to(jnp.sum(visible.rows(row0, rows), axis=-1), (B, N, rows))

  full_tiles = T // R  # traced once by lax.map; the ragged tail (static) is its own tile
  tiles_QBNR = lax.map(lambda i: count(i * R, R), jnp.arange(full_tiles))
  counts = [jnp.moveaxis(tiles_QBNR, 0, 2).reshape(B, N, full_tiles * R)]
  if T % R:
    counts.append(count(full_tiles * R, T % R))
  return jnp.transpose(jnp.concatenate(counts, axis=2), (0, 2, 1)).astype(jnp.float32)


_SHIFT_SUMS = {"xla": _xla_shift_sum, "chunked": _chunked_shift_sum}


FAMILY = registry.Family(
  name="affine_scaled",
  attention=attention,
  implementations=tuple(_SHIFT_SUMS),
  paper=(
    "Affine-Scaled Attention: Towards Flexible and Stable Transformer Attention (arXiv 2602.23057)"
  ),
  returns_aux=True,
  params={
    "w_alpha": registry.ParamSpec(
      lambda d: (d.D, d.N), doc="[D, N] projection of the layer input to α logits (φ(0) = 0.5)"
    )
  },
  state={"alpha_ma": registry.ParamSpec(lambda d: (d.N,), doc="per-head EMA of α (α_ma,0 = 0)")},
  layer_inputs=("x", "valid"),
  conformance=registry.Conformance(
    cases={
      "default": registry.ConformanceCase(),
      "full_keys": registry.ConformanceCase(options={"n_keys": "full"}),
    },
    # Tiles smaller than the suite's lengths, so ragged tiles and skipping are exercised.
    implementation_options={"chunked": {"block_sizes": BlockSizes(16, 8)}},
  ),
)
