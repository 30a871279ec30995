"""MoA: per-head elastic sliding windows with attention sinks, and the plan search behind them.

"Mixture of Attention Spans: Optimizing LLM Inference Efficiency with Heterogeneous
Sliding-Window Lengths" (Fu, Huang, Ning, Zhang, Chen, Wu, Wang, Huang, Li, Yan, et al.;
CoLM 2025), arXiv 2406.14909 (v1: "MoA: Mixture of Sparse Attention for Automatic Large
Language Model Compression"); the method as specified in shared/papers/efficient.md §8.1 and
read in the official code thu-nics/MoA (`MoA/universal/elastic_block_sparse.py`,
`MoA/models/llama/modify_llama_profile.py`, `MoA/attention/density_calculation.py`).

Attention (causal prefill, length L = S keys). Head h keeps a causal window of span

    S_h(L) = clip(round(α_h + β_h · L), 1, L)        (the paper's elastic rule α + β·N)

plus the first `num_sink` keys (attention sinks, the code's `global_size`):

    keep_h[i, j] = (j <= i) ∧ (i − j < S_h(L) ∨ j < num_sink)
    out[:, :, h] = softmax(keep_h ⊙ (scale · q_h kᵀ) + bias) v          exact softmax per head

Shapes: q [B,T,N,H], k [B,S,K,H], v [B,S,K,Hv] -> [B,T,N,Hv]; α, β one value per query head.
"xla" materialises the per-head keep patterns as a dense [N,T,S] mask (the reference);
"chunked" and "pallas" run `per_head.per_head_mask_attention`: heads with equal spans share
one engine call on their static mask, so only the tiles a head's window and sinks touch are
visited, forward and backward.

The plan (offline, §8.1 steps 2-3, scaled down; pure functions below, no external solver):
- `attention_influence(A, ∂L/∂A)`: the first-order change of the loss when entry (i, j) is
  masked and its row renormalised, E_ij = A_ij (Σ_k A_ik G_ik − G_ij) / (1 − A_ij).
- `span_loss` / `candidate_losses`: the predicted loss of a candidate (α, β) = Σ E over the
  causal entries it drops; `density`: the closed-form kept fraction of the causal matrix.
- `select_plan`: one candidate per head minimising the summed loss over the profiled lengths,
  with the mean density ≤ budget at every profiled length (greedy, see its docstring).

Differences from the paper:
- The search is a greedy multiple-choice knapsack over the profiled lengths (loss per length
  normalised by that length's total |E|, summed), not Gurobi's multi-objective MILP with a
  Pareto front and a validation pick on an unseen length; the budget holds at every length.
- Influence is element-wise (the code can pool it into 64×64 blocks and uses a BigBird layout
  of whole 64-token blocks, band widened to an odd block count); spans here are exact tokens.
- Sign: the spec writes A(G − ΣAG)/(1 − A); the code negates it (`effect = -effect`) to get the
  loss change. E here is that loss change (masking a key the loss needs gives E > 0), so the
  loss of a candidate is Σ E over the entries it drops, as the spec's step 3 says.
- A row whose only kept key is masked becomes zeros here (the engine's empty-row rule), so its
  E is −A_ij G_ij (the code special-cases the first row the same way: A·G).
- Spans are per query head; the code converts GQA to MHA for profiling, as we do (per-query-
  head plans on GQA models copy kv heads only for heads of a kv group that differ).

Choices where the paper is silent:
- Rounding: half up (floor(x + 0.5)), then clipped to [1, L], so a negative α cannot empty a
  window (the code filters candidates with α + β·min_len ≤ 0 instead).
- L is the key length S (= T in prefill). `is_causal=True` is top-left aligned as in
  `dot_product_attention`. `is_causal=False` keeps a symmetric band: |i − j| < S_h(S), plus the
  sinks (key side only: sink queries do not see every key).
- Knobs `alphas`, `betas`: one float (every head), a tuple of 1 or N floats (config tuples: a
  ConfigDict tuple field takes `--config.model.knobs.moa.alphas=16,32,64,128`), or the same as
  a comma-separated string. β ≥ 0 (spans grow with length, as the code's grids).
- Defaults (a uniform elastic rule until a plan is searched): α = 32, β = 1/4, 4 sinks
  (StreamingLLM's count; the profiler's one 64-token global block is `num_sink=64`).
- The plan's objective sums the per-length losses, each divided by the total |E| of that
  length's causal non-sink entries, so every profiled length counts equally.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from attnzoo.attention import _validate, registry
from attnzoo.attention.dense.softmax import dot_product_attention
from attnzoo.attention.sparse.per_head import per_head_mask_attention
from attnzoo.masks import AttentionSinks, Mask, SlidingWindow

_IMPLEMENTATIONS = ("xla", "chunked", "pallas")
Spans = float | Sequence[float] | str


# ------------------------------------------------------------------ plans: knobs, spans, masks


def _is_number(x) -> bool:
  return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool)


def per_head_values(name: str, values: Spans, num_heads: int) -> np.ndarray:
  """float64 [N] from a float, a tuple of 1 or N floats, or a comma-separated string."""
  how = f"pass one number (every head) or {num_heads} (one per query head)"
  if isinstance(values, str):
    try:
      items = [float(p) for p in values.split(",") if p.strip()]
    except ValueError:
      raise ValueError(
        f"{name}={values!r} is not a comma-separated list of numbers; {how}"
      ) from None
  elif _is_number(values):
    items = [float(values)]
  elif isinstance(values, (Sequence, np.ndarray)):
    if not all(_is_number(x) for x in values):
      raise ValueError(f"{name}={values!r} must hold numbers only; {how}")
    items = [float(x) for x in values]
  else:
    raise ValueError(f"{name}={values!r} ({type(values).__name__}) is not a number list; {how}")
  if len(items) not in (1, num_heads):
    raise ValueError(f"{name} has {len(items)} values for N={num_heads} query heads; {how}")
  out = np.broadcast_to(np.asarray(items, np.float64), (num_heads,)).copy()
  if not np.all(np.isfinite(out)):
    raise ValueError(f"{name}={values!r} has a non-finite value; spans need finite α, β")
  return out


def check_num_sink(num_sink: int) -> int:
  if isinstance(num_sink, bool) or not isinstance(num_sink, (int, np.integer)) or num_sink < 0:
    raise ValueError(
      f"num_sink={num_sink!r} must be an int >= 0: the leading keys every query keeps (0 = none)"
    )
  return int(num_sink)


def _plan(alphas: Spans, betas: Spans, num_heads: int | None) -> tuple[np.ndarray, np.ndarray]:
  """(α [N], β [N]); N from the longer list when `num_heads` is None (plain-number helpers)."""
  if num_heads is None:
    num_heads = max(_count(alphas), _count(betas))
  a = per_head_values("alphas", alphas, num_heads)
  b = per_head_values("betas", betas, num_heads)
  if np.any(b < 0):
    raise ValueError(f"betas={betas!r} has a negative value; β >= 0 (spans grow with length)")
  return a, b


def _count(values: Spans) -> int:
  if isinstance(values, str):
    return max(1, len([p for p in values.split(",") if p.strip()]))
  return max(1, len(values)) if isinstance(values, (Sequence, np.ndarray)) else 1


def spans(alphas: Spans, betas: Spans, length: int, *, num_heads: int | None = None) -> np.ndarray:
  """int64 [N]: S_h(L) = clip(round(α_h + β_h·L), 1, L), rounding half up."""
  if isinstance(length, bool) or not isinstance(length, (int, np.integer)) or length < 1:
    raise ValueError(f"length={length!r} must be a positive int (the key length L)")
  a, b = _plan(alphas, betas, num_heads)
  return np.clip(np.floor(a + b * length + 0.5), 1, length).astype(np.int64)


def head_masks(
  alphas: Spans,
  betas: Spans,
  *,
  num_heads: int,
  seq_k: int,
  num_sink: int,
  is_causal: bool = True,
) -> tuple[Mask, ...]:
  """Head h's structured mask: window of S_h(seq_k) keys (causal: the query and its S_h − 1
  predecessors; else |i − j| < S_h) OR the first `num_sink` keys. Causality itself comes from
  `is_causal` of the call."""
  num_sink = check_num_sink(num_sink)
  out = []
  for span in spans(alphas, betas, seq_k, num_heads=num_heads):
    reach = int(span) - 1
    window = SlidingWindow(left=reach, right=0 if is_causal else reach)
    out.append(window | AttentionSinks(num_sink) if num_sink else window)
  return tuple(out)


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
  alphas: tuple[float, ...] | float | str = (32.0,),
  betas: tuple[float, ...] | float | str = (0.25,),
  num_sink: int = 4,
  block_q: int = 64,
  block_k: int = 64,
  implementation: str | None = None,
  interpret: bool | None = None,
) -> Float[Array, "B T N V"]:
  """MoA attention (module docstring): head h keeps its elastic window and the sinks.

  Args:
    q, k, v, mask, bias, is_causal, scale, segment_ids, logits_soft_cap: as
      `dot_product_attention` (mask and bias apply to every head, AND-ed with its window).
    alphas, betas: the elastic rule per query head, S_h = clip(round(α_h + β_h·S), 1, S): a
      float, a tuple of 1 or N floats, or a comma-separated string.
    num_sink: leading keys every query keeps (>= 0).
    block_q, block_k: tiles of the chunked / Pallas paths.
    implementation: "xla" (dense per-head mask, the reference), "chunked", "pallas"; None =
      automatic.
    interpret: Pallas interpret mode (None = on CPU).
  """
  B, T, S, N, _, _, _ = _validate.check_qkv(q, k, v, separate_kv_heads=True)
  masks = head_masks(alphas, betas, num_heads=N, seq_k=S, num_sink=num_sink, is_causal=is_causal)
  impl = registry.resolve_implementation(
    implementation, dict.fromkeys(_IMPLEMENTATIONS), family="moa"
  )
  structured = mask if isinstance(mask, Mask) else None
  given = None
  if mask is not None and structured is None:
    given = jnp.asarray(mask)
    if given.dtype != jnp.bool_:
      raise TypeError(f"mask array must be boolean (True = keep), got dtype {given.dtype}")
    given = _validate.broadcast_to_bnts(given, "mask", (B, N, T, S))
  return _attend(
    q,
    k,
    v,
    given,
    bias,
    segment_ids,
    masks=masks,
    structured=structured,
    is_causal=is_causal,
    scale=None if scale is None else float(scale),
    logits_soft_cap=logits_soft_cap,
    implementation=impl,
    block_q=block_q,
    block_k=block_k,
    interpret=interpret,
  )


# One compiled program per static plan: an eager call (the layer's are jitted anyway) would
# otherwise dispatch each head group's attention and its VJP op by op.
_STATIC = ("masks", "structured", "is_causal", "scale", "logits_soft_cap", "implementation")


@functools.partial(jax.jit, static_argnames=(*_STATIC, "block_q", "block_k", "interpret"))
def _attend(q, k, v, given, bias, segment_ids, *, masks, structured, implementation, **kw):
  common = dict(bias=bias, segment_ids=segment_ids, is_causal=kw["is_causal"])
  common.update(scale=kw["scale"], logits_soft_cap=kw["logits_soft_cap"])
  if implementation != "xla":
    return per_head_mask_attention(
      q,
      k,
      v,
      masks,
      mask=structured if given is None else given,
      implementation=implementation,
      block_q=kw["block_q"],
      block_k=kw["block_k"],
      interpret=kw["interpret"],
      **common,
    )
  T, S = q.shape[1], k.shape[1]
  keep_nts = np.stack([m.dense(T, S) for m in masks])
  if structured is not None:
    keep_nts &= structured.dense(T, S)[None]
  keep = jnp.asarray(keep_nts)[None]
  if given is not None:
    keep = keep & given
  return dot_product_attention(q, k, v, mask=keep, implementation="xla", **common)


# ------------------------------------------------------------------ density and reach


def _kept_prefix(width: np.ndarray, length: np.ndarray) -> np.ndarray:
  """Σ_{m=1..length} min(width, m) = w·length − w(w − 1)/2 with w = min(width, length)."""
  w = np.minimum(width, length)
  return w * length - w * (w - 1) // 2


def density(
  alphas: Spans, betas: Spans, num_sink: int, length: int, *, num_heads: int | None = None
) -> np.ndarray:
  """float64 [N]: the kept fraction of the L×L causal matrix per head (closed form).

  Row i keeps min(i + 1, S_h) window keys and min(n, i + 1 − S_h)⁺ sinks before the window, so
  kept = Σ_m min(S_h, m) + Σ_m min(n, m) over m = 1..L and m = 1..L − S_h respectively, out of
  L(L + 1)/2 (the code's `streamingllm_attention_density`). The layer's density is the mean.
  """
  span = spans(alphas, betas, length, num_heads=num_heads)
  n = check_num_sink(num_sink)
  kept = _kept_prefix(span, length) + _kept_prefix(np.full_like(span, n), length - span)
  return kept / (length * (length + 1) / 2)


def effective_context(
  alphas: Spans, betas: Spans, num_sink: int, length: int, *, num_heads: int | None = None
) -> dict[str, np.ndarray]:
  """Per head at length L: "span" S_h(L) (the farthest distance the window reaches, + 1),
  "cache" (keys the last query keeps = KV-cache entries per head while decoding at L:
  S_h + min(n, L − S_h)) and "density" (as `density`)."""
  span = spans(alphas, betas, length, num_heads=num_heads)
  n = check_num_sink(num_sink)
  return {
    "span": span,
    "cache": span + np.minimum(n, length - span),
    "density": density(alphas, betas, num_sink, length, num_heads=num_heads),
  }


# ------------------------------------------------------------------ profile: attention influence


def attention_influence(
  A: Float[Array, "... T S"], dL_dA: Float[Array, "... T S"], *, eps: float = 1e-6
) -> Float[Array, "... T S"]:
  """E_ij: first-order change of L when entry (i, j) is masked and row i renormalised.

  Masking j sets A'_ij = 0 and A'_ik = A_ik / (1 − A_ij), so ΔL ≈ Σ_k G_ik ΔA_ik =
  A_ij (Σ_k A_ik G_ik − G_ij) / (1 − A_ij) with G = ∂L/∂A (exact when L is linear in A). An
  entry holding its whole row (1 − A_ij <= eps) empties it: E = −A_ij G_ij. fp32.
  """
  A = jnp.asarray(A, jnp.float32)
  G = jnp.asarray(dL_dA, jnp.float32)
  if A.shape != G.shape:
    raise ValueError(f"A has shape {A.shape} but dL_dA has {G.shape}; pass matching arrays")
  row = jnp.sum(A * G, axis=-1, keepdims=True)
  rest = 1.0 - A
  alone = rest <= eps
  return jnp.where(alone, -A * G, A * (row - G) / jnp.where(alone, 1.0, rest))


def profile(
  q: Float[Array, "B T N H"],
  k: Float[Array, "B T K H"],
  v: Float[Array, "B T K V"],
  loss_fn,
  *,
  scale: float | None = None,
) -> Float[Array, "N T T"]:
  """E [N, T, T] summed over the batch for a causal prefill whose output goes into
  `loss_fn(out [B,T,N,Hv]) -> scalar` (the profiling pass: A from the dense model, G = ∂L/∂A)."""
  B, T, S, N, K, H, _ = _validate.check_qkv(q, k, v)
  if T != S:
    raise ValueError(f"profile is for causal prefill: T={T} must equal S={S}")
  scale = 1.0 / math.sqrt(H) if scale is None else scale
  k_n, v_n = jnp.repeat(k, N // K, axis=2), jnp.repeat(v, N // K, axis=2)
  logits = jnp.einsum("btnh,bsnh->bnts", q, k_n, preferred_element_type=jnp.float32) * scale
  causal = jnp.tril(jnp.ones((T, T), jnp.bool_))[None, None]
  A = jax.nn.softmax(jnp.where(causal, logits, -jnp.inf), axis=-1)

  def loss_of(A):
    return loss_fn(jnp.einsum("bnts,bsnv->btnv", A, v_n.astype(jnp.float32)))

  G = jax.grad(loss_of)(A)
  return jnp.sum(jnp.where(causal, attention_influence(A, G), 0.0), axis=0)


# ------------------------------------------------------------------ search: candidate losses


def _check_influence(E) -> np.ndarray:
  E = np.asarray(E, np.float64)
  if E.ndim != 3 or E.shape[1] != E.shape[2]:
    raise ValueError(f"E has shape {E.shape}; pass the influence [N, L, L] of a causal prefill")
  return E


def span_loss(
  E: Float[Array, "N L L"], alphas: Spans, betas: Spans, *, num_sink: int
) -> np.ndarray:
  """float64 [N]: Σ E_h over the causal entries head h's mask (α_h, β_h, sinks) drops — the
  predicted loss of the plan (the readable definition; `candidate_losses` is the fast one)."""
  E = _check_influence(E)
  N, L, _ = E.shape
  causal = np.tril(np.ones((L, L), bool))
  keep = np.stack(
    [m.dense(L, L) for m in head_masks(alphas, betas, num_heads=N, seq_k=L, num_sink=num_sink)]
  )
  return np.sum(np.where(causal & ~keep, E, 0.0), axis=(1, 2))


def candidate_losses(
  E: Float[Array, "N L L"], candidates: Sequence[tuple[float, float]], *, num_sink: int
) -> np.ndarray:
  """float64 [N, C]: `span_loss` of every candidate (α, β) for every head, from the sums of E
  along each causal diagonal (a window of span w drops exactly the distances d >= w)."""
  E = _check_influence(E)
  N, L, _ = E.shape
  alphas, betas = _candidate_arrays(candidates)
  i, j = np.tril_indices(L)
  dropped = j >= check_num_sink(num_sink)  # sinks are never dropped
  dist = (i - j)[dropped]
  per_dist = np.stack(
    [np.bincount(dist, weights=E[h][i, j][dropped], minlength=L) for h in range(N)]
  )
  tail = np.concatenate([np.cumsum(per_dist[:, ::-1], axis=1)[:, ::-1], np.zeros((N, 1))], 1)
  return tail[:, spans(alphas, betas, L)]


def _candidate_arrays(candidates) -> tuple[np.ndarray, np.ndarray]:
  pairs = [tuple(c) for c in candidates]
  if not pairs or any(len(p) != 2 for p in pairs):
    raise ValueError(f"candidates={candidates!r} must be a non-empty sequence of (alpha, beta)")
  a, b = (np.asarray(x, np.float64) for x in zip(*pairs, strict=True))
  if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b)) and np.all(b >= 0)):
    raise ValueError(f"candidates={candidates!r} need finite α and β >= 0")
  return a, b


def select_plan(
  E_by_length: Mapping[int, Float[Array, "N L L"]] | Sequence[Float[Array, "N L L"]],
  candidates: Sequence[tuple[float, float]],
  density_budget: float,
  *,
  num_sink: int = 4,
) -> tuple[tuple[float, ...], tuple[float, ...]]:
  """(alphas, betas): one candidate per head, mean density <= budget at every profiled length.

  Loss of head h under candidate c: Σ_L candidate_losses(E_L)[h, c] / Σ|E_L| (causal, non-sink
  entries). Greedy multiple-choice knapsack: every head starts at the sparsest candidate (least
  density summed over lengths; ties: least loss); then, while some head can switch to a
  candidate of lower loss that keeps every length within budget, take the switch with the
  largest loss reduction per unit of its largest density increase (switches that cost nothing
  first). Deterministic; no external solver.
  """
  if isinstance(E_by_length, Mapping):
    for key, e in E_by_length.items():
      if key != np.shape(e)[-1]:
        raise ValueError(f"E_by_length[{key}] has length {np.shape(e)[-1]}; key it by its L")
    E_by_length = list(E_by_length.values())
  arrays = [_check_influence(e) for e in E_by_length]
  if not arrays:
    raise ValueError("E_by_length is empty; pass the influence [N, L, L] of >= 1 length")
  N = arrays[0].shape[0]
  if any(e.shape[0] != N for e in arrays):
    raise ValueError(f"E arrays have head counts {[e.shape[0] for e in arrays]}; they must match")
  if not (_is_number(density_budget) and 0 < density_budget <= 1):
    raise ValueError(f"density_budget={density_budget!r} must be in (0, 1] (mean kept fraction)")
  alphas, betas = _candidate_arrays(candidates)
  n = check_num_sink(num_sink)
  lengths = [e.shape[-1] for e in arrays]
  cost = np.stack([density(alphas, betas, n, L) for L in lengths])  # [lengths, C]
  loss = np.zeros((N, alphas.size))
  for e, L in zip(arrays, lengths, strict=True):
    i, j = np.tril_indices(L)
    scale = np.sum(np.abs(e[:, i, j][:, j >= n]))
    loss += candidate_losses(e, candidates, num_sink=n) / max(scale, np.finfo(np.float64).tiny)

  total = cost.sum(0)
  cheapest = np.flatnonzero(total <= total.min() + 1e-12)
  current = cheapest[np.argmin(loss[:, cheapest], axis=1)]
  cap = N * density_budget + 1e-9
  used = cost[:, current].sum(1)
  if np.any(used > cap):
    raise ValueError(
      f"density_budget={density_budget} is below the sparsest candidate's density "
      f"{dict(zip(lengths, np.round(used / N, 4).tolist(), strict=True))} (per length); raise "
      "the budget or add sparser candidates"
    )
  while True:
    gain = loss[np.arange(N), current][:, None] - loss  # [N, C]
    step = cost[:, None, :] - cost[:, current][:, :, None]  # [lengths, N, C]
    feasible = np.all(used[:, None, None] + step <= cap, axis=0) & (gain > 1e-12)
    if not feasible.any():
      break
    worst = step.max(0)
    free = feasible & (worst <= 0)
    score = (
      np.where(free, gain, -np.inf)
      if free.any()
      else np.where(feasible, gain / np.maximum(worst, 1e-300), -np.inf)
    )
    h, c = np.unravel_index(np.argmax(score), score.shape)
    used = used + step[:, h, c]
    current[h] = c
  return tuple(alphas[current].tolist()), tuple(betas[current].tolist())


# ------------------------------------------------------------------ registry entry


def _conformance_plan(d: registry.Dims) -> dict:
  """Heterogeneous spans on the suite's short sequences: heads 0 and 2 share a window (one
  call), head 1 is elastic, head 3 wide; 2 sinks."""
  a, b = (3.0, 0.0, 3.0, 12.0), (0.0, 0.25, 0.0, 0.5)
  return dict(
    alphas=tuple(a[n % 4] for n in range(d.N)),
    betas=tuple(b[n % 4] for n in range(d.N)),
    num_sink=2,
  )


_SUITE_TILES = dict(block_q=8, block_k=8)  # several tiles on the suite's short rows: windows skip

FAMILY = registry.Family(
  name="moa",
  attention=attention,
  implementations=_IMPLEMENTATIONS,
  paper="Mixture of Attention Spans: Optimizing LLM Inference Efficiency with Heterogeneous "
  "Sliding-Window Lengths (arXiv 2406.14909)",
  conformance=registry.Conformance(
    cases={"default": registry.ConformanceCase(options=_conformance_plan)},
    implementation_options={
      "chunked": _SUITE_TILES,
      "pallas": {**_SUITE_TILES, "interpret": True},
    },
    slow=("pallas",),
    benchmark={"default": registry.ConformanceCase()},  # the family's default spans
  ),
)
