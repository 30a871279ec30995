"""Softmax attention with a different structured mask per query head.

    out[:, :, n] = softmax(masks[n] ∧ mask ∧ causal (scale · q_n kᵀ_{n // G}) + bias_n) v_{n // G}

Exact dense attention per head; only the keep pattern differs between heads (MoA's per-head
elastic windows, arXiv 2406.14909; DuoAttention-style retrieval vs streaming heads). Heads whose
masks are equal (masks are frozen dataclasses: hashable, compared by value) form one group, and
each group is one `dot_product_attention` call with that static mask, so every implementation
("xla", "chunked", "pallas") sees an exact static `BlockMap` and skips the tiles the group's
mask empties, forward and backward. Outputs are put back in head order.

GQA: query head n reads kv head n // G. A group takes the kv heads its query heads read; when
each of those kv heads serves the same number c of the group's query heads (always so for
masks given per kv head, or one head per kv head), the group is GQA with c queries per kv head
and no kv head is copied; otherwise the group's kv heads are gathered per query head (MHA).

`per_head_block_map` gives the per-head tile map (`Nm = N`, tables padded to the widest head)
for accounting (`BlockMap.density()`) and for kernels that take per-head maps.

Shapes: q [B,T,N,H], k [B,S,K,H], v [B,S,K,Hv] (or v [B,S,Kv,Hv], Kv dividing N, as
`dot_product_attention`) -> [B,T,N,Hv]; `masks` has N entries.

Choices: a `mask=` given with the per-head masks is AND-ed into every head. A structured mask
keeps the tile skipping (`head_mask & mask`); a bool array [B|1, N|1, T, S] is sliced per group
(as is `bias`) and, since the engine takes one mask, AND-ed with the group's dense pattern: exact,
but without tile skipping (and "pallas" rejects dense arrays, as `dot_product_attention` does).
Groups are ordered by each mask's first head, so the calls are deterministic.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from attnzoo.attention import _validate
from attnzoo.attention.dense.softmax import dot_product_attention, repeat_to_common_heads
from attnzoo.masks import Causal, Mask
from pallas_kernels.block_sparse import BlockMap, BlockSizes


def check_masks(masks: Sequence[Mask], num_heads: int) -> tuple[Mask, ...]:
  """`masks` as a tuple of N `Mask`s; ValueError / TypeError naming the fix."""
  if isinstance(masks, Mask) or not isinstance(masks, Sequence):
    raise TypeError(
      f"masks must be a sequence of {num_heads} attnzoo.masks.Mask (one per query head), got "
      f"{type(masks).__name__}; for one mask shared by every head use dot_product_attention"
    )
  masks = tuple(masks)
  if len(masks) != num_heads:
    raise ValueError(
      f"got {len(masks)} masks for N={num_heads} query heads; pass exactly one Mask per query "
      "head (repeat a mask for heads that share it)"
    )
  for n, m in enumerate(masks):
    if not isinstance(m, Mask):
      raise TypeError(f"masks[{n}] is a {type(m).__name__}; every entry must be an attnzoo Mask")
  return masks


def head_groups(masks: Sequence[Mask]) -> tuple[tuple[Mask, tuple[int, ...]], ...]:
  """((mask, heads), ...): the distinct masks, each with the ascending heads that use it,
  ordered by first use."""
  groups: dict[Mask, list[int]] = {}
  for n, m in enumerate(masks):
    groups.setdefault(m, []).append(n)
  return tuple((m, tuple(heads)) for m, heads in groups.items())


def kv_heads_of(heads: Sequence[int], G: int) -> np.ndarray:
  """The kv heads a call for query `heads` (ascending; G queries per kv head) passes: the
  distinct ones when each serves the same number of `heads` (the call is then GQA, nothing
  copied), else one per query head (MHA)."""
  kv = np.asarray(heads, np.int32) // G
  distinct, counts = np.unique(kv, return_counts=True)
  return distinct.astype(np.int32) if np.all(counts == counts[0]) else kv


def _take_heads(x, idx: np.ndarray, size: int):
  """x[:, :, idx] along the head axis (axis 2), without a copy when idx is every head."""
  if idx.size == size and np.array_equal(idx, np.arange(size)):
    return x
  return jnp.take(x, jnp.asarray(idx), axis=2)


def _slice_bnts(x, heads: tuple[int, ...], N: int):
  """x [B|1, N|1, T, S] restricted to `heads` (a head axis of 1 is shared)."""
  if x is None or x.shape[1] == 1:
    return x
  return _take_heads(jnp.swapaxes(x, 1, 2), np.asarray(heads), N).swapaxes(1, 2)


def per_head_mask_attention(
  q: Float[Array, "B T N H"],
  k: Float[Array, "B S K H"],
  v: Float[Array, "B S Kv V"],
  masks: Sequence[Mask],
  *,
  mask: Mask | jax.Array | None = None,
  bias: Float[Array, "..."] | None = None,
  is_causal: bool = False,
  scale: float | None = None,
  segment_ids: jax.Array | tuple[jax.Array, jax.Array] | None = None,
  logits_soft_cap: float | None = None,
  implementation: str | None = None,
  block_q: int | None = None,
  block_k: int | None = None,
  interpret: bool | None = None,
  return_lse: bool = False,
) -> Float[Array, "B T N V"] | tuple[Float[Array, "B T N V"], Float[Array, "B T N"]]:
  """Softmax attention where query head n keeps `masks[n]` (module docstring).

  Args:
    q, k, v: [B,T,N,H], [B,S,K,H], [B,S,Kv,Hv]; K and Kv divide N.
    masks: N structured masks, one per query head (equal masks share one call).
    mask, bias, is_causal, scale, segment_ids, logits_soft_cap, interpret, return_lse: as
      `dot_product_attention`, applied to every head (arrays sliced per group).
    implementation: "xla", "chunked" or "pallas" (None = automatic), for every group.
    block_q, block_k: tiles of the chunked / Pallas paths (None = the engine's default); both
      or neither.

  Returns:
    out [B,T,N,Hv] in q's dtype (and lse [B,T,N] with `return_lse`).
  """
  B, T, S, N, _, _, _ = _validate.check_qkv(q, k, v, separate_kv_heads=True)
  masks = check_masks(masks, N)
  k, v = repeat_to_common_heads(k, v)
  K = k.shape[2]
  G = N // K
  if (block_q is None) != (block_k is None):
    raise ValueError(
      f"block_q={block_q}, block_k={block_k}: give both tile sizes or neither (engine default)"
    )
  block_sizes = None if block_q is None else BlockSizes(block_q, block_k)
  dense = None
  if mask is not None and not isinstance(mask, Mask):
    dense = jnp.asarray(mask)
    if dense.dtype != jnp.bool_:
      raise TypeError(f"mask array must be boolean (True = keep), got dtype {dense.dtype}")
    dense = _validate.broadcast_to_bnts(dense, "mask", (B, N, T, S))
  if bias is not None:
    bias = _validate.broadcast_to_bnts(jnp.asarray(bias), "bias", (B, N, T, S))

  outs, lses, order = [], [], []
  for head_mask, heads in head_groups(masks):
    kv = kv_heads_of(heads, G)
    group_mask = head_mask if not isinstance(mask, Mask) else head_mask & mask
    group_dense = _slice_bnts(dense, heads, N)
    if group_dense is not None:  # the engine takes one mask: a dense array then holds both
      group_mask = group_dense & jnp.asarray(group_mask.dense(T, S))[None, None]
    result = dot_product_attention(
      _take_heads(q, np.asarray(heads), N),
      _take_heads(k, kv, K),
      _take_heads(v, kv, K),
      mask=group_mask,
      bias=_slice_bnts(bias, heads, N),
      is_causal=is_causal,
      scale=scale,
      segment_ids=segment_ids,
      logits_soft_cap=logits_soft_cap,
      implementation=implementation,
      block_sizes=block_sizes,
      interpret=interpret,
      return_lse=return_lse,
    )
    out, lse = result if return_lse else (result, None)
    outs.append(out)
    lses.append(lse)
    order.extend(heads)
  inverse = np.argsort(np.asarray(order))
  out = _take_heads(jnp.concatenate(outs, axis=2), inverse, N)
  if not return_lse:
    return out
  return out, _take_heads(jnp.concatenate(lses, axis=2), inverse, N)


def per_head_block_map(
  masks: Sequence[Mask],
  seq_q: int,
  seq_k: int,
  block_q: int,
  block_k: int,
  *,
  is_causal: bool = False,
) -> BlockMap:
  """The static per-head `BlockMap` [1, N, Qb, Mk]: head n's tiles under `masks[n]` (AND a
  top-left causal mask with `is_causal`), tables padded to the widest head."""
  masks = check_masks(masks, len(masks))
  kinds: dict[Mask, np.ndarray] = {}
  for m, _ in head_groups(masks):
    kinds[m] = (m & Causal() if is_causal else m).block_mask(seq_q, seq_k, block_q, block_k)
  block_mask = np.stack([kinds[m] for m in masks])[None]
  return BlockMap.from_block_mask(
    block_mask, block_q=block_q, block_k=block_k, seq_q=seq_q, seq_k=seq_k
  )
