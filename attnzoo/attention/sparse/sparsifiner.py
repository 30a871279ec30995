"""Sparsifiner: a learned low-rank connectivity predictor picks each query's top-ρ keys.

"Sparsifiner: Learning Sparse Instance-Dependent Attention for Efficient Vision Transformers"
(Wei, Ye, Zhang, Sun, Hu, Chen, Chen; CVPR 2023, arXiv 2303.13755), §3 and the official code
`lim142857/Sparsifiner` (`src/models/sparsifiner.py::MaskPredictor`, `src/losses.py`).

Per layer and query head n (kv head κ = n // G), a cheap predictor of the attention pattern:

    q̃ = q W_cq,  k̃ = k W_ck                          W_cq, W_ck: [H, r]   (r = H/2 by default)
    Â  = softmax_allowed(q̃ k̃ᵀ / √r)                   [B, N, T, S]  predicted connectivity
    M  = top-ρ(Â) ∧ allowed                           per row: the ⌈ρ·n_row⌉ keys of largest Â,
                                                     n_row = the keys the static mask allows
    out = softmax(M ⊙ (q kᵀ / √H) + bias) v           the element-level sparse attention

`allowed` is the static mask (`mask` AND `is_causal`). The selection M is discrete and carries
no gradient (the code's `attn_mask.detach_()`): the attention's gradients flow through the kept
logits only, and the predictor learns from the distillation loss alone,

    L_distill = mean over rows (b, n, t) of Σ_s (Â − sg(A))²,   A = softmax_allowed(q kᵀ/√H + bias)

the code's MSE between the predicted and the dense attention of the same layer (its
`ATTN_RECON` / `ATTN_SELF_DISTILL`, `F.mse_loss(..., reduction='sum')`), teacher detached;
aux loss "sparsifiner_distill", default weight 0.01 (the code's ATTN_RECON.WEIGHT, the loss of
its default 5-epoch predictor phase). Metrics: "sparsifiner_density" (kept / allowed elements),
"sparsifiner_tile_density" (visited / all tiles of the chunked path) and, with `distill`,
"sparsifiner_mass_recall" (the dense attention mass on the kept keys).

Implementations (one semantics): "xla" — M as a dense mask on the materialised logits (the
reference); "chunked" — M coarsened to tiles (a tile is visited when any of its elements is
kept) and passed as a per-(batch, head) runtime `block_map` to `dot_product_attention`, with M
still AND-ed inside the visited tiles as a dense mask array: the same output, and unvisited
tiles are skipped forward and backward.

Shapes: q [B,T,N,H], k [B,S,K,H], v [B,S,K,Hv] -> [B,T,N,Hv]; w_cq, w_ck [H, r]; valid bool
[B,T] (False at padding: such rows leave the loss and metrics).

Differences from the paper:
- No token-dimension low rank: the code also projects the keys' token axis N -> N/6 (`proj_n`)
  and maps the coefficients back with a thresholded sparse basis (`proj_back_n`, top-8
  coefficients). Those arrays are sized by a fixed token count (197) and mix all keys (future
  ones too), so they fit neither variable lengths nor causal attention; Â here is the plain
  low-rank (in H) softmax, costing O(T·S·r).
- Predictor scale 1/√r (the code uses num_heads^-1/2, the pitfall noted in the spec); the
  projections have no biases (the code's `nn.Linear` have them).
- No special CLS row (the code keeps row 0 dense and drops it from Â): no family here has a
  CLS token.
- L_distill is averaged over rows instead of summed over the batch too, so its weight does not
  depend on the batch size or length; the trainer sums it over layers (the code averages).
- Model-level distillation from a separate teacher network (the code's CLS KL and last-layer
  token MSE) belongs to the trainer, not to an attention layer; not here.

Choices where the paper is silent:
- ρ counts each row's *allowed* keys (⌈ρ·n_row⌉, the paper's ⌈ρN⌉ for an unmasked row), so a
  causal row keeps the same fraction of its past at every position; ρ is read as the nearest
  fraction with denominator ≤ 1000 and the ceiling is integer arithmetic (0.1 of 30 keys is 3).
- Ties in Â keep the lower key index, so exactly ⌈ρ·n_row⌉ keys are kept.
- Init of W_cq, W_ck: LeCun normal (std 1/√H), the usual linear-layer scale.
- The predictor's inputs q, k are not detached (as the code): L_distill also reaches the q/k
  projections through Â, never through the teacher A.
- fp32 for Â, A and the logits; out in q's dtype.
"""

from __future__ import annotations

import fractions
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jaxtyping import Array, Bool, Float

from attnzoo.attention import _validate, registry
from attnzoo.attention.dense.softmax import dot_product_attention
from attnzoo.masks import Mask
from pallas_kernels.block_sparse import EMPTY, PARTIAL, BlockMap, BlockSizes, num_blocks

DISTILL_WEIGHT = 0.01  # the code's LOSS.ATTN_RECON.WEIGHT (default config)
_RHO_DENOMINATOR = 1000
_IMPLEMENTATIONS = ("xla", "chunked")
_NEG = -1e30  # finite "masked" logit: exp underflows to 0, no inf - inf anywhere


def resolve_rank(head_dim: int, rank: int | None) -> int:
  """The predictor width r (None = max(1, H // 2), the code's reduce_c_factor 2)."""
  r = max(1, head_dim // 2) if rank is None else rank
  if isinstance(r, bool) or not isinstance(r, (int, np.integer)) or r < 1:
    raise ValueError(
      f"rank={rank!r} must be a positive int (the connectivity predictor's width r), or None "
      f"for H // 2 = {max(1, head_dim // 2)}"
    )
  return int(r)


def keep_fraction(keep_rate: float) -> tuple[int, int]:
  """ρ as (numerator, denominator), denominator ≤ 1000; ValueError outside (0, 1]."""
  if isinstance(keep_rate, bool) or not isinstance(keep_rate, (int, float, np.floating)):
    raise ValueError(f"keep_rate={keep_rate!r} must be a number in (0, 1]")
  if not 0.0 < float(keep_rate) <= 1.0:
    raise ValueError(
      f"keep_rate={keep_rate!r} must be in (0, 1]: the fraction ρ of each row's visible keys "
      "kept (the paper's default is 0.25; 1 keeps every key, i.e. dense attention)"
    )
  frac = fractions.Fraction(float(keep_rate)).limit_denominator(_RHO_DENOMINATOR)
  return frac.numerator, frac.denominator


def allowed_keys(
  mask: Mask | jax.Array | None, is_causal: bool, shape_bnts: tuple[int, int, int, int]
) -> Bool[Array, "B N T S"]:
  """The static mask (a `Mask` or a bool array, AND `is_causal`) as bool [B, N, T, S]."""
  _, _, T, S = shape_bnts
  keep = np.ones((T, S), bool)
  dense = None
  if isinstance(mask, Mask):
    keep &= mask.dense(T, S)
  elif mask is not None:
    dense = jnp.asarray(mask)
    if dense.dtype != jnp.bool_:
      raise TypeError(f"mask array must be boolean (True = keep), got dtype {dense.dtype}")
    dense = _validate.broadcast_to_bnts(dense, "mask", shape_bnts)
  if is_causal:
    keep &= np.arange(S)[None, :] <= np.arange(T)[:, None]
  out = jnp.asarray(keep)[None, None]
  if dense is not None:
    out = out & dense
  return jnp.broadcast_to(out, shape_bnts)


def _masked_softmax(logits, allowed):
  """softmax over the allowed keys; rows with none are all zeros (finite gradients)."""
  logits = jnp.where(allowed, logits, _NEG)
  m = lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
  p = jnp.where(allowed, jnp.exp(logits - m), 0.0)
  denom = jnp.sum(p, axis=-1, keepdims=True)
  return p / jnp.where(denom > 0, denom, 1.0)


def _scores(x_q, x_k):
  """fp32 [B,N,T,S] products of q-side [B,T,N,R] and k-side [B,S,K,R] (query head n reads
  kv head n // G)."""
  B, T, N, R = x_q.shape
  S, K = x_k.shape[1], x_k.shape[2]
  x_q = x_q.reshape(B, T, K, N // K, R)
  s = jnp.einsum("btkgr,bskr->bkgts", x_q, x_k, preferred_element_type=jnp.float32)
  return s.reshape(B, N, T, S)


def predicted_connectivity(
  q: Float[Array, "B T N H"],
  k: Float[Array, "B S K H"],
  w_cq: Float[Array, "H R"],
  w_ck: Float[Array, "H R"],
  allowed: Bool[Array, "B N T S"],
) -> Float[Array, "B N T S"]:
  """Â = softmax over allowed keys of (q W_cq)(k W_ck)ᵀ / √r, fp32."""
  f32 = jnp.float32
  q_r = jnp.einsum("btnh,hr->btnr", q.astype(f32), w_cq.astype(f32))
  k_r = jnp.einsum("bskh,hr->bskr", k.astype(f32), w_ck.astype(f32))
  return _masked_softmax(_scores(q_r, k_r) / math.sqrt(w_cq.shape[-1]), allowed)


def top_rho_mask(
  scores: Float[Array, "B N T S"], allowed: Bool[Array, "B N T S"], keep_rate: float
) -> Bool[Array, "B N T S"]:
  """Per row, the ⌈ρ·n_row⌉ allowed keys of largest score (ties: lower index), no gradient."""
  num, den = keep_fraction(keep_rate)
  S = scores.shape[-1]
  scores = lax.stop_gradient(jnp.where(allowed, scores, -jnp.inf))
  n_row = jnp.sum(allowed, axis=-1, dtype=jnp.int32)
  n_keep = jnp.maximum((n_row * num + den - 1) // den, jnp.minimum(n_row, 1))
  # n_row <= S bounds every row's count by a static width; lax.top_k lists equal scores by
  # lower index, and is ~15x faster than ranking by two full argsorts on CPU.
  width = max(1, (S * num + den - 1) // den)
  _, top = lax.top_k(scores, width)
  slots = jnp.arange(width, dtype=jnp.int32).reshape((1,) * n_keep.ndim + (width,))
  taken = (slots < n_keep[..., None]).astype(jnp.int32)
  kept = jnp.put_along_axis(jnp.zeros(scores.shape, jnp.int32), top, taken, axis=-1, inplace=False)
  return (kept > 0) & allowed


def coarsen(keep: Bool[Array, "B N T S"], block_q: int, block_k: int) -> jax.Array:
  """int32 [B, N, Qb, Kb]: PARTIAL where the tile holds a kept element, else EMPTY."""
  B, N, T, S = keep.shape
  qb, kb = num_blocks(T, block_q), num_blocks(S, block_k)
  padded = jnp.pad(keep, ((0, 0), (0, 0), (0, qb * block_q - T), (0, kb * block_k - S)))
  any_kept = jnp.any(padded.reshape(B, N, qb, block_q, kb, block_k), axis=(3, 5))
  return jnp.where(any_kept, PARTIAL, EMPTY).astype(jnp.int32)


def block_map_of(keep: Bool[Array, "B N T S"], block_q: int, block_k: int) -> BlockMap:
  """The per-(batch, head) runtime map visiting exactly the tiles holding a kept element."""
  T, S = keep.shape[-2:]
  return BlockMap.from_block_mask(
    coarsen(keep, block_q, block_k),
    block_q=block_q,
    block_k=block_k,
    seq_q=T,
    seq_k=S,
    max_kv_blocks=num_blocks(S, block_k),
    max_q_blocks=num_blocks(T, block_q),
  )


def _check_param(name, w, want):
  if tuple(w.shape) != want:
    raise ValueError(
      f"{name} has shape {tuple(w.shape)}, expected (H, r) = {want}; create it from "
      "FAMILY.params (ParamSpec) with the same rank knob"
    )


def attention(
  q: Float[Array, "B T N H"],
  k: Float[Array, "B S K H"],
  v: Float[Array, "B S K V"],
  *,
  mask: Mask | jax.Array | None = None,
  bias: Float[Array, "..."] | None = None,
  is_causal: bool = False,
  scale: float | None = None,
  keep_rate: float = 0.25,
  rank: int | None = None,
  block_q: int = 64,
  block_k: int = 64,
  distill: bool = True,
  w_cq: Float[Array, "H R"],
  w_ck: Float[Array, "H R"],
  valid: Bool[Array, "B T"] | None = None,
  implementation: str | None = None,
) -> tuple[Float[Array, "B T N V"], registry.Aux]:
  """Sparsifiner attention; see the module docstring for the equations and conventions.

  Args:
    q, k, v: [B,T,N,H], [B,S,K,H], [B,S,K,Hv]; N % K == 0.
    mask, bias, is_causal, scale: as `dot_product_attention` (the mask bounds the selection).
    keep_rate: ρ in (0, 1], the fraction of each row's allowed keys kept (1 = dense).
    rank: r, the predictor's width (None = H // 2); sizes w_cq, w_ck.
    block_q, block_k: tiles of the "chunked" path's block map.
    distill: compute the dense teacher, L_distill and the mass recall (False: loss 0).
    w_cq, w_ck: [H, r] the predictor's query / key projections.
    valid: bool [B,T], False at padding (rows left out of the loss and metrics); None = all.
    implementation: "xla" (dense masked reference) or "chunked"; None = automatic.

  Returns:
    (out [B,T,N,Hv] in q's dtype, Aux with loss "sparsifiner_distill" and the metrics above).
  """
  B, T, S, N, K, H, _ = _validate.check_qkv(q, k, v)
  r = resolve_rank(H, rank)
  keep_fraction(keep_rate)
  _check_param("w_cq", w_cq, (H, r))
  _check_param("w_ck", w_ck, (H, r))
  valid = jnp.ones((B, T), jnp.bool_) if valid is None else jnp.asarray(valid)
  if valid.shape != (B, T):
    raise ValueError(f"valid has shape {valid.shape}; pass a bool [B, T] = {(B, T)} array")
  impl = registry.resolve_implementation(
    implementation, dict.fromkeys(_IMPLEMENTATIONS), family="sparsifiner"
  )
  scale = 1.0 / math.sqrt(H) if scale is None else scale

  allowed = allowed_keys(mask, is_causal, (B, N, T, S))
  approx = predicted_connectivity(q, k, w_cq, w_ck, allowed)
  keep = top_rho_mask(approx, allowed, keep_rate)
  bmap = block_map_of(keep, block_q, block_k)
  out = dot_product_attention(
    q,
    k,
    v,
    mask=keep,
    bias=bias,
    is_causal=is_causal,  # lets the chunked path classify tiles by causality too
    scale=scale,
    implementation=impl,
    block_sizes=BlockSizes(block_q, block_k) if impl == "chunked" else None,
    block_map=bmap if impl == "chunked" else None,
  )

  rows = (valid[:, None, :] & jnp.any(allowed, axis=-1)).astype(jnp.float32)  # [B, N, T]
  n_rows = jnp.maximum(jnp.sum(rows), 1.0)
  kept = jnp.sum(keep, axis=-1, dtype=jnp.float32)
  seen = jnp.sum(allowed, axis=-1, dtype=jnp.float32)
  metrics = {
    "sparsifiner_density": jnp.sum(rows * kept) / jnp.maximum(jnp.sum(rows * seen), 1.0),
    "sparsifiner_tile_density": jnp.mean(bmap.kv_counts / bmap.num_kv_blocks),
  }
  loss = jnp.zeros((), jnp.float32)
  if distill:
    logits = _scores(q.astype(jnp.float32), k.astype(jnp.float32)) * scale
    if bias is not None:
      logits = logits + _validate.broadcast_to_bnts(jnp.asarray(bias), "bias", (B, N, T, S))
    teacher = lax.stop_gradient(_masked_softmax(logits, allowed))
    loss = jnp.sum(rows * jnp.sum((approx - teacher) ** 2, axis=-1)) / n_rows
    recall = jnp.sum(jnp.where(keep, teacher, 0.0), axis=-1)
    metrics["sparsifiner_mass_recall"] = jnp.sum(rows * recall) / n_rows
  metrics = {name: lax.stop_gradient(m) for name, m in metrics.items()}
  return out, registry.Aux(losses={"sparsifiner_distill": loss}, metrics=metrics)


_PREDICTOR_INIT = jax.nn.initializers.lecun_normal()


def _predictor_shape(d: registry.Dims) -> tuple[int, int]:
  return (d.H, resolve_rank(d.H, d.knobs.get("rank")))


FAMILY = registry.Family(
  name="sparsifiner",
  attention=attention,
  implementations=_IMPLEMENTATIONS,
  paper="Sparsifiner: Learning Sparse Instance-Dependent Attention for Efficient Vision "
  "Transformers (arXiv 2303.13755)",
  returns_aux=True,
  params={
    "w_cq": registry.ParamSpec(_predictor_shape, _PREDICTOR_INIT, "Sparsifiner predictor W_cq"),
    "w_ck": registry.ParamSpec(_predictor_shape, _PREDICTOR_INIT, "Sparsifiner predictor W_ck"),
  },
  aux_losses={"sparsifiner_distill": DISTILL_WEIGHT},
  layer_inputs=("valid",),
  conformance=registry.Conformance(
    # Small tiles so the suite's short sequences span several tiles (ragged, skipped ones).
    cases={"default": registry.ConformanceCase(options=dict(keep_rate=0.25, block_q=8, block_k=8))},
    benchmark={"default": registry.ConformanceCase(options=dict(keep_rate=0.1))},
  ),
)
