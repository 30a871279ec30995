"""Rectified SpaAttn: block-sparse attention that puts the dropped mass back from pooled tiles.

"Rectified SpaAttn: Revisiting Attention Sparsity for Efficient Video Generation" (Liu et al.,
arXiv 2511.19835): IPAR (Isolated-Pooling Attention Reallocation) and GAPR (Gain-Aware Pooling
Rectification). The equations follow the official code `BienLuky/Rectified-SpaAttn`
(`rectified_flux_attn.py::_build_block_index_with_importance_optimized`,
`block_sparse_attention_combined`; `gapr_mask.py::estimate_pr_gain`); the paper's section and
equation numbers were not verified (spec: shared/papers/efficient.md §13). Block-sparse
attention over-weights the critical tiles (their softmax is normalised over them alone) and
drops the rest; Rectified SpaAttn rescales the critical part by its share of an implicit full
attention estimated from pooled tiles and adds pooled values where pooling is trustworthy.

Per batch b, query head n (kv head n // G), q tiles i of block_q rows, kv tiles j of n_j keys;
x̄ is a tile mean (padding excluded), `allowed` the tiles the static mask (`mask` AND
`is_causal`) leaves non-EMPTY, FULL the tiles it keeps entirely:

    ŝ_ij = q̄_i · k̄_j                                       pooled logit, unscaled
    p̂_ij = n_j e^{c ŝ_ij + b̄_ij} / Σ_{j' allowed} n_j' e^{c ŝ_ij' + b̄_ij'}
                                                          IPAR: implicit full mass of tile j
    C_i  = the fewest tiles by p̂ (descending) with Σ p̂ >= p_remain, at least min_blocks,
           ∪ the diagonal tile ∪ every PARTIAL tile            critical tiles (no gradient)
    F_i  = FULL tiles not in C_i                           estimated from pools
    Rc_i = {j ∈ F_i : |ŝ_ij| > |mean|Δq_i| · k̄_j| + |q̄_i · mean|Δk_j||}
                                                          GAPR: gain > error (no gradient)
  for each row t of tile i:
    O_t, λ_t = softmax attention of q_t over the keys of C_i and its log-sum-exp (the engine)
    ℓ_tj = c q_t · k̄_j + b̄_tj + log n_j                     j ∈ F_i: pooled log mass
    Z_t  = e^{λ_t} + Σ_{j ∈ F_i} e^{ℓ_tj}
    R_t  = (e^{λ_t} + Σ_{j ∈ F_i \\ Rc_i} e^{ℓ_tj}) / Z_t     rescale (folded tiles included)
    out_t = R_t O_t + Σ_{j ∈ Rc_i} (e^{ℓ_tj} / Z_t) v̄_j

c = `scale` (1/√H), b̄ the tile mean of `bias` (0 without), Δq = q − q̄_i within tile i. The
ablations run through the same path on the same C_i: `ipar=False` is plain block-sparse
attention (out = O); `ipar=True, gapr=False` rescales only, R_t = e^{λ_t} / Z_t (the mass of
F_i is dropped, not folded); `ipar=True, gapr=True` is the method. `rectify` also returns the
row statistic e^{λ_t} / Z_t, the critical tiles' share of the implicit full attention.

Shapes: q [B,T,N,H], k [B,S,K,H], v [B,S,K,Hv] -> [B,T,N,Hv]; tile tables [B,N,Qb,Kb].

Implementations (one semantics; the selection and the pooled terms are shared code): "xla" —
`dot_product_attention(..., block_map=C, implementation="xla")`, the selection applied as a
dense mask on the materialised logits (the reference); "chunked" — the same call on the
runtime-map engine, which walks only the critical tiles of each (batch, head) forward and
backward. The pooled terms cost O(T · S/block_k · H) (q_t against one pooled key per tile).

Differences from the paper:
- The rescale R and the correction weights are per query row (q_t · k̄_j), not per query tile
  (q̄_i · k̄_j repeated over the tile's rows): a row then reads no other row's query, which
  causal attention needs (below), and the estimate is finer (on the tests' smooth token
  fields, 8-token tiles, p_remain 0.5: relative error vs dense 0.16 against the tile-level
  form's 0.21, lower in all 9 settings tried). The selection and GAPR stay tile-level
  decisions, as in the paper.
- The critical tiles' mass is the exact e^{λ_t} of the sparse pass (the engine returns λ);
  only the tiles outside C_i are estimated from pools. The code uses pooled p̂ for both
  (R_i = Σ_{j ∈ C_i ∪ folded} p̂_ij). Either way p_remain = 1 is exactly dense attention.
- No text tokens: the code keeps text keys un-pooled (they enter IPAR's renormaliser with
  weight 1 each) and text queries dense; every key here lies in a tile and is pooled with
  it. `extra_kv` (isolated text keys) is out of scope.
- Forced tiles are the token-space diagonal (the local context), not the code's Hilbert-curve
  3-D neighbour list (no spatial layout here). GAPR's common factor Bq·Bk is dropped (it is
  the same on both sides, ragged tiles included).
- The selection keeps the smallest prefix reaching p_remain (the code counts the tiles with
  cumulative mass <= p_remain, plus one: one tile more when a sum equals p_remain exactly).
- No dense warm-up layers or steps (the code keeps some dense): build a hybrid model instead.

Choices where the paper is silent (it is non-causal, on full video/image sequences):
- Masks and causality. Pooled terms are only formed for FULL tiles, whose keys are all
  visible to every row of the q tile (under `is_causal`: keys before the tile's first row),
  never for a PARTIAL or EMPTY tile: no continuous term reads a masked (future) key, so its
  gradient is exactly zero.
  Every PARTIAL tile (a causal diagonal tile, a window's edge, a row of a dense mask) is
  critical, so its allowed keys are attended exactly; with irregular masks that leaves less
  to skip. The discrete selection and GAPR are tile-level estimates that read the whole q
  tile and the pooled keys of partially masked tiles (future rows and keys of the diagonal
  tile under `is_causal`), as `block_select` does; they carry no gradient.
- Gradients. C_i and Rc_i are discrete: their inputs pass through `stop_gradient`. R_t and
  the correction are differentiable functions of q, k, v (through O_t, λ_t, q_t, k̄_j, v̄_j;
  the stabilising max carries none), so the gradient is that of the computed output for the
  fixed selection; out_t's gradient reaches the query of row t only.
- `bias` (e.g. ALiBi) enters the pooled logits as its mean over the tile's keys (over the
  tile's rows too for the selection); GAPR ignores it. Ragged last tiles: means over their
  real tokens, n_j their key count. A row with no visible key returns zeros (finite grads).
- Defaults: tiles 64 (the paper's 128 is large for the short sequences here), p_remain 0.5
  (the code's default; its FLUX script uses 0.3), min_blocks 1; fp32 pooled statistics.
- Metrics (no losses): "rectified_density" (critical / allowed tiles), "rectified_pooled"
  (tiles corrected with pooled values / allowed tiles), "rectified_kept_mass" (mean
  e^{λ_t} / Z_t) and "rectified_rescale" (mean R_t, 1 without IPAR), over the rows the
  sparse pass attends (λ_t finite).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jaxtyping import Array, Bool, Float, Int

from attnzoo.attention import _validate, registry
from attnzoo.attention.dense.softmax import dot_product_attention
from attnzoo.masks import Causal, Mask
from pallas_kernels.block_sparse import EMPTY, FULL, PARTIAL, BlockMap, num_blocks

_IMPLEMENTATIONS = ("xla", "chunked")


class Plan(NamedTuple):
  """The tile decisions of one call (bool [B, N, Qb, Kb], no gradient).

  Attributes:
    allowed: tiles the static mask leaves non-EMPTY.
    critical: C_i, attended exactly by the sparse pass.
    pooled: F_i, the FULL non-critical tiles estimated from pools.
    rectified: Rc_i ⊆ F_i, the tiles whose pooled values are added (GAPR's gain > error).
  """

  allowed: Bool[Array, "B N Qb Kb"]
  critical: Bool[Array, "B N Qb Kb"]
  pooled: Bool[Array, "B N Qb Kb"]
  rectified: Bool[Array, "B N Qb Kb"]


def check_knobs(
  *, p_remain: float, min_blocks: int, block_q: int, block_k: int, ipar: bool, gapr: bool
) -> None:
  """ValueError naming the bad knob and the fix."""
  number = (int, float, np.integer, np.floating)
  if isinstance(p_remain, bool) or not isinstance(p_remain, number) or not 0 < p_remain <= 1:
    raise ValueError(
      f"p_remain={p_remain!r} must be a number in (0, 1]: the implicit full-attention mass the "
      "critical tiles cover (the paper uses 0.3-0.7; 1 keeps every tile, i.e. dense attention)"
    )
  for name, value in (("block_q", block_q), ("block_k", block_k), ("min_blocks", min_blocks)):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
      raise ValueError(f"{name}={value!r} must be a positive int")
  for name, value in (("ipar", ipar), ("gapr", gapr)):
    if not isinstance(value, (bool, np.bool_)):
      raise ValueError(f"{name}={value!r} must be a bool")
  if gapr and not ipar:
    raise ValueError(
      "gapr=True needs ipar=True: GAPR's pooled weights and folded mass are shares of IPAR's "
      "implicit full attention; pass ipar=True (the method) or gapr=False"
    )


# ------------------------------------------------------------------ pooled statistics


def _padded_tiles(x, block):
  """x [B, L, heads, d] as fp32 tiles [B, nb, block, heads, d] (zero padding) + counts [nb]."""
  B, L, heads, d = x.shape
  nb = num_blocks(L, block)
  x = jnp.pad(x.astype(jnp.float32), ((0, 0), (0, nb * block - L), (0, 0), (0, 0)))
  counts = np.minimum(block, L - np.arange(nb) * block).astype(np.float32)
  return x.reshape(B, nb, block, heads, d), counts


def tile_means(x: Float[Array, "B L M D"], block: int) -> Float[Array, "B Lb M D"]:
  """Mean of each tile of `block` positions (a ragged last tile: over its real ones), fp32."""
  tiles, counts = _padded_tiles(x, block)
  return jnp.sum(tiles, axis=2) / counts[None, :, None, None]


def tile_deviations(x: Float[Array, "B L M D"], block: int) -> Float[Array, "B Lb M D"]:
  """mean |x − x̄| over each tile's real positions (GAPR's |Δ|), fp32."""
  tiles, counts = _padded_tiles(x, block)
  mean = jnp.sum(tiles, axis=2, keepdims=True) / counts[None, :, None, None, None]
  L, nb = x.shape[1], tiles.shape[1]
  real = (np.arange(nb * block) < L).reshape(1, nb, block, 1, 1)
  return jnp.sum(jnp.where(real, jnp.abs(tiles - mean), 0.0), axis=2) / counts[None, :, None, None]


def _pair(a_bimh, b_bjkh):
  """[B, N, I, J] products of a per-query-head [B, I, N, H] and a per-kv-head [B, J, K, H]."""
  B, I, N, H = a_bimh.shape
  J, K = b_bjkh.shape[1], b_bjkh.shape[2]
  a_bikgh = a_bimh.reshape(B, I, K, N // K, H)
  s_bkgij = jnp.einsum("bikgh,bjkh->bkgij", a_bikgh, b_bjkh, preferred_element_type=jnp.float32)
  return s_bkgij.reshape(B, N, I, J)


def pooled_block_scores(
  q: Float[Array, "B T N H"], k: Float[Array, "B S K H"], *, block_q: int, block_k: int
) -> Float[Array, "B N Qb Kb"]:
  """ŝ_ij = q̄_i · k̄_j, the UNSCALED pooled logits (GAPR compares them with unscaled errors),
  fp32. Differentiable; `plan` stops the gradient."""
  return _pair(tile_means(q, block_q), tile_means(k, block_k))


def _key_bias(bias_bnts, block_k):
  """[B, N, T, Kb]: the bias averaged over each kv tile's keys."""
  B, N, T, S = bias_bnts.shape
  kb = num_blocks(S, block_k)
  padded = jnp.pad(bias_bnts.astype(jnp.float32), ((0, 0), (0, 0), (0, 0), (0, kb * block_k - S)))
  counts = np.minimum(block_k, S - np.arange(kb) * block_k).astype(np.float32)
  return padded.reshape(B, N, T, kb, block_k).sum(-1) / counts[None, None, None, :]


def _bias(bias, shape_bnts):
  return _validate.broadcast_to_bnts(jnp.asarray(bias), "bias", shape_bnts)


def tile_classes(
  mask: Mask | jax.Array | None,
  is_causal: bool,
  shape_bnts: tuple[int, int, int, int],
  block_q: int,
  block_k: int,
) -> Int[Array, "Bm Nm Qb Kb"]:
  """EMPTY / PARTIAL / FULL per tile of the static mask (`mask` AND `is_causal`); a bool mask
  array is classified per (batch, head) from its elements."""
  B, N, T, S = shape_bnts
  structured = mask if isinstance(mask, Mask) else None
  if is_causal:
    structured = Causal() if structured is None else structured & Causal()
  qb, kb = num_blocks(T, block_q), num_blocks(S, block_k)
  if structured is None:
    static = np.full((qb, kb), FULL, np.int32)
  else:
    static = structured.block_mask(T, S, block_q, block_k)
  classes = jnp.asarray(static)[None, None]
  if mask is None or isinstance(mask, Mask):
    return classes
  keep = jnp.asarray(mask)
  if keep.dtype != jnp.bool_:
    raise TypeError(f"mask array must be boolean (True = keep), got dtype {keep.dtype}")
  keep = _validate.broadcast_to_bnts(keep, "mask", shape_bnts)
  keep = jnp.pad(keep, ((0, 0), (0, 0), (0, qb * block_q - T), (0, kb * block_k - S)))
  kept = jnp.sum(keep.reshape(B, N, qb, block_q, kb, block_k), axis=(3, 5), dtype=jnp.int32)
  rows = np.minimum(block_q, T - np.arange(qb) * block_q)
  cols = np.minimum(block_k, S - np.arange(kb) * block_k)
  size = (rows[:, None] * cols[None, :]).astype(np.int32)[None, None]
  dense = jnp.where(kept == 0, EMPTY, jnp.where(kept == size, FULL, PARTIAL))
  both_full = (classes == FULL) & (dense == FULL)
  either_empty = (classes == EMPTY) | (dense == EMPTY)
  return jnp.where(either_empty, EMPTY, jnp.where(both_full, FULL, PARTIAL)).astype(jnp.int32)


def _diagonal(T, S, block_q, block_k):
  """bool [Qb, Kb]: the kv tile holding each q tile's centre in token space."""
  qb, kb = num_blocks(T, block_q), num_blocks(S, block_k)
  centre = (np.arange(qb) * block_q + block_q // 2) * S // T // block_k
  diag = np.zeros((qb, kb), bool)
  diag[np.arange(qb), np.minimum(centre, kb - 1)] = True
  return diag


# ------------------------------------------------------------------ decisions


def plan(
  q: Float[Array, "B T N H"],
  k: Float[Array, "B S K H"],
  *,
  mask: Mask | jax.Array | None = None,
  bias: Float[Array, "..."] | None = None,
  is_causal: bool = False,
  scale: float | None = None,
  block_q: int = 64,
  block_k: int = 64,
  p_remain: float = 0.5,
  min_blocks: int = 1,
  gapr: bool = True,
) -> Plan:
  """The critical tiles (IPAR masses, p_remain, min_blocks, forced tiles) and GAPR's rectified
  tiles for (q, k); see the module docstring. No gradient."""
  B, T, S, N, K, H, _ = _validate.check_qkv(q, k, k)
  scale = 1.0 / math.sqrt(H) if scale is None else scale
  q, k = lax.stop_gradient(q), lax.stop_gradient(k)
  q_pool, k_pool = tile_means(q, block_q), tile_means(k, block_k)  # [B,Qb,N,H], [B,Kb,K,H]
  raw = _pair(q_pool, k_pool)  # [B, N, Qb, Kb]
  kb = raw.shape[-1]
  classes = tile_classes(mask, is_causal, (B, N, T, S), block_q, block_k)
  classes = jnp.broadcast_to(classes, raw.shape)
  allowed = classes != EMPTY

  # IPAR: each pooled key stands for its tile's n_j keys in the implicit full attention.
  sizes = np.minimum(block_k, S - np.arange(kb) * block_k).astype(np.float32)
  logits = scale * raw + np.log(sizes)[None, None, None, :]
  if bias is not None:
    bias_btnj = _key_bias(lax.stop_gradient(_bias(bias, (B, N, T, S))), block_k)
    bias_btnj = bias_btnj.transpose(0, 2, 1, 3)
    logits = logits + tile_means(bias_btnj, block_q).transpose(0, 2, 1, 3)
  logits = jnp.where(allowed, logits, -jnp.inf)
  top = jnp.max(logits, axis=-1, keepdims=True)
  e = jnp.where(allowed, jnp.exp(logits - jnp.where(jnp.isfinite(top), top, 0.0)), 0.0)
  p_hat = e / jnp.maximum(jnp.sum(e, axis=-1, keepdims=True), 1e-30)

  order = jnp.argsort(-p_hat, axis=-1)  # stable: ties keep the lower tile index
  sorted_p = jnp.take_along_axis(p_hat, order, axis=-1)
  before = jnp.cumsum(sorted_p, axis=-1) - sorted_p  # mass of the better tiles
  rank = jnp.arange(kb, dtype=jnp.int32).reshape(1, 1, 1, kb)
  # p_remain = 1 keeps every allowed tile, whatever the rounding of the cumulative sum.
  take = (before < p_remain) | (rank < min_blocks) | (p_remain >= 1.0)
  chosen = jnp.put_along_axis(jnp.zeros(raw.shape, bool), order, take, axis=-1, inplace=False)
  forced = (classes == PARTIAL) | jnp.asarray(_diagonal(T, S, block_q, block_k))[None, None]
  critical = (chosen | forced) & allowed

  pooled = (classes == FULL) & ~critical
  if gapr:
    q_dev, k_dev = tile_deviations(q, block_q), tile_deviations(k, block_k)
    error = jnp.abs(_pair(q_dev, k_pool)) + jnp.abs(_pair(q_pool, k_dev))
    rectified = pooled & (jnp.abs(raw) > error)
  else:
    rectified = jnp.zeros(raw.shape, bool)
  return Plan(allowed=allowed, critical=critical, pooled=pooled, rectified=rectified)


# ------------------------------------------------------------------ the rectified output


def _rows(tiles_bnij, block_q, T):
  """Tile table [B, N, Qb, Kb] -> per-row table [B, N, T, Kb]."""
  return jnp.repeat(tiles_bnij, block_q, axis=2)[:, :, :T]


def rectify(
  out_sparse: Float[Array, "B T N V"],
  lse: Float[Array, "B T N"],
  q: Float[Array, "B T N H"],
  k: Float[Array, "B S K H"],
  v: Float[Array, "B S K V"],
  tiles: Plan,
  *,
  bias: Float[Array, "..."] | None = None,
  scale: float | None = None,
  block_q: int = 64,
  block_k: int = 64,
  ipar: bool = True,
  gapr: bool = True,
) -> tuple[Float[Array, "B T N V"], Float[Array, "B T N"], Float[Array, "B T N"]]:
  """out_t = R_t O_t + Σ_{j ∈ Rc} (e^{ℓ_tj} / Z_t) v̄_j from the sparse pass (O, λ = lse).

  Returns (out fp32, kept mass e^{λ_t} / Z_t, R_t), [B,T,N] row statistics: the kept mass is
  the critical tiles' share of the implicit full attention (0 for a row with no key), R_t the
  rescale applied (1 when `ipar` is off: plain block-sparse attention)."""
  B, T, S, N, K, H, _ = _validate.check_qkv(q, k, v)
  scale = 1.0 / math.sqrt(H) if scale is None else scale
  kb = num_blocks(S, block_k)
  sizes = np.minimum(block_k, S - np.arange(kb) * block_k).astype(np.float32)
  ell_bntj = scale * _pair(q.astype(jnp.float32), tile_means(k, block_k))
  ell_bntj = ell_bntj + np.log(sizes)[None, None, None]
  if bias is not None:
    ell_bntj = ell_bntj + _key_bias(_bias(bias, (B, N, T, S)), block_k)
  ell_bntj = jnp.where(_rows(tiles.pooled, block_q, T), ell_bntj, -jnp.inf)
  lam_bnt = jnp.swapaxes(lse, 1, 2)
  top_bnt = lax.stop_gradient(jnp.maximum(lam_bnt, jnp.max(ell_bntj, axis=-1)))
  top_bnt = jnp.where(jnp.isfinite(top_bnt), top_bnt, 0.0)  # a row with no key at all
  crit_bnt = jnp.exp(lam_bnt - top_bnt)  # λ = -inf (no critical key) -> 0
  pool_bntj = jnp.exp(ell_bntj - top_bnt[..., None])  # tiles not pooled -> 0
  total_bnt = crit_bnt + jnp.sum(pool_bntj, axis=-1)
  total_bnt = jnp.where(total_bnt > 0, total_bnt, 1.0)
  kept_btn = jnp.swapaxes(crit_bnt / total_bnt, 1, 2)
  if not ipar:
    return out_sparse.astype(jnp.float32), kept_btn, jnp.ones_like(kept_btn)
  rectified_bntj = _rows(tiles.rectified, block_q, T)
  # GAPR folds the untrusted pooled tiles' mass into the critical rescale; IPAR alone drops it.
  folded_bnt = jnp.sum(jnp.where(rectified_bntj, 0.0, pool_bntj), axis=-1) if gapr else 0.0
  rescale_btn = jnp.swapaxes((crit_bnt + folded_bnt) / total_bnt, 1, 2)
  weights_bntj = jnp.where(rectified_bntj, pool_bntj, 0.0) / total_bnt[..., None]
  v_pool = tile_means(v, block_k)  # [B, Kb, K, V]
  w_bkgtj = weights_bntj.reshape(B, K, N // K, T, kb)
  corr_btnv = jnp.einsum("bkgtj,bjkv->btkgv", w_bkgtj, v_pool).reshape(B, T, N, v.shape[-1])
  out_btnv = rescale_btn[..., None] * out_sparse.astype(jnp.float32) + corr_btnv
  return out_btnv, kept_btn, rescale_btn


def critical_block_map(tiles: Plan, *, T: int, S: int, block_q: int, block_k: int) -> BlockMap:
  """The per-(batch, head) runtime map of the critical tiles (the engine re-classifies it by
  the static mask)."""
  return BlockMap.from_block_mask(
    jnp.where(tiles.critical, PARTIAL, EMPTY).astype(jnp.int32),
    block_q=block_q,
    block_k=block_k,
    seq_q=T,
    seq_k=S,
    max_kv_blocks=num_blocks(S, block_k),
    max_q_blocks=num_blocks(T, block_q),
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
  block_q: int = 64,
  block_k: int = 64,
  p_remain: float = 0.5,
  min_blocks: int = 1,
  ipar: bool = True,
  gapr: bool = True,
  implementation: str | None = None,
) -> tuple[Float[Array, "B T N V"], registry.Aux]:
  """Rectified SpaAttn; see the module docstring for the equations and conventions.

  Args:
    q, k, v: [B,T,N,H], [B,S,K,H], [B,S,K,Hv]; N % K == 0.
    mask, bias, is_causal, scale: as `dot_product_attention`; pooled terms only on tiles the
      mask keeps FULL.
    block_q, block_k: tile sizes of the pooling, the selection and the chunked path.
    p_remain: in (0, 1], the implicit full-attention mass the critical tiles cover (1: all).
    min_blocks: the fewest tiles chosen by mass per q tile (besides the forced ones).
    ipar: rescale the critical part by its share of the implicit full attention.
    gapr: add pooled values of the tiles where the gain beats the error (needs ipar).
    implementation: "xla" (dense-mask reference) or "chunked"; None = automatic.

  Returns:
    (out [B,T,N,Hv] in q's dtype, Aux with the metrics of the module docstring; no losses).
  """
  B, T, S, N, K, H, _ = _validate.check_qkv(q, k, v)
  tiling = dict(block_q=block_q, block_k=block_k)
  knobs = dict(p_remain=p_remain, min_blocks=min_blocks, ipar=ipar, gapr=gapr)
  check_knobs(**tiling, **knobs)
  impl = registry.resolve_implementation(
    implementation, dict.fromkeys(_IMPLEMENTATIONS), family="rectified"
  )
  scale = 1.0 / math.sqrt(H) if scale is None else float(scale)
  dense = None if mask is None or isinstance(mask, Mask) else jnp.asarray(mask)
  structured = mask if dense is None else None
  options = dict(is_causal=is_causal, scale=scale, implementation=impl, **tiling, **knobs)
  return _attention(q, k, v, dense, bias, structured=structured, **options)


# The whole call is one program, so eager callers (tests, notebooks) compile once per shape
# instead of once per operation; under an outer jit it is inlined.
_STATIC = ("structured", "is_causal", "scale", "implementation", "block_q", "block_k")


@functools.partial(jax.jit, static_argnames=(*_STATIC, "p_remain", "min_blocks", "ipar", "gapr"))
def _attention(q, k, v, dense, bias, *, structured, is_causal, scale, implementation, **knobs):
  T, S = q.shape[1], k.shape[1]
  tiling = dict(block_q=knobs["block_q"], block_k=knobs["block_k"])
  mask = structured if dense is None else dense
  common = dict(bias=bias, scale=scale, **tiling)
  selection = dict(p_remain=knobs["p_remain"], min_blocks=knobs["min_blocks"], gapr=knobs["gapr"])
  tiles = plan(q, k, mask=mask, is_causal=is_causal, **common, **selection)
  out_sparse, lse = dot_product_attention(
    q,
    k,
    v,
    mask=mask,
    bias=bias,
    is_causal=is_causal,
    scale=scale,
    implementation=implementation,
    block_map=critical_block_map(tiles, T=T, S=S, **tiling),
    return_lse=True,
  )
  flags = dict(ipar=knobs["ipar"], gapr=knobs["gapr"])
  out, kept, rescale = rectify(out_sparse, lse, q, k, v, tiles, **common, **flags)
  return out.astype(q.dtype), registry.Aux(metrics=_metrics(tiles, lse, kept, rescale))


def _metrics(tiles, lse, kept, rescale):
  n_allowed = jnp.maximum(jnp.sum(tiles.allowed, dtype=jnp.float32), 1.0)
  rows = jnp.isfinite(lse).astype(jnp.float32)  # rows the sparse pass attends
  n_rows = jnp.maximum(jnp.sum(rows), 1.0)
  metrics = {
    "rectified_density": jnp.sum(tiles.critical, dtype=jnp.float32) / n_allowed,
    "rectified_pooled": jnp.sum(tiles.rectified, dtype=jnp.float32) / n_allowed,
    "rectified_kept_mass": jnp.sum(rows * kept) / n_rows,
    "rectified_rescale": jnp.sum(rows * rescale) / n_rows,
  }
  return {name: lax.stop_gradient(m) for name, m in metrics.items()}


FAMILY = registry.Family(
  name="rectified",
  attention=attention,
  implementations=_IMPLEMENTATIONS,
  paper="Rectified SpaAttn: Revisiting Attention Sparsity for Efficient Video Generation "
  "(arXiv 2511.19835)",
  returns_aux=True,
  conformance=registry.Conformance(
    cases={"default": registry.ConformanceCase(options=dict(p_remain=0.5))},
    # Small tiles so the suite's short sequences span several (ragged, skipped, pooled ones);
    # per implementation, so the benchmark keeps the default tiles.
    implementation_options={impl: dict(block_q=8, block_k=8) for impl in _IMPLEMENTATIONS},
  ),
)
