"""DHSA: dynamic hierarchical sparse attention (chunk-level scores, token-level selection).

"Long-Context Modeling with Dynamic Hierarchical Sparse Attention for On-Device LLMs" (Xiong et
al., arXiv 2510.24606), §3 (dynamic chunking, length-normalised chunk representations,
upsampled token scores, per-block top-k); spec: shared/papers/efficient.md §7.1.

The keys are cut into chunks C_0..C_{Nc-1} (`boundaries`), the queries into blocks of
`block_size` positions. With q̃, k̃ the queries and keys averaged over heads:

    q̄_b = mean_{t∈b}(q̃_t) · √|b|            k̄_c = mean_{j∈C_c}(k̃_j) · √|C_c|     ("avgpool_norm")
    S[b, c] = q̄_b · k̄_c                      chunk similarity, shared by all heads
    S_tok[b, j] = S[b, chunk(j)]              upsampled to tokens, j allowed for block b
    I_b = the `local_tokens` allowed keys of largest index below the block's end
          ∪ the allowed keys of largest S_tok filling the budget to `topk_tokens`
    out_t = softmax_{j ∈ I_b(t), j allowed for t}(scale · q_t·k_j + bias) v_j

"Allowed" is the static mask (`mask`, `is_causal`): at block level a key is allowed when some
query of the block may read it (key j < end of the block when causal); the attention itself
applies the exact element mask (causal on each query's own position), so queries early in a
block do not read the block's later keys even though they were selected.

Shapes: q [B,T,N,H], k [B,S,K,H], v [B,S,K,Hv] -> [B,T,N,Hv]; boundaries int [C+1] or
[B, C+1] (chunk c = [boundaries[c], boundaries[c+1]); 0 first, S last, non-decreasing, so
repeated S pads a batch to a common C); idx int32 [B, Qb, W] with Qb = ⌈T/block_size⌉,
W = min(topk_tokens, S), ascending, slots beyond a block's allowed keys hold S.

Boundaries: "fixed" (`fixed_chunk_boundaries(S, chunk_size)`, the framework default), "mass"
(`attention_mass_boundaries`: the paper's label heuristic from the true attention, an oracle),
an int array, or a callable `k -> boundaries` (a learned predictor brought by the caller).

Implementations (one semantics): "xla" — the selected keys as a dense [B,1,T,S] mask on the
materialised logits (the reference); "chunked" — the same mask, with the kv tiles that hold a
selected key passed as a per-batch runtime `BlockMap` to `dot_product_attention`, so unvisited
tiles are skipped forward and backward. The selection is discrete and computed under
`stop_gradient`: gradients flow through the attention over the selected keys only.

Aux metrics: "dhsa_density" (kept / allowed elements), "dhsa_tile_density" (visited / all
tiles of the chunked path's map), "dhsa_chunks" (non-empty chunks, mean over the batch).

Differences from the paper:
- No learned boundary predictor (the paper's small network on the keys, trained on the mass
  labels): out of scope; pass one as a callable `boundaries`. "mass" computes the labels'
  chunking directly from the dense attention (O(T·S) memory), so it is an oracle: it reads
  every query of the sequence, and under causal attention early blocks' chunks depend on later
  tokens (no gradient flows through it). Use "fixed" (or a causal predictor) to train an LM.
- `num_chunks` counts chunks (at most num_chunks − 1 interior boundaries); the code counts
  boundaries. The mass ratio uses every later query (the code's odd-layer variant; its
  even layers cap the rows at a 4096-token window) and no "smooth ends" buffer: candidate p
  needs both windows inside the sequence, w − 1 <= p <= S − w − 1.
- q̄_b averages the block's real queries (the code averages a zero-padded last block and then
  multiplies by √(real length)); both scale by √len as the paper's "avgpool_norm".
- No "instruction tokens" (the code's dense last 64 queries) and no "global tokens" (a prefix
  spliced into every block's list by the code, not in the paper's method); no sliding-window
  cap. Empty slots hold S instead of repeating the last key.

Choices where the paper is silent:
- Non-causal use (the paper is causal prefill): every key is allowed at block level; "local"
  keeps its meaning (the allowed keys just below the block's end).
- Causal use keeps the paper's block-level estimate: q̄_b mixes every query of the block and
  k̄_c every key of the chunk, so which past keys a query reads may depend on later tokens of
  its own block or chunk (no gradient flows through the choice; the values and gradients a
  query reads are causal). Use block_size = chunk_size = 1 for strict token-level causality.
- Defaults: block_size 64, local_tokens 128 (the code's `dhsa_sdpa`), chunk_size 64 (fixed
  chunks then match the paper's block-sparse baseline), topk_tokens 512 (the paper reports
  budgets, not a default); selection and the chunked path's tiles are separate knobs.
- Masks: a structured or dense `mask` also restricts the selection (a key is allowed for a
  block when some query of the block and some head may read it); bias, segment ids and the
  soft cap act in the attention only. GQA: q̃ averages the N query heads, k̃ the K kv heads.
- Ties in S_tok (every key of a chunk shares its chunk's score) pick the lower key index, so
  a budget that ends inside a chunk takes its first keys; the selection is deterministic.
- With fewer allowed keys than the budget a block keeps all of them (dense within its
  allowed set); `topk_tokens >= S` is dense attention under the mask.
- Empty chunks (repeated boundaries) have representation 0 and hold no keys.
- fp32 for the representations, scores and the mass ratio; out in q's dtype.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jaxtyping import Array, Bool, Float, Int

from attnzoo.attention import _validate, registry
from attnzoo.attention.dense.softmax import dot_product_attention
from attnzoo.attention.sparse.dhsa_chunks import (
  _causal,
  _check_int,
  _check_number,
  attention_mass_boundaries,
  check_boundaries,
  fixed_chunk_boundaries,
)
from attnzoo.attention.sparse.sparsifiner import coarsen
from attnzoo.masks import Mask
from pallas_kernels.block_sparse import BlockMap, BlockSizes, num_blocks

BOUNDARIES = ("fixed", "mass")
POOLINGS = ("avgpool_norm", "avgpool")
_IMPLEMENTATIONS = ("xla", "chunked")


def _check_pooling(pooling: str) -> None:
  if pooling not in POOLINGS:
    raise ValueError(f"pooling={pooling!r} must be one of {POOLINGS} (the paper: avgpool_norm)")


def check_knobs(block_size: int, topk_tokens: int, local_tokens: int) -> None:
  """ValueError naming the bad knob and the fix."""
  _check_int("block_size", block_size, 1, "the number of queries per selection block")
  _check_int("topk_tokens", topk_tokens, 1, "the keys each query block attends")
  _check_int("local_tokens", local_tokens, 0, "the most recent keys every block keeps")
  if local_tokens > topk_tokens:
    raise ValueError(
      f"local_tokens={local_tokens} exceeds topk_tokens={topk_tokens}: the local keys are part "
      "of the budget; raise topk_tokens or lower local_tokens"
    )


# ------------------------------------------------------------------ representations and scores


@functools.partial(jax.jit, static_argnames=("pooling",))
def chunk_representations(
  k: Float[Array, "B S K H"], boundaries: Int[Array, "Bb C1"], pooling: str = "avgpool_norm"
) -> tuple[Float[Array, "B C H"], Int[Array, "B S"]]:
  """(k̄ [B, C, H] fp32, chunk id of each key [B, S]): mean of the chunk's head-averaged keys,
  × √|C_c| for "avgpool_norm"; empty chunks are 0."""
  _check_pooling(pooling)
  B, S = k.shape[:2]
  bounds = jnp.broadcast_to(boundaries, (B, boundaries.shape[-1]))
  C = bounds.shape[-1] - 1
  keys = jnp.arange(S, dtype=jnp.int32)
  chunk_of = jax.vmap(lambda b: jnp.searchsorted(b, keys, side="right"))(bounds) - 1
  k_bsh = jnp.mean(k.astype(jnp.float32), axis=2)
  sums = jax.vmap(lambda x, c: jax.ops.segment_sum(x, c, num_segments=C))(k_bsh, chunk_of)
  lens = jnp.diff(bounds, axis=-1).astype(jnp.float32)[..., None]  # [B, C, 1]
  reps = sums / jnp.maximum(lens, 1.0)
  if pooling == "avgpool_norm":
    reps = reps * jnp.sqrt(lens)
  return reps, chunk_of.astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("block_size", "pooling"))
def block_representations(
  q: Float[Array, "B T N H"], block_size: int, pooling: str = "avgpool_norm"
) -> Float[Array, "B Qb H"]:
  """q̄ [B, Qb, H] fp32: mean of each block's head-averaged queries (× √len for avgpool_norm;
  the last block may be short)."""
  B, T = q.shape[:2]
  qb = num_blocks(T, block_size)
  q_bth = jnp.mean(q.astype(jnp.float32), axis=2)
  q_bth = jnp.pad(q_bth, ((0, 0), (0, qb * block_size - T), (0, 0)))
  sums = jnp.sum(q_bth.reshape(B, qb, block_size, -1), axis=2)
  lens = np.minimum(block_size, T - block_size * np.arange(qb)).astype(np.float32)
  reps = sums / jnp.asarray(lens)[None, :, None]
  if pooling == "avgpool_norm":
    reps = reps * jnp.asarray(np.sqrt(lens))[None, :, None]
  return reps


def chunk_scores(
  q: Float[Array, "B T N H"],
  k: Float[Array, "B S K H"],
  *,
  boundaries: Int[Array, "Bb C1"],
  block_size: int,
  pooling: str = "avgpool_norm",
) -> Float[Array, "B Qb C"]:
  """S[b, c] = q̄_b · k̄_c, fp32, shared by all heads (no gradient)."""
  _check_int("block_size", block_size, 1, "the number of queries per selection block")
  boundaries = check_boundaries(boundaries, k.shape[0], k.shape[1])
  return _chunk_scores(q, k, boundaries, block_size, pooling)[0]


@functools.partial(jax.jit, static_argnums=(3, 4))
def _chunk_scores(q, k, boundaries, block_size, pooling):
  """(S [B, Qb, C], chunk id of each key [B, S]) from checked boundaries."""
  q, k = lax.stop_gradient(q), lax.stop_gradient(k)
  k_bar, chunk_of = chunk_representations(k, boundaries, pooling)
  q_bar = block_representations(q, block_size, pooling)
  return jnp.einsum("bqh,bch->bqc", q_bar, k_bar), chunk_of


# ------------------------------------------------------------------ selection


def _static_keep(mask, is_causal: bool, shape_bnts) -> jax.Array | None:
  """The element mask [Bx, Nx, T, S] (the `mask` AND causality), or None for no mask (then
  causality alone is applied analytically)."""
  _, _, T, S = shape_bnts
  if mask is None:
    return None
  if isinstance(mask, Mask):
    keep = jnp.asarray(mask.dense(T, S))[None, None]
  else:
    keep = jnp.asarray(mask)
    if keep.dtype != jnp.bool_:
      raise TypeError(f"mask array must be boolean (True = keep), got dtype {keep.dtype}")
    keep = _validate.broadcast_to_bnts(keep, "mask", shape_bnts)
  return keep & _causal(T, S) if is_causal else keep


def _block_allowed(keep: Bool[Array, "Bx Nx T S"], T: int, S: int, block_size: int):
  """bool [Bx, Qb, S]: keys some query of the block (and some head) may read."""
  qb = num_blocks(T, block_size)
  keep = jnp.any(keep, axis=1)  # [Bx, T, S]
  keep = jnp.pad(keep, ((0, 0), (0, qb * block_size - T), (0, 0)))
  return jnp.any(keep.reshape(keep.shape[0], qb, block_size, S), axis=2)


def _select(scores_tok, keep, *, is_causal: bool, T: int, selection):
  """idx [B, Qb, W] from token scores [B, Qb, S] and the static element mask (or None)."""
  block_size, topk_tokens, local_tokens, _ = selection
  B, qb, S = scores_tok.shape
  pos = jnp.arange(S)[None, None, :]
  ends = jnp.minimum(block_size * (jnp.arange(qb) + 1), T)[None, :, None]
  below = pos < ends
  if keep is None:  # every key below the block's end is allowed: no ranking needed
    allowed = below if is_causal else jnp.ones((1, qb, S), jnp.bool_)
    local = below & (pos >= ends - local_tokens)
  else:
    allowed = _block_allowed(keep, T, S, block_size)
    below = allowed & below
    # Allowed keys in [j, block end): the local ones are the last `local_tokens` of them.
    from_end = jnp.cumsum(below[..., ::-1].astype(jnp.int32), axis=-1)[..., ::-1]
    local = below & (from_end <= local_tokens)
  priority = jnp.where(local, jnp.inf, jnp.where(allowed, scores_tok, -jnp.inf))
  width = min(topk_tokens, S)
  # lax.top_k lists equal values by lower index: ties in S_tok keep the earlier keys.
  top_values, top = lax.top_k(priority, width)
  idx = jnp.where(top_values > -jnp.inf, top, S).astype(jnp.int32)
  return jnp.sort(idx, axis=-1)


def dhsa_select(
  q: Float[Array, "B T N H"],
  k: Float[Array, "B S K H"],
  *,
  boundaries: Int[Array, "Bb C1"],
  block_size: int,
  topk_tokens: int,
  local_tokens: int,
  pooling: str = "avgpool_norm",
  is_causal: bool = True,
  mask: Mask | jax.Array | None = None,
) -> Int[Array, "B Qb W"]:
  """idx int32 [B, ⌈T/block_size⌉, min(topk_tokens, S)]: each query block's selected keys,
  ascending; slots beyond the block's allowed keys hold S. Discrete: no gradient."""
  check_knobs(block_size, topk_tokens, local_tokens)
  B, T, S, N, *_ = _validate.check_qkv(q, k, k)
  _check_pooling(pooling)
  keep = _static_keep(mask, is_causal, (B, N, T, S))
  selection = (block_size, topk_tokens, local_tokens, pooling)
  return _dhsa_select(q, k, check_boundaries(boundaries, B, S), keep, is_causal, selection)


@functools.partial(jax.jit, static_argnums=(4, 5))
def _dhsa_select(q, k, boundaries, keep, is_causal, selection):
  """idx from checked boundaries [Bb, C+1], the static element mask (or None) and
  selection = (block_size, topk_tokens, local_tokens, pooling)."""
  block_size, _, _, pooling = selection
  B, T, S = q.shape[0], q.shape[1], k.shape[1]
  scores, chunk_of = _chunk_scores(q, k, boundaries, block_size, pooling)
  qb = scores.shape[1]
  scores_tok = jnp.take_along_axis(scores, jnp.broadcast_to(chunk_of[:, None], (B, qb, S)), -1)
  return _select(scores_tok, keep, is_causal=is_causal, T=T, selection=selection)


def selected_blocks(idx: Int[Array, "B Qb W"], seq_k: int) -> Bool[Array, "B Qb S"]:
  """bool [B, Qb, S]: True at each block's selected keys (slots holding S are dropped)."""
  B, qb, width = idx.shape
  rows = jnp.broadcast_to(jnp.arange(qb)[None, :, None], (B, qb, width))
  batch = jnp.broadcast_to(jnp.arange(B)[:, None, None], (B, qb, width))
  hit = jnp.zeros((B, qb, seq_k + 1), jnp.bool_).at[batch, rows, idx].set(True)
  return hit[..., :seq_k]


def selection_mask(
  idx: Int[Array, "B Qb W"], *, seq_q: int, seq_k: int, block_size: int
) -> Bool[Array, "B T S"]:
  """The element mask idx implies: query t may read key j iff j ∈ idx[t // block_size] (AND
  the static mask, applied by the attention)."""
  return jnp.repeat(selected_blocks(idx, seq_k), block_size, axis=1)[:, :seq_q]


# ------------------------------------------------------------------ the family


def _boundaries_or_mass(boundaries, k, *, chunk_size, num_chunks, window, theta, nms):
  """Checked boundaries [Bb, C+1]; for "mass", None and the labels' checked knobs."""
  B, S = k.shape[:2]
  if isinstance(boundaries, str) and boundaries == "fixed":
    return check_boundaries(fixed_chunk_boundaries(S, chunk_size), B, S), None
  if isinstance(boundaries, str) and boundaries == "mass":
    if num_chunks is None:
      num_chunks = num_blocks(S, _check_int("chunk_size", chunk_size, 1, "keys per chunk"))
    return None, (
      _check_int("num_chunks", num_chunks, 1, "the most chunks the keys are cut into"),
      _check_int("boundary_window", window, 1, "the keys on each side of a candidate"),
      _check_number("boundary_theta", theta),
      _check_int("boundary_nms", nms, 0, "candidates this close to a chosen one are dropped"),
    )
  if callable(boundaries):
    return check_boundaries(boundaries(lax.stop_gradient(k)), B, S), None
  if boundaries is not None and not isinstance(boundaries, str):
    return check_boundaries(boundaries, B, S), None
  raise ValueError(
    f"boundaries={boundaries!r} must be one of {BOUNDARIES}, an int array [C+1] / [B, C+1] "
    "or a callable k -> boundaries"
  )


@dataclasses.dataclass(frozen=True)
class _Config:
  """The static part of a call (a jit static argument)."""

  is_causal: bool
  scale: float
  logits_soft_cap: float | None
  selection: tuple[int, int, int, str]  # (block_size, topk_tokens, local_tokens, pooling)
  mass: tuple[int, int, float, int] | None  # (num_chunks, window, theta, nms) for "mass"
  block_q: int
  block_k: int
  implementation: str


def _tile_map(keep: Bool[Array, "B 1 T S"], cfg: _Config, width: int) -> BlockMap:
  """Per-batch runtime map visiting the tiles that hold a kept element. A q tile spans at most
  ⌈(block_q − 1)/block_size⌉ + 1 query blocks of `width` keys each: a static bound on its
  active kv tiles."""
  B, _, T, S = keep.shape
  block_q, block_k = cfg.block_q, cfg.block_k
  kb = num_blocks(S, block_k)
  spans = -(-(block_q - 1) // cfg.selection[0]) + 1
  return BlockMap.from_block_mask(
    coarsen(keep, block_q, block_k),
    block_q=block_q,
    block_k=block_k,
    seq_q=T,
    seq_k=S,
    max_kv_blocks=min(kb, spans * width),
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
  segment_ids: jax.Array | tuple[jax.Array, jax.Array] | None = None,
  logits_soft_cap: float | None = None,
  block_size: int = 64,
  topk_tokens: int = 512,
  local_tokens: int = 128,
  boundaries: str | jax.Array | Callable[..., jax.Array] = "fixed",
  chunk_size: int = 64,
  num_chunks: int | None = None,
  boundary_window: int = 4,
  boundary_theta: float = 1.1,
  boundary_nms: int = 8,
  pooling: str = "avgpool_norm",
  block_q: int = 64,
  block_k: int = 64,
  implementation: str | None = None,
) -> tuple[Float[Array, "B T N V"], registry.Aux]:
  """DHSA attention; see the module docstring for the equations and conventions.

  Args:
    q, k, v, mask, bias, is_causal, scale, segment_ids, logits_soft_cap: as
      `dot_product_attention` (the mask and causality also bound the selection).
    block_size: queries per selection block (the paper's query blocks).
    topk_tokens: keys each block attends (its budget), >= local_tokens.
    local_tokens: the most recent allowed keys every block keeps.
    boundaries: "fixed" (chunks of `chunk_size`), "mass" (the attention-mass labels), an int
      array [C+1] / [B, C+1], or a callable k -> such an array.
    chunk_size: keys per fixed chunk; with "mass" and num_chunks=None, ⌈S/chunk_size⌉ chunks.
    num_chunks: the most chunks "mass" cuts the keys into.
    boundary_window, boundary_theta, boundary_nms: the mass labels' window w, threshold θ and
      non-maximum-suppression distance.
    pooling: "avgpool_norm" (× √len, the paper) or "avgpool" (plain means).
    block_q, block_k: tiles of the "chunked" path's block map.
    implementation: "xla" (dense-mask reference) or "chunked"; None = automatic.

  Returns:
    (out [B,T,N,Hv] in q's dtype, Aux with the metrics above and no losses).
  """
  B, T, S, N, _, H, _ = _validate.check_qkv(q, k, v)
  check_knobs(block_size, topk_tokens, local_tokens)
  _check_int("block_q", block_q, 1, "the chunked path's query tile")
  _check_int("block_k", block_k, 1, "the chunked path's key tile")
  _check_pooling(pooling)
  impl = registry.resolve_implementation(
    implementation, dict.fromkeys(_IMPLEMENTATIONS), family="dhsa"
  )
  bounds, mass = _boundaries_or_mass(
    boundaries,
    k,
    chunk_size=chunk_size,
    num_chunks=num_chunks,
    window=boundary_window,
    theta=boundary_theta,
    nms=boundary_nms,
  )
  if bias is not None:
    bias = _validate.broadcast_to_bnts(jnp.asarray(bias), "bias", (B, N, T, S))
  if segment_ids is not None:
    segment_ids = _validate.split_segment_ids(segment_ids, B, T, S)
  scale = 1.0 / math.sqrt(H) if scale is None else float(scale)
  selection = (block_size, topk_tokens, local_tokens, pooling)
  cfg = _Config(is_causal, scale, logits_soft_cap, selection, mass, block_q, block_k, impl)
  keep_static = _static_keep(mask, is_causal, (B, N, T, S))
  return _attention(q, k, v, keep_static, bias, segment_ids, bounds, cfg)


# One compiled program per configuration: eager calls (tests, notebooks) would otherwise
# dispatch and compile a hundred small ops one by one.
@functools.partial(jax.jit, static_argnums=7)
def _attention(q, k, v, keep_static, bias, segment_ids, bounds, cfg: _Config):
  """The family on checked inputs: keep_static [Bx, Nx, T, S] or None, bounds [Bb, C+1] or
  None ("mass": computed here)."""
  B, T, N = q.shape[:3]
  S = k.shape[1]
  if bounds is None:
    bounds = attention_mass_boundaries(
      q, k, *cfg.mass, is_causal=cfg.is_causal, scale=cfg.scale, allowed=keep_static
    )
  idx = _dhsa_select(q, k, bounds, keep_static, cfg.is_causal, cfg.selection)
  keep = selection_mask(idx, seq_q=T, seq_k=S, block_size=cfg.selection[0])[:, None]
  if keep_static is not None:
    keep = keep & keep_static
  elif cfg.is_causal:
    keep = keep & _causal(T, S)
  bmap = _tile_map(keep.any(axis=1, keepdims=True), cfg, idx.shape[-1])
  chunked = cfg.implementation == "chunked"
  out = dot_product_attention(
    q,
    k,
    v,
    mask=keep,
    bias=bias,
    is_causal=cfg.is_causal,  # lets the chunked path drop future tiles by the static rule too
    scale=cfg.scale,
    segment_ids=segment_ids,
    logits_soft_cap=cfg.logits_soft_cap,
    implementation=cfg.implementation,
    block_sizes=BlockSizes(cfg.block_q, cfg.block_k) if chunked else None,
    block_map=bmap if chunked else None,
  )

  if keep_static is None:
    allowed = float(np.sum(np.minimum(np.arange(T) + 1, S))) if cfg.is_causal else float(T * S)
    density = jnp.sum(keep, dtype=jnp.float32) / (B * allowed)
  else:
    allowed = jnp.sum(jnp.broadcast_to(keep_static, (B, N, T, S)), dtype=jnp.float32)
    kept = jnp.sum(jnp.broadcast_to(keep, (B, N, T, S)), dtype=jnp.float32)
    density = kept / jnp.maximum(allowed, 1.0)
  lengths = jnp.diff(jnp.broadcast_to(bounds, (B, bounds.shape[-1])), axis=-1)
  metrics = {
    "dhsa_density": density,
    "dhsa_tile_density": jnp.mean(bmap.kv_counts / bmap.num_kv_blocks),
    "dhsa_chunks": jnp.mean(jnp.sum(lengths > 0, axis=-1, dtype=jnp.float32)),
  }
  metrics = {name: lax.stop_gradient(m) for name, m in metrics.items()}
  return out, registry.Aux(metrics=metrics)


FAMILY = registry.Family(
  name="dhsa",
  attention=attention,
  implementations=_IMPLEMENTATIONS,
  paper="Long-Context Modeling with Dynamic Hierarchical Sparse Attention for On-Device LLMs "
  "(arXiv 2510.24606)",
  returns_aux=True,
  conformance=registry.Conformance(
    # Blocks, chunks and tiles small enough that the suite's 37-45 token sequences hold
    # several of each; 16 of up to 45 keys per block keeps the selection sparse.
    cases={
      "default": registry.ConformanceCase(
        options=dict(
          block_size=8, topk_tokens=16, local_tokens=4, chunk_size=6, block_q=8, block_k=8
        )
      )
    },
    benchmark={"default": registry.ConformanceCase()},  # the family's defaults (512 keys)
  ),
)
