"""BlockRank's own invariants (arXiv 2510.05396; spec: shared/papers/architecture.md §14.3).

The conformance suite (generated from the registry) covers shapes, jit, causality, GQA, masked
rows and chunked/pallas-vs-xla; here: documents isolated from each other (exactly), order
invariance of the query under the shared position ids, empty documents = causal attention, the
position ids, the contrastive loss on hand-computed cases, its gradients, the metrics and the
layer that reports them, and bad input."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnzoo import masks
from attnzoo.attention import dot_product_attention
from attnzoo.attention.sparse import blockrank
from attnzoo.masks.blockrank import PAD, QUERY, layout_from_lengths
from attnzoo.nn import attention_layer
from attnzoo.nn.positions import rope
from tests.tolerances import assert_close

IDS = layout_from_lengths(3, [4, 4, 5], 3)  # [I×3 | d1×4 | d2×4 | d3×5 | Q×3], T = 19
T = IDS.shape[0]


def qkv(seed=0, t=T, n=4, kv=2, h=8):
  kq, kk, kv_ = jax.random.split(jax.random.key(seed), 3)
  return (
    jax.random.normal(kq, (2, t, n, h)),
    jax.random.normal(kk, (2, t, kv, h)),
    jax.random.normal(kv_, (2, t, kv, h)),
  )


def run(q, k, v, implementation="xla", **kw):
  """The family, causal, jitted (eager dispatch of its many small ops is the slow part)."""
  kw.setdefault("layout", tuple(int(i) for i in IDS))
  call = functools.partial(blockrank.attention, is_causal=True, implementation=implementation, **kw)
  return jax.jit(call)(q, k, v)


# ------------------------------------------------------------------ the mask's invariants


@pytest.mark.parametrize("implementation", ["xla", "chunked"])
def test_documents_do_not_see_other_documents(implementation):
  q, k, v = qkv()
  other = IDS == 2
  noise = [jax.random.normal(jax.random.key(9 + i), x.shape) for i, x in enumerate((q, k, v))]
  changed = [
    jnp.where(other[None, :, None, None], x + 3 * e, x)
    for x, e in zip((q, k, v), noise, strict=True)
  ]
  out, _ = run(q, k, v, implementation)
  out2, _ = run(*changed, implementation)
  rows = (IDS == 0) | (IDS == 1) | (IDS == 3)
  # Masked keys contribute exact zeros: the rows are bit-identical, not merely close.
  np.testing.assert_array_equal(np.asarray(out)[:, rows], np.asarray(out2)[:, rows])
  assert np.abs(np.asarray(out - out2)[:, IDS == QUERY]).max() > 1e-3  # the query does see it


def test_family_equals_softmax_under_the_blockrank_mask():
  q, k, v = qkv(1)
  want = dot_product_attention(q, k, v, mask=masks.BlockRank(IDS), implementation="xla")
  for impl in ("xla", "chunked"):
    assert_close(run(q, k, v, impl)[0], want, err_msg=impl)


def test_query_is_invariant_to_document_order_with_shared_positions():
  ids = layout_from_lengths(2, [4, 4, 4], 3)
  q, k, v = qkv(2, t=ids.shape[0])
  perm = np.arange(ids.shape[0])
  perm[2:6], perm[6:10] = np.arange(6, 10), np.arange(2, 6)  # swap documents 1 and 2
  layout = tuple(int(i) for i in ids)

  def attend(positions, q, k, v):
    pos = jnp.broadcast_to(positions, (2, ids.shape[0]))
    return run(rope(q, pos), rope(k, pos), v, layout=layout)[0]

  shared = blockrank.blockrank_positions(ids)
  out, swapped = attend(shared, q, k, v), attend(shared, q[:, perm], k[:, perm], v[:, perm])
  query = ids == QUERY
  assert_close(swapped[:, query], out[:, query])
  assert_close(swapped, out[:, perm])
  # With ordinary positions the documents' order shows through RoPE.
  plain = jnp.arange(ids.shape[0])
  out, swapped = attend(plain, q, k, v), attend(plain, q[:, perm], k[:, perm], v[:, perm])
  assert np.abs(np.asarray(swapped - out)[:, query]).max() > 1e-3


def test_with_every_document_padded_the_query_is_causal_attention():
  ids = np.array([0, 0, 0, PAD, PAD, PAD, PAD, QUERY, QUERY, QUERY])
  q, k, v = qkv(3, t=10)
  out, _ = run(q, k, v, layout=tuple(int(i) for i in ids))
  real = ids != PAD
  want = dot_product_attention(q[:, real], k[:, real], v[:, real], is_causal=True)
  assert_close(out[:, real], want)
  np.testing.assert_array_equal(np.asarray(out)[:, ~real], 0.0)


# ------------------------------------------------------------------ position ids


def test_positions_follow_the_official_collate():
  ids = np.array([PAD, 0, 0, PAD, 1, 1, 2, 2, 2, PAD, QUERY, QUERY])
  want = [0, 0, 1, 0, 2, 3, 2, 3, 4, 0, 16384, 16385]
  np.testing.assert_array_equal(np.asarray(blockrank.blockrank_positions(ids)), want)
  batch = np.stack([ids, layout_from_lengths(1, [5, 3], 3)])
  got = jax.jit(blockrank.blockrank_positions)(jnp.asarray(batch))  # traced layouts too
  np.testing.assert_array_equal(
    np.asarray(got), [want, [0, 1, 2, 3, 4, 5, 1, 2, 3] + [16384 + i for i in range(3)]]
  )
  with pytest.raises(ValueError, match=r"query_offset=4 is below the 5 positions"):
    blockrank.blockrank_positions(ids[1:9], query_offset=4)


# ------------------------------------------------------------------ the contrastive loss

TINY = np.array([0, 1, 1, 2, QUERY, QUERY])  # documents: tokens 1-2 (doc 0), token 3 (doc 1)


def tiny(q_value, k_docs):
  """q [1,6,N,1] = q_value per head at every token; k [1,6,1,1] with k_docs at tokens 1-3."""
  q = jnp.broadcast_to(jnp.asarray(q_value, jnp.float32), (1, 6, len(q_value)))[..., None]
  k = jnp.zeros((1, 6, 1, 1)).at[0, 1:4, 0, 0].set(jnp.asarray(k_docs, jnp.float32))
  return q, k


@pytest.mark.parametrize(
  ("q_value", "k_docs", "sigma0"),
  [
    ([0.0], [0.0, 0.0, 0.0], 2 / 3),  # uniform over 3 doc tokens: σ = (2/3, 1/3)
    ([1.0], [math.log(2), 0.0, 0.0], 3 / 4),  # softmax (1/2, 1/4, 1/4): σ = (3/4, 1/4)
    ([0.0, 1.0], [math.log(2), 0.0, 0.0], 17 / 24),  # mean of both heads' softmaxes
  ],
)
def test_loss_on_hand_computed_cases(q_value, k_docs, sigma0):
  q, k = tiny(q_value, k_docs)
  gap = (2 * sigma0 - 1) / 0.05  # (σ_0 − σ_1) / τ
  for label, want, acc in (
    ([0], math.log1p(math.exp(-gap)), 1.0),
    ([1], math.log1p(math.exp(gap)), 0.0),
  ):
    loss, accuracy = blockrank.blockrank_contrastive_loss(q, k, TINY, np.array(label), scale=1.0)
    # fp32 difference of two log-sum-exps of logits σ/τ <= 20: about 20·eps absolute.
    np.testing.assert_allclose(float(loss), want, rtol=1e-5, atol=4e-6)
    assert float(accuracy) == acc
  # Both documents positive: numerator = denominator; −1 pads the official answer_ids.
  loss, _ = blockrank.blockrank_contrastive_loss(q, k, TINY, np.array([[0, 1]]), scale=1.0)
  np.testing.assert_allclose(float(loss), 0.0, atol=1e-6)
  loss, _ = blockrank.blockrank_contrastive_loss(q, k, TINY, np.array([[1, -1]]), scale=1.0)
  np.testing.assert_allclose(float(loss), math.log1p(math.exp(gap)), rtol=1e-5, atol=4e-6)


def test_loss_gradients_are_finite_and_reach_only_scoring_rows():
  ids = layout_from_lengths(2, [3, 2, 4], 4)
  q, k, _ = qkv(4, t=ids.shape[0])
  layout = jnp.asarray(np.stack([ids, ids]))

  @jax.jit
  def loss(q, k, layout, label):  # traced layout and labels
    return blockrank.blockrank_contrastive_loss(q, k, layout, label, num_docs=3)[0]

  label = jnp.array([[2, -1], [-1, -1]])  # the second example has no positive: left out
  dq, dk = jax.grad(loss, argnums=(0, 1))(q, k, layout, label)
  assert np.isfinite(np.asarray(dq)).all() and np.isfinite(np.asarray(dk)).all()
  scored = np.zeros(ids.shape[0], bool)
  scored[-2:] = True
  np.testing.assert_array_equal(np.asarray(dq)[:, ~scored], 0.0)
  np.testing.assert_array_equal(np.asarray(dq)[1], 0.0)
  assert np.abs(np.asarray(dq)[0, scored]).sum() > 0
  np.testing.assert_array_equal(np.asarray(dk)[:, ids <= 0], 0.0)  # only document keys


def test_metrics_are_the_loss_scores():
  q, k, v = qkv(5)
  _, aux = run(q, k, v)
  logits = blockrank.score_logits(q, k, jnp.array([[17, 18]] * 2), scale=1 / math.sqrt(8))
  sigma = blockrank.document_scores(
    logits, jnp.asarray(np.stack([IDS, IDS])), jnp.array([[17, 18]] * 2), 3
  )
  assert_close(aux.metrics["blockrank_top_doc"], jnp.mean(jnp.max(sigma, -1)))
  assert_close(jnp.sum(sigma, -1), jnp.ones(2))
  assert 0.0 < float(aux.metrics["blockrank_doc_mass"]) < 1.0
  assert 0.0 <= float(aux.metrics["blockrank_doc_entropy"]) <= math.log(3) + 1e-6
  _, quiet = run(q, k, v, report_scores=False)
  assert quiet.metrics == {}


@pytest.mark.parametrize(("num_layers", "layer"), [(32, 20), (4, 2), (1, 0)])
def test_the_paper_layer_reports_the_scores(num_layers, layer):
  reports = [
    blockrank.layer_knobs({}, layer=i, num_layers=num_layers, num_heads=2)["report_scores"]
    for i in range(num_layers)
  ]
  assert reports == [i == layer for i in range(num_layers)]
  last = blockrank.layer_knobs(
    {"score_layer": -1}, layer=num_layers - 1, num_layers=num_layers, num_heads=2
  )
  assert last == {"report_scores": True}


def test_attention_layer_reports_metrics_from_one_layer():
  make = lambda layer: attention_layer.Attention(
    16,
    num_heads=2,
    num_kv_heads=1,
    head_dim=8,
    family="blockrank",
    knobs={"block_len": 4},
    is_causal=True,
    layer=layer,
    num_layers=4,
    rngs=nnx.Rngs(0),
  )
  x = jax.random.normal(jax.random.key(0), (2, 16, 16))
  _, totals = attention_layer.run_with_aux(make(2), x)
  assert set(totals.metrics) == {"blockrank_doc_mass", "blockrank_top_doc", "blockrank_doc_entropy"}
  _, totals = attention_layer.run_with_aux(make(1), x)
  assert totals.metrics == {}


# ------------------------------------------------------------------ bad input


def test_bad_input_raises_naming_the_value_and_the_fix():
  q, k, v = qkv()
  with pytest.raises(ValueError, match=r"layout has 19 tokens but the call has T=20"):
    blockrank.attention(*qkv(t=20), layout=tuple(int(i) for i in IDS))
  with pytest.raises(ValueError, match=r"layout\[4\]=0 follows"):
    run(q, k, v, layout=(0, 1, 1, 1) + (0,) * 15)
  with pytest.raises(ValueError, match="not 'I|d1"):
    run(q, k, v, layout="3;4")
  with pytest.raises(ValueError, match=r"block_len=0 must be >= 1"):
    blockrank.attention(q, k, v, block_len=0)
  with pytest.raises(ValueError, match=r"score_layer=7 is not a layer of this 4-layer model"):
    blockrank.layer_knobs({"score_layer": 7}, layer=0, num_layers=4, num_heads=2)
  loss = blockrank.blockrank_contrastive_loss
  with pytest.raises(ValueError, match=r"without a positive document in \[0, 3\)"):
    loss(q, k, IDS, np.array([0, 3]))
  with pytest.raises(ValueError, match="score_positions contains 5, which is not a query token"):
    loss(q, k, IDS, np.array([0, 1]), score_positions=np.array([5, 18]))
  with pytest.raises(ValueError, match=r"3 query token\(s\) but score_tokens=4"):
    loss(q, k, IDS, np.array([0, 1]), score_tokens=4)
  with pytest.raises(ValueError, match="pass num_docs=n"):
    jax.jit(lambda ids: loss(q, k, ids, jnp.array([0, 1])))(jnp.asarray(IDS))
  with pytest.raises(ValueError, match=r"temperature=0.0 must be > 0"):
    loss(q, k, IDS, np.array([0, 1]), temperature=0.0)
