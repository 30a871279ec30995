"""Softmax (dot-product) attention with every common mask.

    out = softmax(mask(cap(scale * q kᵀ) + bias)) v,        cap(x) = c · tanh(x / c)

"Attention Is All You Need" (Vaswani et al., arXiv 1706.03762, Eq. 1), with the
tanh logit soft-cap of Gemma 2 (arXiv 2408.00118, §2) applied before the bias.

Shapes: q [B,T,N,H], k [B,S,K,H], v [B,S,K,Hv] -> [B,T,N,Hv]; N % K == 0 is
grouped-query attention (query head n reads kv head n // (N // K)), computed
without materialising repeated kv heads.

Different key and value head counts (Sigma's DiffQKV, Lin et al., arXiv 2501.13629,
Eq. 3): k [B,S,Kk,H], v [B,S,Kv,Hv], Kk and Kv each dividing N; query head i reads
key head floor(i·Kk/N) and value head floor(i·Kv/N). Before dispatch both are
repeated along the head axis to L = lcm(Kk, Kv) heads (L divides N), which is exact:
repeated head j of k is floor(j·Kk/L), and floor(floor(i·L/N)·Kk/L) = floor(i·Kk/N)
since L/Kk is an integer. Every implementation then runs unchanged (GQA with L kv
heads). Cost: the repeated copies are materialised, [B,S,L,H] + [B,S,L,Hv] instead
of [B,S,Kk,H] + [B,S,Kv,Hv] (e.g. Sigma-1.5B's 4 K / 16 V heads: K is stored 4x);
a kernel that indexes both head maps without the copies is left for later.

Masks compose by AND: a structured `attnzoo.masks.Mask` or a boolean array
broadcastable to [B,N,T,S] (`mask=`), `is_causal` (top-left aligned, as
`jax.nn.dot_product_attention`), and packed-sequence `segment_ids` (keep equal ids).

Runtime tile selection (`block_map=`): a `BlockMap` chosen from the data (e.g.
`attnzoo.attention.sparse.block_select.topk_block_map`), possibly traced, one map per
batch element and query head or shared, restricts attention to the tiles it lists:
keep = mask ∧ (the key's tile is selected for the query's tile). Its tile sizes are the
call's. The map is first re-classified against the static mask (`restrict_block_map`:
tiles the mask empties are dropped, PARTIAL where the mask's predicate must run), so a
map built without the mask cannot break it. "xla" applies it as a dense mask; "chunked"
and "pallas" walk only the listed tiles, forward and backward.

Implementations (one semantics): "xla" — the readable reference below; "chunked"
— flash-style tiles in jnp with O(T·H) memory and block skipping
(`chunked.py`); "pallas" — the block-sparse Pallas kernel
(`pallas_kernels.block_sparse`).

Differences from the paper / from `jax.nn.dot_product_attention`: a query row
whose keys are all masked returns zeros (jax returns the mean of v), with finite
gradients; logits and softmax statistics are always fp32.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jaxtyping import Array, Float

from attnzoo.attention import _validate, registry
from attnzoo.attention.dense.chunked import MASK_VALUE, chunked_attention
from attnzoo.masks import And, Causal, Mask, Segments
from pallas_kernels.block_sparse import EMPTY, FULL, BlockMap, BlockSizes, num_blocks

# Largest default tile of the chunked path; 512 x 512 was the fastest tile on these CPUs
# (shared/notes/peers-on-cpu.md).
_CHUNKED_TILE = 512


def dot_product_attention(
  q: Float[Array, "B T N H"],
  k: Float[Array, "B S K H"],
  v: Float[Array, "B S Kv V"],
  *,
  mask: Mask | jax.Array | None = None,
  bias: Float[Array, "..."] | None = None,
  is_causal: bool = False,
  scale: float | None = None,
  segment_ids: jax.Array | tuple[jax.Array, jax.Array] | None = None,
  logits_soft_cap: float | None = None,
  implementation: str | None = None,
  block_sizes: BlockSizes | None = None,
  interpret: bool | None = None,
  block_map: BlockMap | None = None,
  return_lse: bool = False,
  positions: tuple[jax.Array, jax.Array] | None = None,
) -> Float[Array, "B T N V"] | tuple[Float[Array, "B T N V"], Float[Array, "B T N"]]:
  """Softmax attention; see the module docstring for the equation and conventions.

  Args:
    q, k, v: queries [B,T,N,H], keys [B,S,K,H], values [B,S,Kv,Hv] (K and Kv divide N;
      Kv != K is Sigma's separate head maps, see the module docstring).
    mask: a `Mask` (structured; enables block skipping) or a bool array
      broadcastable to [B,N,T,S]; True = keep.
    bias: additive logits bias broadcastable to [B,N,T,S] (differentiable).
    is_causal: AND a top-left aligned causal mask (key j visible to query i iff j <= i).
    scale: logits scale, default 1/sqrt(H).
    segment_ids: int [B,T] (self-attention, T == S) or a pair (q_ids [B,T], kv_ids [B,S]).
    logits_soft_cap: c > 0 for c·tanh(logits/c).
    implementation: "xla", "chunked", "pallas", or None for the platform's best.
    block_sizes: tile sizes of the chunked and pallas paths.
    interpret: run the Pallas kernel in the interpreter; None = exactly when the platform has no
      Pallas backend (CPU), logged by pallas_kernels; False on CPU raises.
    block_map: runtime tile selection (module docstring), groups [Bm, Nm] with Bm in {1, B}
      and Nm in {1, N}; its tile sizes set the chunked/pallas tiles (`block_sizes`, if given,
      must have the same block_q, block_k).
    return_lse: also return the per-row log-sum-exp of the kept logits, lse [B,T,N] fp32
      (-inf for a row with no kept key), differentiable: for merging partial attentions
      (out = Σ_i exp(lse_i − lse) out_i) and for the mass a sparse selection keeps
      (exp(lse_sparse − lse_dense)). "xla", "chunked", "pallas".
    positions: (q_pos int [B,T] or [B,T,N], kv_pos int [B,S] or [B,S,K]): the original
      positions of the rows of a permuted layout (PBS-Attn's key segments, tile-major N-D
      orders); the structured mask and `is_causal` are evaluated on them instead of on the row
      index, in every visited tile. Dense masks, bias, segment ids and `block_map` refer to
      the layout as passed. Without `block_map` every tile is visited. "xla", "chunked"
      ("pallas" falls back to "chunked", logged). See `permuted.py` for permute/un-permute.
  """
  B, T, S, N, K, H, _ = _validate.check_qkv(q, k, v, separate_kv_heads=True)
  k, v = repeat_to_common_heads(k, v)
  if scale is None:
    scale = 1.0 / math.sqrt(H)
  if logits_soft_cap is not None and not logits_soft_cap > 0:
    raise ValueError(f"logits_soft_cap={logits_soft_cap} must be a positive float or None")
  structured, dense = _split_mask(mask, (B, N, T, S))
  if is_causal:
    structured = Causal() if structured is None else structured & Causal()
  if bias is not None:
    bias = _validate.broadcast_to_bnts(jnp.asarray(bias), "bias", (B, N, T, S))
  segments = _validate.split_segment_ids(segment_ids, B, T, S)
  if positions is not None:
    positions = _check_positions(positions, B=B, T=T, S=S, N=N, K=k.shape[2], Kk=K)
  if block_sizes is not None and not isinstance(block_sizes, BlockSizes):
    raise TypeError(f"block_sizes must be a BlockSizes, got {type(block_sizes).__name__}")

  name = registry.resolve_implementation(implementation, _IMPLEMENTATIONS, family="softmax")
  if block_map is not None:
    # With positions the static mask's tile classification is void (rows are permuted): keep
    # every selected tile, and the predicate runs in each.
    by_mask = structured if positions is None else None
    block_map = restrict_block_map(block_map, by_mask, B=B, N=N, T=T, S=S)
    tiles = (block_map.block_q, block_map.block_k)
    if block_sizes is not None and (block_sizes.block_q, block_sizes.block_k) != tiles:
      raise ValueError(
        f"block_sizes has tiles ({block_sizes.block_q}, {block_sizes.block_k}) but block_map "
        f"was built for {tiles}; pass block_sizes=None or build the map with the same tiles"
      )
    block_sizes = block_sizes or BlockSizes(*tiles)
    if name == "ring":
      raise NotImplementedError(
        "implementation='ring' does not take a block_map; use 'chunked' or 'pallas'"
      )
    if name == "xla":  # the reference: the selection as a dense mask
      selected = selected_elements(block_map)
      dense = selected if dense is None else dense & selected
  if name == "ring" and positions is not None:
    raise NotImplementedError("implementation='ring' does not take positions; use 'chunked'")
  if name == "pallas" and positions is not None:
    if implementation == "pallas":
      raise NotImplementedError(
        "implementation='pallas' has no position tables for permuted layouts yet; use "
        "implementation='chunked' (the same tiles and skipping) or None"
      )
    registry.log_fallback("softmax", "pallas", "chunked", "position tables (permuted layout)")
    name = "chunked"
  if name == "pallas" and (bias is not None or dense is not None):
    if implementation == "pallas":
      raise NotImplementedError(
        "implementation='pallas' takes structured masks and segment ids, not a dense "
        "bias/mask array; use implementation='chunked' for those"
      )
    registry.log_fallback("softmax", "pallas", "chunked", "a dense bias/mask array")
    name = "chunked"
  return _IMPLEMENTATIONS[name](
    q,
    k,
    v,
    structured=structured,
    dense_mask=dense,
    bias=bias,
    segment_ids=segments,
    scale=scale,
    soft_cap=logits_soft_cap,
    block_sizes=block_sizes,
    interpret=interpret,
    block_map=block_map,
    return_lse=return_lse,
    positions=positions,
  )


def _check_positions(positions, *, B, T, S, N, K, Kk):
  """(q_pos [B,T] | [B,T,N], kv_pos [B,S] | [B,S,K]) -> (int32 [B, Nq, T], int32 [B, Kk', S])
  with Nq in {1, N}, Kk' in {1, K} (K: the kv heads after `repeat_to_common_heads`)."""
  if not (isinstance(positions, tuple | list) and len(positions) == 2):
    raise TypeError("positions must be a pair (q_positions [B,T], kv_positions [B,S])")
  out = []
  for name, x, L, H in (("q", positions[0], T, N), ("kv", positions[1], S, Kk)):
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.integer):
      raise TypeError(f"{name} positions must be integers, got dtype {x.dtype}")
    if x.shape == (B, L):
      x = x[:, None, :]
    elif x.shape == (B, L, H):
      x = jnp.swapaxes(x, 1, 2)
    else:
      raise ValueError(
        f"{name} positions have shape {x.shape}; expected {(B, L)} (shared by the heads) or "
        f"{(B, L, H)} (one layout per {'query' if name == 'q' else 'kv'} head)"
      )
    out.append(x.astype(jnp.int32))
  if out[1].shape[1] > 1 and K != Kk:
    raise ValueError(
      f"per-head kv positions need equal key and value head counts (got K={Kk} key heads and "
      f"{K} after repeating to common heads); pass kv positions of shape {(B, S)}"
    )
  return tuple(out)


def restrict_block_map(
  block_map: BlockMap, structured: Mask | None, *, B: int, N: int, T: int, S: int
) -> BlockMap:
  """`block_map`'s selected tiles, re-classified by the static mask: EMPTY where the mask keeps
  nothing, else the mask's PARTIAL/FULL (so the predicate runs wherever it must). Same table
  widths; traced when the map is."""
  if not isinstance(block_map, BlockMap):
    raise TypeError(
      f"block_map must be a pallas_kernels.block_sparse.BlockMap, got {type(block_map).__name__}"
    )
  if (block_map.seq_q, block_map.seq_k) != (T, S):
    raise ValueError(
      f"block_map was built for T={block_map.seq_q}, S={block_map.seq_k}, but q has T={T} "
      f"and k has S={S}; build it from these q and k"
    )
  block_map.broadcast_to_groups(B, N)
  bq, bk = block_map.block_q, block_map.block_k
  if structured is None:
    allowed = np.full((num_blocks(T, bq), num_blocks(S, bk)), FULL, np.int32)
  else:
    allowed = structured.block_mask(T, S, bq, bk)
  selected = block_map.to_block_mask() != EMPTY
  xp = np if isinstance(selected, np.ndarray) else jnp
  classified = xp.where(selected, allowed[None, None], EMPTY).astype(np.int32)
  return BlockMap.from_block_mask(
    classified,
    block_q=bq,
    block_k=bk,
    seq_q=T,
    seq_k=S,
    max_kv_blocks=block_map.max_kv_blocks,
    max_q_blocks=block_map.max_q_blocks,
  )


def selected_elements(block_map: BlockMap) -> jax.Array:
  """bool [Bm, Nm, T, S]: True where the key's tile is listed for the query's tile."""
  selected = block_map.to_block_mask() != EMPTY
  xp = np if isinstance(selected, np.ndarray) else jnp
  dense = xp.repeat(xp.repeat(selected, block_map.block_q, axis=-2), block_map.block_k, axis=-1)
  return jnp.asarray(dense[..., : block_map.seq_q, : block_map.seq_k])


def repeat_to_common_heads(
  k: Float[Array, "B S K H"], v: Float[Array, "B S Kv V"]
) -> tuple[Float[Array, "B S L H"], Float[Array, "B S L V"]]:
  """k and v with their heads repeated to L = lcm(K, Kv) each (a no-op when K == Kv).

  Exact for Eq. 3's maps (see the module docstring); callers have checked that K and Kv
  divide N, so L does too.
  """
  K, Kv = k.shape[2], v.shape[2]
  if K == Kv:
    return k, v
  L = math.lcm(K, Kv)
  return jnp.repeat(k, L // K, axis=2), jnp.repeat(v, L // Kv, axis=2)


def _split_mask(mask, shape_bnts):
  if mask is None:
    return None, None
  if isinstance(mask, Mask):
    return mask, None
  mask = jnp.asarray(mask)
  if mask.dtype != jnp.bool_:
    raise TypeError(f"mask array must be boolean (True = keep), got dtype {mask.dtype}")
  return None, _validate.broadcast_to_bnts(mask, "mask", shape_bnts)


# ------------------------------------------------------------------ "xla": the reference


def _xla(
  q,
  k,
  v,
  *,
  structured,
  dense_mask,
  bias,
  segment_ids,
  scale,
  soft_cap,
  return_lse=False,
  positions=None,
  **_,
):
  """Materialises the [B,N,T,S] logits; the readable definition of every option."""
  B, T, N, H = q.shape
  S, K = k.shape[1], k.shape[2]
  G = N // K
  q_btkgh = q.reshape(B, T, K, G, H)
  logits = jnp.einsum("btkgh,bskh->bkgts", q_btkgh, k, preferred_element_type=jnp.float32)
  logits = logits * scale
  if soft_cap is not None:
    logits = soft_cap * jnp.tanh(logits / soft_cap)
  if bias is not None:
    logits = logits + _heads_split(bias, G).astype(jnp.float32)
  keep = None  # bool, broadcastable to [B, K, G, T, S]; None = every key visible

  def conj(a, b):
    return b if a is None else a & b

  if structured is not None and positions is not None:  # original positions of each row
    q_pos, kv_pos = positions  # [B, Nq, T], [B, Kk, S]
    q_pos = q_pos.reshape(B, K, G, T) if q_pos.shape[1] == N else q_pos[:, :, None]
    kv_pos = kv_pos[:, :, None]
    keep = structured.predicate(q_pos[..., :, None], kv_pos[..., None, :], jnp)
  elif structured is not None:
    q_pos = jnp.arange(T, dtype=jnp.int32)[:, None]
    k_pos = jnp.arange(S, dtype=jnp.int32)[None, :]
    keep = jnp.broadcast_to(structured.predicate(q_pos, k_pos, jnp), (T, S))[None, None, None]
  if dense_mask is not None:
    keep = conj(keep, _heads_split(dense_mask, G))
  if segment_ids is not None:
    q_ids, kv_ids = segment_ids
    keep = conj(keep, q_ids[:, None, None, :, None] == kv_ids[:, None, None, None, :])
  if keep is not None:
    logits = jnp.where(keep, logits, MASK_VALUE)
  # The max only stabilises exp(); softmax is invariant to it, so it carries no gradient.
  m = lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
  p = jnp.exp(logits - m)
  if keep is not None:
    p = jnp.where(keep, p, 0.0)
  denom = jnp.sum(p, axis=-1, keepdims=True)
  weights = p / jnp.where(denom > 0, denom, 1.0)  # fully masked rows -> zeros
  out = jnp.einsum("bkgts,bskv->btkgv", weights, v.astype(jnp.float32))
  out = out.reshape(B, T, N, v.shape[-1]).astype(q.dtype)
  if not return_lse:
    return out
  # lse = m + log Σ p (fully masked rows: log 0 = -inf); m's gradient cancels: d lse / d s = P.
  lse = jnp.squeeze(m + jnp.log(denom), -1)  # [B, K, G, T]
  lse = jnp.where(denom[..., 0] > 0, lse, -jnp.inf)
  return out, jnp.moveaxis(lse, -1, 1).reshape(B, T, N)


def _heads_split(x_bnts, G):
  b, n, t, s = x_bnts.shape
  return x_bnts.reshape(b, 1, 1, t, s) if n == 1 else x_bnts.reshape(b, n // G, G, t, s)


# ------------------------------------------------------------------ "chunked" and "pallas"


def _default_tile(length: int) -> int:
  return min(_CHUNKED_TILE, -(-length // 8) * 8)


def _chunked(q, k, v, *, block_sizes, **kw):  # block_map, positions (if any) travel in kw
  kw.pop("interpret")
  if block_sizes is None:
    bq, bk = _default_tile(q.shape[1]), _default_tile(k.shape[1])
  else:
    bq, bk = block_sizes.block_q, block_sizes.block_k
  return chunked_attention(q, k, v, block_q=bq, block_k=bk, **kw)


def _pallas(
  q,
  k,
  v,
  *,
  structured,
  segment_ids,
  scale,
  soft_cap,
  block_sizes,
  interpret,
  block_map,
  return_lse=False,
  **_,
):
  """The block-sparse kernel; table masks pass `mask.tables()` as kernel inputs.

  A `Segments` mask (alone or AND-ed with others) becomes the kernel's native segment ids
  when no `segment_ids` are given: one compare per tile costs less than gathering ids from
  tables (GPU) or building keep tiles in XLA (TPU). Falls back to "chunked", with a
  warning, where the kernel raises NotImplementedError (a custom mask whose predicate
  closes over arrays it does not list in `tables()`).
  """
  from pallas_kernels.block_sparse import block_sparse_attention  # noqa: PLC0415
  from pallas_kernels.block_sparse.ops import MaskPredicate  # noqa: PLC0415

  tiles = block_sizes or BlockSizes()
  T, S = q.shape[1], k.shape[1]
  bq, bk = tiles.block_q, tiles.block_k
  runtime_map = block_map
  if structured is None:
    full = np.full((num_blocks(T, bq), num_blocks(S, bk)), FULL, np.int32)
    block_map = BlockMap.from_block_mask(full, block_q=bq, block_k=bk, seq_q=T, seq_k=S)
    mask_fn, tables = None, ()
  else:
    block_map = structured.block_map(T, S, bq, bk)  # also checks the mask's lengths
    mask = structured
    parts = structured.masks if isinstance(structured, And) else (structured,)
    documents = [m for m in parts if type(m) is Segments]
    if segment_ids is None and len(documents) == 1:
      ids = (documents[0].q_ids, documents[0].kv_ids)
      segment_ids = tuple(jnp.broadcast_to(x[None], (q.shape[0], x.shape[0])) for x in ids)
      rest = tuple(m for m in parts if m is not documents[0])
      mask = (rest[0] if len(rest) == 1 else And(rest)) if rest else None
    # Equal for equal masks (a rebuilt `mask & Causal()` too): eager calls reuse the kernels.
    mask_fn, tables = (MaskPredicate(mask), mask.tables()) if mask is not None else (None, ())
  if runtime_map is not None:
    block_map = runtime_map  # already classified by the mask (restrict_block_map)
  try:
    return block_sparse_attention(
      q,
      k,
      v,
      block_map,
      mask_fn=mask_fn,
      mask_tables=tables,
      scale=scale,
      segment_ids=segment_ids,
      logits_soft_cap=soft_cap,
      block_sizes=tiles,
      interpret=interpret,
      return_lse=return_lse,
    )
  except NotImplementedError as e:
    registry.log_fallback("softmax", "pallas", "chunked", str(e))
  return _chunked(
    q,
    k,
    v,
    structured=structured,
    dense_mask=None,
    bias=None,
    segment_ids=segment_ids,
    scale=scale,
    soft_cap=soft_cap,
    block_sizes=block_sizes,
    interpret=interpret,
    block_map=runtime_map,
    return_lse=return_lse,
  )


def _ring(
  q, k, v, *, structured, dense_mask, bias, segment_ids, scale, soft_cap, return_lse=False, **_
):
  """Ring attention over the "sequence" axis of the current mesh (`jax.set_mesh`).

  The ring supports causality, segment ids and the soft cap; any other mask or a bias raises
  here, naming what to change (sequence parallelism is a mesh setting, so the error comes from
  the family, not from the trainer)."""
  from attnzoo.attention.dense import ring  # noqa: PLC0415 (needs a mesh; rarely used)

  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or "sequence" not in mesh.axis_names:
    raise ValueError(
      "implementation='ring' shards the sequence over the 'sequence' axis of the current "
      "mesh, but no such mesh is set; run inside `with jax.set_mesh(mesh):` with a mesh "
      "that has a 'sequence' axis, or pick another implementation"
    )
  if return_lse:
    raise NotImplementedError(
      "implementation='ring' does not return lse; use 'chunked' or 'pallas' for return_lse"
    )
  is_causal = isinstance(structured, Causal) and structured.offset == 0
  if (structured is not None and not is_causal) or dense_mask is not None or bias is not None:
    raise NotImplementedError(
      f"implementation='ring' (sequence parallelism, mesh sequence={mesh.shape['sequence']}) "
      f"supports is_causal, segment_ids and logits_soft_cap only; got mask={structured!r}, "
      f"dense mask={'yes' if dense_mask is not None else 'no'}, "
      f"bias={'yes' if bias is not None else 'no'}. Drop them, or set the mesh's "
      "sequence axis to 1"
    )
  return ring.ring_attention(
    q,
    k,
    v,
    mesh=mesh,
    axis_name="sequence",
    is_causal=is_causal,
    scale=scale,
    segment_ids=segment_ids,
    logits_soft_cap=soft_cap,
  )


_IMPLEMENTATIONS = {"xla": _xla, "chunked": _chunked, "pallas": _pallas, "ring": _ring}

FAMILY = registry.Family(
  name="softmax",
  attention=dot_product_attention,
  implementations=tuple(_IMPLEMENTATIONS),
  paper="Attention Is All You Need (arXiv 1706.03762)",
  conformance=registry.Conformance(
    # Tiles smaller than the suite's lengths, so ragged tiles and skipping are exercised.
    implementation_options={
      "chunked": {"block_sizes": BlockSizes(16, 8)},
      "pallas": {"block_sizes": BlockSizes(16, 16)},  # interpreted on CPU (logged)
    },
    skip={"ring": "needs a mesh with a sequence axis: tests/attention/dense/test_ring.py"},
    slow=("pallas",),  # the Pallas interpreter is slow per grid step
  ),
)
