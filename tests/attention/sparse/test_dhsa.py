"""DHSA's own invariants (arXiv 2510.24606; spec: shared/papers/efficient.md §7.3).

The conformance suite (generated from the registry) covers shapes, jit, causality, GQA, masked
rows and chunked-vs-xla on its default setting; here: the output is the dense masked softmax
over the keys `idx` lists, the selection on hand-checked cases (local keys, ties, budget), the
local keys are always selected, a full budget is dense attention, √len normalisation on
constant keys, causality by gradient inside a block, chunked = xla forward and gradients
(fixed and mass boundaries, masks), the mass-ratio labels and their NMS, bad input.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnzoo import masks
from attnzoo.attention import dot_product_attention
from attnzoo.attention.sparse import dhsa, dhsa_chunks
from tests.attention.conformance import random_qkv
from tests.tolerances import assert_close

B, T, N, K, H = 2, 44, 4, 2, 8  # 44 = 5 blocks of 8 + a short one of 4
KNOBS = dict(block_size=8, topk_tokens=12, local_tokens=3, chunk_size=5, block_q=8, block_k=8)
_STATIC = (
  "mask",
  "is_causal",
  "block_size",
  "topk_tokens",
  "local_tokens",
  "boundaries",
  "chunk_size",
  "num_chunks",
  "block_q",
  "block_k",
  "pooling",
  "implementation",
)
_attention = jax.jit(dhsa.attention, static_argnames=_STATIC)
_select = jax.jit(
  dhsa.dhsa_select,
  static_argnames=("block_size", "topk_tokens", "local_tokens", "pooling", "is_causal", "mask"),
)


def run(q, k, v, **kw):
  """The family, jitted (one compile instead of op-by-op dispatch)."""
  return _attention(q, k, v, **{**KNOBS, **kw})


def numpy_attention_from_idx(q, k, v, idx, block_size, is_causal, keep=None):
  """float64 softmax over each query's keys: j ∈ idx[t // block_size] (∧ j <= t, ∧ keep)."""
  q, k, v, idx = (np.asarray(x, np.float64) for x in (q, k, v, idx))
  Bq, Tq, Nq, Hq = q.shape
  S, Kk = k.shape[1], k.shape[2]
  out = np.zeros((Bq, Tq, Nq, v.shape[-1]))
  for b in range(Bq):
    for t in range(Tq):
      keys = idx[b, t // block_size]
      keys = keys[keys < S].astype(int)
      if is_causal:
        keys = keys[keys <= t]
      if keep is not None:
        keys = keys[keep[t, keys]]
      if keys.size == 0:
        continue
      for n in range(Nq):
        kv = n // (Nq // Kk)
        logits = k[b, keys, kv] @ q[b, t, n] / np.sqrt(Hq)
        p = np.exp(logits - logits.max())
        out[b, t, n] = (p / p.sum()) @ v[b, keys, kv]
  return out


# ------------------------------------------------------------------ out = masked softmax over idx


# The reference only: chunked = xla is tested below and by the conformance suite.
@pytest.mark.parametrize(
  ("boundaries", "is_causal"),
  [("fixed", False), ("fixed", True), pytest.param("mass", True, marks=pytest.mark.slow)],
)
def test_output_is_the_dense_softmax_over_the_selected_keys(boundaries, is_causal):
  q, k, v = random_qkv(0, B, T, T, N, K, H)
  kw = dict(is_causal=is_causal, boundaries=boundaries, num_chunks=6)
  out, aux = run(q, k, v, implementation="xla", **kw)
  if boundaries == "fixed":
    bounds = dhsa_chunks.fixed_chunk_boundaries(T, KNOBS["chunk_size"])
  else:
    bounds = dhsa_chunks.attention_mass_boundaries(q, k, 6, is_causal=is_causal)
  idx = _select(
    q, k, boundaries=bounds, block_size=8, topk_tokens=12, local_tokens=3, is_causal=is_causal
  )
  assert idx.shape == (B, 6, 12)
  want = numpy_attention_from_idx(q, k, v, idx, 8, is_causal)
  assert_close(out, want)
  # Really sparse: 12 of up to 44 keys per block, unlike dense attention.
  assert float(aux.metrics["dhsa_density"]) < 0.6
  dense = dot_product_attention(q, k, v, is_causal=is_causal, implementation="xla")
  assert not np.allclose(np.asarray(out), np.asarray(dense), atol=1e-3)


@pytest.mark.parametrize("is_causal", [pytest.param(False, marks=pytest.mark.slow), True])
def test_full_budget_is_dense_attention(is_causal):
  q, k, v = random_qkv(1, B, T, T, N, K, H)
  for implementation in ("xla", "chunked") if is_causal else ("xla",):
    out, aux = run(q, k, v, topk_tokens=T, is_causal=is_causal, implementation=implementation)
    dense = dot_product_attention(q, k, v, is_causal=is_causal, implementation="xla")
    assert_close(out, dense, err_msg=implementation)
    np.testing.assert_allclose(float(aux.metrics["dhsa_density"]), 1.0, rtol=1e-6)
  # A budget beyond S is capped at S keys (every allowed key).
  idx = _select(
    q,
    k,
    boundaries=dhsa_chunks.fixed_chunk_boundaries(T, 5),
    block_size=8,
    topk_tokens=1000,
    local_tokens=3,
    is_causal=is_causal,
  )
  assert idx.shape == (B, 6, T)


# ------------------------------------------------------------------ the selection


def _hand_case():
  """H = 1, q ≡ 1, chunks of 2 keys valued 1, 3, -1, 2: S[b, c] = 2·√2·value_c for every
  4-query block (q̄ = 1·√4, k̄_c = value_c·√2)."""
  q = jnp.ones((1, 8, 1, 1))
  k = jnp.asarray(np.repeat([1.0, 3.0, -1.0, 2.0], 2), jnp.float32).reshape(1, 8, 1, 1)
  bounds = dhsa_chunks.fixed_chunk_boundaries(8, 2)
  scores = dhsa.chunk_scores(q, k, boundaries=bounds, block_size=4)
  assert_close(scores[0], 2 * np.sqrt(2) * np.array([[1.0, 3.0, -1.0, 2.0]] * 2))
  return q, k, bounds


def test_selection_hand_checked_causal():
  q, k, bounds = _hand_case()
  idx = dhsa.dhsa_select(
    q, k, boundaries=bounds, block_size=4, topk_tokens=4, local_tokens=1, is_causal=True
  )
  # Block 0 may read keys 0..3 only: all four. Block 1: the local key 7, then the best
  # chunks: keys 2, 3 (chunk 1, score ∝ 3) and key 6 (chunk 3, ∝ 2).
  np.testing.assert_array_equal(np.asarray(idx[0]), [[0, 1, 2, 3], [2, 3, 6, 7]])
  # A budget past the allowed keys pads with S = 8.
  idx = dhsa.dhsa_select(
    q, k, boundaries=bounds, block_size=4, topk_tokens=6, local_tokens=1, is_causal=True
  )
  np.testing.assert_array_equal(np.asarray(idx[0]), [[0, 1, 2, 3, 8, 8], [0, 1, 2, 3, 6, 7]])


def test_selection_hand_checked_bidirectional_ties_keep_the_lower_key():
  q, k, bounds = _hand_case()
  idx = dhsa.dhsa_select(
    q, k, boundaries=bounds, block_size=4, topk_tokens=5, local_tokens=1, is_causal=False
  )
  # Block 0: local key 3 (the last below its end), then chunk 1 (key 2), chunk 3 (keys 6, 7),
  # then chunk 0 whose keys 0 and 1 tie: the lower, key 0.
  np.testing.assert_array_equal(np.asarray(idx[0]), [[0, 2, 3, 6, 7], [0, 2, 3, 6, 7]])
  # local_tokens = 0: pure score order (chunk 1, chunk 3, then key 0 of chunk 0).
  idx = dhsa.dhsa_select(
    q, k, boundaries=bounds, block_size=4, topk_tokens=5, local_tokens=0, is_causal=False
  )
  np.testing.assert_array_equal(np.asarray(idx[0]), [[0, 2, 3, 6, 7], [0, 2, 3, 6, 7]])
  # Local keys use up the budget: block 0 keeps keys 1, 2, 3 and fills 2 slots from chunk 3
  # (keys 6, 7), not from the lower-scored chunk 0.
  idx = dhsa.dhsa_select(
    q, k, boundaries=bounds, block_size=4, topk_tokens=5, local_tokens=3, is_causal=False
  )
  np.testing.assert_array_equal(np.asarray(idx[0, 0]), [1, 2, 3, 6, 7])


@pytest.mark.parametrize("seed", [0, pytest.param(1, marks=pytest.mark.slow)])
def test_the_local_keys_are_always_selected_and_the_budget_is_exact(seed):
  rng = np.random.default_rng(seed)
  T_, S_ = (int(x) for x in rng.integers(12, 40, 2))
  block_size = int(rng.integers(1, 9))
  topk = int(rng.integers(1, 16))
  local = int(rng.integers(0, topk + 1))
  is_causal = bool(seed % 2)
  if is_causal:
    S_ = T_
  q, k, _ = random_qkv(seed, 2, T_, S_, 2, 1, H)
  # Uneven chunks, different per batch element, with an empty one.
  bounds = np.array([[0, 3, 3, 10, S_], [0, 1, 7, S_ - 2, S_]], np.int32)
  keep = np.random.default_rng(seed + 10).random((T_, S_)) < 0.7
  idx = np.asarray(
    dhsa.dhsa_select(
      q,
      k,
      boundaries=bounds,
      block_size=block_size,
      topk_tokens=topk,
      local_tokens=local,
      is_causal=is_causal,
      mask=masks.DenseMask(keep),
    )
  )
  assert idx.shape == (2, -(-T_ // block_size), min(topk, S_))
  for b in range(2):
    for blk in range(idx.shape[1]):
      rows = slice(blk * block_size, min((blk + 1) * block_size, T_))
      allowed = keep[rows].copy()
      if is_causal:
        allowed &= np.arange(S_)[None, :] <= np.arange(T_)[rows, None]
      allowed = np.flatnonzero(allowed.any(0))
      chosen = idx[b, blk][idx[b, blk] < S_]
      np.testing.assert_array_equal(np.sort(chosen), chosen)  # ascending
      assert set(chosen) <= set(allowed)
      assert len(chosen) == min(topk, len(allowed))  # the whole budget, or every allowed key
      end = min((blk + 1) * block_size, T_)
      recent = allowed[allowed < end][-local:] if local else []
      assert set(recent) <= set(chosen), (b, blk, recent, chosen)


# ------------------------------------------------------------------ √len normalisation


def test_chunk_scores_scale_with_the_square_root_of_the_chunk_length():
  # Constant keys u everywhere: every chunk has mean u, so only its length separates them.
  u = jax.random.normal(jax.random.key(3), (H,))
  k = jnp.broadcast_to(u, (1, 30, 2, H))
  q, _, _ = random_qkv(4, 1, 10, 30, 2, 2, H)
  bounds = np.array([0, 1, 5, 14, 30], np.int32)  # lengths 1, 4, 9, 16
  lengths = np.diff(bounds).astype(np.float64)
  norm = dhsa.chunk_scores(q, k, boundaries=bounds, block_size=4)
  plain = dhsa.chunk_scores(q, k, boundaries=bounds, block_size=4, pooling="avgpool")
  # S[b, c] ∝ √|C_c| with avgpool_norm; equal across chunks with the plain mean.
  assert_close(norm / norm[..., :1], np.broadcast_to(np.sqrt(lengths), norm.shape))
  assert_close(plain / plain[..., :1], np.ones(plain.shape))
  # Query blocks scale by √len too: the last block has 2 queries (10 = 4 + 4 + 2).
  q_bar = dhsa.block_representations(q, 4)
  q_mean = np.asarray(q, np.float64).mean(2)
  assert_close(q_bar[0, 2], q_mean[0, 8:].mean(0) * np.sqrt(2))
  assert_close(q_bar[0, 0], q_mean[0, :4].mean(0) * 2.0)
  # Doubling one chunk's length (the others fixed) multiplies its score by √2.
  longer = dhsa.chunk_scores(
    q, jnp.broadcast_to(u, (1, 34, 2, H)), boundaries=np.array([0, 1, 5, 18, 34]), block_size=4
  )
  assert_close(longer[..., 2] / norm[..., 2], np.full(norm.shape[:2], np.sqrt(13 / 9)))
  assert_close(longer[..., 1], norm[..., 1])


# ------------------------------------------------------------------ causality, chunked = xla


@pytest.mark.parametrize("implementation", [pytest.param("xla", marks=pytest.mark.slow), "chunked"])
def test_causality_by_gradient_inside_a_block(implementation):
  q, k, v = random_qkv(5, 1, 24, 24, 2, 1, H)
  out, pullback = jax.vjp(
    lambda k, v: run(q, k, v, is_causal=True, implementation=implementation)[0], k, v
  )
  # t = 8 is the first query of block 1: its block selects keys up to 15, which t must not read.
  for t in (8, 13):
    dk, dv = pullback(jnp.zeros_like(out).at[:, t].set(1.0))
    np.testing.assert_array_equal(np.asarray(dk[:, t + 1 :]), 0.0)
    np.testing.assert_array_equal(np.asarray(dv[:, t + 1 :]), 0.0)
    assert np.abs(np.asarray(dv[:, : t + 1])).sum() > 0


@pytest.mark.parametrize(
  "setting",
  [
    dict(is_causal=True),
    pytest.param(dict(is_causal=True, boundaries="mass", num_chunks=5), marks=pytest.mark.slow),
    pytest.param(
      dict(is_causal=False, mask=masks.SlidingWindow(left=12, right=3)), marks=pytest.mark.slow
    ),
  ],
  ids=["causal", "causal_mass", "window"],
)
def test_chunked_matches_xla_forward_and_gradients(setting):
  q, k, v = random_qkv(6, B, T, T, N, K, H)
  cot = jax.random.normal(jax.random.key(7), (B, T, N, H))

  def loss(implementation, q, k, v):
    out, aux = run(q, k, v, implementation=implementation, **setting)
    return jnp.sum(out * cot), (out, aux)

  def value_and_grads(implementation):
    fn = jax.value_and_grad(functools.partial(loss, implementation), (0, 1, 2), has_aux=True)
    return jax.jit(fn)(q, k, v)

  (_, (want, aux)), want_grads = value_and_grads("xla")
  (_, (got, got_aux)), got_grads = value_and_grads("chunked")
  assert_close(got, want)
  for name, g, wg in zip("qkv", got_grads, want_grads, strict=True):
    assert_close(g, wg, grad=True, err_msg=f"d{name}")
  for name, m in aux.metrics.items():  # the same selection; means may differ in the last bit
    np.testing.assert_allclose(np.asarray(got_aux.metrics[name]), np.asarray(m), 1e-6, 0, name)
  # Some tiles are skipped.
  assert float(aux.metrics["dhsa_tile_density"]) < 0.9


def test_a_static_mask_bounds_the_selection_and_the_output():
  q, k, v = random_qkv(8, 1, 20, 20, 2, 1, H)
  window = masks.SlidingWindow(left=5, right=0)
  idx = np.asarray(
    dhsa.dhsa_select(
      q,
      k,
      boundaries=dhsa_chunks.fixed_chunk_boundaries(20, 3),
      block_size=4,
      topk_tokens=6,
      local_tokens=2,
      is_causal=False,
      mask=window,
    )
  )
  dense = window.dense(20, 20)
  for blk in range(5):
    allowed = dense[4 * blk : 4 * blk + 4].any(0)
    chosen = idx[0, blk][idx[0, blk] < 20]
    assert allowed[chosen].all()
  out, _ = run(q, k, v, mask=window, block_size=4, topk_tokens=6, local_tokens=2, chunk_size=3)
  want = numpy_attention_from_idx(q, k, v, idx, 4, False, keep=dense)
  assert_close(out, want)


# ------------------------------------------------------------------ boundaries


def test_fixed_boundaries():
  np.testing.assert_array_equal(dhsa_chunks.fixed_chunk_boundaries(10, 4), [0, 4, 8, 10])
  np.testing.assert_array_equal(dhsa_chunks.fixed_chunk_boundaries(8, 4), [0, 4, 8])
  np.testing.assert_array_equal(dhsa_chunks.fixed_chunk_boundaries(3, 8), [0, 3])


def _numpy_mass_ratio(probs, window):
  """The label formula by loops, float64 (probs [T, S], head-averaged attention)."""
  T_, S_ = probs.shape
  out = np.zeros(S_)
  for p in range(window - 1, S_ - window):
    rows = probs[p + window :]
    past = rows[:, p - window + 1 : p + 1].sum()
    future = rows[:, p + 1 : p + window + 1].sum()
    out[p] = (max(past, future) + 1e-6) / (min(past, future) + 1e-6)
  return out


@pytest.mark.parametrize("is_causal", [pytest.param(False, marks=pytest.mark.slow), True])
def test_attention_mass_ratio_matches_the_formula(is_causal):
  q, k, _ = random_qkv(9, 1, 24, 24, 4, 2, H, scale=2.0)
  ratio = dhsa_chunks.attention_mass_ratio(q, k, window=3, is_causal=is_causal)
  logits = np.einsum("tnh,snh->nts", np.asarray(q[0]), np.repeat(np.asarray(k[0]), 2, 1))
  logits = logits / np.sqrt(H)
  if is_causal:
    logits = np.where(np.tril(np.ones((24, 24), bool)), logits, -np.inf)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs = (probs / probs.sum(-1, keepdims=True)).mean(0)
  assert_close(ratio[0], _numpy_mass_ratio(probs, 3))


def test_mass_boundaries_find_planted_segments():
  # Keys in three segments along orthogonal directions; every query reads segment 1. Later
  # queries' mass jumps at 15|16 and 31|32, nowhere else.
  S_ = 48
  seg = np.repeat([0, 1, 2], 16)
  k = jnp.asarray(4.0 * np.eye(H)[seg])[None, :, None]
  q = jnp.asarray(np.broadcast_to(2.0 * np.eye(H)[1], (S_, H)))[None, :, None]
  for is_causal in (False, True):
    bounds = dhsa_chunks.attention_mass_boundaries(q, k, 3, window=4, nms=8, is_causal=is_causal)
    np.testing.assert_array_equal(np.asarray(bounds), [[0, 16, 32, 48]])
  # More chunks than planted boundaries above θ: the rest are empty (repeated S)...
  ratio = dhsa_chunks.attention_mass_ratio(q, k, window=4)
  far = np.abs(np.arange(24) - 15) > 4  # the first half, away from the boundary at 15
  assert float(jnp.max(ratio[0, :24][far])) < 1.1
  bounds = dhsa_chunks.select_boundaries(ratio, 6, theta=1.1, nms=8)
  assert bounds.shape == (1, 7)
  assert np.asarray(bounds)[0, -1] == S_ and {16, 32} <= set(np.asarray(bounds)[0].tolist())
  # ...and the family reports the chunks it used.
  v = jnp.ones((1, S_, 1, 2))
  _, aux = run(q, k, v, boundaries="mass", num_chunks=3, is_causal=True)
  assert float(aux.metrics["dhsa_chunks"]) == 3.0


def test_nms_threshold_and_ties():
  ratio = jnp.asarray([[1.0, 5.0, 4.0, 1.05, 5.0, 3.0, 2.0, 1.0, 9.0, 1.0]])
  # θ = 1.1 drops 1.05. Greedy: 9 at 8 (drops 6), then the tie 5 at 1 and 4 → the lower
  # position 1 (drops 2), then 5 at 4 (drops 5); nothing is left: 3 boundaries, then S.
  bounds = dhsa_chunks.select_boundaries(ratio, 5, theta=1.1, nms=2)
  np.testing.assert_array_equal(np.asarray(bounds), [[0, 2, 5, 9, 10, 10]])
  # nms = 0 suppresses only the chosen position itself.
  bounds = dhsa_chunks.select_boundaries(ratio, 4, theta=1.1, nms=0)
  np.testing.assert_array_equal(np.asarray(bounds), [[0, 2, 5, 9, 10]])
  # Nothing above θ: one chunk.
  bounds = dhsa_chunks.select_boundaries(ratio, 4, theta=100.0, nms=0)
  np.testing.assert_array_equal(np.asarray(bounds), [[0, 10, 10, 10, 10]])


def test_boundaries_as_arrays_and_callables():
  q, k, v = random_qkv(10, B, T, T, N, K, H)
  per_batch = np.array([[0, 7, 20, 44, 44], [0, 2, 3, 30, 44]], np.int32)

  @jax.jit
  def traced(q, k, v, bounds):  # boundaries traced: their values are not checked
    return dhsa.attention(q, k, v, boundaries=bounds, is_causal=True, **KNOBS)

  out, aux = traced(q, k, v, jnp.asarray(per_batch))
  idx = dhsa.dhsa_select(q, k, boundaries=per_batch, block_size=8, topk_tokens=12, local_tokens=3)
  assert_close(out, numpy_attention_from_idx(q, k, v, idx, 8, True))
  assert float(aux.metrics["dhsa_chunks"]) == 3.5  # 3 and 4 non-empty chunks
  out_fn, _ = dhsa.attention(
    q, k, v, boundaries=lambda keys: per_batch, is_causal=True, implementation="xla", **KNOBS
  )
  assert_close(out_fn, out)


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
  ("knobs", "match"),
  [
    (dict(topk_tokens=4, local_tokens=8), r"local_tokens=8 exceeds topk_tokens=4"),
    (dict(block_size=0), r"block_size=0 must be an int >= 1"),
    (dict(block_size=-3), r"block_size=-3 must be an int >= 1"),
    (dict(topk_tokens=0, local_tokens=0), r"topk_tokens=0 must be an int >= 1"),
    (dict(local_tokens=-1), r"local_tokens=-1 must be an int >= 0"),
    (dict(block_size=2.5), r"block_size=2.5 must be an int"),
    (dict(chunk_size=0), r"chunk_size=0 must be an int >= 1"),
    (dict(boundaries="learned"), r"boundaries='learned' must be one of \('fixed', 'mass'\)"),
    (dict(boundaries="mass", num_chunks=0), r"num_chunks=0 must be an int >= 1"),
    (dict(boundaries="mass", boundary_window=0), r"window=0 must be an int >= 1"),
    (dict(pooling="maxpool"), r"pooling='maxpool' must be one of"),
    (dict(block_q=0), r"block_q=0 must be an int >= 1"),
    (dict(boundaries=np.array([1, 5, 12])), r"must start at 0, end at S=12"),
    (dict(boundaries=np.array([0, 8, 5, 12])), r"not decrease"),
    (dict(boundaries=np.array([[0, 12]] * 3)), r"must be int \[C\+1\] or \[B, C\+1\]"),
    (dict(boundaries=np.array([0.0, 12.0])), r"integer positions"),
  ],
)
def test_bad_knobs_raise_naming_the_value(knobs, match):
  q, k, v = random_qkv(0, 2, 12, 12, 2, 1, H)
  kw = {**KNOBS, **knobs}
  with pytest.raises(ValueError, match=match):
    dhsa.attention(q, k, v, implementation="xla", **kw)
