"""Content-sparse softmax attention: a selector picks, from the data, which tiles to compute.

    map  = selector(q, k; tiles, static mask)          per (batch, query head, q tile)
    out  = softmax(mask ∧ selected(map) ⊙ (scale · q kᵀ) + bias) v

The selector is the knob `selector`:
- "topk": the `top_k` kv tiles with the largest pooled score mean(q_tile)·mean(k_tile)
  (BiFormer's region routing, arXiv 2303.08810 §3.2; MoBA-style block selection),
- "mass": the fewest kv tiles whose softmax mass over the pooled scores reaches `mass`
  (PBS-Attn's cumulative threshold, arXiv 2510.21270 §3.3),
- any callable `(q, k, *, block_q, block_k, mask) -> BlockMap` (per-(batch, head) tables of
  static width; `attnzoo.attention.sparse.block_select` has the building blocks).
Both named selectors always keep the static mask's diagonal tiles (the local context) and
never choose a tile the static mask empties (`mask` and `is_causal` are passed to them), so
causality holds at tile level by construction; the map is re-classified against the mask
before use (`softmax.restrict_block_map`), so a custom selector cannot break the mask either.

Selection is discrete: pooled q/k pass through `stop_gradient` (`block_select`), so gradients
flow through the attention over the selected tiles only — the same on every implementation.
"xla" applies the selection as a dense mask (the reference); "chunked" walks only the selected
tiles per (batch, head) forward and backward (O(T·H) memory, work ∝ density); "pallas" runs the
block-sparse kernel on exactly the same map.

Shapes: q [B,T,N,H], k [B,S,K,H], v [B,S,K,Hv] -> [B,T,N,Hv]; tiles block_q × block_k.

Choices: the pooled-score estimate is over a whole q tile, so inside the diagonal tile the
choice for earlier rows also saw later rows' queries (the tile-level estimate of these papers'
prefill; it carries no gradient). A dense boolean `mask` array is not visible to the selectors
(they take structured masks): it is still applied, but tiles it empties may use up the budget.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
from jaxtyping import Array, Float

from attnzoo.attention import registry
from attnzoo.attention.dense.softmax import dot_product_attention
from attnzoo.attention.sparse import block_select
from attnzoo.masks import Causal, Mask
from pallas_kernels.block_sparse import BlockMap, BlockSizes

SELECTORS = ("topk", "mass")
_IMPLEMENTATIONS = ("xla", "chunked", "pallas")


def select(
  q: Float[Array, "B T N H"],
  k: Float[Array, "B S K H"],
  *,
  selector: str | Callable[..., BlockMap],
  block_q: int,
  block_k: int,
  mask: Mask | None,
  top_k: int,
  mass: float,
  density: float | None = None,
) -> BlockMap:
  """The selector's map for (q, k), checked (tile sizes, type)."""
  if density is not None:
    if selector != "topk" or not 0.0 < density <= 1.0:
      raise ValueError(
        f"density={density!r} sets the top-k selector's tiles per row as a fraction in (0, 1] "
        f"of the kv tiles; it needs selector='topk' (got {selector!r})"
      )
    top_k = top_k_for_density(density, k.shape[1], block_k)
  if callable(selector):
    bmap = selector(q, k, block_q=block_q, block_k=block_k, mask=mask)
    name = getattr(selector, "__name__", repr(selector))
  elif selector == "topk":
    bmap = block_select.topk_block_map(
      q, k, block_q=block_q, block_k=block_k, num_blocks_per_row=top_k, mask=mask
    )
    name = selector
  elif selector == "mass":
    bmap = block_select.mass_block_map(q, k, block_q=block_q, block_k=block_k, mass=mass, mask=mask)
    name = selector
  else:
    raise ValueError(
      f"selector={selector!r} must be one of {SELECTORS} or a callable "
      "(q, k, *, block_q, block_k, mask) -> BlockMap"
    )
  if not isinstance(bmap, BlockMap):
    raise TypeError(f"selector {name} returned {type(bmap).__name__}; it must return a BlockMap")
  if (bmap.block_q, bmap.block_k) != (block_q, block_k):
    raise ValueError(
      f"selector {name} returned a map with tiles ({bmap.block_q}, {bmap.block_k}); the call "
      f"asked for block_q={block_q}, block_k={block_k}: build the map with those tiles"
    )
  return bmap


def top_k_for_density(density: float, seq_k: int, block_k: int) -> int:
  """Tiles per row that make a top-k map about `density` of all kv tiles, the forced diagonal
  tile included (at least 1 chosen tile besides it)."""
  kb = -(-seq_k // block_k)
  return max(1, min(kb, round(density * kb) - 1))


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
  selector: str | Callable[..., BlockMap] = "topk",
  top_k: int = 4,
  mass: float = 0.9,
  density: float | None = None,
  block_q: int = 64,
  block_k: int = 64,
  implementation: str | None = None,
  interpret: bool | None = None,
) -> Float[Array, "B T N V"]:
  """Content-sparse attention (module docstring).

  Args:
    q, k, v, mask, bias, is_causal, scale, segment_ids, logits_soft_cap: as
      `dot_product_attention`.
    selector: "topk", "mass" or a callable returning a `BlockMap`.
    top_k: kv tiles chosen per q tile by "topk" (besides the forced diagonal one); at most
      the number of kv tiles.
    mass: estimated attention mass "mass" keeps, in (0, 1].
    density: "topk" only: choose top_k per call as this fraction of the kv tiles (diagonal
      included), so one setting means the same sparsity at every length (benchmarks).
    block_q, block_k: tile sizes of the selection (and of the chunked / Pallas paths).
    implementation: "xla" (reference), "chunked", "pallas"; None = automatic.
    interpret: Pallas interpret mode (None = on CPU).
  """
  structured = mask if isinstance(mask, Mask) else None
  if is_causal:
    structured = Causal() if structured is None else structured & Causal()
  bmap = select(
    q,
    k,
    selector=selector,
    block_q=block_q,
    block_k=block_k,
    mask=structured,
    top_k=top_k,
    mass=mass,
    density=density,
  )
  impl = registry.resolve_implementation(
    implementation, dict.fromkeys(_IMPLEMENTATIONS), family="sparse"
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
    block_sizes=BlockSizes(block_q, block_k),
    interpret=interpret,
    block_map=bmap,
  )


FAMILY = registry.Family(
  name="sparse",
  attention=attention,
  implementations=_IMPLEMENTATIONS,
  paper="content-dependent tile selection (BiFormer arXiv 2303.08810, PBS-Attn arXiv 2510.21270)",
  conformance=registry.Conformance(
    # Small tiles so the suite's short sequences span several; one tile per row besides the
    # diagonal keeps the selection sparse.
    cases={
      "topk": registry.ConformanceCase(
        options=dict(selector="topk", top_k=1, block_q=8, block_k=8)
      ),
      "mass": registry.ConformanceCase(
        options=dict(selector="mass", mass=0.5, block_q=8, block_k=8)
      ),
    },
    implementation_options={"pallas": {"interpret": True}},
    slow=("pallas",),
    # Long sequences, 128-token tiles: 10 % and 20 % of the kv tiles per row (top-k, the
    # diagonal included) and a 90 %-mass selection.
    benchmark={
      "topk10": registry.ConformanceCase(
        options=dict(selector="topk", density=0.1, block_q=128, block_k=128)
      ),
      "topk20": registry.ConformanceCase(
        options=dict(selector="topk", density=0.2, block_q=128, block_k=128)
      ),
      "mass90": registry.ConformanceCase(
        options=dict(selector="mass", mass=0.9, block_q=128, block_k=128)
      ),
    },
  ),
)
