"""Position-arithmetic masks: sliding window, chunked, blocked, global tokens, sinks.

Each is defined by a closed-form predicate on absolute positions and has an
analytic `block_mask` from per-tile position bounds (`tile_bounds`); the tests
check every override against the generic `Mask.block_mask`.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from attnzoo.masks.base import Mask, classify, require_int, tile_bounds


@dataclasses.dataclass(frozen=True)
class SlidingWindow(Mask):
  """Local attention: query q keeps key k when -left <= k - (q + offset) <= right.

  Sources: Longformer (Beltagy et al., "Longformer: The Long-Document Transformer",
  arXiv 2004.05150, §3.1 sliding window); Mistral 7B (arXiv 2310.06825, §2,
  causal sliding-window attention).

  `right=0` is causal local attention: the query and its `left` predecessors, i.e.
  a window of `left + 1` keys. `offset` shifts the query's position as in `Causal`:
  offset = S - T aligns the last query with the last key (decoding against a cache).

  Differences from the papers: Longformer's window w is symmetric (w/2 per side);
  here the two extents are separate so both the symmetric and the causal forms,
  and asymmetric ones, are one class. Mistral's window W (keys per query, including
  itself) is `SlidingWindow(left=W - 1)`.
  """

  left: int
  right: int = 0
  offset: int = 0

  def __post_init__(self):
    fix = "pass the number of keys visible on that side (0 for none)"
    require_int("SlidingWindow.left", self.left, 0, fix)
    require_int("SlidingWindow.right", self.right, 0, fix)
    require_int("SlidingWindow.offset", self.offset, None)

  def predicate(self, q_pos, k_pos, xp=jnp):
    d = k_pos - (q_pos + self.offset)
    return (d >= -self.left) & (d <= self.right)

  def block_mask(self, seq_q, seq_k, block_q, block_k):
    self.check_lengths(seq_q, seq_k)
    q_lo, q_hi, k_lo, k_hi = tile_bounds(seq_q, seq_k, block_q, block_k)
    q_lo, q_hi = q_lo + self.offset, q_hi + self.offset
    # Over a tile, k - q takes every integer in [k_lo - q_hi, k_hi - q_lo].
    any_kept = (k_lo - q_hi <= self.right) & (k_hi - q_lo >= -self.left)
    all_kept = (k_hi - q_lo <= self.right) & (k_lo - q_hi >= -self.left)
    return classify(any_kept, all_kept)


@dataclasses.dataclass(frozen=True)
class Chunked(Mask):
  """Chunked attention: keep when q // chunk == k // chunk (and k <= q if causal).

  Source: Llama 4's chunked local-attention layers (Meta, "The Llama 4 herd", 2025;
  Hugging Face config `attention_chunk_size=8192`; the remaining layers are global
  NoPE layers, "iRoPE"). No arXiv paper; the rule is the one in the reference code.

  Chunks are aligned to absolute position 0 on both axes (T may differ from S).
  `causal=True` (default) is the Llama-4 form; `causal=False` is block-diagonal
  attention with equal q/kv chunks (`Blocked(chunk)`).
  """

  chunk: int
  causal: bool = True

  def __post_init__(self):
    require_int("Chunked.chunk", self.chunk, 1, "pass the chunk length in tokens")
    if not isinstance(self.causal, (bool, np.bool_)):
      raise TypeError(f"Chunked.causal={self.causal!r} must be a bool")

  def predicate(self, q_pos, k_pos, xp=jnp):
    keep = (q_pos // self.chunk) == (k_pos // self.chunk)
    return keep & (k_pos <= q_pos) if self.causal else keep

  def block_mask(self, seq_q, seq_k, block_q, block_k):
    self.check_lengths(seq_q, seq_k)
    q_lo, q_hi, k_lo, k_hi = tile_bounds(seq_q, seq_k, block_q, block_k)
    c = self.chunk
    any_kept = np.maximum(q_lo // c, k_lo // c) <= np.minimum(q_hi // c, k_hi // c)
    all_kept = (q_lo // c == q_hi // c) & (k_lo // c == k_hi // c) & (q_lo // c == k_lo // c)
    if self.causal:
      # With a shared chunk j, the pair (max(k_lo, j*c), min(q_hi, j*c + c - 1)) is
      # in range, so "some kept" only adds k_lo <= q_hi; "all kept" adds k_hi <= q_lo.
      any_kept = any_kept & (k_lo <= q_hi)
      all_kept = all_kept & (k_hi <= q_lo)
    return classify(any_kept, all_kept)


@dataclasses.dataclass(frozen=True)
class Blocked(Mask):
  """Blocked (block-diagonal) attention: keep when q // size_q == k // size_k.

  Source: blockwise self-attention (Qiu et al., "Blockwise Self-Attention for Long
  Document Understanding", arXiv 1911.02972, §3, the identity permutation block);
  Swin's window attention (arXiv 2103.14030, §3.2) is its 2-D form
  (`Neighborhood(shape, window=w, stride=w)`).

  `size_k` defaults to `size_q`. Different sizes pair the i-th q block with the
  i-th kv block (useful when T != S, e.g. a compressed key sequence); kv blocks
  past the last q block (and vice versa) are attended by no one.
  """

  size_q: int
  size_k: int | None = None

  def __post_init__(self):
    require_int("Blocked.size_q", self.size_q, 1, "pass the q block length in tokens")
    if self.size_k is None:
      object.__setattr__(self, "size_k", int(self.size_q))
    require_int("Blocked.size_k", self.size_k, 1, "pass the kv block length in tokens")

  def predicate(self, q_pos, k_pos, xp=jnp):
    return (q_pos // self.size_q) == (k_pos // self.size_k)

  def block_mask(self, seq_q, seq_k, block_q, block_k):
    self.check_lengths(seq_q, seq_k)
    q_lo, q_hi, k_lo, k_hi = tile_bounds(seq_q, seq_k, block_q, block_k)
    gq_lo, gq_hi = q_lo // self.size_q, q_hi // self.size_q
    gk_lo, gk_hi = k_lo // self.size_k, k_hi // self.size_k
    any_kept = np.maximum(gq_lo, gk_lo) <= np.minimum(gq_hi, gk_hi)
    all_kept = (gq_lo == gq_hi) & (gk_lo == gk_hi) & (gq_lo == gk_lo)
    return classify(any_kept, all_kept)


@dataclasses.dataclass(frozen=True)
class GlobalTokens(Mask):
  """Global tokens: the first `num_global` keys are visible to every query, and (with
  `queries_see_all=True`, the default) the first `num_global` queries see every key.

  Source: Longformer (arXiv 2004.05150, §3.1 "global attention", symmetric);
  BigBird (Zaheer et al., arXiv 2007.14062, §2, ITC global tokens, g = num_global).
  With `queries_see_all=False` it is the attention-sink pattern of StreamingLLM
  (Xiao et al., arXiv 2309.17453, §3.2), also available as `AttentionSinks`.

  Combine with a local pattern by `|`, e.g.
  `(SlidingWindow(128) | GlobalTokens(4)) & Causal()`.
  Differences from the papers: global tokens are the first positions (Longformer
  chooses task-specific ones, e.g. [CLS]); for arbitrary positions use `DenseMask`.
  """

  num_global: int
  queries_see_all: bool = True

  def __post_init__(self):
    require_int(
      "GlobalTokens.num_global", self.num_global, 0, "pass the number of leading global tokens"
    )
    if not isinstance(self.queries_see_all, (bool, np.bool_)):
      raise TypeError(f"GlobalTokens.queries_see_all={self.queries_see_all!r} must be a bool")

  def predicate(self, q_pos, k_pos, xp=jnp):
    keep = k_pos < self.num_global
    return keep | (q_pos < self.num_global) if self.queries_see_all else keep

  def block_mask(self, seq_q, seq_k, block_q, block_k):
    self.check_lengths(seq_q, seq_k)
    q_lo, q_hi, k_lo, k_hi = tile_bounds(seq_q, seq_k, block_q, block_k)
    n = self.num_global
    any_kept, all_kept = k_lo < n, k_hi < n
    if self.queries_see_all:
      # All kept needs every row or every column global: else (q_hi, k_hi) is dropped.
      any_kept, all_kept = any_kept | (q_lo < n), all_kept | (q_hi < n)
    return classify(any_kept, all_kept)


@dataclasses.dataclass(frozen=True)
class AttentionSinks(Mask):
  """The first `num_sinks` keys are visible to every query (attention sinks).

  Source: Xiao et al., "Efficient Streaming Language Models with Attention Sinks"
  (StreamingLLM), arXiv 2309.17453, §3.2: keep the first 4 tokens' KV next to a
  sliding window, i.e. `(SlidingWindow(L) | AttentionSinks(4)) & Causal()`.
  Same as `GlobalTokens(num_sinks, queries_see_all=False)`.
  """

  num_sinks: int

  def __post_init__(self):
    require_int(
      "AttentionSinks.num_sinks", self.num_sinks, 0, "pass the number of leading sink tokens"
    )

  def predicate(self, q_pos, k_pos, xp=jnp):
    return k_pos < self.num_sinks

  def block_mask(self, seq_q, seq_k, block_q, block_k):
    self.check_lengths(seq_q, seq_k)
    _, _, k_lo, k_hi = tile_bounds(seq_q, seq_k, block_q, block_k)
    return classify(k_lo < self.num_sinks, k_hi < self.num_sinks)
