"""BiFormer: bi-level routing attention (BRA) with a locally-enhanced positional encoding.

"BiFormer: Vision Transformer with Bi-Level Routing Attention" (Zhu, Wang, Ke, Li, Lau;
CVPR 2023, arXiv 2303.08810, §3.2 and Eq. 2-6). Tokens are the cells of a 2-D grid (H, W),
row-major; the grid is split into Rh × Rw regions (the paper's S × S) of (H/Rh)·(W/Rw) tokens:

    Q_r, K_r = region means of sg(q), sg(k)                     [R, N·H]  (sg = stop_gradient)
    A_r      = Q_r K_rᵀ                                         [R, R]    region adjacency
    I_r      = topk_index(A_r, top_k)                           [R, top_k]
    O_i      = softmax(scale · q_i K_gᵀ) V_g,  K_g, V_g = the tokens of regions I_r[region(i)]
    out      = O + LePE(v),   LePE = depth-wise C × C convolution of v over the grid (Eq. 6)

Shapes: q [B,T,N,H], k [B,S,K,H], v [B,S,K,Hv] -> [B,T,N,Hv]; N % K == 0 (grouped kv heads).

On the block-sparse engine: tokens are permuted to region-major order (`RegionLayout`), so
each region is one contiguous tile of (tokens per region) rows; the routed regions become a
per-batch `BlockMap` (shared by the heads, as the paper routes once on the full q/k width);
`dot_product_attention(..., block_map=...)` runs "xla" (the selection as a dense mask: the
reference), "chunked" (visits only the routed tiles, forward and backward) or "pallas"; the
output is gathered back to row-major order (an exact permutation).

Differences from the paper / official code (`rayleizhu/BiFormer`, `ops/bra_legacy.py`):
- Scale: default 1/√H (head dim); the released models use (N·H)^-1/2 (`qk_dim ** -0.5`), pass
  `scale=` for that.
- Sizes not divisible by the regions: like the official code the grid is zero-padded at the
  bottom/right to Rh·⌈H/Rh⌉ × Rw·⌈W/Rw⌉ and region means exclude the padding, but padded keys
  are masked here (the official code leaves "TODO: mask padding region"). Trailing padding in
  region-major order is dropped (a ragged last tile); other padding is masked by a `DenseMask`.
  Regions that are all padding are never routed to; when fewer than `top_k` regions hold keys,
  all of them are attended.
- LePE: zero-initialised (a fresh layer is plain BRA; the official Conv2d is Kaiming-uniform),
  one C × C kernel and bias per value channel of each query head ([C,C,N,Hv] and [N,Hv]; with
  N == K this is the official depth-wise conv over N·Hv channels; with grouped kv heads the
  conv reads the head's kv head, so GQA equals MHA with repeated kv heads). It is applied to v
  on the grid, so it needs self-attention on one grid (T == S); `lepe_kernel_size=0` drops it.
  It does not see attention masks or segment ids (a convolution over the grid, as the paper).
- No kv down-sampling (the released models use 'identity') and no routing on downsampled grids.

Choices where the paper is silent:
- `grid=None`: a square √T × √T grid when T is a perfect square, else a 1 × T row (a 1-D
  sequence: regions are then contiguous chunks and region-major order is the identity, so
  no permutation is materialised). An int `regions_per_side` R means 1 × R regions on a
  1-row grid and R × R otherwise. With S ≠ T (cross-attention, not in the paper) the kv grid is
  inferred from S the same way, and q regions route to kv regions of their own layout.
- Causal use (`is_causal=True`; the paper is an encoder): keys after the query in row-major
  order are masked (on the original positions), regions wholly in the future are never routed
  to, the query's own region is always attended and counts as one of the top_k (it does not
  compete, so its future keys cannot change the choice), and LePE uses only taps at or before
  the centre in row-major order (a PixelCNN-style masked kernel). Gradients are causal; but
  the pooled query of a region mixes all of its rows, so which past regions a token reads may
  depend on later queries of its own region (the tile-level estimate block-sparse prefill
  uses; no gradient flows through it). Use 1-token regions for strict token-level causality.
- Masks: a structured mask or `is_causal` also restricts the routing (region pairs the mask
  empties are not eligible); a dense boolean mask array, a bias and segment ids are applied in
  the token attention but are not visible to the routing. Masks act on original positions.
- Ties in A_r pick the lower region index (`lax.top_k`).

Numerics: region means and A_r in fp32; the token attention is the engine's (fp32 logits and
statistics); LePE accumulates in fp32 and is added to the attention output before the cast
back to the input dtype. Pallas compiled on GPU/TPU needs tile sizes the kernel supports
(tokens per region a power of two >= 16 on GPU); on CPU it is interpreted.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jaxtyping import Array, Bool, Float

from attnzoo.attention import _validate, registry
from attnzoo.attention.dense.softmax import dot_product_attention
from attnzoo.masks import Causal, DenseMask, Mask
from pallas_kernels.block_sparse import EMPTY, FULL, BlockMap, BlockSizes, num_blocks

REGIONS_PER_SIDE = 7  # the paper's S (n_win) for 224² inputs
TOP_K = 4  # the paper's stage-2 top-k; the spec's API default
LEPE_KERNEL_SIZE = 5  # side_dwconv of the released BiFormer models
_IMPLEMENTATIONS = ("xla", "chunked", "pallas")


# ------------------------------------------------------------------ grids and region layouts


def resolve_grid(grid: tuple[int, int] | None, length: int, *, name: str = "T") -> tuple[int, int]:
  """(H, W) with H·W == length: `grid` checked, or inferred (square, else 1 × length)."""
  if grid is None:
    side = math.isqrt(length)
    return (side, side) if side * side == length else (1, length)
  if (
    not isinstance(grid, (tuple, list))
    or len(grid) != 2
    or not all(isinstance(g, (int, np.integer)) and g >= 1 for g in grid)
  ):
    raise ValueError(f"grid={grid!r} must be a pair (H, W) of positive ints, or None to infer it")
  if grid[0] * grid[1] != length:
    raise ValueError(
      f"grid={tuple(grid)} has {grid[0] * grid[1]} cells but {name}={length} tokens; pass "
      f"grid=(H, W) with H·W = {length}, or grid=None (square if {name} is, else 1 × {name})"
    )
  return int(grid[0]), int(grid[1])


def resolve_regions(regions_per_side: int | tuple[int, int], grid: tuple[int, int]):
  """(Rh, Rw): an int R is 1 × R on a 1-row grid and R × R otherwise; a pair as given."""
  if isinstance(regions_per_side, (int, np.integer)) and not isinstance(regions_per_side, bool):
    regions = (1, int(regions_per_side)) if grid[0] == 1 else (int(regions_per_side),) * 2
  elif isinstance(regions_per_side, (tuple, list)) and len(regions_per_side) == 2:
    regions = tuple(regions_per_side)
  else:
    regions = None
  if regions is None or not all(isinstance(r, (int, np.integer)) and r >= 1 for r in regions):
    raise ValueError(
      f"regions_per_side={regions_per_side!r} must be a positive int (the paper's S) or a "
      "pair (Rh, Rw) of positive ints"
    )
  return int(regions[0]), int(regions[1])


@dataclasses.dataclass(frozen=True)
class RegionLayout:
  """Region-major order of a row-major (H, W) grid split into (Rh, Rw) regions (static numpy).

  Slot p of the permuted sequence holds token `order[p]` (-1: padding of a region cut by the
  grid's edge); regions are tiles of `tile` = ⌈H/Rh⌉·⌈W/Rw⌉ consecutive slots, the last one
  possibly ragged (trailing padding is dropped). `inverse[t]` is the slot of token t.
  """

  grid: tuple[int, int]
  regions: tuple[int, int]
  tile: int
  order: np.ndarray
  inverse: np.ndarray

  @classmethod
  def build(cls, grid: tuple[int, int], regions: tuple[int, int]) -> RegionLayout:
    (H, W), (Rh, Rw) = grid, regions
    ph, pw = -(-H // Rh), -(-W // Rw)
    h = np.arange(Rh)[:, None, None, None] * ph + np.arange(ph)[None, None, :, None]
    w = np.arange(Rw)[None, :, None, None] * pw + np.arange(pw)[None, None, None, :]
    h, w = (a.reshape(-1) for a in np.broadcast_arrays(h, w))
    order = np.where((h < H) & (w < W), h * W + w, -1)
    order = order[: int(np.flatnonzero(order >= 0)[-1]) + 1]
    inverse = np.empty(H * W, np.int64)
    inverse[order[order >= 0]] = np.flatnonzero(order >= 0)
    return cls((H, W), (Rh, Rw), ph * pw, order, inverse)

  @property
  def length(self) -> int:
    """Slots of the permuted sequence (tokens plus interior padding)."""
    return len(self.order)

  @property
  def num_regions(self) -> int:
    return self.regions[0] * self.regions[1]

  @property
  def is_identity(self) -> bool:
    return bool(np.array_equal(self.order, np.arange(self.grid[0] * self.grid[1])))

  def counts(self) -> np.ndarray:
    """float [Qb]: tokens (not padding) in each tile."""
    nb = num_blocks(self.length, self.tile)
    real = np.zeros(nb * self.tile, bool)
    real[: self.length] = self.order >= 0
    return real.reshape(nb, self.tile).sum(-1).astype(np.float32)

  def to_regions(self, x: Float[Array, "B L ..."]) -> Float[Array, "B P ..."]:
    """x in region-major order along axis 1; padding slots are zeros."""
    if self.is_identity:
      return x
    index = np.where(self.order >= 0, self.order, x.shape[1])
    return jnp.take(x, index, axis=1, mode="fill", fill_value=0)

  def from_regions(self, x: Float[Array, "B P ..."]) -> Float[Array, "B L ..."]:
    """The inverse of `to_regions` (padding slots dropped); an exact gather."""
    return x if self.is_identity else jnp.take(x, self.inverse, axis=1)


def _layouts(T, S, grid, regions_per_side):
  q_grid = resolve_grid(grid, T, name="T")
  kv_grid = q_grid if S == T else resolve_grid(None, S, name="S")
  q_layout = RegionLayout.build(q_grid, resolve_regions(regions_per_side, q_grid))
  kv_layout = RegionLayout.build(kv_grid, resolve_regions(regions_per_side, kv_grid))
  return q_layout, kv_layout


# ------------------------------------------------------------------ routing


def _static_mask(structured, is_causal, q_layout, kv_layout, T, S) -> Mask | None:
  """The structured mask and causality on original positions, as a mask on region-major slots
  (padding keys and queries masked). Passed through when both layouts are the identity."""
  if q_layout.is_identity and kv_layout.is_identity:
    if is_causal:
      return Causal() if structured is None else structured & Causal()
    return structured
  keep = np.ones((T, S), bool) if structured is None else structured.dense(T, S)
  if is_causal:
    keep &= np.arange(T)[:, None] >= np.arange(S)[None, :]
  qo, ko = q_layout.order, kv_layout.order
  keep = keep[np.maximum(qo, 0)][:, np.maximum(ko, 0)] & (qo >= 0)[:, None] & (ko >= 0)[None, :]
  return None if keep.all() else DenseMask(keep)


def _region_means(x, layout):
  """fp32 [B, R, heads, H]: means over each region's tokens (padding excluded), no gradient."""
  x = layout.to_regions(lax.stop_gradient(x)).astype(jnp.float32)
  B, P, heads, H = x.shape
  nb = num_blocks(P, layout.tile)
  x = jnp.pad(x, ((0, 0), (0, nb * layout.tile - P), (0, 0), (0, 0)))
  counts = np.maximum(layout.counts(), 1.0)
  return x.reshape(B, nb, layout.tile, heads, H).sum(2) / counts[None, :, None, None]


def route(
  q: Float[Array, "B T N H"],
  k: Float[Array, "B S K H"],
  *,
  q_layout: RegionLayout,
  kv_layout: RegionLayout,
  top_k: int,
  allowed: np.ndarray,
  forced: np.ndarray,
) -> Bool[Array, "B Qb Kb"]:
  """Routed region pairs: per batch element and query region, the `top_k` kv regions of largest
  A_r = Q_r K_rᵀ (full q/k width, summed over heads) among `allowed` [Qb, Kb] ones; `forced`
  pairs are always kept and count towards `top_k`. Discrete: no gradient."""
  q_r = _region_means(q, q_layout)  # [B, Qb, N, H]
  k_r = _region_means(k, kv_layout)  # [B, Kb, K, H]
  B, Qb, N, H = q_r.shape
  Kb, K = k_r.shape[1], k_r.shape[2]
  q_r = q_r.reshape(B, Qb, K, N // K, H)
  adjacency = jnp.einsum("bikgh,bjkh->bij", q_r, k_r)
  eligible = allowed & ~forced
  scores = jnp.where(jnp.asarray(eligible)[None], adjacency, -jnp.inf)
  picks = min(top_k, Kb)
  _, top = lax.top_k(scores, picks)  # [B, Qb, picks]
  quota = top_k - forced.sum(-1)  # [Qb]: forced pairs use up slots
  used = np.arange(picks)[None, :] < quota[:, None]  # [Qb, picks]
  hit = top[..., None] == jnp.arange(Kb).reshape(1, 1, 1, Kb)  # [B, Qb, picks, Kb]
  chosen = jnp.any(hit & jnp.asarray(used)[None, :, :, None], axis=2)
  return (chosen & jnp.asarray(eligible)[None]) | jnp.asarray(forced)[None]


def _allowed_and_forced(static, is_causal, q_layout, kv_layout, T_p, S_p):
  qb, kb = num_blocks(T_p, q_layout.tile), num_blocks(S_p, kv_layout.tile)
  if static is None:
    classes = np.full((qb, kb), FULL, np.int32)
  else:
    classes = static.block_mask(T_p, S_p, q_layout.tile, kv_layout.tile)
  allowed = classes != EMPTY
  forced = np.zeros((qb, kb), bool)
  if is_causal:  # the own region (same index in both layouts)
    own = np.arange(min(qb, kb))
    forced[own, own] = True
    forced &= allowed
  return classes, allowed, forced


def route_regions(
  q: Float[Array, "B T N H"],
  k: Float[Array, "B S K H"],
  *,
  grid: tuple[int, int] | None = None,
  regions_per_side: int | tuple[int, int] = REGIONS_PER_SIDE,
  top_k: int = TOP_K,
  is_causal: bool = False,
  mask: Mask | None = None,
) -> Bool[Array, "B Rq Rk"]:
  """bool [B, Rq, Rk]: which kv regions each query region attends (region-major numbering;
  trailing all-padding regions are absent). The routing step of `attention`."""
  _, T, S, *_ = _validate.check_qkv(q, k, k)
  q_layout, kv_layout = _layouts(T, S, grid, regions_per_side)
  _check_top_k(top_k, kv_layout)
  static = _static_mask(mask, is_causal, q_layout, kv_layout, T, S)
  _, allowed, forced = _allowed_and_forced(
    static, is_causal, q_layout, kv_layout, q_layout.length, kv_layout.length
  )
  return route(
    q, k, q_layout=q_layout, kv_layout=kv_layout, top_k=top_k, allowed=allowed, forced=forced
  )


def _check_top_k(top_k, kv_layout):
  regions = kv_layout.num_regions
  if not (isinstance(top_k, (int, np.integer)) and 1 <= top_k <= regions):
    raise ValueError(
      f"top_k={top_k!r} must be an int in [1, {regions}]: the kv grid {kv_layout.grid} has "
      f"{kv_layout.regions[0]}×{kv_layout.regions[1]} regions; lower top_k or use more regions"
    )


# ------------------------------------------------------------------ LePE


def lepe(
  v: Float[Array, "B S K V"],
  kernel: Float[Array, "C C N V"],
  bias: Float[Array, "N V"],
  *,
  grid: tuple[int, int],
  is_causal: bool = False,
) -> Float[Array, "B S N V"]:
  """fp32 LePE(v): bias + Σ_{dy,dx} kernel[dy+r, dx+r] ⊙ v[y+dy, x+dx] over the row-major grid
  (zero padding, r = C // 2; PyTorch Conv2d's cross-correlation). Query head n reads kv head
  n // (N // K). Causal: only taps with (dy, dx) at or before (0, 0) in row-major order."""
  B, S, K, Hv = v.shape
  C, N = kernel.shape[0], kernel.shape[2]
  H, W = grid
  r = C // 2
  v_BHWNV = jnp.repeat(v.astype(jnp.float32), N // K, axis=2).reshape(B, H, W, N, Hv)
  v_pad = jnp.pad(v_BHWNV, ((0, 0), (r, r), (r, r), (0, 0), (0, 0)))
  kernel = kernel.astype(jnp.float32)
  out = jnp.broadcast_to(bias.astype(jnp.float32)[None, None, None], v_BHWNV.shape)
  for dy in range(-r, r + 1):
    for dx in range(-r, r + 1):
      if abs(dy) >= H or abs(dx) >= W:  # reads only padding
        continue
      if is_causal and (dy > 0 or (dy == 0 and dx > 0)):
        continue
      tap = kernel[dy + r, dx + r][None, None, None]
      out = out + tap * v_pad[:, r + dy : r + dy + H, r + dx : r + dx + W]
  return out.reshape(B, S, N, Hv)


def _check_lepe(lepe_kernel_size, lepe_kernel, lepe_bias, N, Hv, T, S):
  if not isinstance(lepe_kernel_size, (int, np.integer)) or lepe_kernel_size < 0:
    raise ValueError(f"lepe_kernel_size={lepe_kernel_size!r} must be an int >= 0 (0 = no LePE)")
  if lepe_kernel_size == 0:
    if lepe_kernel is not None or lepe_bias is not None:
      raise ValueError(
        "lepe_kernel_size=0 (no LePE) but lepe_kernel / lepe_bias were given; drop them or "
        "set lepe_kernel_size to their kernel size"
      )
    return False
  C = lepe_kernel_size
  if C % 2 == 0:
    raise ValueError(f"lepe_kernel_size={C} must be odd (a centred convolution), e.g. 3 or 5")
  if lepe_kernel is None or lepe_bias is None:
    raise ValueError(
      f"lepe_kernel_size={C} needs lepe_kernel [C,C,N,Hv] and lepe_bias [N,Hv] (created by the "
      "layer from FAMILY.params); pass them, or lepe_kernel_size=0 for no LePE"
    )
  if lepe_kernel.shape != (C, C, N, Hv) or lepe_bias.shape != (N, Hv):
    raise ValueError(
      f"lepe_kernel {lepe_kernel.shape} / lepe_bias {lepe_bias.shape} do not match "
      f"lepe_kernel_size={C}, N={N}, Hv={Hv}: expected {(C, C, N, Hv)} and {(N, Hv)}"
    )
  if T != S:
    raise ValueError(
      f"LePE convolves v on the query grid, so it needs self-attention (T == S), got T={T}, "
      f"S={S}; pass lepe_kernel_size=0 for cross-attention"
    )
  return True


# ------------------------------------------------------------------ the family


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
  lepe_kernel: Float[Array, "C C N V"] | None = None,
  lepe_bias: Float[Array, "N V"] | None = None,
  grid: tuple[int, int] | None = None,
  regions_per_side: int | tuple[int, int] = REGIONS_PER_SIDE,
  top_k: int = TOP_K,
  lepe_kernel_size: int = LEPE_KERNEL_SIZE,
  implementation: str | None = None,
  interpret: bool | None = None,
) -> Float[Array, "B T N V"]:
  """Bi-level routing attention + LePE (module docstring).

  Args:
    q, k, v, mask, bias, is_causal, scale, segment_ids, logits_soft_cap: as
      `dot_product_attention`, on original (row-major) positions.
    lepe_kernel, lepe_bias: LePE's depth-wise kernel [C,C,N,Hv] and bias [N,Hv].
    grid: (H, W) of the query tokens (H·W = T); None = square if T is, else 1 × T.
    regions_per_side: the paper's S (int: S × S regions, 1 × S on a 1-row grid) or (Rh, Rw).
    top_k: kv regions each query region attends, in [1, number of regions].
    lepe_kernel_size: C, odd; 0 = no LePE.
    implementation: "xla" (reference), "chunked", "pallas"; None = automatic.
    interpret: Pallas interpret mode (None = on CPU).
  """
  B, T, S, N, _, _, Hv = _validate.check_qkv(q, k, v)
  q_layout, kv_layout = _layouts(T, S, grid, regions_per_side)
  _check_top_k(top_k, kv_layout)
  use_lepe = _check_lepe(lepe_kernel_size, lepe_kernel, lepe_bias, N, Hv, T, S)
  impl = registry.resolve_implementation(
    implementation, dict.fromkeys(_IMPLEMENTATIONS), family="biformer"
  )
  structured = mask if isinstance(mask, Mask) else None
  dense = None if mask is None or isinstance(mask, Mask) else jnp.asarray(mask)
  static = _static_mask(structured, is_causal, q_layout, kv_layout, T, S)
  T_p, S_p = q_layout.length, kv_layout.length
  classes, allowed, forced = _allowed_and_forced(static, is_causal, q_layout, kv_layout, T_p, S_p)
  chosen = route(
    q, k, q_layout=q_layout, kv_layout=kv_layout, top_k=top_k, allowed=allowed, forced=forced
  )
  block_mask = jnp.where(chosen, jnp.asarray(classes)[None], EMPTY)[:, None]  # [B, 1, Qb, Kb]
  bq, bk = q_layout.tile, kv_layout.tile
  bmap = BlockMap.from_block_mask(
    block_mask,
    block_q=bq,
    block_k=bk,
    seq_q=T_p,
    seq_k=S_p,
    max_kv_blocks=min(top_k, num_blocks(S_p, bk)),
  )

  def pairwise(x, name, fill):  # a [.., T, S] array on region-major slots
    x = _validate.broadcast_to_bnts(x, name, (B, N, T, S))
    if q_layout.is_identity and kv_layout.is_identity:
      return x
    qi = np.where(q_layout.order >= 0, q_layout.order, x.shape[2])
    ki = np.where(kv_layout.order >= 0, kv_layout.order, x.shape[3])
    x = jnp.take(x, qi, axis=2, mode="fill", fill_value=fill)
    return jnp.take(x, ki, axis=3, mode="fill", fill_value=fill)

  if dense is not None:
    dense = pairwise(dense, "mask", False)
  if bias is not None:
    bias = pairwise(jnp.asarray(bias), "bias", 0)
  if segment_ids is not None:
    q_ids, kv_ids = _validate.split_segment_ids(segment_ids, B, T, S)
    segment_ids = (q_layout.to_regions(q_ids), kv_layout.to_regions(kv_ids))
  out_p = dot_product_attention(
    q_layout.to_regions(q),
    kv_layout.to_regions(k),
    kv_layout.to_regions(v),
    mask=_combine(static, dense, T_p, S_p),
    bias=bias,
    scale=scale,
    segment_ids=segment_ids,
    logits_soft_cap=logits_soft_cap,
    implementation=impl,
    block_sizes=BlockSizes(bq, bk),
    interpret=interpret,
    block_map=bmap,
  )
  out = q_layout.from_regions(out_p)
  if not use_lepe:
    return out
  pe = lepe(v, lepe_kernel, lepe_bias, grid=q_layout.grid, is_causal=is_causal)
  return (out.astype(jnp.float32) + pe).astype(q.dtype)


def _combine(static: Mask | None, dense: jax.Array | None, T_p: int, S_p: int):
  """One `mask=` for the engine: the structured mask, or the dense array AND-ed with it (the
  engine takes one of the two; a dense array is [T, S] anyway)."""
  if dense is None or static is None:
    return static if dense is None else dense
  return dense & jnp.asarray(static.dense(T_p, S_p))[None, None]


def _lepe_size(dims: registry.Dims) -> int:
  return int(dims.knobs.get("lepe_kernel_size", LEPE_KERNEL_SIZE))


FAMILY = registry.Family(
  name="biformer",
  attention=attention,
  implementations=_IMPLEMENTATIONS,
  paper="BiFormer: Vision Transformer with Bi-Level Routing Attention (arXiv 2303.08810)",
  params={
    "lepe_kernel": registry.ParamSpec(
      shape=lambda d: (_lepe_size(d),) * 2 + (d.N, d.V) if _lepe_size(d) else None,
      doc="LePE depth-wise kernel [C, C, N, Hv] (zero init: a fresh layer is plain BRA)",
      head_axis=2,
    ),
    "lepe_bias": registry.ParamSpec(
      shape=lambda d: (d.N, d.V) if _lepe_size(d) else None,
      doc="LePE bias [N, Hv]",
      head_axis=0,
    ),
  },
  conformance=registry.Conformance(
    # The suite's lengths (37, 45, 1, 7, 129, 130, 3) are not squares: 1 × L rows in 4
    # regions (ragged last region), 2 routed of 4 keeps the selection sparse. LePE is off:
    # it needs T == S and the suite also runs T != S (tests/attention/sparse/test_biformer.py
    # covers LePE).
    cases={
      "default": registry.ConformanceCase(
        options=dict(regions_per_side=4, top_k=2, lepe_kernel_size=0)
      )
    },
    implementation_options={"pallas": {"interpret": True}},
    slow=("pallas",),
    benchmark={
      "default": registry.ConformanceCase(
        options=dict(regions_per_side=8, top_k=4, lepe_kernel_size=0)
      )
    },
  ),
)
