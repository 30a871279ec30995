"""PBS-Attn: permuted block-sparse attention — keys sorted inside segments, then fewer tiles.

"Sparser Block-Sparse Attention via Token Permutation" (Wang et al., arXiv 2510.21270, §3; the
official code `xinghaow99/pbs-attn`, `pbs.py`, `permute_states.py`). Causal prefill. Per batch
element and query head n (reading kv head n // G):

    s_j   = mean over the last query tile's rows r of softmax_{j ≤ pos(r)}(q_r·k_j·scale)
    π     = inside each complete segment of `segment_size` keys, sort by s descending (stable);
            the last incomplete segment keeps its order           (keys and values: k' = k[π])
    P_ij  = softmax over eligible kv tiles j of (mean(q tile i) · mean(k' tile j) · scale)
            eligible: tiles of earlier segments (FULL by causality: π stays inside a segment)
    keep  = {same-segment tiles: always} ∪ {the fewest eligible tiles with Σ P ≥ τ}
            ∪ {the tile holding original token 0: the attention sink}
    out_i = softmax over kept tiles of (q_i · k'_j · scale), keep (i, j) iff i ≥ π(j)

Queries are not permuted, so the output needs no inverse permutation; softmax is invariant to
the order of the keys, so with τ = 1 (every tile) the output is exactly dense causal attention.
The causal mask reads the keys' original positions (`dot_product_attention(positions=)`):
masking the permuted order would leak future tokens (the spec's first pitfall).

Shapes: q [B,T,N,H], k [B,S,K,H], v [B,S,K,Hv] -> [B,T,N,Hv]; tiles block_size × block_size;
`segment_size` a multiple of block_size. The paper is self-attention (T = S); with T ≠ S a
query tile's segment is that of its positions (is_causal top-left aligned, as everywhere).

Implementations (one semantics): "xla" — the selection as a dense mask over the permuted layout
(the reference); "chunked" — the per-(batch, head) runtime map walked forward and backward with
the causal predicate on original positions in each visited tile. No Pallas path: the kernel has
no position tables yet.

Differences from the paper:
- GQA: every query head permutes its own copy of its kv head (the paper permutes per attention
  head of MHA models), so GQA equals MHA with repeated kv heads; the copies are materialised,
  as the per-(batch, head) runtime-map path repeats kv heads anyway.
- Tile mass weighs each tile by its number of keys (a ragged last tile is not over-counted),
  as `block_select.mass_block_map` does; the paper's tiles are all full.

Choices where the paper is silent / caveats:
- Like the paper's prefill, the importance comes from the last query tile, i.e. from the end of
  the sequence: the *choice* of tiles for early queries depends on later tokens. It carries no
  gradient (`stop_gradient`, a discrete choice) and causality holds for every kept element, but
  an autoregressive model trained with it sees a selection that decode cannot reproduce.
- `permute=False` runs the same selection on the identity layout (the paper's block-sparse
  baseline), for the density-at-equal-mass comparison.
- Metrics: "pbs_density" — visited tiles / causally allowed tiles.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jaxtyping import Array, Float, Int

from attnzoo.attention import _validate, registry
from attnzoo.attention.dense.softmax import dot_product_attention
from attnzoo.attention.sparse import block_select
from pallas_kernels.block_sparse import EMPTY, FULL, BlockMap, BlockSizes, num_blocks

_IMPLEMENTATIONS = ("xla", "chunked")


def check_layout(block_size: int, segment_size: int) -> None:
  if not (isinstance(block_size, int) and block_size > 0):
    raise ValueError(f"block_size={block_size!r} must be a positive int (tile size)")
  if not (isinstance(segment_size, int) and segment_size > 0 and segment_size % block_size == 0):
    raise ValueError(
      f"segment_size={segment_size!r} must be a positive multiple of block_size={block_size} "
      "(a permutation never moves a key out of its tile's segment)"
    )


def key_importance(
  q: Float[Array, "B T N H"], k: Float[Array, "B S K H"], *, block_size: int, scale: float
) -> Float[Array, "B N S"]:
  """s [B, N, S]: mean causal softmax probability of each key under the last query tile's rows,
  per query head; fp32, no gradient."""
  B, T, N, H = q.shape
  S, K = k.shape[1], k.shape[2]
  rows = min(block_size, T)
  q_last = lax.stop_gradient(q[:, T - rows :]).astype(jnp.float32)
  q_last = q_last.reshape(B, rows, K, N // K, H)
  logits = jnp.einsum("brkgh,bskh->bkgrs", q_last, lax.stop_gradient(k).astype(jnp.float32))
  pos_r = (T - rows + jnp.arange(rows))[:, None]
  visible = (pos_r >= jnp.arange(S)[None, :])[None, None, None]
  logits = jnp.where(visible, logits * scale, -jnp.inf)
  return jnp.mean(jax.nn.softmax(logits, axis=-1), axis=3).reshape(B, N, S)


def segment_permutation(
  importance: Float[Array, "B N S"], *, segment_size: int
) -> Int[Array, "B N S"]:
  """π [B, N, S]: the original position of the key placed at each row — inside every complete
  segment sorted by importance, descending (ties keep the earlier key); the incomplete last
  segment is left as is."""
  B, N, S = importance.shape
  full = (S // segment_size) * segment_size
  ident = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, N, S))
  if full == 0:
    return ident
  seg = importance[..., :full].reshape(B, N, full // segment_size, segment_size)
  order = jnp.argsort(-seg, axis=-1, stable=True).astype(jnp.int32)
  offsets = jnp.arange(full // segment_size, dtype=jnp.int32) * segment_size
  offsets = offsets.reshape(1, 1, -1, 1)
  perm = (order + offsets).reshape(B, N, full)
  return jnp.concatenate([perm, ident[..., full:]], axis=-1)


def _segment_tables(T: int, S: int, block_size: int, segment_size: int, is_causal: bool):
  """Static [Qb, Kb] tables: same-segment tiles (query tile and key tile in one segment of
  positions), eligible off-segment tiles (with causality: keys of earlier segments only)."""
  seg_q = np.arange(num_blocks(T, block_size)) * block_size // segment_size
  seg_k = np.arange(num_blocks(S, block_size)) * block_size // segment_size
  same = seg_q[:, None] == seg_k[None, :]
  other = seg_q[:, None] > seg_k[None, :] if is_causal else ~same
  return same, other


def select_tiles(
  q: Float[Array, "B T N H"],
  k_perm: Float[Array, "B S N H"],
  perm: Int[Array, "B N S"],
  *,
  block_size: int,
  segment_size: int,
  threshold: float,
  is_causal: bool,
  scale: float,
) -> BlockMap:
  """The per-(batch, query head) BlockMap over the permuted layout (module docstring);
  k_perm [B, S, N, H] holds query head n's permuted copy of its kv head, perm [B, N, S]."""
  B, T, N, _ = q.shape
  S = k_perm.shape[1]
  nb = num_blocks(S, block_size)
  same, other = _segment_tables(T, S, block_size, segment_size, is_causal)
  same, other = jnp.asarray(same)[None, None], jnp.asarray(other)[None, None]
  scores = block_select.pooled_block_scores(
    q, k_perm, block_q=block_size, block_k=block_size, scale=scale
  )  # [B, N, Qb, Kb]
  sizes = np.minimum(block_size, S - np.arange(nb) * block_size).astype(np.float32)
  logits = jnp.where(other, scores + np.log(sizes).reshape(1, 1, 1, -1), -jnp.inf)
  probs = jax.nn.softmax(logits, axis=-1)
  probs = jnp.where(other, probs, 0.0)  # rows with no eligible tile: all zero
  order = jnp.argsort(-probs, axis=-1, stable=True)
  sorted_p = jnp.take_along_axis(probs, order, axis=-1)
  before = jnp.cumsum(sorted_p, axis=-1) - sorted_p
  take = (before < threshold) if threshold < 1.0 else jnp.ones(sorted_p.shape, bool)
  chosen = jnp.put_along_axis(jnp.zeros(probs.shape, bool), order, take, axis=-1, inplace=False)
  chosen = (chosen & other) | same
  # The sink: the tile where original token 0 landed, for every query tile that may see it.
  sink_tile = jnp.argmin(perm, axis=-1) // block_size  # [B, N]
  is_sink = sink_tile[:, :, None, None] == jnp.arange(nb)[None, None, None, :]
  chosen = chosen | (is_sink & (same | other))
  block_mask = jnp.where(chosen, FULL, EMPTY).astype(jnp.int32)
  return BlockMap.from_block_mask(
    block_mask, block_q=block_size, block_k=block_size, seq_q=T, seq_k=S, max_kv_blocks=nb
  )


def layout(
  q: Float[Array, "B T N H"],
  k: Float[Array, "B S K H"],
  v: Float[Array, "B S K V"],
  *,
  block_size: int,
  segment_size: int,
  threshold: float,
  permute: bool,
  is_causal: bool,
  scale: float,
) -> tuple[jax.Array, jax.Array, tuple[jax.Array, jax.Array], BlockMap]:
  """(k', v' [B,S,N,·] per query head, positions (q [B,T], kv [B,S,N]), BlockMap): everything
  `dot_product_attention(q, k', v', is_causal=, block_map=, positions=)` needs to run PBS-Attn
  (e.g. with return_lse=True to measure the attention mass the selection keeps)."""
  B, T, N, _ = q.shape
  S, K = k.shape[1], k.shape[2]
  if permute:
    imp = key_importance(q, k, block_size=block_size, scale=scale)
    perm = segment_permutation(imp, segment_size=segment_size)  # [B, N, S]
  else:
    perm = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, N, S))
  perm_bsn = jnp.swapaxes(perm, 1, 2)[..., None]
  gather = lambda x: jnp.take_along_axis(jnp.repeat(x, N // K, axis=2), perm_bsn, axis=1)
  bmap = select_tiles(
    q,
    gather(k),
    perm,
    block_size=block_size,
    segment_size=segment_size,
    threshold=threshold,
    is_causal=is_causal,
    scale=scale,
  )
  q_pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
  return gather(k), gather(v), (q_pos, jnp.swapaxes(perm, 1, 2)), bmap


def attention(
  q: Float[Array, "B T N H"],
  k: Float[Array, "B S K H"],
  v: Float[Array, "B S K V"],
  *,
  is_causal: bool = False,
  scale: float | None = None,
  block_size: int = 64,
  segment_size: int = 128,
  threshold: float = 0.9,
  permute: bool = True,
  implementation: str | None = None,
) -> tuple[Float[Array, "B T N V"], registry.Aux]:
  """PBS-Attn (module docstring).

  Args:
    q, k, v: [B,T,N,H], [B,S,K,H], [B,S,K,Hv]; N % K == 0.
    is_causal, scale: as `dot_product_attention` (the paper's setting is causal).
    block_size: the tile size of the selection and the chunked path.
    segment_size: keys are permuted inside segments of this many (a multiple of block_size).
    threshold: τ in (0, 1], the estimated mass of the off-segment tiles kept (1 = all: dense).
    permute: False = the same selection without the permutation (the block-sparse baseline).
    implementation: "xla" (dense-mask reference) or "chunked"; None = automatic.

  Returns:
    (out [B,T,N,Hv] in q's dtype, Aux with metric "pbs_density").
  """
  B, T, S, N, K, H, _ = _validate.check_qkv(q, k, v)
  check_layout(block_size, segment_size)
  if not 0.0 < threshold <= 1.0:
    raise ValueError(f"threshold={threshold} must be in (0, 1]: the fraction of mass kept")
  impl = registry.resolve_implementation(
    implementation, dict.fromkeys(_IMPLEMENTATIONS), family="pbs"
  )
  scale = 1.0 / math.sqrt(H) if scale is None else scale
  k_perm, v_perm, positions, bmap = layout(
    q,
    k,
    v,
    block_size=block_size,
    segment_size=segment_size,
    threshold=threshold,
    permute=permute,
    is_causal=is_causal,
    scale=scale,
  )
  out = dot_product_attention(
    q,
    k_perm,
    v_perm,
    is_causal=is_causal,
    scale=scale,
    implementation=impl,
    block_sizes=BlockSizes(block_size, block_size),
    block_map=bmap,
    positions=positions,
  )
  same, other = _segment_tables(T, S, block_size, segment_size, is_causal)
  allowed = float(np.sum(same | other))
  density = jnp.mean(jnp.sum(bmap.kv_counts, axis=-1) / allowed)
  return out, registry.Aux(metrics={"pbs_density": lax.stop_gradient(density)})


FAMILY = registry.Family(
  name="pbs",
  attention=attention,
  implementations=_IMPLEMENTATIONS,
  paper="Sparser Block-Sparse Attention via Token Permutation (arXiv 2510.21270)",
  returns_aux=True,
  supports_mask=False,  # causality only; the paper has no other masks
  conformance=registry.Conformance(
    # Small tiles and segments so the suite's short sequences have several segments to permute
    # and off-segment tiles to drop.
    cases={
      "default": registry.ConformanceCase(
        options=dict(block_size=8, segment_size=16, threshold=0.5)
      )
    },
    # The paper's tiles and segments (128 / 256), τ = 0.9.
    benchmark={
      "default": registry.ConformanceCase(
        options=dict(block_size=128, segment_size=256, threshold=0.9)
      )
    },
  ),
)
