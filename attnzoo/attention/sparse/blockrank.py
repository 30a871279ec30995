"""BlockRank: in-context ranking attention with inter-document block sparsity.

"Scalable In-context Ranking with Generative Models" (Gupta et al., arXiv 2510.05396), §3;
official code `nilesh2797/BlockRank` (`blockrank_std_attention.py`, `losses.py`, `dataset.py`).
The prompt [instruction | doc_1 | ... | doc_n | query] is described by per-token layout ids
(`attnzoo.masks.blockrank`: INSTRUCTION 0, documents 1..n, QUERY -1, PAD -2).

Attention (the family): softmax attention under the BlockRank mask,

    out = softmax(keep ⊙ (scale · q kᵀ) + bias) v,
    keep(i, j) = [j ≤ i] ∧ (id_j = id_i ∨ id_j = INSTRUCTION ∨ id_i = QUERY),  no PAD at i or j

so documents never see each other and the query sees everything before it; the mask's
`BlockMap` lets the chunked path and the Pallas kernel skip the EMPTY doc↔doc tiles.

Permutation-invariant positions (`blockrank_positions`, the paper's position-id trick, as the
code's `block_icr_collate_fn`): instruction token j gets j, token j of every document gets
n_I + j (all documents share one range after the n_I instruction tokens), query token j gets
16384 + j; padding gets 0 (j counts non-pad tokens of its segment).

Auxiliary contrastive loss (`blockrank_contrastive_loss`, Eq. of §3.3 as in `losses.py`), at one
middle layer l* (20 of Mistral-7B's 32): from P scoring query rows (the "[" token that opens the
answer and the token before it, P = 2),

    a_{h,p}(s) = softmax_{s ∈ documents}(scale · q_{h,p} · k_{h,s})        document tokens only
    σ_d        = Σ_{s ∈ doc d} mean_{h,p} a_{h,p}(s)                          σ ∈ Δ^{n-1}
    L_aux      = −log( Σ_{d ∈ Pos} exp(σ_d / τ) / Σ_d exp(σ_d / τ) ),   τ = 0.05, weight λ = 0.1

(InfoNCE with multiple positives; L = L_lm + λ L_aux). At inference σ ranks the documents.

The seam the trainer lacks: σ needs no label, L_aux does — the indices of the relevant documents
per example, which no layer input ("x", "positions", "valid") carries. So the family reports the
label-free statistics as `Aux.metrics` (at the layer `score_layer` only, via `layer_knobs`):
`blockrank_doc_mass` (share of the scoring rows' real attention on documents),
`blockrank_top_doc` (max_d σ_d) and `blockrank_doc_entropy` (−Σ σ log σ, nats), and the loss is
the pure function `blockrank_contrastive_loss(q, k, layout, label, ...)`. A data pipeline that
trains it needs per example: the layout ids [B, T] (or one fixed format), the position ids
`blockrank_positions(layout)` [B, T] fed to RoPE (the model now always uses arange), the scoring
positions [B, P] and the positive documents [B, A] (−1 padded, as the code's `answer_ids`).

Layout knobs (static: the family sees only q/k/v, knobs, arrays and layer inputs): `layout`
("I|d1,d2,...|Q" token counts, or per-token ids) for a fixed-format task, else `block_len` =
the paper's H: M = ceil(L / H) blocks, block 0 the instruction, the last (possibly shorter)
block the query, the rest documents (`masks.blockrank.layout_from_blocks`), L = max(T, S).

Shapes: q [B,T,N,H], k [B,S,K,H], v [B,S,K,Hv] -> [B,T,N,Hv]; GQA as `dot_product_attention`.

Differences from the paper:
- Documents may have any length and padding is explicit (PAD ids) instead of M equal
  left-padded blocks; the code's "[" position (first completion token) is a `score_positions`
  argument of the loss, defaulting to the last P query tokens (the family uses that default).
- The loss averages over the examples that have a positive (the code would give +inf for an
  example with none); positive indices outside [0, n) are ignored like the code's −1 padding.
- The family's metrics use the q·k logits (soft-capped if asked) without `bias` (the paper uses
  RoPE, which is inside q and k).

Choices where the paper is silent:
- `score_layer=None` is layer ⌊20·L/32⌋ (the paper's l* = 20 of 32, scaled); negative values
  count from the end. `block_len=16` by default (the code pads blocks to multiples of 16).
- For T ≠ S the layout of length max(T, S) is top-left aligned with queries and keys, like
  `is_causal`; metrics are reported only for self-attention (T = S).
- `is_causal=False` gives the bidirectional variant of the rules (`masks.BlockRank(causal=False)`).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jaxtyping import Array, Float, Int

from attnzoo.attention import _validate, registry
from attnzoo.attention.dense.softmax import dot_product_attention
from attnzoo.masks import BlockRank, Mask
from attnzoo.masks.base import require_int
from attnzoo.masks.blockrank import (
  INSTRUCTION,
  PAD,
  QUERY,
  check_layout,
  layout_from_blocks,
  parse_layout,
)
from pallas_kernels.block_sparse import BlockSizes

QUERY_POSITION_OFFSET = 16384  # the code's offset of the query block's position ids
TEMPERATURE = 0.05  # τ of the released training config (the docs quote 0.1 as a default)
AUX_WEIGHT = 0.1  # λ
SCORE_TOKENS = 2  # the "[" token and the one before it
_IMPLEMENTATIONS = ("xla", "chunked", "pallas")
_NO_POSITIVE = -1e30  # finite, so rows without a positive keep finite gradients


def _concrete(x) -> np.ndarray | None:
  return None if isinstance(x, jax.core.Tracer) else np.asarray(x)


def resolve_layout(
  T: int, S: int, *, layout: str | Sequence[int] | None, block_len: int
) -> tuple[np.ndarray, np.ndarray]:
  """(q_ids [T], kv_ids [S]): the configured layout (or the block format) of max(T, S) tokens,
  top-left aligned with the queries and the keys."""
  length = max(T, S)
  if layout is None:
    ids = layout_from_blocks(length, block_len)
  elif isinstance(layout, str):
    ids = parse_layout(layout)
  else:
    ids = check_layout(np.asarray(layout))
  if ids.shape[0] != length:
    raise ValueError(
      f"layout has {ids.shape[0]} tokens but the call has T={T}, S={S}; pass a layout of "
      f"max(T, S)={length} tokens, or layout=None to derive it from block_len"
    )
  return ids[:T], ids[:S]


def blockrank_positions(
  layout: Int[Array, "*B L"], *, query_offset: int = QUERY_POSITION_OFFSET
) -> Int[Array, "*B L"]:
  """Permutation-invariant position ids (module docstring) of layout ids [L] or [B, L].

  Feed them to RoPE (`attnzoo.nn.positions.rope(q, positions)`): every document then sits at
  the same distance from the instruction and from the query, so the query's view of the
  documents does not depend on their order.
  """
  ids = jnp.asarray(layout, jnp.int32)
  concrete = _concrete(layout)
  if concrete is not None:
    rows = concrete.reshape(-1, concrete.shape[-1])
    for row in rows:
      check_layout(row)
    longest = max(
      int(np.sum(row == INSTRUCTION)) + int(np.bincount(row[row > 0], minlength=1).max())
      for row in rows
    )
    if query_offset < longest:
      raise ValueError(
        f"query_offset={query_offset} is below the {longest} positions of instruction plus the "
        f"longest document; pass query_offset >= {longest} (the paper uses 16384)"
      )
  valid = ids != PAD
  rank = jnp.where(ids == QUERY, jnp.iinfo(jnp.int32).max, ids)
  index = jnp.broadcast_to(jnp.arange(ids.shape[-1], dtype=jnp.int32), ids.shape)
  seen = jnp.cumsum(valid.astype(jnp.int32), axis=-1)  # valid tokens up to and incl. t
  # Rank of the previous valid token (layouts are sorted by rank, so a change starts a segment).
  last_valid = lax.cummax(jnp.where(valid, index, -1), axis=ids.ndim - 1)
  prev = jnp.concatenate([jnp.full_like(last_valid[..., :1], -1), last_valid[..., :-1]], -1)
  prev_rank = jnp.where(
    prev >= 0, jnp.take_along_axis(rank, jnp.maximum(prev, 0), axis=-1), jnp.iinfo(jnp.int32).min
  )
  starts = valid & (rank != prev_rank)
  before_segment = lax.cummax(jnp.where(starts, seen - 1, 0), axis=ids.ndim - 1)
  within = seen - 1 - before_segment
  num_instruction = jnp.sum(ids == INSTRUCTION, axis=-1, keepdims=True, dtype=jnp.int32)
  pos = jnp.where(ids == QUERY, query_offset + within, within)
  pos = jnp.where(ids > 0, num_instruction + within, pos)
  return jnp.where(valid, pos, 0)


def default_score_positions(layout: Int[Array, "*B L"], count: int) -> Int[Array, "*B P"]:
  """The last `count` query tokens of each layout, ascending; −1 where there are fewer."""
  ids = jnp.asarray(layout, jnp.int32)
  index = jnp.broadcast_to(jnp.arange(ids.shape[-1], dtype=jnp.int32), ids.shape)
  index = jnp.where(ids == QUERY, index, -1)
  return jnp.sort(lax.top_k(index, count)[0], axis=-1)


def score_logits(
  q: Float[Array, "B T N H"],
  k: Float[Array, "B S K H"],
  positions: Int[Array, "B P"],
  *,
  scale: float,
  logits_soft_cap: float | None = None,
) -> Float[Array, "B N P S"]:
  """fp32 logits of the scoring query rows `positions` against every key (GQA by grouping)."""
  B, _, N, H = q.shape
  K = k.shape[2]
  P = positions.shape[-1]
  rows = jnp.take_along_axis(q, jnp.clip(positions, 0, q.shape[1] - 1)[:, :, None, None], axis=1)
  logits = jnp.einsum(
    "bpkgh,bskh->bkgps",
    rows.reshape(B, P, K, N // K, H),
    k,
    preferred_element_type=jnp.float32,
  )
  logits = logits.reshape(B, N, P, k.shape[1]) * scale
  if logits_soft_cap is not None:
    logits = logits_soft_cap * jnp.tanh(logits / logits_soft_cap)
  return logits


def document_scores(
  logits: Float[Array, "B N P S"],
  layout: Int[Array, "B S"],
  positions: Int[Array, "B P"],
  num_docs: int,
) -> Float[Array, "B n"]:
  """σ [B, n]: softmax over document tokens, mean over heads and the valid scoring rows
  (positions ≥ 0), summed per document (module docstring)."""
  is_doc = (layout > 0)[:, None, None, :]
  masked = jnp.where(is_doc, logits, -jnp.inf)
  top = lax.stop_gradient(jnp.max(jnp.where(is_doc, logits, _NO_POSITIVE), -1, keepdims=True))
  p = jnp.where(is_doc, jnp.exp(masked - top), 0.0)
  total = jnp.sum(p, -1, keepdims=True)
  p = p / jnp.where(total > 0, total, 1.0)
  row_ok = (positions >= 0).astype(jnp.float32)  # [B, P]
  weight = row_ok / jnp.maximum(jnp.sum(row_ok, -1, keepdims=True), 1.0)
  per_token = jnp.einsum("bnps,bp->bs", p, weight) / logits.shape[1]
  docs = layout[:, :, None] == jnp.arange(1, num_docs + 1, dtype=layout.dtype)[None, None, :]
  return jnp.einsum("bs,bsd->bd", per_token, docs.astype(jnp.float32))


def _positives(label, num_docs: int) -> jax.Array:
  label = jnp.asarray(label, jnp.int32)
  if label.ndim == 1:
    label = label[:, None]
  return jnp.any(label[:, :, None] == jnp.arange(num_docs, dtype=jnp.int32)[None, None], axis=1)


def blockrank_contrastive_loss(
  q: Float[Array, "B T N H"],
  k: Float[Array, "B T K H"],
  layout: Int[Array, "*B T"],
  label: Int[Array, "B ..."],
  *,
  num_docs: int | None = None,
  score_positions: Int[Array, "*B P"] | None = None,
  score_tokens: int = SCORE_TOKENS,
  temperature: float = TEMPERATURE,
  scale: float | None = None,
  logits_soft_cap: float | None = None,
) -> tuple[Float[Array, ""], Float[Array, ""]]:
  """(L_aux, accuracy) of the BlockRank auxiliary loss (module docstring) at one layer.

  Args:
    q, k: that layer's queries and keys after RoPE (self-attention, T = S).
    layout: ids [T] (one format) or [B, T] (per example; may be traced).
    label: positive document indices, 0-based (document id d is index d − 1): [B] or [B, A]
      with −1 padding (the code's `answer_ids`).
    num_docs: n, needed when `layout` is traced (else max id).
    score_positions: scoring rows [P] or [B, P] (the paper: the "[" token and its predecessor);
      None = the last `score_tokens` query tokens.
    temperature: τ. scale: logits scale (default 1/√H). logits_soft_cap: as the attention.
  Returns:
    the mean InfoNCE loss over examples with a positive, and the fraction of those whose top
    document σ is a positive.
  """
  B, T, _, H = q.shape
  _validate.check_qkv(q, k, k)
  if k.shape[1] != T:
    raise ValueError(f"the loss is for self-attention: q has T={T}, k has S={k.shape[1]}")
  if not temperature > 0:
    raise ValueError(f"temperature={temperature} must be > 0 (the paper uses τ = 0.05)")
  require_int("score_tokens", score_tokens, 1, "pass how many query rows are scored (paper: 2)")
  ids = jnp.broadcast_to(jnp.asarray(layout, jnp.int32), (B, T))
  concrete = _concrete(layout)
  if concrete is not None:
    for row in concrete.reshape(-1, concrete.shape[-1]):
      check_layout(row)
    if concrete.shape[-1] != T:
      raise ValueError(f"layout has {concrete.shape[-1]} tokens but T={T}; one id per token")
  if num_docs is None:
    if concrete is None:
      raise ValueError("layout is traced, so num_docs cannot be read from it; pass num_docs=n")
    num_docs = int(concrete.max())
  num_docs = require_int("num_docs", num_docs, 1, "the layout must hold at least one document")
  if score_positions is None:
    positions = default_score_positions(ids, score_tokens)
  else:
    positions = jnp.broadcast_to(
      jnp.asarray(score_positions, jnp.int32), (B, jnp.shape(score_positions)[-1])
    )
  _check_scoring(
    concrete, _concrete(score_positions) if score_positions is not None else None, score_tokens, T
  )
  labels = _concrete(label)
  if labels is not None and not ((labels >= 0) & (labels < num_docs)).reshape(B, -1).any(-1).all():
    raise ValueError(
      f"label={labels.tolist()} leaves an example without a positive document in [0, {num_docs}); "
      f"pass 0-based document indices (−1 = padding) with at least one per example"
    )
  logits = score_logits(
    q, k, positions, scale=scale or 1.0 / float(np.sqrt(H)), logits_soft_cap=logits_soft_cap
  )
  sigma = document_scores(logits, ids, positions, num_docs) / temperature
  positive = _positives(label, num_docs)
  has_positive = jnp.any(positive, -1)
  lse_all = jax.nn.logsumexp(sigma, -1)
  lse_pos = jax.nn.logsumexp(jnp.where(positive, sigma, _NO_POSITIVE), -1)
  count = jnp.maximum(jnp.sum(has_positive), 1).astype(jnp.float32)
  loss = jnp.sum(jnp.where(has_positive, lse_all - lse_pos, 0.0)) / count
  hit = jnp.take_along_axis(positive, jnp.argmax(sigma, -1)[:, None], -1)[:, 0]
  accuracy = jnp.sum(hit & has_positive) / count
  return loss, accuracy


def _check_scoring(layout, positions, score_tokens, T) -> None:
  """With concrete arrays: scoring rows must be query tokens (they see every document)."""
  if layout is None:
    return
  rows = layout.reshape(-1, layout.shape[-1])
  if positions is None:
    few = [int(np.sum(r == QUERY)) for r in rows if np.sum(r == QUERY) < score_tokens]
    if few:
      raise ValueError(
        f"the layout has {few[0]} query token(s) but score_tokens={score_tokens} rows are "
        f"scored; lower score_tokens or lengthen the query"
      )
    return
  positions = np.broadcast_to(positions, (rows.shape[0], positions.shape[-1]))
  for row, pos in zip(rows, positions, strict=True):
    bad = [int(p) for p in pos if not (0 <= p < T and row[p] == QUERY)]
    if bad:
      raise ValueError(
        f"score_positions contains {bad[0]}, which is not a query token of the layout; "
        f"score rows of the query (id {QUERY}), which attend to every document"
      )


def _metrics(q, k, kv_ids, *, is_causal, scale, logits_soft_cap, score_tokens) -> dict:
  """The label-free statistics of the scoring rows (module docstring), no gradient."""
  num_docs = int(kv_ids.max(initial=0))
  queries = np.flatnonzero(kv_ids == QUERY)
  if num_docs == 0 or queries.size == 0:
    return {}
  q, k = lax.stop_gradient(q), lax.stop_gradient(k)
  B, S = q.shape[0], k.shape[1]
  positions = jnp.broadcast_to(
    jnp.asarray(queries[-score_tokens:], jnp.int32), (B, min(score_tokens, queries.size))
  )
  ids = jnp.broadcast_to(jnp.asarray(kv_ids), (B, S))
  logits = score_logits(q, k, positions, scale=scale, logits_soft_cap=logits_soft_cap)
  sigma = document_scores(logits, ids, positions, num_docs)
  visible = (ids != PAD)[:, None, :]
  if is_causal:
    visible = visible & (jnp.arange(S)[None, None, :] <= positions[:, :, None])
  visible = visible[:, None]
  p = jax.nn.softmax(jnp.where(visible, logits, -jnp.inf), axis=-1)
  doc_mass = jnp.mean(jnp.sum(jnp.where((ids > 0)[:, None, None, :], p, 0.0), -1))
  entropy = -jnp.sum(
    jnp.where(sigma > 0, sigma * jnp.log(jnp.where(sigma > 0, sigma, 1.0)), 0.0), -1
  )
  return {
    "blockrank_doc_mass": doc_mass,
    "blockrank_top_doc": jnp.mean(jnp.max(sigma, -1)),
    "blockrank_doc_entropy": jnp.mean(entropy),
  }


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
  block_len: int = 16,
  layout: str | Sequence[int] | None = None,
  score_tokens: int = SCORE_TOKENS,
  score_layer: int | None = None,
  report_scores: bool = True,
  implementation: str | None = None,
  block_sizes: BlockSizes | None = None,
  interpret: bool | None = None,
) -> tuple[Float[Array, "B T N V"], registry.Aux]:
  """BlockRank attention (module docstring); returns (out, Aux(metrics)).

  Args:
    q, k, v, mask, bias, is_causal, scale, segment_ids, logits_soft_cap: as
      `dot_product_attention`; `mask` is AND-ed with the BlockRank mask.
    block_len: tokens per block of the default layout (the paper's H).
    layout: "I|d1,d2,...|Q" token counts, or per-token ids (`masks.blockrank`), of max(T, S)
      tokens; None = the block format from `block_len`.
    score_tokens: scoring rows (the last query tokens) of the metrics.
    score_layer: read by `layer_knobs` (which layer reports metrics); unused here.
    report_scores: compute the metrics (`layer_knobs` sets it for the chosen layer only).
    implementation, block_sizes, interpret: as `dot_product_attention`.
  """
  del score_layer  # resolved into report_scores by layer_knobs
  B, T, S, N, _, H, _ = _validate.check_qkv(q, k, v)
  require_int("block_len", block_len, 1, "pass the tokens per block (the paper's H)")
  require_int("score_tokens", score_tokens, 1, "pass how many query rows are scored (paper: 2)")
  q_ids, kv_ids = resolve_layout(T, S, layout=layout, block_len=block_len)
  structure = BlockRank(q_ids, kv_ids, causal=False)  # is_causal adds Causal() in the call
  if mask is None:
    combined = structure
  elif isinstance(mask, Mask):
    combined = structure & mask
  else:
    mask = jnp.asarray(mask)
    if mask.dtype != jnp.bool_:
      raise TypeError(f"mask array must be boolean (True = keep), got dtype {mask.dtype}")
    dense = jnp.asarray(structure.dense(T, S))[None, None]
    combined = _validate.broadcast_to_bnts(mask, "mask", (B, N, T, S)) & dense
  scale = 1.0 / float(np.sqrt(H)) if scale is None else scale
  impl = registry.resolve_implementation(
    implementation, dict.fromkeys(_IMPLEMENTATIONS), family="blockrank"
  )
  out = dot_product_attention(
    q,
    k,
    v,
    mask=combined,
    bias=bias,
    is_causal=is_causal,
    scale=scale,
    segment_ids=segment_ids,
    logits_soft_cap=logits_soft_cap,
    implementation=impl,
    block_sizes=block_sizes,
    interpret=interpret,
  )
  metrics = {}
  if report_scores and T == S:
    metrics = _metrics(
      q,
      k,
      kv_ids,
      is_causal=is_causal,
      scale=scale,
      logits_soft_cap=logits_soft_cap,
      score_tokens=score_tokens,
    )
  return out, registry.Aux(metrics=metrics)


def paper_score_layer(num_layers: int) -> int:
  """⌊20·L/32⌋: the paper's l* = 20 of Mistral-7B's 32 layers, scaled to L layers."""
  return (20 * num_layers) // 32


def layer_knobs(knobs, *, layer: int, num_layers: int, num_heads: int):
  """Turns `score_layer` into `report_scores` (True at that layer only)."""
  del num_heads
  knobs = dict(knobs)
  chosen = knobs.pop("score_layer", None)
  target = paper_score_layer(num_layers) if chosen is None else chosen
  if (
    isinstance(target, bool)
    or not isinstance(target, int)
    or not -num_layers <= target < num_layers
  ):
    raise ValueError(
      f"score_layer={chosen!r} is not a layer of this {num_layers}-layer model; pass an index "
      f"in [-{num_layers}, {num_layers}) or None for the paper's middle layer"
    )
  knobs["report_scores"] = bool(knobs.get("report_scores", True)) and layer == target % num_layers
  return knobs


FAMILY = registry.Family(
  name="blockrank",
  attention=attention,
  implementations=_IMPLEMENTATIONS,
  paper="Scalable In-context Ranking with Generative Models (arXiv 2510.05396)",
  returns_aux=True,
  layer_knobs=layer_knobs,
  conformance=registry.Conformance(
    # Blocks of 8 tokens: the suite's 37-45 token sequences hold an instruction, several
    # documents and a query; tiles of 8/16 make doc↔doc tiles EMPTY (skipped) and cut blocks.
    cases={"default": registry.ConformanceCase(options=dict(block_len=8))},
    implementation_options={
      "chunked": {"block_sizes": BlockSizes(16, 8)},
      "pallas": {"block_sizes": BlockSizes(16, 16), "interpret": True},
    },
    slow=("pallas",),
  ),
)
