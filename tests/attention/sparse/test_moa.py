"""MoA's own invariants (arXiv 2406.14909; spec: shared/papers/efficient.md §8).

The conformance suite (generated from the registry) covers shapes, jit, causality, GQA, masked
rows, odd lengths and chunked / Pallas vs xla on a heterogeneous plan; here: the elastic rule
and its knobs, the per-head keep pattern against its definition, xla against an independent
numpy softmax, chunked = xla with sinks on longer rows, the closed-form density and reach, the
influence formula against actually masking entries, candidate losses, the plan search (budget
at every length, planted long-range heads get the wide spans, = exhaustive optimum), bad input.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnzoo.attention import FAMILIES, dot_product_attention
from attnzoo.attention.sparse import moa
from configs import lm_bytes
from tests.attention.conformance import random_qkv
from tests.tolerances import assert_close

PLAN = dict(alphas=(3.0, 0.0, 8.0, -4.0), betas=(0.0, 0.25, 0.0, 0.5), num_sink=3)


def numpy_keep(spans, num_sink, T, S, is_causal):
  """keep[h, i, j] from the docstring's definition, written independently of the masks."""
  i, j = np.arange(T)[:, None], np.arange(S)[None, :]
  d = i - j
  out = []
  for s in spans:
    window = (d >= 0) & (d < s) if is_causal else np.abs(d) < s
    keep = window | (j < num_sink)
    out.append(keep & (j <= i) if is_causal else keep)
  return np.stack(out)


# ------------------------------------------------------------------ the elastic rule and knobs


def test_spans_follow_the_elastic_rule_rounded_half_up_and_clipped():
  got = moa.spans((0.0, -5.0, 10.0, 2.5, 1.0), (0.5, 0.0, 0.0, 0.0, 2.0), 10)
  np.testing.assert_array_equal(got, [5, 1, 10, 3, 10])  # 5; clip 1; 10; 2.5 -> 3; clip 10
  np.testing.assert_array_equal(moa.spans(3.0, 0.25, 100, num_heads=2), [28, 28])


@pytest.mark.parametrize(
  "alphas", [(4.0, 4.0, 4.0, 4.0), (4.0,), 4.0, 4, "4", "4, 4,4,4", [4.0, 4.0, 4.0, 4.0]]
)
def test_knob_forms_are_equivalent(alphas):
  np.testing.assert_array_equal(moa.per_head_values("alphas", alphas, 4), [4.0] * 4)


@pytest.mark.parametrize(
  "kw, match",
  [
    (dict(alphas=(1.0, 2.0, 3.0)), r"alphas has 3 values for N=4 query heads"),
    (dict(betas="0.1,0.2"), r"betas has 2 values for N=4"),
    (dict(alphas="1,two"), r"not a comma-separated list"),
    (dict(alphas=float("nan")), r"non-finite"),
    (dict(alphas=True), r"not a number list"),
    (dict(alphas=(1.0, None, 1.0, 1.0)), r"numbers only"),
    (dict(betas=-0.1), r"negative"),
    (dict(num_sink=-1), r"num_sink=-1 must be an int >= 0"),
    (dict(num_sink=2.0), r"num_sink=2.0 must be an int"),
  ],
)
def test_bad_knobs_raise_clearly(kw, match):
  q, k, v = random_qkv(0, 1, 8, 8, 4, 2, 8, 8)
  with pytest.raises(ValueError, match=match):
    moa.attention(q, k, v, is_causal=True, implementation="xla", **{**PLAN, **kw})


def test_config_knobs_take_per_head_tuples():
  c = lm_bytes.get_config("smoke,attention=moa")
  assert c.model.knobs.moa.alphas == (32.0,) and c.model.knobs.moa.num_sink == 4
  c.model.knobs.moa.alphas = (8.0, 16.0, 32.0, 64.0)  # a tuple field takes any tuple
  c.model.knobs.moa.betas = (0.0, 0.5, 0.0, 0.25)
  assert FAMILIES["moa"] is moa.FAMILY


# ------------------------------------------------------------------ the keep pattern


@pytest.mark.parametrize("is_causal", [True, False])
def test_head_masks_are_window_or_sinks(is_causal):
  T = S = 40
  masks = moa.head_masks(**PLAN, num_heads=4, seq_k=S, is_causal=is_causal)
  keep = np.stack([m.dense(T, S) for m in masks])
  if is_causal:
    keep &= np.tril(np.ones((T, S), bool))
  want = numpy_keep(moa.spans(PLAN["alphas"], PLAN["betas"], S), 3, T, S, is_causal)
  np.testing.assert_array_equal(keep, want)
  assert len(set(masks)) == 4


def numpy_attention(q, k, v, keep):
  """float64 softmax per head over `keep` [N, T, S] (GQA: head n reads kv head n // G)."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  G = q.shape[2] // k.shape[2]
  k, v = np.repeat(k, G, axis=2), np.repeat(v, G, axis=2)
  logits = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(q.shape[-1])
  logits = np.where(keep[None], logits, -np.inf)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  return np.einsum("bnts,bsnv->btnv", p, v)


@pytest.mark.parametrize("is_causal", [True, False])
def test_xla_reference_is_per_head_softmax_over_window_and_sinks(is_causal):
  T = 33
  q, k, v = random_qkv(1, 2, T, T, 4, 2, 8, 8)
  out = moa.attention(q, k, v, is_causal=is_causal, implementation="xla", **PLAN)
  keep = numpy_keep(moa.spans(PLAN["alphas"], PLAN["betas"], T), 3, T, T, is_causal)
  assert_close(out, numpy_attention(q, k, v, keep))


def test_chunked_matches_xla_forward_and_gradients_on_longer_rows():
  T = 80  # 10 tiles of 8: windows of 3-40 keys skip most tiles
  q, k, v = random_qkv(2, 1, T, T, 4, 2, 8, 8)
  cot = jax.random.normal(jax.random.key(7), (1, T, 4, 8))

  def value_and_grads(impl):
    def loss(q, k, v):
      out = moa.attention(
        q, k, v, is_causal=True, implementation=impl, block_q=8, block_k=8, **PLAN
      )
      return jnp.sum(out * cot), out

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)

  (_, out), grads = value_and_grads("chunked")
  (_, want), want_grads = value_and_grads("xla")
  assert_close(out, want)
  for name, g, w in zip("qkv", grads, want_grads, strict=True):
    assert_close(g, w, grad=True, err_msg=f"d{name}")


# ------------------------------------------------------------------ density and reach


@pytest.mark.parametrize(
  "alphas, betas, num_sink, L",
  [
    (PLAN["alphas"], PLAN["betas"], 3, 40),
    ((1.0, 5.0, 100.0), (0.0, 0.1, 0.0), 0, 17),  # span 1, elastic, span > L (dense)
    ((2.0, 6.0), (0.0, 0.0), 10, 8),  # more sinks than keys
    ((4.0,), (0.0,), 4, 9),  # the sinks lie inside the first windows
    ((0.0,), (1.0,), 2, 1),
  ],
)
def test_density_closed_form_equals_the_family_masks(alphas, betas, num_sink, L):
  N = len(alphas)
  masks = moa.head_masks(alphas, betas, num_heads=N, seq_k=L, num_sink=num_sink)
  causal = np.tril(np.ones((L, L), bool))
  keep = np.stack([m.dense(L, L) & causal for m in masks])
  counted = keep.sum((1, 2)) / causal.sum()
  np.testing.assert_allclose(moa.density(alphas, betas, num_sink, L), counted, rtol=1e-12)
  report = moa.effective_context(alphas, betas, num_sink, L)
  np.testing.assert_array_equal(report["cache"], keep[:, -1].sum(-1))
  np.testing.assert_array_equal(report["span"], moa.spans(alphas, betas, L))
  np.testing.assert_allclose(report["density"], counted, rtol=1e-12)


def test_streamingllm_density_matches_the_codes_loop():
  """The official `streamingllm_attention_density(global, band, L)` double loop."""
  g, band, L = 4, 12, 50
  want = sum((j < g) or (i - j < band) for i in range(L) for j in range(i + 1)) / (L * (L + 1) / 2)
  np.testing.assert_allclose(moa.density(float(band), 0.0, g, L), [want], rtol=1e-12)


# ------------------------------------------------------------------ attention influence


def test_influence_is_exact_for_a_loss_linear_in_the_row():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=7) * 2
  A = np.exp(logits) / np.exp(logits).sum()
  G = rng.normal(size=7)
  E = np.asarray(moa.attention_influence(A[None], G[None]))[0]
  for j in range(7):
    masked = np.where(np.arange(7) == j, 0.0, A) / (1 - A[j])  # mask, renormalise
    np.testing.assert_allclose(E[j], G @ masked - G @ A, rtol=1e-4, atol=1e-6)
  # The lone key of a row: masking it empties the row (zeros), ΔL = −A·G.
  lone = moa.attention_influence(jnp.asarray([[1.0, 0.0]]), jnp.asarray([[0.7, -2.0]]))
  np.testing.assert_allclose(np.asarray(lone), [[-0.7, 0.0]])


def test_profiled_influence_predicts_masking_entries_of_real_attention():
  """E from `profile` vs the loss change of actually masking each causal entry (one at a time)
  in the attention (renormalised by the softmax): first order, |ΔL − E| = O((A/(1 − A))²); and
  closer than the plain saliency −A·G that leaves out the renormalisation (spec §8.5)."""
  B, T, N, K = 1, 12, 2, 1
  q, k, v = random_qkv(0, B, T, T, N, K, 8, 4)
  w = jax.random.normal(jax.random.key(1), (B, T, N, 4))

  def loss_fn(out):
    return jnp.sum(jnp.tanh(out) * w)

  E = np.asarray(moa.profile(q, k, v, loss_fn))

  @jax.jit
  def loss_with(keep):
    return loss_fn(dot_product_attention(q, k, v, mask=keep, is_causal=True, implementation="xla"))

  full = np.ones((1, N, T, T), bool)
  base = float(loss_with(full))
  logits = np.einsum("btnh,bsnh->bnts", np.asarray(q), np.asarray(k).repeat(N, 2)) / np.sqrt(8)
  logits = np.where(np.tril(np.ones((T, T), bool)), logits, -np.inf)
  A = np.exp(logits - logits.max(-1, keepdims=True))
  A = (A / A.sum(-1, keepdims=True))[0]
  vn = jnp.asarray(np.asarray(v).repeat(N, 2))
  G = np.asarray(
    jax.grad(lambda a: loss_fn(jnp.einsum("bnts,bsnv->btnv", a, vn)))(jnp.asarray(A)[None])
  )[0]
  changes, predicted, saliency, a = [], [], [], []
  for n, i in itertools.product(range(N), range(1, T)):  # row 0 has one key: not first order
    for j in range(i + 1):
      keep = full.copy()
      keep[0, n, i, j] = False
      changes.append(float(loss_with(keep)) - base)
      predicted.append(E[n, i, j])
      saliency.append(-A[n, i, j] * G[n, i, j])
      a.append(A[n, i, j])
  changes, predicted, saliency, a = map(np.asarray, (changes, predicted, saliency, a))
  # The constant bounds the loss's curvature here (3.8 measured); a wrong sign or a missing
  # term breaks it by orders of magnitude on the small-A entries.
  assert np.all(np.abs(changes - predicted) <= 8.0 * (a / (1 - a)) ** 2 + 1e-5)
  err = np.linalg.norm(changes - predicted) / np.linalg.norm(changes)
  assert err < 0.5 * np.linalg.norm(changes - saliency) / np.linalg.norm(changes)


# ------------------------------------------------------------------ candidate losses and the plan

CANDIDATES = ((4.0, 0.0), (8.0, 0.0), (0.0, 0.5), (0.0, 1.0))
LENGTHS = (32, 64)


def planted_influence(L, weights, num_sink=1):
  """E [4, L, L]: heads with weight w > 0 need keys at distance >= 0.6 L (w per entry); the
  others only the last 3 keys."""
  i, j = np.arange(L)[:, None], np.arange(L)[None, :]
  d = i - j
  far = (d >= int(np.ceil(0.6 * L))) & (j >= num_sink)
  near = (d >= 0) & (d < 3)
  return np.stack([w * far if w > 0 else near.astype(float) for w in weights])


def test_candidate_losses_equal_span_loss():
  E = np.asarray(jax.random.normal(jax.random.key(3), (3, 24, 24)))
  fast = moa.candidate_losses(E, CANDIDATES, num_sink=2)
  for c, (a, b) in enumerate(CANDIDATES):
    np.testing.assert_allclose(fast[:, c], moa.span_loss(E, a, b, num_sink=2), rtol=1e-10)


def _plan_loss(E_by_length, plan, num_sink):
  total = 0.0
  for L, E in E_by_length.items():
    i, j = np.tril_indices(L)
    scale = np.abs(E[:, i, j][:, j >= num_sink]).sum()
    total += moa.span_loss(E, *plan, num_sink=num_sink).sum() / scale
  return total


@pytest.mark.parametrize("wide_heads", [1, 2])
def test_plan_meets_the_budget_and_gives_planted_heads_the_wide_spans(wide_heads):
  weights = (0.0, 1.0, 0.0, 2.0)  # heads 1 and 3 need far keys; head 3 twice as much
  E_by_length = {L: planted_influence(L, weights) for L in LENGTHS}
  small, full = CANDIDATES[0], CANDIDATES[3]
  # Room for `wide_heads` dense heads at every length, the rest at the smallest window.
  budget = max(
    (wide_heads * moa.density(*full, 1, L)[0] + (4 - wide_heads) * moa.density(*small, 1, L)[0]) / 4
    for L in LENGTHS
  )
  alphas, betas = moa.select_plan(E_by_length, CANDIDATES, budget, num_sink=1)
  plan = list(zip(alphas, betas, strict=True))
  wide = [3] if wide_heads == 1 else [1, 3]
  assert [h for h in range(4) if plan[h] == full] == wide
  for L in LENGTHS:
    assert np.mean(moa.density(alphas, betas, 1, L)) <= budget + 1e-9
  # Exhaustive search over the 4^4 plans agrees on the loss.
  best = min(
    _plan_loss(E_by_length, tuple(zip(*combo, strict=True)), 1)
    for combo in itertools.product(CANDIDATES, repeat=4)
    if all(np.mean(moa.density(*zip(*combo, strict=True), 1, L)) <= budget + 1e-9 for L in LENGTHS)
  )
  np.testing.assert_allclose(_plan_loss(E_by_length, (alphas, betas), 1), best, atol=1e-12)


def test_plan_is_usable_as_knobs():
  E_by_length = [planted_influence(L, (0.0, 1.0, 0.0, 2.0)) for L in LENGTHS]
  alphas, betas = moa.select_plan(E_by_length, CANDIDATES, 0.5, num_sink=1)
  q, k, v = random_qkv(4, 1, 16, 16, 4, 2, 8, 8)
  out = moa.attention(q, k, v, alphas=alphas, betas=betas, num_sink=1, implementation="xla")
  assert out.shape == (1, 16, 4, 8)


def test_select_plan_bad_input_raises_clearly():
  E = {32: planted_influence(32, (0.0, 1.0, 0.0, 2.0))}
  with pytest.raises(ValueError, match=r"density_budget=0.01 is below the sparsest"):
    moa.select_plan(E, CANDIDATES, 0.01, num_sink=1)
  with pytest.raises(ValueError, match=r"density_budget=1.5 must be in \(0, 1\]"):
    moa.select_plan(E, CANDIDATES, 1.5)
  with pytest.raises(ValueError, match=r"E_by_length\[64\] has length 32; key it by its L"):
    moa.select_plan({64: E[32]}, CANDIDATES, 0.5)
  with pytest.raises(ValueError, match=r"pass the influence \[N, L, L\]"):
    moa.select_plan([np.zeros((4, 8, 9))], CANDIDATES, 0.5)
  with pytest.raises(ValueError, match=r"candidates=\(\) must be a non-empty"):
    moa.select_plan(E, (), 0.5)
  with pytest.raises(ValueError, match=r"head counts \[4, 2\]"):
    moa.select_plan([E[32], np.zeros((2, 16, 16))], CANDIDATES, 0.5)


def test_profile_rejects_cross_attention():
  q, k, v = random_qkv(5, 1, 8, 12, 2, 1, 8, 8)
  with pytest.raises(ValueError, match=r"T=8 must equal S=12"):
    moa.profile(q, k, v, jnp.sum)
