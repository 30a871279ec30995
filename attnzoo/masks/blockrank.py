"""BlockRank's structured in-context-ranking mask, from per-token segment ids.

"Scalable In-context Ranking with Generative Models" (Gupta et al., arXiv 2510.05396, §3
"inter-document block sparsity"; official code `nilesh2797/BlockRank`,
`blockrank_std_attention.py`). The prompt is laid out as

    [ instruction | doc_1 | doc_2 | ... | doc_n | query (+ completion) ]

and described by one int id per token (`layout`):

    INSTRUCTION = 0,  documents = 1..n (in order),  QUERY = -1,  PAD = -2

Query token q keeps key k when (c = [k <= q] when causal, else True)

    keep(q, k) = c ∧ id[q] ≠ PAD ∧ id[k] ≠ PAD
                   ∧ (id[k] = id[q] ∨ id[k] = INSTRUCTION ∨ id[q] = QUERY)

so instruction tokens see the instruction, a document token sees the instruction and its own
document (never another document), and query tokens see everything before them. Attention
cost O(M·H²) instead of O((M·H)²) for M blocks of H tokens; the block map of a layout whose
documents span whole tiles has EMPTY doc↔doc tiles, which the chunked path and the Pallas kernel
skip.

The ids are static host tables (`tables()`), as `Segments`: the Pallas kernel reads them as
inputs through `predicate_with`, and `block_mask` classifies tiles exactly from per-tile id
histograms.

Differences from the paper: the official code fixes M blocks of equal, left-padded length H
(pad tokens inside each block); here documents may have any length and padding is explicit
(PAD ids anywhere), which covers the paper's layout (`from_blocks` builds it without padding).

Choices where the paper is silent:
- `causal=False` (not in the paper, which is a decoder): the same block rules without the
  causal constraint (documents see their whole own document, the instruction sees only itself).
- A PAD query row keeps nothing (its output is zeros): padding is never attended and never
  attends.
- For T ≠ S (cross-attention; decoding), `q_ids` and `kv_ids` are top-left aligned views of
  the same layout, as `Causal(offset=0)`.
"""

from __future__ import annotations

import dataclasses
import re

import jax.numpy as jnp
import numpy as np

from attnzoo.masks.base import And, Causal, Mask, classify, require_int, tile_bounds
from attnzoo.masks.tables import _array_key, _frozen, _lookup

INSTRUCTION = 0
QUERY = -1
PAD = -2

_LAYOUT_HELP = (
  "ids are INSTRUCTION=0, documents 1..n, QUERY=-1, PAD=-2, laid out as "
  "[instruction | doc 1 | ... | doc n | query] (PAD anywhere)"
)


def check_layout(ids, name: str = "layout") -> np.ndarray:
  """int32[L] copy of a BlockRank layout; ValueError naming the offending token and the fix.

  Rules: ids in {PAD, QUERY, INSTRUCTION, 1, 2, ...}; ignoring PAD, the instruction comes
  first, documents 1..n follow in order each as one contiguous run with no id skipped, and the
  query tokens come last.
  """
  ids = np.asarray(ids)
  if ids.ndim != 1 or ids.size == 0:
    raise ValueError(
      f"{name} has shape {ids.shape}; pass a non-empty 1-D array with one id per token "
      f"({_LAYOUT_HELP})"
    )
  if not np.issubdtype(ids.dtype, np.integer):
    raise TypeError(f"{name} has dtype {ids.dtype}; {_LAYOUT_HELP}")
  if ids.min() < PAD or ids.max() > np.iinfo(np.int32).max:
    t = int(np.argmax((ids < PAD) | (ids > np.iinfo(np.int32).max)))
    raise ValueError(f"{name}[{t}]={int(ids[t])} is not a valid id; {_LAYOUT_HELP}")
  real = np.flatnonzero(ids != PAD)
  rank = np.where(ids[real] == QUERY, np.iinfo(np.int64).max, ids[real].astype(np.int64))
  back = np.flatnonzero(np.diff(rank) < 0)
  if back.size:
    t, u = int(real[back[0]]), int(real[back[0] + 1])
    raise ValueError(
      f"{name}[{u}]={int(ids[u])} follows {name}[{t}]={int(ids[t])}: the layout is out of "
      f"order; {_LAYOUT_HELP}"
    )
  docs = np.unique(ids[ids > 0])
  if docs.size and not np.array_equal(docs, np.arange(1, docs.size + 1)):
    missing = sorted(set(range(1, int(docs.max()) + 1)) - set(docs.tolist()))
    raise ValueError(
      f"{name} has document ids {docs.tolist()} but no document {missing[0]}; number the "
      f"documents 1..n in order with no gap"
    )
  return ids.astype(np.int32)


def layout_from_lengths(instruction: int, documents, query: int) -> np.ndarray:
  """int32[L]: `instruction` tokens, then documents of the given lengths, then `query` tokens."""
  instruction = require_int("instruction", instruction, 0, "pass a token count")
  query = require_int("query", query, 0, "pass a token count")
  documents = [
    require_int(f"documents[{i}]", n, 1, "document lengths are positive token counts")
    for i, n in enumerate(documents)
  ]
  ids = np.concatenate(
    [
      np.full(instruction, INSTRUCTION),
      np.repeat(np.arange(1, len(documents) + 1), documents),
      np.full(query, QUERY),
    ]
  ).astype(np.int32)
  return check_layout(ids)


def layout_from_blocks(length: int, block_len: int) -> np.ndarray:
  """int32[length]: the paper's format, M = ceil(length / block_len) blocks of `block_len`
  tokens: block 0 the instruction, blocks 1..M-2 documents, the last (possibly shorter) block
  the query. One block is all instruction (plain causal attention)."""
  length = require_int("length", length, 1, "pass the sequence length")
  block_len = require_int("block_len", block_len, 1, "pass the tokens per block (the paper's H)")
  block = np.arange(length) // block_len
  last = block[-1]
  ids = np.where((block == last) & (last > 0), QUERY, block)
  return ids.astype(np.int32)


def parse_layout(spec: str) -> np.ndarray:
  """'I|d1,d2,...|Q' (token counts: instruction | documents | query) -> int32 ids, e.g.
  '16|32,32,32|8'; documents may be empty ('16||8')."""
  match = re.fullmatch(r"\s*(\d+)\s*\|\s*([\d\s,]*)\|\s*(\d+)\s*", spec)
  if match is None:
    raise ValueError(
      f"layout={spec!r} is not 'I|d1,d2,...|Q' (token counts of the instruction, each "
      f"document and the query), e.g. '16|32,32,32|8'"
    )
  docs = [int(d) for d in match.group(2).replace(" ", "").split(",") if d]
  return layout_from_lengths(int(match.group(1)), docs, int(match.group(3)))


def allowed(qi, ki):
  """The block rule on ids, without causality (works on numpy and jnp arrays)."""
  return (qi != PAD) & (ki != PAD) & ((qi == ki) | (ki == INSTRUCTION) | (qi == QUERY))


@dataclasses.dataclass(frozen=True, eq=False)
class BlockRank(Mask):
  """BlockRank's mask (module docstring): `q_ids` int[T] layout ids of the queries, `kv_ids`
  int[S] of the keys (default `q_ids`), `causal` (default True, as the paper)."""

  q_ids: np.ndarray
  kv_ids: np.ndarray | None = None
  causal: bool = True

  def __post_init__(self):
    object.__setattr__(self, "q_ids", _frozen(check_layout(self.q_ids, "BlockRank.q_ids")))
    kv = self.q_ids if self.kv_ids is None else check_layout(self.kv_ids, "BlockRank.kv_ids")
    object.__setattr__(self, "kv_ids", _frozen(kv))
    if not isinstance(self.causal, (bool, np.bool_)):
      raise TypeError(f"BlockRank.causal={self.causal!r} must be a bool")

  @classmethod
  def from_lengths(cls, instruction: int, documents, query: int, causal: bool = True):
    """`layout_from_lengths` as a self-attention mask."""
    return cls(layout_from_lengths(instruction, documents, query), causal=causal)

  @classmethod
  def from_blocks(cls, length: int, block_len: int, causal: bool = True):
    """`layout_from_blocks` (the paper's M blocks of H tokens) as a self-attention mask."""
    return cls(layout_from_blocks(length, block_len), causal=causal)

  @property
  def num_documents(self) -> int:
    return int(max(self.q_ids.max(), self.kv_ids.max(), 0))

  def check_lengths(self, seq_q, seq_k):
    super().check_lengths(seq_q, seq_k)
    if (seq_q, seq_k) != (self.q_ids.shape[0], self.kv_ids.shape[0]):
      raise ValueError(
        f"BlockRank has {self.q_ids.shape[0]} query ids and {self.kv_ids.shape[0]} key ids but "
        f"the attention matrix is T={seq_q} x S={seq_k}; pass one layout id per token"
      )

  def tables(self):
    return (self.q_ids, self.kv_ids)

  def predicate(self, q_pos, k_pos, xp=jnp):
    return self.predicate_with(self.tables(), q_pos, k_pos, xp)

  def predicate_with(self, tables, q_pos, k_pos, xp=jnp):
    q_ids, kv_ids = tables
    keep = allowed(_lookup(q_ids, q_pos, xp), _lookup(kv_ids, k_pos, xp))
    return keep & (k_pos <= q_pos) if self.causal else keep

  def block_mask(self, seq_q, seq_k, block_q, block_k):
    """Exact. Without causality: tile (i, j) keeps Σ_{a,b} n_q[i,a]·A[a,b]·n_k[j,b] elements
    (per-tile id histograms n, A = `allowed` on the distinct ids). With causality: that AND
    `Causal()`, whose undecided tiles (the diagonal band) are classified element by element."""
    if self.causal:
      free = dataclasses.replace(self, causal=False)
      return And((free, Causal())).block_mask(seq_q, seq_k, block_q, block_k)
    self.check_lengths(seq_q, seq_k)
    q_lo, q_hi, k_lo, k_hi = tile_bounds(seq_q, seq_k, block_q, block_k)
    qb, kb = q_lo.shape
    values, inverse = np.unique(np.concatenate([self.q_ids, self.kv_ids]), return_inverse=True)
    if qb * kb * values.size > seq_q * seq_k:
      return super().block_mask(seq_q, seq_k, block_q, block_k)
    hist_q = np.zeros((qb, values.size), np.int64)
    hist_k = np.zeros((kb, values.size), np.int64)
    np.add.at(hist_q, (np.arange(seq_q) // block_q, inverse[:seq_q]), 1)
    np.add.at(hist_k, (np.arange(seq_k) // block_k, inverse[seq_q:]), 1)
    rule = allowed(values[:, None], values[None, :]).astype(np.int64)
    kept = hist_q @ rule @ hist_k.T
    return classify(kept > 0, kept == (q_hi - q_lo + 1) * (k_hi - k_lo + 1))

  def __eq__(self, other):
    if type(other) is not type(self):
      return NotImplemented
    return (_array_key(self.q_ids), _array_key(self.kv_ids), bool(self.causal)) == (
      _array_key(other.q_ids),
      _array_key(other.kv_ids),
      bool(other.causal),
    )

  def __hash__(self):
    return hash((type(self), _array_key(self.q_ids), _array_key(self.kv_ids), bool(self.causal)))
